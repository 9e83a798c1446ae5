"""Pipelines over a model's parts: the family's plain diffusers pipeline where one exists, else ``LatentSampler``.

SD 1.x/2.x (a UNet denoiser with a DDPM objective) samples and exports as ``StableDiffusionPipeline``. A
combination no standard pipeline runs (a flow-matching UNet: ``FlowMatchEulerDiscreteScheduler`` lacks
``init_noise_sigma``; a transformer with one CLIP encoder) samples through ``LatentSampler``, the same
classifier-free-guidance loop written once over the denoiser/conditioner call, and cannot be exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers import StableDiffusionPipeline
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from sd_lightning.diffusion.objectives import Objective
from sd_lightning.models.builders import DiffusionComponents
from sd_lightning.models.checkpoint_io import SAMPLING_FILE, CheckpointError, components_from_checkpoint
from sd_lightning.models.denoisers import UNetDenoiser


class LatentSampler:
    """Classifier-free guidance with any diffusers scheduler, called like a diffusers text-to-image pipeline."""

    def __init__(self, components: DiffusionComponents, scheduler: SchedulerMixin) -> None:
        self.components, self.scheduler = components, scheduler

    @property
    def device(self) -> torch.device:
        return next(self.components.denoiser.parameters()).device

    def to(self, device: Any) -> LatentSampler:
        for part in (self.components.denoiser, self.components.vae, self.components.conditioner):
            part.to(device)
        return self

    def set_progress_bar_config(self, **_: Any) -> None:
        """Pipelines' progress bar switch; this loop prints nothing."""

    @torch.no_grad()
    def __call__(self, prompt: list[str], num_inference_steps: int = 30, guidance_scale: float = 1.0,
                 generator: list[torch.Generator] | None = None, height: int | None = None, width: int | None = None,
                 output_type: str = "pil") -> SimpleNamespace:
        parts = self.components
        channels, size = parts.latent_shape
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        shape = (channels, (height or size * factor) // factor, (width or size * factor) // factor)
        generators = generator or [torch.Generator().manual_seed(i) for i in range(len(prompt))]
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        latents = latents * float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        guided = guidance_scale > 1.0
        conditioning = parts.conditioner(list(prompt) + ([""] * len(prompt) if guided else []))
        self.scheduler.set_timesteps(num_inference_steps, device=self.device)
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            if hasattr(self.scheduler, "scale_model_input"):
                model_input = self.scheduler.scale_model_input(model_input, t)
            timesteps = t.expand(model_input.shape[0]).to(self.device)
            prediction = parts.denoiser(model_input, timesteps, conditioning)
            if guided:
                text, null = prediction.chunk(2)
                prediction = null + guidance_scale * (text - null)
            latents = self.scheduler.step(prediction, t, latents).prev_sample
        config = parts.vae.config
        latents = latents / config.scaling_factor + (getattr(config, "shift_factor", None) or 0.0)
        images = (parts.vae.decode(latents).sample / 2 + 0.5).clamp(0, 1)
        if output_type == "pt":
            return SimpleNamespace(images=images.cpu())
        arrays = images.permute(0, 2, 3, 1).float().cpu().numpy()
        if output_type == "np":
            return SimpleNamespace(images=arrays)
        return SimpleNamespace(images=[Image.fromarray(a) for a in (arrays * 255).round().astype(np.uint8)])


def diffusers_pipeline(components: DiffusionComponents, scheduler: SchedulerMixin) -> StableDiffusionPipeline | None:
    """The plain diffusers pipeline of this combination, or None when no standard pipeline runs it."""
    if not isinstance(components.denoiser, UNetDenoiser) or not hasattr(scheduler, "init_noise_sigma"):
        return None
    if components.denoiser.config.get("addition_embed_type"):
        return None
    pipeline = StableDiffusionPipeline(
        vae=components.vae, text_encoder=components.conditioner.text_encoder,
        tokenizer=components.conditioner.tokenizer, unet=components.denoiser.model, scheduler=scheduler,
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def build_pipeline(components: DiffusionComponents, objective: Objective, scheduler: str) -> Any:
    """What sampling uses: the diffusers pipeline when one runs this model, else ``LatentSampler``."""
    sampler = objective.sampling_scheduler(scheduler)
    return diffusers_pipeline(components, sampler) or LatentSampler(components, sampler)


def load_pipeline(source: str | Path, scheduler: str | None = None, use_ema: bool = True,
                  trusted_objectives: tuple[str, ...] = ()) -> tuple[Any, dict[str, Any]]:
    """A pipeline and its sampling defaults from a checkpoint file or an exported folder."""
    from sd_lightning.diffusion.schedules import sampling_scheduler

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        pipeline = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
        pipeline.set_progress_bar_config(disable=True)
        sampling_file = path / SAMPLING_FILE
        sampling = json.loads(sampling_file.read_text()) if sampling_file.is_file() else {}
        sampling.setdefault("scheduler", "ddim")
        if (scheduler and scheduler != sampling["scheduler"]) or not sampling_file.is_file():
            pipeline.scheduler = sampling_scheduler(scheduler or sampling["scheduler"], pipeline.scheduler.config)
        return pipeline, sampling
    components, objective, sampling = components_from_checkpoint(path, use_ema, trusted_objectives)
    return build_pipeline(components, objective, scheduler or sampling["scheduler"]), sampling
