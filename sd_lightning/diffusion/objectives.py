"""Training objectives: what the UNet is asked to predict.

Each objective names the diffusers ``prediction_type`` it trains, so the noise scheduler used for
sampling and export is configured from the objective and cannot disagree with it. All conversions use
x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε (Ho et al. 2020, eq. 4) and v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0
(Salimans & Ho 2022, sec. 4).
"""

from __future__ import annotations

import torch


def _coefficients(alphas_cumprod: torch.Tensor, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
    alpha_bar = alphas_cumprod.to(timesteps.device)[timesteps].float()
    shape = (-1,) + (1,) * (ndim - 1)
    return alpha_bar.sqrt().view(shape), (1 - alpha_bar).sqrt().view(shape)


class Objective:
    """Base class: target for the UNet and conversions of its output to ε̂ and x̂_0."""

    prediction_type: str = ""

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor,
               alphas_cumprod: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_epsilon(self, model_output: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                   alphas_cumprod: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_sample(self, model_output: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor,
                  alphas_cumprod: torch.Tensor) -> torch.Tensor:
        sqrt_ab, sqrt_1mab = _coefficients(alphas_cumprod, timesteps, noisy_latents.ndim)
        epsilon = self.to_epsilon(model_output, noisy_latents, timesteps, alphas_cumprod)
        return (noisy_latents - sqrt_1mab * epsilon) / sqrt_ab

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class EpsilonObjective(Objective):
    """Predict the added noise ε (DDPM, Stable Diffusion 1.x)."""

    prediction_type = "epsilon"

    def target(self, latents, noise, timesteps, alphas_cumprod):
        return noise

    def to_epsilon(self, model_output, noisy_latents, timesteps, alphas_cumprod):
        return model_output


class VPredictionObjective(Objective):
    """Predict the velocity v (Stable Diffusion 2.x); well-conditioned at every noise level."""

    prediction_type = "v_prediction"

    def target(self, latents, noise, timesteps, alphas_cumprod):
        sqrt_ab, sqrt_1mab = _coefficients(alphas_cumprod, timesteps, latents.ndim)
        return sqrt_ab * noise - sqrt_1mab * latents

    def to_epsilon(self, model_output, noisy_latents, timesteps, alphas_cumprod):
        sqrt_ab, sqrt_1mab = _coefficients(alphas_cumprod, timesteps, noisy_latents.ndim)
        return sqrt_ab * model_output + sqrt_1mab * noisy_latents

    def to_sample(self, model_output, noisy_latents, timesteps, alphas_cumprod):
        sqrt_ab, sqrt_1mab = _coefficients(alphas_cumprod, timesteps, noisy_latents.ndim)
        return sqrt_ab * noisy_latents - sqrt_1mab * model_output


class SampleObjective(Objective):
    """Predict the clean latent x_0 directly."""

    prediction_type = "sample"

    def target(self, latents, noise, timesteps, alphas_cumprod):
        return latents

    def to_epsilon(self, model_output, noisy_latents, timesteps, alphas_cumprod):
        sqrt_ab, sqrt_1mab = _coefficients(alphas_cumprod, timesteps, noisy_latents.ndim)
        return (noisy_latents - sqrt_ab * model_output) / sqrt_1mab.clamp_min(1e-8)

    def to_sample(self, model_output, noisy_latents, timesteps, alphas_cumprod):
        return model_output
