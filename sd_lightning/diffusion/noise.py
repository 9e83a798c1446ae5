"""Noise samplers for the forward process; each draws from a caller-supplied generator (exact resume).

Draws are made on the CPU with ``torch.randn(shape, generator=generator)`` so a seed gives the same noise on
every device; composite noises are summed in float32 and cast to the latents' dtype and device at the end.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn.functional as F


def _randn(shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """Float32 N(0, 1) on ``like``'s device, drawn on the CPU generator."""
    return torch.randn(shape, generator=generator).to(like.device)


class GaussianNoise:
    """ε ~ N(0, I): the DDPM forward process (the default)."""

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return torch.randn(tuple(latents.shape), generator=generator).to(latents)

    def __repr__(self) -> str:
        return "GaussianNoise()"


class OffsetNoise:
    """ε + offset · δ, δ ~ N(0, 1) per (sample, channel), broadcast over H, W (Guttenberg 2023).

    Plain noise barely changes an image's mean, so at high SNR the model never learns to move the overall
    brightness and samples stay near mid-gray; a shared per-channel shift teaches it to. Each channel's
    spatial mean then has variance offset² + 1/(H·W) instead of 1/(H·W).
    """

    def __init__(self, offset: float = 0.1) -> None:
        if offset < 0:
            raise ValueError(f"noise.sampler.offset must be >= 0, got {offset}")
        self.offset = offset

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        noise = _randn(tuple(latents.shape), generator, latents)
        shift = _randn((latents.shape[0], latents.shape[1]) + (1,) * (latents.ndim - 2), generator, latents)
        return (noise + self.offset * shift).to(latents)

    def __repr__(self) -> str:
        return f"OffsetNoise(offset={self.offset})"


class PyramidNoise:
    """Multi-resolution noise (Whitaker 2023): Σ_{i=0..L} discount^i · up(N(0, I) at (H, W) / 2^i), unit std.

    Per-pixel noise leaves coarse structure almost intact at moderate noise levels; adding bilinearly
    upsampled low-resolution noise destroys it too. Level 0 is the full-resolution noise; ``levels`` = L
    defaults to floor(log2(min(H, W))), i.e. down to ~1 pixel. Scales halve per level (Whitaker draws a random
    factor in [2, 4); a fixed 2 keeps the spectrum reproducible). The sum is renormalized to unit std per
    sample so the forward process keeps its variance.
    """

    def __init__(self, discount: float = 0.8, levels: int | None = None) -> None:
        if not 0.0 < discount < 1.0:
            raise ValueError(f"noise.sampler.discount must be in (0, 1), got {discount}")
        if levels is not None and levels < 0:
            raise ValueError(f"noise.sampler.levels must be >= 0 or null, got {levels}")
        self.discount = discount
        self.levels = levels

    def __call__(self, latents: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if latents.ndim != 4:
            raise ValueError(f"PyramidNoise needs [B, C, H, W] latents, got shape {tuple(latents.shape)}")
        batch, channels, height, width = latents.shape
        noise = _randn(tuple(latents.shape), generator, latents)
        max_levels = max(min(height, width).bit_length() - 1, 0)
        levels = max_levels if self.levels is None else min(self.levels, max_levels)
        for level in range(1, levels + 1):
            size = (max(height // 2**level, 1), max(width // 2**level, 1))
            low = _randn((batch, channels, *size), generator, latents)
            upsampled = F.interpolate(low, size=(height, width), mode="bilinear", align_corners=False)
            noise = noise + self.discount**level * upsampled
        std = noise.flatten(1).std(dim=1).clamp_min(1e-12)
        return (noise / std.view(-1, 1, 1, 1)).to(latents)

    def __repr__(self) -> str:
        return f"PyramidNoise(discount={self.discount}, levels={self.levels})"


class InputPerturbation:
    """Input perturbation (Ning et al. 2023, DDPM-IP): perturbed noise ε' = ε + γ·ξ, ξ ~ N(0, I).

    Contract: the *noised input* is built from the returned ε' (x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε'), while
    the *target* keeps the original ε (or the v/x0 computed from it); the input tensor is not modified. The
    mismatch simulates at training time the prediction errors that accumulate during sampling (exposure
    bias); the paper uses γ = 0.1.
    """

    def __init__(self, gamma: float = 0.1) -> None:
        if gamma < 0:
            raise ValueError(f"noise.input_perturbation.gamma must be >= 0, got {gamma}")
        self.gamma = gamma

    def __call__(self, noise: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        return (noise.float() + self.gamma * _randn(tuple(noise.shape), generator, noise)).to(noise)

    def __repr__(self) -> str:
        return f"InputPerturbation(gamma={self.gamma})"


Randomness = torch.Generator | Sequence[torch.Generator]


def draw(randomness: Randomness, batch: torch.Tensor | int, sampler: Callable[[Any, torch.Generator], torch.Tensor]
         ) -> torch.Tensor:
    """``sampler(batch, generator)`` with one generator for the whole batch, or sample by sample with one each.

    Per-sample generators (seeded by each sample's id) make every random draw of a training step a function of
    the sample alone, not of its batch position, batch size or process: N data-parallel processes then draw
    exactly what one process draws for the same global batch.
    """
    if isinstance(randomness, torch.Generator):
        return sampler(batch, randomness)
    if isinstance(batch, int):
        return torch.cat([sampler(1, generator) for generator in randomness])
    return torch.cat([sampler(batch[i:i + 1], generator) for i, generator in enumerate(randomness)])
