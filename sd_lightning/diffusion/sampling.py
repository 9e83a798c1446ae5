"""Generation through a plain diffusers pipeline, reproducible per image."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from PIL import Image

# The guidance scale where a model stores none (the digits recipe's measured balance of accuracy and variety).
DEFAULT_GUIDANCE_SCALE = 1.25


def generate(
    pipeline: Any,
    prompts: Sequence[str],
    seed: int = 0,
    steps: int = 30,
    guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
    batch_size: int = 64,
    height: int | None = None,
    width: int | None = None,
    output_type: str = "pil",
    seeds: Sequence[int] | None = None,
    pipeline_kwargs: dict[str, Any] | None = None,
) -> list[Image.Image] | torch.Tensor:
    """``pipeline``: a diffusers text-to-image pipeline or ``LatentSampler``. Image i starts from noise seeded by
    ``seeds[i]`` (default ``seed + i``), so results do not depend on batch size or on the other prompts.

    An empty prompt generates unconditionally (from pure noise with the null condition). The pipeline call gets
    what a pipeline built or loaded by sd_lightning records it needs (``sd_lightning_call_kwargs``: SD 3's
    ``max_sequence_length``), then ``pipeline_kwargs`` (for a plain diffusers pipeline: the export's
    ``sd_lightning.json`` ``pipeline_kwargs``).
    """
    call_kwargs = {**getattr(pipeline, "sd_lightning_call_kwargs", {}), **(pipeline_kwargs or {})}
    seeds = list(range(seed, seed + len(prompts))) if seeds is None else list(seeds)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts")
    outputs: list = []
    for start in range(0, len(prompts), batch_size):
        chunk = list(prompts[start:start + batch_size])
        generators = [torch.Generator(device="cpu").manual_seed(s) for s in seeds[start:start + batch_size]]
        result = pipeline(
            prompt=chunk,
            num_inference_steps=steps,
            guidance_scale=guidance_scale,
            generator=generators,
            height=height,
            width=width,
            output_type=output_type,
            **call_kwargs,
        )
        outputs.append(result.images)
    if output_type == "pil":
        return [image for chunk in outputs for image in chunk]
    return torch.cat([torch.as_tensor(o) for o in outputs])


def make_grid(images: Sequence[Image.Image], columns: int | None = None) -> Image.Image:
    """Tile images row by row into one picture."""
    if not images:
        raise ValueError("make_grid needs at least one image")
    columns = columns or math.ceil(math.sqrt(len(images)))
    rows = math.ceil(len(images) / columns)
    width, height = images[0].size
    grid = Image.new("RGB", (columns * width, rows * height))
    for index, image in enumerate(images):
        grid.paste(image.convert("RGB"), ((index % columns) * width, (index // columns) * height))
    return grid
