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


def _for_objective(epsilon_weight: torch.Tensor, ratio: torch.Tensor, objective: Objective) -> torch.Tensor:
    """Re-express a weight defined on the ε-MSE for the objective's own target.

    At a fixed x_t, v̂ - v = (ε̂ - ε)/sqrt(ᾱ_t) and x̂0 - x0 = -(ε̂ - ε)/sqrt(SNR), so
    ||v̂ - v||² = (SNR + 1)/SNR · ||ε̂ - ε||² and ||x̂0 - x0||² = ||ε̂ - ε||² / SNR. The same effective weight w
    on the ε error is therefore w·SNR/(SNR + 1) on a v loss and w·SNR on an x0 loss (this is how Min-SNR-γ's
    min(SNR, γ)/SNR becomes min(SNR, γ)/(SNR + 1) for v-prediction).
    """
    if objective.prediction_type == "v_prediction":
        return epsilon_weight * ratio / (ratio + 1)
    if objective.prediction_type == "sample":
        return epsilon_weight * ratio
    return epsilon_weight


class DebiasedEstimationWeighting:
    """Debiased estimation loss (Yu et al. 2024, "Unmasking Bias in Diffusion Model Training"): 1/sqrt(SNR) on ε.

    Down-weights low-noise steps, whose ε-loss otherwise dominates training with little effect on samples.
    Per objective (see ``_for_objective``): ε-target 1/sqrt(SNR); v-target 1/sqrt(SNR) · SNR/(SNR + 1) =
    sqrt(SNR)/(SNR + 1); x0-target sqrt(SNR). ``max_weight`` caps the ε-weight 1/sqrt(SNR) *before* that
    conversion (it is infinite at a zero-terminal-SNR step), so all objectives keep one effective weight;
    ``None`` disables the cap.
    """

    def __init__(self, max_weight: float | None = 1000.0) -> None:
        if max_weight is not None and max_weight <= 0:
            raise ValueError(f"weighting.max_weight must be positive or null, got {max_weight}")
        self.max_weight = max_weight

    def __call__(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, objective: Objective) -> torch.Tensor:
        ratio = snr(alphas_cumprod, timesteps)
        epsilon_weight = ratio.rsqrt()
        if self.max_weight is not None:
            epsilon_weight = epsilon_weight.clamp(max=self.max_weight)
        return _for_objective(epsilon_weight, ratio, objective)

    def __repr__(self) -> str:
        return f"DebiasedEstimationWeighting(max_weight={self.max_weight})"


class P2Weighting:
    """Perception-prioritized weighting (Choi et al. 2022, eq. 8): λ'_t = 1 / (k + SNR)^γ on the ε-MSE.

    Puts less weight on the low-noise steps that only refine imperceptible detail; k keeps the weight finite
    as SNR → 0 and γ sets how strongly high-SNR steps are suppressed (γ = 0 is uniform). The paper defines it
    for the ε-MSE (L_simple); other targets get the conversion Min-SNR-γ uses (see ``_for_objective``):
    v-target SNR / ((k + SNR)^γ (SNR + 1)), x0-target SNR / (k + SNR)^γ.
    """

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        if k <= 0:
            raise ValueError(f"weighting.k must be positive, got {k}")
        if gamma < 0:
            raise ValueError(f"weighting.gamma must be >= 0, got {gamma}")
        self.k, self.gamma = k, gamma

    def __call__(self, timesteps: torch.Tensor, alphas_cumprod: torch.Tensor, objective: Objective) -> torch.Tensor:
        ratio = snr(alphas_cumprod, timesteps)
        return _for_objective((self.k + ratio).pow(-self.gamma), ratio, objective)

    def __repr__(self) -> str:
        return f"P2Weighting(k={self.k}, gamma={self.gamma})"
