"""Per-timestep loss weights ([B]) that multiply the per-sample loss; each asks the objective, never its name.

Weights from the DDPM literature are defined on the ε-MSE; ``objective.epsilon_loss_scale`` re-expresses them for
the objective's own target (a weight w on the ε error is w / scale on the target's error), which is how
Min-SNR-γ's min(SNR, γ)/SNR becomes min(SNR, γ)/(SNR + 1) for v-prediction. They apply to every objective with
an SNR (flow matching included). The SD3 weightings are defined on σ and need ``objective=flow_matching``.
"""

from __future__ import annotations

import torch
from diffusers.training_utils import compute_loss_weighting_for_sd3

from sd_lightning.diffusion.objectives import Objective


class Weighting:
    """Base: ``epsilon_weight(snr)`` on the ε-MSE, converted for the objective's target."""

    def epsilon_weight(self, snr: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, timesteps: torch.Tensor, objective: Objective) -> torch.Tensor:
        return self.epsilon_weight(objective.snr(timesteps)) / objective.epsilon_loss_scale(timesteps)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class UniformWeighting(Weighting):
    """Every timestep weighs 1 on the objective's own target (L_simple)."""

    def __call__(self, timesteps: torch.Tensor, objective: Objective) -> torch.Tensor:
        return torch.ones(timesteps.shape, dtype=torch.float32, device=timesteps.device)


class MinSnrWeighting(Weighting):
    """Min-SNR-γ (Hang et al. 2023, eq. 9): min(SNR, γ)/SNR on the ε-MSE."""

    def __init__(self, gamma: float = 5.0) -> None:
        if gamma <= 0:
            raise ValueError(f"weighting.gamma must be positive, got {gamma}")
        self.gamma = gamma

    def epsilon_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return snr.clamp(max=self.gamma) / snr


class DebiasedEstimationWeighting(Weighting):
    """Debiased estimation (Yu et al. 2024): 1/sqrt(SNR) on the ε-MSE, capped at ``max_weight`` (null: no cap).

    Down-weights low-noise steps, whose ε-loss otherwise dominates training with little effect on samples; the
    cap keeps it finite at a zero-terminal-SNR step.
    """

    def __init__(self, max_weight: float | None = 1000.0) -> None:
        if max_weight is not None and max_weight <= 0:
            raise ValueError(f"weighting.max_weight must be positive or null, got {max_weight}")
        self.max_weight = max_weight

    def epsilon_weight(self, snr: torch.Tensor) -> torch.Tensor:
        weight = snr.rsqrt()
        return weight if self.max_weight is None else weight.clamp(max=self.max_weight)


class P2Weighting(Weighting):
    """Perception-prioritized weighting (Choi et al. 2022, eq. 8): 1 / (k + SNR)^γ on the ε-MSE."""

    def __init__(self, k: float = 1.0, gamma: float = 1.0) -> None:
        if k <= 0:
            raise ValueError(f"weighting.k must be positive, got {k}")
        if gamma < 0:
            raise ValueError(f"weighting.gamma must be >= 0, got {gamma}")
        self.k, self.gamma = k, gamma

    def epsilon_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return (self.k + snr).pow(-self.gamma)


class SD3Weighting(Weighting):
    """diffusers' ``compute_loss_weighting_for_sd3`` on the objective's σ: ``sigma_sqrt`` (σ⁻²) or ``cosmap``."""

    def __init__(self, scheme: str = "cosmap") -> None:
        if scheme not in ("sigma_sqrt", "cosmap"):
            raise ValueError(f"weighting.scheme={scheme!r} must be 'sigma_sqrt' or 'cosmap'")
        self.scheme = scheme

    def __call__(self, timesteps: torch.Tensor, objective: Objective) -> torch.Tensor:
        return compute_loss_weighting_for_sd3(self.scheme, objective.sigma(timesteps)).float()
