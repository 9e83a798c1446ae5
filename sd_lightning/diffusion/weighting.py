"""Per-timestep loss weights ([B]); they multiply the per-sample loss."""

from __future__ import annotations

import torch

from sd_lightning.diffusion.objectives import Objective


def snr(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio ᾱ_t / (1 - ᾱ_t)."""
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    return alpha_bar / (1 - alpha_bar)


class UniformWeighting:
    def __call__(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, objective: Objective) -> torch.Tensor:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)

    def __repr__(self) -> str:
        return "UniformWeighting()"


class MinSnrWeighting:
    """Min-SNR-γ (Hang et al. 2023, eq. 9): min(SNR, γ) expressed for the objective's target.

    ε-target: min(SNR, γ)/SNR; v-target: min(SNR, γ)/(SNR + 1); x0-target: min(SNR, γ).
    """

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"weighting.gamma must be positive, got {gamma}")
        self.gamma = gamma

    def __call__(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, objective: Objective) -> torch.Tensor:
        ratio = snr(alphas_cumprod, timesteps)
        clipped = ratio.clamp(max=self.gamma)
        if objective.prediction_type == "epsilon":
            return clipped / ratio
        if objective.prediction_type == "v_prediction":
            return clipped / (ratio + 1)
        return clipped

    def __repr__(self) -> str:
        return f"MinSnrWeighting(gamma={self.gamma})"
