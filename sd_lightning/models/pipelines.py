"""Pipelines over a model's parts: the family's plain diffusers pipeline where one exists, else ``LatentSampler``.

Each family (``models/families.py``) samples and exports through its pipeline: SD 1.x/2.x and SDXL (a UNet with a
DDPM objective) as ``StableDiffusionPipeline`` / ``StableDiffusionXLPipeline``, SD 3 (MMDiT, flow matching) as
``StableDiffusion3Pipeline``. A combination no standard pipeline runs (a flow-matching UNet:
``FlowMatchEulerDiscreteScheduler`` lacks ``init_noise_sigma``; a transformer with one CLIP encoder) samples
through ``LatentSampler``, the same classifier-free-guidance loop written once over the denoiser/conditioner call,
and cannot be exported.
"""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import torch
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from PIL import Image

from sd_lightning.diffusion.objectives import Objective
from sd_lightning.models.builders import DiffusionComponents
from sd_lightning.models.checkpoint_io import SAMPLING_FILE, CheckpointError, components_from_checkpoint
from sd_lightning.models.families import (
    CALL_KWARGS,
    MissingModelError,
    UnsupportedModelError,
    family_of,
    folder_family,
)


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
                 output_type: str = "pil", **_: Any) -> SimpleNamespace:
        """Extra pipeline arguments (``sampling.pipeline_kwargs``) are the conditioner's already: ignored here."""
        parts = self.components
        channels, size = parts.latent_shape
        factor = 2 ** (len(parts.vae.config.block_out_channels) - 1)
        shape = (channels, (height or size * factor) // factor, (width or size * factor) // factor)
        generators = generator or [torch.Generator().manual_seed(i) for i in range(len(prompt))]
        latents = torch.stack([torch.randn(shape, generator=g) for g in generators]).to(self.device)
        latents = latents * float(getattr(self.scheduler, "init_noise_sigma", 1.0))
        guided = guidance_scale > 1.0
        conditioning = parts.conditioner.for_sampling(list(prompt) + ([""] * len(prompt) if guided else []),
                                                      shape[1] * factor, shape[2] * factor)
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


def diffusers_pipeline(components: DiffusionComponents, scheduler: SchedulerMixin) -> Any:
    """The family's plain diffusers pipeline over these components, or None when no standard pipeline runs them."""
    family = family_of(components)
    if family is None or not family.scheduler_fits(scheduler):
        return None
    return family.pipeline(components, scheduler)


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
        pipeline = folder_pipeline(path)
        sampling_file = path / SAMPLING_FILE
        sampling = json.loads(sampling_file.read_text()) if sampling_file.is_file() else {}
        sampling.setdefault("scheduler", "ddim")
        setattr(pipeline, CALL_KWARGS, dict(sampling.get("pipeline_kwargs", {})))
        if (scheduler and scheduler != sampling["scheduler"]) or not sampling_file.is_file():
            pipeline.scheduler = sampling_scheduler(scheduler or sampling["scheduler"], pipeline.scheduler.config)
        return pipeline, sampling
    components, objective, sampling = components_from_checkpoint(path, use_ema, trusted_objectives)
    return build_pipeline(components, objective, scheduler or sampling["scheduler"]), sampling


def folder_pipeline(path: Path) -> Any:
    """An exported folder's pipeline, of the family its model_index.json names (safetensors only)."""
    try:
        family = folder_family(path, key="ckpt_path")
    except (MissingModelError, UnsupportedModelError) as err:
        raise CheckpointError(str(err)) from err
    pipeline = family.load(path, safetensors_only=True)
    pipeline.set_progress_bar_config(disable=True)
    return pipeline
