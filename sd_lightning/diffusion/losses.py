"""Distances between prediction and target, per sample ([B]); the caller weights and reduces."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _per_sample(elementwise: torch.Tensor) -> torch.Tensor:
    return elementwise.flatten(1).mean(dim=1)


class MSELoss:
    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _per_sample(F.mse_loss(prediction.float(), target.float(), reduction="none"))

    def __repr__(self) -> str:
        return "MSELoss()"


class L1Loss:
    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _per_sample(F.l1_loss(prediction.float(), target.float(), reduction="none"))

    def __repr__(self) -> str:
        return "L1Loss()"


class HuberLoss:
    """Quadratic below ``delta``, linear above: robust to the rare huge residual."""

    def __init__(self, delta: float = 0.1) -> None:
        if delta <= 0:
            raise ValueError(f"loss.delta must be positive, got {delta}")
        self.delta = delta

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return _per_sample(F.huber_loss(prediction.float(), target.float(), reduction="none", delta=self.delta))

    def __repr__(self) -> str:
        return f"HuberLoss(delta={self.delta})"
