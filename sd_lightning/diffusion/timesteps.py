"""Timestep distributions: each draws u ∈ [0, 1] per sample from a caller-supplied generator (exact resume).

The objective maps u into its own time domain (``objective.timesteps(u)``), so one distribution serves DDPM and
flow-matching objectives alike. The densities are diffusers' ``compute_density_for_timestep_sampling`` (SD3).
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_density_for_timestep_sampling


class TimestepDistribution:
    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class UniformTimesteps(TimestepDistribution):
    """u ~ U[low, high): the whole schedule by default; a sub-range (``timesteps=range``) suits fine-tuning."""

    def __init__(self, low: float = 0.0, high: float = 1.0) -> None:
        if not 0.0 <= low < high <= 1.0:
            raise ValueError(f"timesteps.low={low}, timesteps.high={high} must satisfy 0 <= low < high <= 1")
        self.low, self.high = low, high

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = compute_density_for_timestep_sampling("uniform", batch_size, generator=generator)
        return self.low + (self.high - self.low) * u


class LogitNormalTimesteps(TimestepDistribution):
    """u = sigmoid(n), n ~ N(mean, std) (Esser et al. 2024, sec. 3.1): more training on middle noise levels."""

    def __init__(self, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"timesteps.std must be positive, got {std}")
        self.mean, self.std = mean, std

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return compute_density_for_timestep_sampling("logit_normal", batch_size, logit_mean=self.mean,
                                                     logit_std=self.std, generator=generator)


class ModeTimesteps(TimestepDistribution):
    """Mode sampling with heavy tails (Esser et al. 2024, eq. 20); ``scale`` in [-1, 2/(π-2)] bends the density."""

    def __init__(self, scale: float = 1.29) -> None:
        if not -1.0 <= scale <= 2 / (torch.pi - 2):
            raise ValueError(f"timesteps.scale={scale} must lie in [-1, {2 / (torch.pi - 2):.3f}]")
        self.scale = scale

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return compute_density_for_timestep_sampling("mode", batch_size, mode_scale=self.scale, generator=generator)


class ShiftedTimesteps(TimestepDistribution):
    """Uniform u shifted toward noise, u' = shift·u / (1 + (shift - 1)·u) (Esser et al. 2024, eq. 23)."""

    def __init__(self, shift: float = 3.0) -> None:
        if shift <= 0:
            raise ValueError(f"timesteps.shift must be positive, got {shift}")
        self.shift = shift

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = compute_density_for_timestep_sampling("uniform", batch_size, generator=generator)
        return self.shift * u / (1 + (self.shift - 1) * u)
