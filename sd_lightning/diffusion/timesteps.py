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
    """t = floor(T · sigmoid(u)), u ~ N(mean, std), clamped to [0, T - 1] (Esser et al. 2024, sec. 3.1).

    The logit-normal density puts more training on middle noise levels, where the prediction task is hardest;
    ``mean`` > 0 shifts it toward noisier steps, ``std`` widens it. The median timestep is T · sigmoid(mean).
    """

    def __init__(self, num_train_timesteps: int = 1000, mean: float = 0.0, std: float = 1.0) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"noise.timestep_sampler.num_train_timesteps must be >= 1, got {num_train_timesteps}")
        if std <= 0:
            raise ValueError(f"noise.timestep_sampler.std must be positive, got {std}")
        self.num_train_timesteps = num_train_timesteps
        self.mean, self.std = mean, std

    def __call__(self, batch_size: int, generator: torch.Generator) -> torch.Tensor:
        u = torch.randn(batch_size, generator=generator) * self.std + self.mean
        t = torch.floor(torch.sigmoid(u) * self.num_train_timesteps).long()
        return t.clamp(0, self.num_train_timesteps - 1)  # sigmoid(u) rounds to 1.0 for large u

    def __repr__(self) -> str:
        return (f"LogitNormalTimestepSampler(num_train_timesteps={self.num_train_timesteps}, "
                f"mean={self.mean}, std={self.std})")
