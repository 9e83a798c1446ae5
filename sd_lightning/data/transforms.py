"""Image preprocessing with PIL + numpy + torch (torchvision cannot be installed beside this torch)."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image


class ImageTransform:
    """Resize the shorter side, crop (center or random), optionally flip, and normalize to [-1, 1].

    ``rng`` decides random crops and flips, so a caller that seeds it per sample gets reproducible
    augmentation that does not depend on worker count.
    """

    def __init__(
        self,
        resolution: int = 32,
        center_crop: bool = True,
        random_flip: bool = False,
        resample: str = "bicubic",
    ) -> None:
        if resolution < 8:
            raise ValueError(f"data.resolution must be at least 8, got {resolution}")
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = Image.Resampling[resample.upper()]

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> torch.Tensor:
        rng = rng or random.Random(0)
        image = image.convert("RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        new_size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if new_size != image.size:
            image = image.resize(new_size, self.resample)
        width, height = image.size
        if self.center_crop:
            left, top = (width - self.resolution) // 2, (height - self.resolution) // 2
        else:
            left, top = rng.randint(0, width - self.resolution), rng.randint(0, height - self.resolution)
        image = image.crop((left, top, left + self.resolution, top + self.resolution))
        if self.random_flip and rng.random() < 0.5:
            image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        return torch.from_numpy(array).permute(2, 0, 1).contiguous()


def to_pil_images(pixel_values: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors [N, C, H, W] back to PIL images."""
    array = ((pixel_values.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
