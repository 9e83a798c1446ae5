"""A researcher's own objective and weighting, outside the installed package (see the README's "Extending")."""

import torch

from sd_lightning.diffusion.objectives import VPredictionObjective
from sd_lightning.diffusion.weighting import Weighting


class NoisyHalfVPrediction(VPredictionObjective):
    """v-prediction trained only on the noisier half of the schedule (t ≥ T/2): one class, one YAML."""

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        return super().timesteps(0.5 + 0.5 * u)


class SoftMinSnr(Weighting):
    """A smooth Min-SNR: γ / (γ + SNR) on the ε-MSE, converted to the objective's target by the base class."""

    def __init__(self, gamma: float = 5.0) -> None:
        self.gamma = gamma

    def epsilon_weight(self, snr: torch.Tensor) -> torch.Tensor:
        return self.gamma / (self.gamma + snr)
