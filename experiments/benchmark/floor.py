"""The benchmark's floor: the framework's training step written as a plain PyTorch loop, without Lightning."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from workers import Channel, apply_unet_option, compose_config, peak_rss


def run_plain(config: dict[str, Any], channel: Channel, scratch: Path) -> dict[str, Any]:
    """The reference: the same parts, data, optimizer and schedule, and the module's step math, without Lightning.

    encode (VAE posterior sample) → condition dropout → prompt embeddings (memoized, as the module does for a
    frozen text encoder) → noise → timesteps → add noise → UNet → v-prediction target → MSE → backward → step.
    """
    import lightning as L
    import torch
    import torch.nn.functional as F
    from hydra.utils import instantiate
    from torch.utils.flop_counter import FlopCounterMode

    from sd_lightning.optim import configure_optimization

    cfg = compose_config(config["overrides"], scratch / "run")
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    components = instantiate(cfg.model.components)
    unet, vae = components.denoiser.model, components.vae
    text_encoder, tokenizer = components.conditioner.text_encoder, components.conditioner.tokenizer
    # The module's training schedule: the objective's own DDPM scheduler.
    scheduler = instantiate(cfg.objective).scheduler
    if scheduler.config.prediction_type != "v_prediction":
        raise ValueError("the reference loop implements objective=v_prediction only")
    vae.requires_grad_(False).eval()
    text_encoder.requires_grad_(False).eval()
    unet.train()
    apply_unet_option(unet, config.get("unet"), {})
    warmup = int(config["warmup"])
    optimization = configure_optimization(instantiate(cfg.optimizer), instantiate(cfg.lr_scheduler),
                                          list(unet.parameters()), warmup + 100_000)
    optimizer = optimization["optimizer"] if isinstance(optimization, dict) else optimization
    lr_scheduler = optimization["lr_scheduler"]["scheduler"] if isinstance(optimization, dict) else None
    scale = float(vae.config.scaling_factor)
    cond_drop = float(cfg.model.components.conditioner.drop_prob)
    num_timesteps = int(scheduler.config.num_train_timesteps)
    prompt_cache: dict[str, torch.Tensor] = {}

    def embed(prompts: list[str]) -> torch.Tensor:
        missing = [p for p in dict.fromkeys(prompts) if p not in prompt_cache]
        if missing:
            ids = tokenizer(missing, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                            return_tensors="pt").input_ids
            with torch.no_grad():
                prompt_cache.update(zip(missing, text_encoder(ids)[0]))
        return torch.stack([prompt_cache[p] for p in prompts])

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor, list[str]]]:
        """(VAE posterior mean, std, prompts) of each batch of the module's training loader, epoch after epoch."""
        loader = datamodule.train_dataloader()
        while True:
            for batch in loader:
                with torch.no_grad():
                    posterior = vae.encode(batch["pixel_values"]).latent_dist
                yield posterior.mean, posterior.std, batch["prompt"]

    def step(mean: torch.Tensor, std: torch.Tensor, prompts: list[str], number: int) -> None:
        generator = torch.Generator().manual_seed(number)
        latents = (mean + std * torch.randn(mean.shape, generator=generator)) * scale
        keep = torch.rand(len(prompts), generator=generator) >= cond_drop
        encoder_hidden_states = embed([p if k else "" for p, k in zip(prompts, keep.tolist())])
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, num_timesteps, (latents.shape[0],), generator=generator)
        noisy_latents = scheduler.add_noise(latents, noise, timesteps)
        model_output = unet(noisy_latents, timesteps, encoder_hidden_states).sample
        target = scheduler.get_velocity(latents, noise, timesteps)
        loss = F.mse_loss(model_output, target, reduction="none").mean(dim=(1, 2, 3)).mean()
        loss.backward()
        optimizer.step()
        if lr_scheduler is not None:
            lr_scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    rss_before_fit = peak_rss()["peak_rss_mib"]
    started = time.perf_counter()
    stream = batches()
    for number in range(warmup):
        step(*next(stream), number)
    with FlopCounterMode(display=False) as counter:
        step(*next(stream), warmup)
    channel.ready_info = {"flops_per_step": counter.get_total_flops(), "torch_threads": torch.get_num_threads(),
                          "warmup_seconds": time.perf_counter() - started, "rss_before_fit_mib": rss_before_fit}
    number = warmup + 1
    while True:
        batch = next(stream)
        units = channel.boundary()
        if units is None:
            return {}
        step(*batch, number)
        number += 1
        for _ in range(units - 1):
            step(*next(stream), number)
            number += 1
