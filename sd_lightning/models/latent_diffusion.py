"""LatentDiffusionModule: encode → sample timesteps → add noise → predict → objective loss → log."""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.models.attention_processor import AttnProcessor
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from sd_lightning.data.split import stable_seed
from sd_lightning.diffusion.losses import MSELoss
from sd_lightning.diffusion.noise import GaussianNoise, Randomness, draw
from sd_lightning.diffusion.objectives import Objective
from sd_lightning.diffusion.schedules import sampling_scheduler
from sd_lightning.diffusion.timesteps import UniformTimestepSampler
from sd_lightning.diffusion.weighting import UniformWeighting
from sd_lightning.models.builders import DiffusionComponents
from sd_lightning.models.checkpoint_io import RECORD_KEY, component_record, pipeline_from_components
from sd_lightning.models.lora import LoraSpec, inject_lora
from sd_lightning.optim import configure_optimization
from sd_lightning.optim.optimizers import split_weight_decay

log = logging.getLogger(__name__)

DEFAULT_SAMPLING = {"scheduler": "ddim", "steps": 30, "guidance_scale": 1.25}


def _float64_collection(prefix: str) -> MetricCollection:
    collection = MetricCollection(
        {"mse": MeanSquaredError(), "rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError(), "r2": R2Score()},
        prefix=prefix,
    )
    return collection.set_dtype(torch.float64)


def _standard_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(like.shape), generator=generator)

