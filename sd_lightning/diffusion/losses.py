"""Distances between prediction and target, per sample ([B]); the caller weights and reduces.

A loss is one element-wise distance; the reduction is shared: the mean over each sample's elements, or with a
loss mask (``data.masks``: ``<stem>.mask.png`` files or the alpha channel, at latent resolution) the mask-weighted
mean, normalized by the masked area so a small subject weighs as much as a large one.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


class Loss:
    def elementwise(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def __call__(self, prediction: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
                 ) -> torch.Tensor:
        """``mask`` [B, 1, h, w] in [0, 1] (broadcast over channels); None: every element counts alike."""
        distance = self.elementwise(prediction.float(), target.float())
        if mask is None:
            return distance.flatten(1).mean(dim=1)
        weights = mask.to(distance).expand_as(distance)
        return (distance * weights).flatten(1).sum(dim=1) / weights.flatten(1).sum(dim=1).clamp_min(1e-8)

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


class MSELoss(Loss):
    def elementwise(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.mse_loss(prediction, target, reduction="none")


class L1Loss(Loss):
    def elementwise(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.l1_loss(prediction, target, reduction="none")


class HuberLoss(Loss):
    """Quadratic below ``delta``, linear above: robust to the rare huge residual."""

    def __init__(self, delta: float = 0.1) -> None:
        if delta <= 0:
            raise ValueError(f"loss.delta must be positive, got {delta}")
        self.delta = delta

    def elementwise(self, prediction: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.huber_loss(prediction, target, reduction="none", delta=self.delta)
