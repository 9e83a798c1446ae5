import math

import pytest
import torch

from sd_lightning.diffusion.losses import HuberLoss, L1Loss, MSELoss
from sd_lightning.diffusion.objectives import EpsilonObjective, SampleObjective, VPredictionObjective
from sd_lightning.diffusion.schedules import build_noise_scheduler, sampling_scheduler
from sd_lightning.diffusion.weighting import MinSnrWeighting, UniformWeighting, snr

SCHEDULER = build_noise_scheduler()
ALPHAS = SCHEDULER.alphas_cumprod


@pytest.mark.parametrize("objective", [EpsilonObjective(), VPredictionObjective(), SampleObjective()])
def test_a_perfect_prediction_recovers_noise_and_latents(objective):
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(6, 4, 8, 8, generator=generator)
    noise = torch.randn(6, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([0, 10, 250, 500, 750, 990])
    noisy = SCHEDULER.add_noise(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps, ALPHAS)
    eps = objective.to_epsilon(target, noisy, timesteps, ALPHAS)
    x0 = objective.to_sample(target, noisy, timesteps, ALPHAS)
    tol = 5e-3 if isinstance(objective, SampleObjective) else 1e-4  # x0 → ε divides by sqrt(1 - ᾱ_0)
    assert torch.allclose(eps, noise, atol=tol)
    assert torch.allclose(x0, latents, atol=1e-3)


def test_v_target_matches_diffusers_get_velocity():
    generator = torch.Generator().manual_seed(1)
    latents, noise = torch.randn(3, 4, 8, 8, generator=generator), torch.randn(3, 4, 8, 8, generator=generator)
    timesteps = torch.tensor([5, 400, 999])
    expected = SCHEDULER.get_velocity(latents, noise, timesteps)
    assert torch.allclose(VPredictionObjective().target(latents, noise, timesteps, ALPHAS), expected, atol=1e-6)


def test_losses_are_per_sample():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    assert torch.allclose(MSELoss()(prediction, target), torch.tensor([1.0, 1.0]))
    assert torch.allclose(L1Loss()(prediction, target), torch.tensor([1.0, 0.5]))
    # Huber(δ=1): 0.5 r² below δ, δ(|r| - δ/2) above.
    assert torch.allclose(HuberLoss(delta=1.0)(prediction, target), torch.tensor([0.5, 1.5 / 4]))


def test_min_snr_weights_match_hand_computed_values():
    timesteps = torch.tensor([10, 500, 900])
    ratio = snr(ALPHAS, timesteps)
    alpha_bar = ALPHAS[timesteps]
    assert torch.allclose(ratio, alpha_bar / (1 - alpha_bar))
    gamma = 5.0
    weighting = MinSnrWeighting(gamma)
    expected_eps = [min(float(r), gamma) / float(r) for r in ratio]
    expected_v = [min(float(r), gamma) / (float(r) + 1) for r in ratio]
    assert torch.allclose(weighting(timesteps, ALPHAS, EpsilonObjective()), torch.tensor(expected_eps), rtol=1e-5)
    assert torch.allclose(weighting(timesteps, ALPHAS, VPredictionObjective()), torch.tensor(expected_v), rtol=1e-5)
    assert float(ratio[0]) > gamma and math.isclose(float(weighting(timesteps, ALPHAS, EpsilonObjective())[0]),
                                                    gamma / float(ratio[0]), rel_tol=1e-5)
    assert torch.equal(UniformWeighting()(timesteps, ALPHAS, EpsilonObjective()), torch.ones(3))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm", "euler", "euler_a"])
def test_sampling_schedulers_share_the_training_schedule(name):
    training = build_noise_scheduler("v_prediction")
    scheduler = sampling_scheduler(name, training.config)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[0]) == 999


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match="scheduler='heun'"):
        sampling_scheduler("heun", build_noise_scheduler().config)
