"""Noise samplers, timestep samplers and weightings against hand-computed values and statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from sd_lightning.diffusion.noise import GaussianNoise, InputPerturbation, OffsetNoise, PyramidNoise
from sd_lightning.diffusion.objectives import EpsilonObjective, SampleObjective, VPredictionObjective
from sd_lightning.diffusion.schedules import build_noise_scheduler
from sd_lightning.diffusion.timesteps import LogitNormalTimestepSampler, UniformTimestepSampler
from sd_lightning.diffusion.weighting import DebiasedEstimationWeighting, MinSnrWeighting, P2Weighting, snr

ALPHAS = build_noise_scheduler().alphas_cumprod
LATENTS = torch.zeros(512, 4, 16, 16)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("sampler", [GaussianNoise(), OffsetNoise(0.3), PyramidNoise(0.8)])
def test_noise_is_deterministic_and_shaped(sampler):
    a, b = sampler(LATENTS[:4], _gen(1)), sampler(LATENTS[:4], _gen(1))
    assert a.shape == LATENTS[:4].shape and torch.equal(a, b)
    assert not torch.equal(a, sampler(LATENTS[:4], _gen(2)))


def test_offset_noise_adds_per_channel_variance():
    offset = 0.3
    noise = OffsetNoise(offset)(LATENTS, _gen())
    channel_means = noise.mean(dim=(2, 3))
    # Var of a per-channel mean: offset² (shared shift) + 1/(H·W) (pixel noise).
    assert channel_means.var().item() == pytest.approx(offset**2 + 1 / 256, rel=0.15)
    plain = GaussianNoise()(LATENTS, _gen()).mean(dim=(2, 3)).var().item()
    assert plain == pytest.approx(1 / 256, rel=0.15)


def test_pyramid_noise_has_unit_std_and_more_low_frequencies():
    pyramid = PyramidNoise(0.8)(LATENTS, _gen())
    gaussian = GaussianNoise()(LATENTS, _gen())
    assert pyramid.flatten(1).std(dim=1).mean().item() == pytest.approx(1.0, abs=1e-4)
    assert F.avg_pool2d(pyramid, 4).std() > 2 * F.avg_pool2d(gaussian, 4).std()


def test_input_perturbation_keeps_the_target_noise():
    noise = GaussianNoise()(LATENTS[:64], _gen())
    perturbed = InputPerturbation(0.1)(noise, _gen(5))
    assert (perturbed - noise).std().item() == pytest.approx(0.1, rel=0.05)


def test_logit_normal_timesteps():
    sampler = LogitNormalTimestepSampler(1000, 0.0, 1.0)
    t = sampler(20000, _gen())
    assert t.min() >= 0 and t.max() <= 999 and torch.equal(t, sampler(20000, _gen()))
    assert abs(t.float().median().item() - 500) < 15
    # P(t < 119) = P(u < logit(0.119)) = Φ(-2.0) ≈ 0.0228 for a standard normal u.
    assert (t < 119).float().mean().item() == pytest.approx(0.0228, abs=0.006)
    ranged = UniformTimestepSampler(1000, 0, 500)(5000, _gen())
    assert ranged.max() < 500


def test_debiased_and_p2_weights_by_hand():
    t = torch.tensor([20, 500, 950])
    ratio = [float(ALPHAS[i] / (1 - ALPHAS[i])) for i in t]
    debiased = DebiasedEstimationWeighting()
    assert torch.allclose(debiased(t, ALPHAS, EpsilonObjective()), torch.tensor([1 / math.sqrt(r) for r in ratio]),
                          rtol=1e-5)
    assert torch.allclose(debiased(t, ALPHAS, VPredictionObjective()),
                          torch.tensor([1 / math.sqrt(r) * r / (r + 1) for r in ratio]), rtol=1e-5)
    p2 = P2Weighting(k=1.0, gamma=0.5)
    assert torch.allclose(p2(t, ALPHAS, EpsilonObjective()), torch.tensor([(1 + r) ** -0.5 for r in ratio]), rtol=1e-5)
    assert torch.allclose(p2(t, ALPHAS, SampleObjective()), torch.tensor([(1 + r) ** -0.5 * r for r in ratio]),
                          rtol=1e-5)


def test_min_snr_is_the_same_effective_weight_for_every_objective():
    """min(SNR, γ)/SNR on ε equals min(SNR, γ)/(SNR+1) on v and min(SNR, γ) on x0 (Hang et al. 2023)."""
    t = torch.arange(0, 1000, 37)
    ratio = snr(ALPHAS, t)
    w = MinSnrWeighting(5.0)
    eps, v, x0 = (w(t, ALPHAS, o) for o in (EpsilonObjective(), VPredictionObjective(), SampleObjective()))
    assert torch.allclose(v * (ratio + 1) / ratio, eps, rtol=1e-4)
    assert torch.allclose(x0 / ratio, eps, rtol=1e-4)


def test_zero_terminal_snr_rescale_matches_lin_et_al_algorithm_1():
    plain = build_noise_scheduler().alphas_cumprod.double()
    rescaled = build_noise_scheduler(rescale_betas_zero_snr=True).alphas_cumprod.double()
    s = plain.sqrt()
    s0, sT = s[0].clone(), s[-1].clone()
    expected = ((s - sT) * s0 / (s0 - sT)) ** 2  # Algorithm 1: shift to zero at T, rescale to keep t=0
    assert rescaled[-1] < 1e-9
    assert torch.allclose(rescaled[:-1], expected[:-1], rtol=1e-4, atol=1e-7)