class LatentDiffusionModule(L.LightningModule):
    """Trains a UNet to denoise VAE latents conditioned on text; the VAE (and by default the text encoder) are frozen.

    Randomness in a training step (timesteps, noise, condition dropout, latent sampling) is drawn from a
    generator seeded by (seed, epoch, batch index, rank), so a resumed run draws exactly what the uninterrupted
    run drew. Validation uses fixed timesteps and noise seeded by each sample's id, so its numbers depend
    only on the weights.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        weighting: Callable[..., torch.Tensor] | None = None,
        timestep_sampler: Callable[[int, torch.Generator], torch.Tensor] | None = None,
        noise_sampler: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        input_perturbation: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        rescale_betas_zero_snr: bool = False,
        cond_drop_prob: float = 0.1,
        train_text_encoder: bool = False,
        val_timesteps: Sequence[int] = (100, 300, 500, 700, 900),
        sampling: dict[str, Any] | None = None,
        prompt_cache_size: int = 1024,
        seed: int = 0,
        path: str | None = None,
        exclude_from_weight_decay: bool = False,
        gradient_checkpointing: bool = False,
        attention: str = "sdpa",
        lora: LoraSpec | None = None,
        channels_last: bool = False,
        compile: str | None = None,
    ) -> None:
        """``path`` records the pretrained folder the components came from (``model=pretrained``).

        ``channels_last`` stores the UNet's convolution weights NHWC; ``compile`` (a ``torch.compile`` backend
        such as ``inductor``) compiles the UNet in place, keeping its parameter names. Both are speed knobs whose
        effect ``experiments/benchmark.py`` measures; exports and checkpoints are unaffected.

        ``lora`` trains peft LoRA adapters instead of the UNet (and, with ``lora.text_encoder``, of the text
        encoder): the base weights are frozen, and only the adapters reach the optimizer and EMA.
        """
        super().__init__()
        if not 0.0 <= cond_drop_prob <= 1.0:
            raise ValueError(f"model.cond_drop_prob must be in [0, 1], got {cond_drop_prob}")
        self.unet = components.unet
        self.vae = components.vae
        self.text_encoder = components.text_encoder
        self.tokenizer = components.tokenizer
        self.tokenizer_source = components.tokenizer_source
        self.objective = objective
        if rescale_betas_zero_snr and objective.prediction_type == "epsilon":
            raise ValueError(
                "noise=zero_terminal_snr makes the last timestep pure noise, where an epsilon target is undefined: "
                "use objective=v_prediction (Lin et al. 2023)"
            )
        self.noise_scheduler = DDPMScheduler.from_config(
            components.noise_scheduler.config,
            prediction_type=objective.prediction_type,
            rescale_betas_zero_snr=rescale_betas_zero_snr or components.noise_scheduler.config.get("rescale_betas_zero_snr", False),
        )
        num_train_timesteps = self.noise_scheduler.config.num_train_timesteps
        bad = [t for t in val_timesteps if not 0 <= t < num_train_timesteps]
        if bad:
            raise ValueError(f"model.val_timesteps {bad} outside [0, {num_train_timesteps})")
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.loss = loss or MSELoss()
        self.weighting = weighting or UniformWeighting()
        self.timestep_sampler = timestep_sampler or UniformTimestepSampler(num_train_timesteps)
        self.noise_sampler = noise_sampler or GaussianNoise()
        self.input_perturbation = input_perturbation
        self.exclude_from_weight_decay = exclude_from_weight_decay
        if attention not in ("sdpa", "classic"):
            raise ValueError(f"model.attention={attention!r} must be 'sdpa' or 'classic'")
        if attention == "classic":
            self.unet.set_attn_processor(AttnProcessor())
        if gradient_checkpointing:
            self.unet.enable_gradient_checkpointing()
        if channels_last:
            self.unet.to(memory_format=torch.channels_last)
        if compile:
            self.unet.compile(backend=compile)
        self.cond_drop_prob = cond_drop_prob
        self.lora = lora
        # Text-encoder adapters are trained weights: the encoder runs in train mode and is not memoized.
        self.train_text_encoder = train_text_encoder or bool(lora and lora.text_encoder)
        self.val_timesteps = tuple(int(t) for t in val_timesteps)
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.seed = seed
        self.prompt_cache_size = prompt_cache_size
        self._prompt_cache: OrderedDict[str, torch.Tensor] = OrderedDict()
        self._checked_prompts: set[str] = set()
        self.register_buffer("alphas_cumprod", self.noise_scheduler.alphas_cumprod.clone().float(), persistent=False)
        self._freeze()
        if lora is not None:
            inject_lora(self.unet, self.text_encoder, lora)
        # LoRA on a pretrained folder: checkpoints hold the adapters only, the frozen base is reread from ``path``.
        self.adapters_only_checkpoints = lora is not None and path is not None and not lora.save_base_weights
        self.strict_loading = not self.adapters_only_checkpoints
        self.val_metrics = _float64_collection("val/")
        self.val_sample_metrics = MetricCollection({"x0_mse": MeanSquaredError()}, prefix="val/").set_dtype(torch.float64)
        self.val_timestep_metrics = torch.nn.ModuleDict(
            {str(t): MeanSquaredError().set_dtype(torch.float64) for t in self.val_timesteps}
        )
        self.save_hyperparameters(
            {
                "objective": repr(objective),
                "loss": repr(self.loss),
                "weighting": repr(self.weighting),
                "timestep_sampler": repr(self.timestep_sampler),
                "noise_sampler": repr(self.noise_sampler),
                "input_perturbation": repr(input_perturbation),
                "rescale_betas_zero_snr": bool(self.noise_scheduler.config.rescale_betas_zero_snr),
                "gradient_checkpointing": gradient_checkpointing,
                "attention": attention,
                "channels_last": channels_last,
                "compile": compile,
                "cond_drop_prob": cond_drop_prob,
                "train_text_encoder": self.train_text_encoder,
                "lora": None if lora is None else lora.to_dict(),
                "val_timesteps": list(self.val_timesteps),
                "sampling": dict(self.sampling),
                "seed": seed,
                "path": path,
            }
        )

    def _freeze(self) -> None:
        """Frozen parts live here only: no gradients, eval mode, and kept out of the optimizer and EMA."""
        self.vae.requires_grad_(False)
        self.vae.eval()
        self.text_encoder.requires_grad_(self.train_text_encoder)
        if not self.train_text_encoder:
            self.text_encoder.eval()

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.vae.eval()
        if not self.train_text_encoder:
            self.text_encoder.eval()
        return self

    def state_dict(self, *args: Any, **kwargs: Any) -> dict[str, Any]:
        """All weights, or only the trained ones with ``adapters_only_checkpoints`` (what a checkpoint then holds)."""
        state = super().state_dict(*args, **kwargs)
        if getattr(self, "adapters_only_checkpoints", False):
            prefix = kwargs.get("prefix", "")
            trained = {prefix + name for name, p in self.named_parameters() if p.requires_grad}
            for key in [k for k in state if k not in trained]:
                del state[key]
        return state

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        params = list(self.unet.parameters())
        if self.train_text_encoder:
            params += list(self.text_encoder.parameters())
        return [p for p in params if p.requires_grad]

    # ----------------------------------------------------------------------------------------- encoding
    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    def encode_images(self, pixel_values: torch.Tensor, generator: Randomness | None = None) -> torch.Tensor:
        """VAE latents times the scaling factor; a posterior sample when a generator is given, else its mode."""
        with torch.no_grad():
            posterior = self.vae.encode(pixel_values).latent_dist
            if generator is None:
                latents = posterior.mode()
            else:
                eps = draw(generator, posterior.mean, _standard_normal).to(posterior.mean)
                latents = posterior.mean + posterior.std * eps
        return latents * self.latent_scale

    def batch_latents(self, batch: dict[str, Any], generator: Randomness | None = None) -> torch.Tensor:
        """``encode_images`` of the batch's pixels, or, for a ``data.cache`` batch, the same from its stored posterior.

        A cached batch carries the unscaled posterior mean (``latents``) and ``latents_std`` and never calls the
        VAE; the sample is drawn as ``encode_images`` draws it, so both give the same latents for one generator.
        """
        if "latents" not in batch:
            return self.encode_images(batch["pixel_values"], generator)
        latents = batch["latents"]
        if generator is not None:
            eps = draw(generator, latents, _standard_normal).to(latents)
            latents = latents + batch["latents_std"] * eps
        return latents * self.latent_scale

    def batch_hidden_states(self, batch: dict[str, Any], prompts: Sequence[str]) -> torch.Tensor:
        """``encode_prompts(prompts)``; a cached batch carries the states of its prompts and of the null prompt."""
        if "encoder_hidden_states" not in batch:
            return self.encode_prompts(prompts)
        if self.train_text_encoder:
            raise ValueError("data.cache holds frozen text-encoder outputs, but the text encoder trains "
                             "(model.train_text_encoder / model.lora.text_encoder): set data.cache=null")
        dropped = torch.tensor([p == "" for p in prompts], device=batch["encoder_hidden_states"].device)
        return torch.where(dropped[:, None, None], batch["null_encoder_hidden_states"], batch["encoder_hidden_states"])

    def tokenize(self, prompts: Sequence[str]) -> torch.Tensor:
        """Token ids padded to the text encoder's length; prompts longer than that are cut with a warning."""
        unseen = [p for p in dict.fromkeys(prompts) if p not in self._checked_prompts]
        if unseen:
            limit = self.tokenizer.model_max_length
            for prompt, ids in zip(unseen, self.tokenizer(unseen, truncation=False).input_ids):
                if len(ids) > limit:
                    log.warning("prompt truncated to %d tokens (it has %d): %.80r…", limit, len(ids), prompt)
            self._checked_prompts.update(unseen)
            if len(self._checked_prompts) > 100_000:
                self._checked_prompts.clear()
        return self.tokenizer(
            list(prompts),
            padding="max_length",
            max_length=self.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids

    def encode_prompts(self, prompts: Sequence[str]) -> torch.Tensor:
        """Text-encoder hidden states, as StableDiffusionPipeline computes them; memoized while frozen."""
        if self.train_text_encoder:
            return self.text_encoder(self.tokenize(prompts).to(self.device))[0]
        missing = list(dict.fromkeys(p for p in prompts if p not in self._prompt_cache))
        if missing:
            with torch.no_grad():
                states = self.text_encoder(self.tokenize(missing).to(self.device))[0]
            for prompt, state in zip(missing, states):
                self._prompt_cache[prompt] = state
            while len(self._prompt_cache) > self.prompt_cache_size:
                self._prompt_cache.popitem(last=False)
        for prompt in prompts:
            self._prompt_cache.move_to_end(prompt)
        return torch.stack([self._prompt_cache[p] for p in prompts])

    def drop_conditions(self, prompts: Sequence[str], generator: Randomness) -> list[str]:
        """Replace prompts by the empty prompt with probability ``cond_drop_prob`` (classifier-free guidance)."""
        keep = draw(generator, len(prompts), lambda n, g: torch.rand(n, generator=g)) >= self.cond_drop_prob
        return [p if k else "" for p, k in zip(prompts, keep.tolist())]

    def step_generator(self, batch_idx: int) -> torch.Generator:
        """Seeded by (seed, epoch, batch, rank): distinct for every micro-batch, identical after a resume."""
        return torch.Generator().manual_seed(
            stable_seed(self.seed, "train", self.current_epoch, batch_idx, self.global_rank)
        )

    def sample_generators(self, batch: dict[str, Any], batch_idx: int) -> Randomness:
        """One generator per sample, seeded by (seed, epoch, sample id), so a step's noise, timesteps and
        condition dropout do not depend on batch size, batch position or the number of processes, and are
        identical after a resume. Batches without ids fall back to ``step_generator``."""
        ids = batch.get("id")
        if not ids:
            return self.step_generator(batch_idx)
        return [torch.Generator().manual_seed(stable_seed(self.seed, "train", self.current_epoch, i)) for i in ids]

    # ----------------------------------------------------------------------------------------- training
    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, encoder_hidden_states: torch.Tensor) -> torch.Tensor:
        return self.unet(noisy_latents, timesteps, encoder_hidden_states).sample

    def diffusion_loss(self, batch: dict[str, Any], generator: Randomness) -> torch.Tensor:
        """Per-sample weighted loss [B] for one batch."""
        latents = self.batch_latents(batch, generator)
        prompts = self.drop_conditions(batch["prompt"], generator)
        encoder_hidden_states = self.batch_hidden_states(batch, prompts)
        noise = draw(generator, latents, self.noise_sampler)
        timesteps = draw(generator, latents.shape[0], self.timestep_sampler).to(self.device)
        input_noise = noise if self.input_perturbation is None else draw(generator, noise, self.input_perturbation)
        noisy_latents = self.noise_scheduler.add_noise(latents, input_noise, timesteps)
        model_output = self(noisy_latents, timesteps, encoder_hidden_states)
        target = self.objective.target(latents, noise, timesteps, self.alphas_cumprod)
        return self.loss(model_output, target) * self.weighting(timesteps, self.alphas_cumprod, self.objective)

    def on_train_epoch_start(self) -> None:
        datamodule = getattr(self.trainer, "datamodule", None)
        if hasattr(datamodule, "set_epoch"):
            datamodule.set_epoch(self.current_epoch)

    @staticmethod
    def batch_size(batch: dict[str, Any]) -> int:
        """Images in a batch of pixels or of cached latents (0 when every image was unreadable)."""
        return (batch["latents"] if "latents" in batch else batch["pixel_values"]).shape[0]

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.batch_size(batch) == 0:
            return None
        loss = self.diffusion_loss(batch, self.sample_generators(batch, batch_idx)).mean()
        batch_size = self.batch_size(batch)
        if not torch.isfinite(loss):
            return None  # NonFiniteGuardCallback counts the skipped step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        if batch.get("num_skipped", 0):
            self.log("data/skipped_images", float(batch["num_skipped"]), reduce_fx="sum", batch_size=batch_size)
        return loss

    # --------------------------------------------------------------------------------------- validation
    def validation_noise(self, ids: Sequence[str], shape: Sequence[int]) -> torch.Tensor:
        """Noise for each validation sample, fixed by its id (not by batch position or process)."""
        noises = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(stable_seed("val", i))) for i in ids]
        return torch.stack(noises).to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        if self.batch_size(batch) == 0:
            return
        latents = self.batch_latents(batch)
        encoder_hidden_states = self.batch_hidden_states(batch, batch["prompt"])
        noise_all = self.validation_noise(batch["id"], (len(self.val_timesteps), *latents.shape[1:]))
        for index, t in enumerate(self.val_timesteps):
            noise = noise_all[:, index]
            timesteps = torch.full((latents.shape[0],), t, device=self.device, dtype=torch.long)
            noisy_latents = self.noise_scheduler.add_noise(latents, noise, timesteps)
            model_output = self(noisy_latents, timesteps, encoder_hidden_states)
            eps_hat = self.objective.to_epsilon(model_output, noisy_latents, timesteps, self.alphas_cumprod)
            x0_hat = self.objective.to_sample(model_output, noisy_latents, timesteps, self.alphas_cumprod)
            eps_hat, noise = eps_hat.double(), noise.double()
            self.val_metrics.update(eps_hat.flatten(), noise.flatten())
            self.val_sample_metrics.update(x0_hat.double().flatten(), latents.double().flatten())
            self.val_timestep_metrics[str(t)].update(eps_hat.flatten(), noise.flatten())

    def on_validation_epoch_end(self) -> None:
        values = {**self.val_metrics.compute(), **self.val_sample_metrics.compute()}
        values.update({f"val/mse_t{t}": m.compute() for t, m in self.val_timestep_metrics.items()})
        self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=False)
        self.val_metrics.reset()
        self.val_sample_metrics.reset()
        for metric in self.val_timestep_metrics.values():
            metric.reset()

    # --------------------------------------------------------------------------------------- generation
    def build_pipeline(self, scheduler: str | None = None) -> StableDiffusionPipeline:
        """A plain diffusers pipeline over this module's parts (the same object sdl-export writes)."""
        components = DiffusionComponents(
            self.unet, self.vae, self.text_encoder, self.tokenizer, self.noise_scheduler, self.tokenizer_source
        )
        name = scheduler or self.sampling["scheduler"]
        return pipeline_from_components(components, sampling_scheduler(name, self.noise_scheduler.config))

    # --------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        params: Any = self.trainable_parameters()
        if self.exclude_from_weight_decay:
            wanted = {id(p) for p in params}
            params = split_weight_decay([(n, p) for n, p in self.named_parameters() if id(p) in wanted])
        return configure_optimization(
            self.optimizer_factory,
            self.lr_scheduler_factory,
            params,
            int(self.trainer.estimated_stepping_batches),
        )

    # ------------------------------------------------------------------------------------- checkpoints
    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = component_record(self)
