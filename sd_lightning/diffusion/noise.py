"""Noise samplers for the forward process; each draws from a caller-supplied generator (exact resume)."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    return torch.randn(shape, generator=generator).to(like)


class GaussianNoise:
    """ε ~ N(0, I): the DDPM forward process."""

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return _randn(tuple(latents.shape), generator, latents)

    def __repr__(self) -> str:
        return "GaussianNoise()"


class OffsetNoise:
    """ε + offset · δ with δ ~ N(0, 1) per (sample, channel) (Guttenberg 2023).

    Plain noise never changes an image's mean much at high SNR, so models learn to keep every image's
    overall brightness near mid-gray; a shared per-channel offset teaches them to move it.
    """

    def __init__(self, offset: float = 0.1) -> None:
        if offset < 0:
            raise ValueError(f"noise.sampler.offset must be >= 0, got {offset}")
        self.offset = offset

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = _randn(tuple(latents.shape), generator, latents)
        shift = _randn((latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2), generator, latents)
        return noise + self.offset * shift

    def __repr__(self) -> str:
        return f"OffsetNoise(offset={self.offset})"


class PyramidNoise:
    """Multi-resolution noise (Whitaker 2023): Σ_i discount^i · upsample(N(0, I) at size / 2^i), renormalized.

    Adds low-frequency components that plain per-pixel noise lacks, so coarse structure is noised too.
    """

    def __init__(self, discount: float = 0.8, levels: int | None = None) -> None:
        if not 0.0 < discount < 1.0:
            raise ValueError(f"noise.sampler.discount must be in (0, 1), got {discount}")
        self.discount = discount
        self.levels = levels

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        batch, channels, height, width = latents.shape
        noise = _randn(tuple(latents.shape), generator, latents)
        max_levels = max(int(torch.log2(torch.tensor(min(height, width))).item()), 0)
        levels = max_levels if self.levels is None else min(self.levels, max_levels)
        for level in range(1, levels + 1):
            size = (max(height // 2**level, 1), max(width // 2**level, 1))
            low = _randn((batch, channels, *size), generator, latents)
            noise = noise + self.discount**level * F.interpolate(low, size=(height, width), mode="bilinear",
                                                                 align_corners=False)
        return noise / noise.flatten(1).std(dim=1).view(-1, 1, 1, 1)

    def __repr__(self) -> str:
        return f"PyramidNoise(discount={self.discount}, levels={self.levels})"


class InputPerturbation:
    """Input perturbation (Ning et al. 2023, eq. 9): the *noised input* uses ε + γ·ξ, the *target* keeps ε.

    Simulates at training time the prediction errors that accumulate during sampling (exposure bias).
    """

    def __init__(self, gamma: float = 0.1) -> None:
        if gamma < 0:
            raise ValueError(f"noise.input_perturbation.gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def __call__(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return noise + self.gamma * _randn(tuple(noise.shape), generator, noise)

    def __repr__(self) -> str:
        return f"InputPerturbation(gamma={self.gamma})"
