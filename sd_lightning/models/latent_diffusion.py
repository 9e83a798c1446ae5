"""LatentDiffusionModule: encode → draw t and noise → noisy input → denoise → objective target → weighted loss → log.

The module composes pieces and never branches on their names: the objective owns the diffusion process, the
timestep distribution draws t, the weighting asks the objective for SNR or σ, the denoiser takes
``(noisy_latents, timesteps, conditioning)`` whatever its backbone, and the conditioner owns prompts, the null
condition and its dropout.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torchmetrics import MeanAbsoluteError, MeanSquaredError, MetricCollection, R2Score

from sd_lightning.data.split import stable_seed
from sd_lightning.diffusion.losses import MSELoss
from sd_lightning.diffusion.noise import GaussianNoise, Randomness, draw
from sd_lightning.diffusion.objectives import Objective
from sd_lightning.diffusion.sampling import DEFAULT_GUIDANCE_SCALE
from sd_lightning.diffusion.timesteps import UniformTimesteps
from sd_lightning.diffusion.weighting import UniformWeighting
from sd_lightning.models.builders import DiffusionComponents
from sd_lightning.models.checkpoint_io import RECORD_KEY, ModelRecord
from sd_lightning.models.pipelines import build_pipeline
from sd_lightning.optim import configure_optimization
from sd_lightning.optim.optimizers import split_weight_decay

DEFAULT_SAMPLING = {"scheduler": "ddim", "steps": 30, "guidance_scale": DEFAULT_GUIDANCE_SCALE}


def _float64_collection(prefix: str) -> MetricCollection:
    collection = MetricCollection(
        {"mse": MeanSquaredError(), "rmse": MeanSquaredError(squared=False), "mae": MeanAbsoluteError(), "r2": R2Score()},
        prefix=prefix,
    )
    return collection.set_dtype(torch.float64)


def _standard_normal(like: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.randn(tuple(like.shape), generator=generator)


class LatentDiffusionModule(L.LightningModule):
    """Trains a denoiser on VAE latents under a conditioner; the VAE (and by default the text encoder) is frozen.

    Every random draw of a training step (latent sample, condition dropout, noise, timesteps) comes from one
    generator per sample seeded by (seed, epoch, sample id) — batches without ids use one generator seeded by
    (seed, epoch, batch index, rank) — so a resumed run draws exactly what the uninterrupted run drew and N
    processes draw what one process draws. Validation uses fixed timesteps and noise seeded by each sample's id.
    """

    def __init__(
        self,
        components: DiffusionComponents,
        objective: Objective,
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable[..., Any] | None = None,
        loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        weighting: Callable[..., torch.Tensor] | None = None,
        timesteps: Callable[[int, torch.Generator], torch.Tensor] | None = None,
        noise: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        input_perturbation: Callable[[torch.Tensor, torch.Generator], torch.Tensor] | None = None,
        val_timesteps: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
        sampling: dict[str, Any] | None = None,
        seed: int = 0,
        path: str | None = None,
        exclude_from_weight_decay: bool = False,
        prior_loss_weight: float = 1.0,
    ) -> None:
        """``val_timesteps`` are fractions of the objective's time domain; ``path`` records a pretrained folder;
        ``prior_loss_weight`` weighs the class images of DreamBooth batches (``batch_loss``)."""
        super().__init__()
        self.denoiser = components.denoiser
        self.vae = components.vae
        self.conditioner = components.conditioner
        self.adapter = components.adapter
        self.textual_inversion = components.textual_inversion
        if prior_loss_weight < 0:
            raise ValueError(f"model.prior_loss_weight={prior_loss_weight} must be >= 0")
        self.prior_loss_weight = prior_loss_weight
        self.objective = objective
        self.optimizer_factory = optimizer
        self.lr_scheduler_factory = lr_scheduler
        self.loss = loss or MSELoss()
        self.weighting = weighting or UniformWeighting()
        self.timestep_distribution = timesteps or UniformTimesteps()
        self.noise = noise or GaussianNoise()
        self.input_perturbation = input_perturbation or None  # the `none` option is an empty config
        self.exclude_from_weight_decay = exclude_from_weight_decay
        bad = [u for u in val_timesteps if not 0.0 < float(u) < 1.0]
        if bad:
            raise ValueError(f"model.val_timesteps {bad} must be fractions in (0, 1) of the objective's time domain")
        self.val_fractions = tuple(float(u) for u in val_timesteps)
        self.sampling = {**DEFAULT_SAMPLING, **(sampling or {})}
        self.sampling["scheduler"] = self.sampling["scheduler"] or objective.default_sampler
        # What the family pipeline's call needs besides these (SD 3: max_sequence_length), exported with them.
        self.sampling["pipeline_kwargs"] = {**self.conditioner.pipeline_call_kwargs(),
                                            **self.sampling.get("pipeline_kwargs", {})}
        self.objective.sampling_scheduler(self.sampling["scheduler"])  # refuse a sampler the objective cannot use
        self.weighting(self.objective.timesteps(torch.tensor([0.5])), self.objective)  # … and a weighting
        self.seed = seed
        self.path = path
        # Adapters on a pretrained folder: checkpoints hold the adapters only, the frozen base is reread from ``path``.
        self.adapters_only_checkpoints = (self.adapter is not None and path is not None
                                          and not self.adapter.save_base_weights)
        self.strict_loading = not self.adapters_only_checkpoints
        self.val_metrics = _float64_collection("val/")
        self.val_sample_metrics = MetricCollection({"x0_mse": MeanSquaredError()}, prefix="val/").set_dtype(torch.float64)
        self.val_timestep_metrics = torch.nn.ModuleDict(
            {self.timestep_label(u): MeanSquaredError().set_dtype(torch.float64) for u in self.val_fractions}
        )
        # Not logged: the loggers get the whole resolved run config (train.py), which these reprs would overwrite.
        self.save_hyperparameters({
            "objective": repr(objective), "loss": repr(self.loss), "weighting": repr(self.weighting),
            "timesteps": repr(self.timestep_distribution), "noise": repr(self.noise),
            "input_perturbation": repr(input_perturbation), "denoiser": type(self.denoiser).__name__,
            "drop_prob": self.conditioner.drop_prob, "train_text_encoder": self.conditioner.trains,
            "adapter": None if self.adapter is None else self.adapter.to_record(),
            "val_timesteps": list(self.val_fractions), "sampling": dict(self.sampling), "seed": seed, "path": path,
        }, logger=False)

    @staticmethod
    def timestep_label(fraction: float) -> str:
        return str(round(fraction * 1000))

    def train(self, mode: bool = True) -> LatentDiffusionModule:
        super().train(mode)
        self.vae.eval()
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
        """The denoiser's and (when it trains) the text encoder's weights: what the optimizer and EMA see."""
        params = [*self.denoiser.parameters(), *self.conditioner.parameters()]
        return [p for p in params if p.requires_grad]

    # ------------------------------------------------------------------------------------- frozen encoders
    @property
    def components(self) -> DiffusionComponents:
        return DiffusionComponents(self.denoiser, self.vae, self.conditioner, self.adapter, self.textual_inversion)

    @property
    def latent_scale(self) -> float:
        return float(self.vae.config.scaling_factor)

    @property
    def latent_shift(self) -> float:
        return float(getattr(self.vae.config, "shift_factor", None) or 0.0)

    # What ``sdl-data cache`` reads (data.cache.FrozenEncoders).
    @property
    def text_encoder(self) -> torch.nn.Module:
        return self.conditioner.text_encoder

    @property
    def tokenizer(self) -> Any:
        return self.conditioner.tokenizer

    @property
    def text_encoders(self) -> list[torch.nn.Module]:
        return self.conditioner.text_encoders

    @property
    def tokenizers(self) -> list[Any]:
        return self.conditioner.tokenizers

    @property
    def conditioner_kind(self) -> str:
        """The conditioner's kind and the settings that shape its outputs (drop_prob does not: it acts later)."""
        options = {k: v for k, v in self.conditioner.options().items() if k not in ("drop_prob", "train_text_encoder")}
        return f"{self.conditioner.kind} {sorted(options.items())}"

    @property
    def train_text_encoder(self) -> bool:
        return self.conditioner.trains

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]:
        return self.conditioner(prompts)

    def encode_images(self, pixel_values: torch.Tensor, generator: Randomness | None = None) -> torch.Tensor:
        """Scaled VAE latents; a posterior sample when a generator is given, else its mode."""
        with torch.no_grad():
            posterior = self.vae.encode(pixel_values).latent_dist
            latents = posterior.mode()
            if generator is not None:
                latents = posterior.mean + posterior.std * draw(generator, posterior.mean, _standard_normal).to(latents)
        return (latents - self.latent_shift) * self.latent_scale

    def batch_latents(self, batch: dict[str, Any], generator: Randomness | None = None) -> torch.Tensor:
        """``encode_images`` of the batch's pixels, or, for a ``data.cache`` batch, the same from its stored posterior."""
        if "latents" not in batch:
            return self.encode_images(batch["pixel_values"], generator)
        latents = batch["latents"]
        if generator is not None:
            latents = latents + batch["latents_std"] * draw(generator, latents, _standard_normal).to(latents)
        return (latents - self.latent_shift) * self.latent_scale

    # ----------------------------------------------------------------------------------------- training
    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: dict[str, torch.Tensor]
                ) -> torch.Tensor:
        return self.denoiser(noisy_latents, timesteps, conditioning)

    def diffusion_loss(self, batch: dict[str, Any], generator: Randomness) -> torch.Tensor:
        """Per-sample weighted loss [B] for one batch."""
        latents = self.batch_latents(batch, generator)
        conditioning = self.conditioner.from_batch(batch, self.conditioner.drop(batch["prompt"], generator))
        noise = draw(generator, latents, self.noise)
        timesteps = self.objective.timesteps(draw(generator, latents.shape[0], self.timestep_distribution)).to(self.device)
        input_noise = noise if self.input_perturbation is None else draw(generator, noise, self.input_perturbation)
        noisy_latents = self.objective.noisy(latents, input_noise, timesteps)
        prediction = self(noisy_latents, timesteps, conditioning)
        target = self.objective.target(latents, noise, timesteps)
        mask = batch.get("loss_mask")
        if mask is None:  # a user's loss may take (prediction, target) only
            return self.loss(prediction, target) * self.weighting(timesteps, self.objective)
        # data.masks: the pixels' weights averaged over each latent cell
        mask = torch.nn.functional.interpolate(mask.to(prediction), size=prediction.shape[-2:], mode="area")
        return self.loss(prediction, target, mask) * self.weighting(timesteps, self.objective)

    def sample_generators(self, batch: dict[str, Any], batch_idx: int) -> Randomness:
        """One generator per sample, seeded by (seed, epoch, sample id); without ids, one per (epoch, batch, rank)."""
        ids = batch.get("id")
        if not ids:
            return torch.Generator().manual_seed(
                stable_seed(self.seed, "train", self.current_epoch, batch_idx, self.global_rank))
        return [torch.Generator().manual_seed(stable_seed(self.seed, "train", self.current_epoch, i)) for i in ids]

    @staticmethod
    def batch_size(batch: dict[str, Any]) -> int:
        """Images in a batch of pixels or of cached latents (0 when every image was unreadable)."""
        return (batch["latents"] if "latents" in batch else batch["pixel_values"]).shape[0]

    def _skipped(self, loss: torch.Tensor | None) -> torch.Tensor | None:
        """A step to skip. One process: no loss (Lightning skips it). Data-parallel: Lightning refuses a missing loss,
        so the step returns a non-finite one through every trained weight; the gradient all-reduce carries it to
        every process, and NonFiniteGuardCallback drops the gradients everywhere (the skip is counted once)."""
        if self.trainer.world_size == 1:
            return None
        if loss is None:
            loss = torch.stack([p.sum() for p in self.trainable_parameters()]).sum() * float("nan")
        return loss

    def batch_loss(self, losses: torch.Tensor, batch: dict[str, Any]) -> dict[str, torch.Tensor]:
        """The step's loss from the per-sample losses: their mean; for DreamBooth pairs (``prior`` flags the class
        images) the instance images' mean plus ``prior_loss_weight`` × the class images' mean."""
        prior = batch.get("prior")
        if prior is None:
            return {"loss": losses.mean()}
        prior = prior.to(losses.device)
        instance, classes = losses[~prior].mean(), losses[prior].mean()
        return {"loss": instance + self.prior_loss_weight * classes, "instance_loss": instance, "prior_loss": classes}

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        if self.batch_size(batch) == 0:
            return self._skipped(None)  # every image of this batch was unreadable
        parts = self.batch_loss(self.diffusion_loss(batch, self.sample_generators(batch, batch_idx)), batch)
        loss = parts.pop("loss")
        batch_size = self.batch_size(batch)
        if not torch.isfinite(loss):
            return self._skipped(loss)  # NonFiniteGuardCallback counts the skipped step
        self.log("train/loss", loss, prog_bar=True, batch_size=batch_size)
        for name, value in parts.items():
            self.log(f"train/{name}", value, batch_size=batch_size)
        if batch.get("num_skipped", 0):
            self.log("data/skipped_images", float(batch["num_skipped"]), reduce_fx="sum", batch_size=batch_size)
        return loss

    # --------------------------------------------------------------------------------------- validation
    def validation_noise(self, ids: Sequence[str], shape: Sequence[int]) -> torch.Tensor:
        """Noise for each validation sample, fixed by its id (not by batch position or process)."""
        noises = [torch.randn(tuple(shape), generator=torch.Generator().manual_seed(stable_seed("val", i))) for i in ids]
        return torch.stack(noises).to(self.device)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        """Every objective reports in the common spaces: ε̂ against ε, and x̂0 against x0."""
        if self.batch_size(batch) == 0:
            return
        latents = self.batch_latents(batch)
        conditioning = self.conditioner.from_batch(batch, batch["prompt"])
        noise_all = self.validation_noise(batch["id"], (len(self.val_fractions), *latents.shape[1:]))
        for index, fraction in enumerate(self.val_fractions):
            noise = noise_all[:, index]
            u = torch.full((latents.shape[0],), fraction)
            timesteps = self.objective.timesteps(u).to(self.device)
            noisy_latents = self.objective.noisy(latents, noise, timesteps)
            prediction = self(noisy_latents, timesteps, conditioning)
            eps_hat = self.objective.to_epsilon(prediction, noisy_latents, timesteps).double()
            x0_hat = self.objective.to_sample(prediction, noisy_latents, timesteps).double()
            noise = noise.double()
            self.val_metrics.update(eps_hat.flatten(), noise.flatten())
            self.val_sample_metrics.update(x0_hat.flatten(), latents.double().flatten())
            self.val_timestep_metrics[self.timestep_label(fraction)].update(eps_hat.flatten(), noise.flatten())

    def on_validation_epoch_end(self) -> None:
        values = {**self.val_metrics.compute(), **self.val_sample_metrics.compute()}
        values.update({f"val/mse_t{t}": m.compute() for t, m in self.val_timestep_metrics.items()})
        self.log_dict({k: v.float() for k, v in values.items()}, sync_dist=False)
        self.val_metrics.reset()
        self.val_sample_metrics.reset()
        for metric in self.val_timestep_metrics.values():
            metric.reset()

    # --------------------------------------------------------------------------------------- generation
    def build_pipeline(self, scheduler: str | None = None) -> Any:
        """The family's diffusers pipeline over this module's parts (what sdl-export writes), or LatentSampler."""
        return build_pipeline(self.components, self.objective, scheduler or self.sampling["scheduler"])

    # --------------------------------------------------------------------------------------- optimizers
    def configure_optimizers(self) -> Any:
        params: Any = self.trainable_parameters()
        if self.exclude_from_weight_decay:
            wanted = {id(p) for p in params}
            params = split_weight_decay([(n, p) for n, p in self.named_parameters() if id(p) in wanted])
        return configure_optimization(self.optimizer_factory, self.lr_scheduler_factory, params,
                                      int(self.trainer.estimated_stepping_batches))

    # ------------------------------------------------------------------------------------- checkpoints
    def record(self) -> ModelRecord:
        from pathlib import Path

        base = str(Path(self.path).expanduser().resolve()) if self.path else None
        return ModelRecord(self.components, self.objective, dict(self.sampling), base, self.adapters_only_checkpoints)

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        checkpoint[RECORD_KEY] = self.record().to_dict()
