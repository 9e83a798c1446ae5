"""Training timestep samplers; each draws from a caller-supplied generator for exact resume."""

from __future__ import annotations

import torch


class UniformTimestepSampler:
    """t ~ U{min_timestep, …, max_timestep - 1}; a sub-range suits fine-tuning."""

    def __init__(self, num_train_timesteps: int = 1000, min_timestep: int = 0, max_timestep: int | None = None) -> None:
        self.min_timestep = min_timestep
        self.max_timestep = num_train_timesteps if max_timestep is None else max_timestep
        if not 0 <= self.min_timestep < self.max_timestep <= num_train_timesteps:
            raise ValueError(
                f"timestep range [{self.min_timestep}, {self.max_timestep}) must lie inside [0, {num_train_timesteps})"
            )

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(self.min_timestep, self.max_timestep, (batch_size,), generator=generator)

    def __repr__(self) -> str:
        return f"UniformTimestepSampler({self.min_timestep}, {self.max_timestep})"


class LogitNormalTimestepSampler:
    """t = T · sigmoid(u), u ~ N(mean, std) (Esser et al. 2024, sec. 3.1): more weight on middle noise levels."""

    def __init__(self, num_train_timesteps: int = 1000, mean: float = 0.0, std: float = 1.0) -> None:
        if std <= 0:
            raise ValueError(f"noise.timestep_sampler.std must be positive, got {std}")
        self.num_train_timesteps = num_train_timesteps
        self.mean, self.std = mean, std

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(batch_size, generator=generator) * self.std + self.mean
        t = (torch.sigmoid(u) * self.num_train_timesteps).long()
        return t.clamp(0, self.num_train_timesteps - 1)

    def __repr__(self) -> str:
        return f"LogitNormalTimestepSampler(mean={self.mean}, std={self.std})"
