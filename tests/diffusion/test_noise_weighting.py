"""Noise samplers, timestep samplers and weightings against hand-computed values and statistics."""

import math

import pytest
import torch
import torch.nn.functional as F

from sd_lightning.diffusion.noise import GaussianNoise, InputPerturbation, OffsetNoise, PyramidNoise
from sd_lightning.diffusion.objectives import (
    EpsilonObjective,
    FlowMatchingObjective,
    Objective,
    SampleObjective,
    VPredictionObjective,
)
from sd_lightning.diffusion.weighting import (
    DebiasedEstimationWeighting,
    MinSnrWeighting,
    P2Weighting,
    SD3Weighting,
)

ALPHAS = EpsilonObjective().alphas_cumprod
LATENTS = torch.zeros(512, 4, 16, 16)
# ᾱ = 0.8, 0.5, 0.2 → SNR = ᾱ/(1 - ᾱ) = 4, 1, 1/4 exactly: weights below are worked out by hand.
TOY_ALPHAS = torch.tensor([0.8, 0.5, 0.2])
TOY_T = torch.tensor([0, 1, 2])


def toy(cls: type[Objective], alphas: torch.Tensor = TOY_ALPHAS) -> Objective:
    """An objective whose schedule is ``alphas`` (so weights can be worked out by hand)."""
    objective = cls()
    objective.alphas_cumprod = alphas
    return objective


EPS, V, X0 = toy(EpsilonObjective), toy(VPredictionObjective), toy(SampleObjective)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# ------------------------------------------------------------------------------------------------ noise
@pytest.mark.parametrize("sampler", [GaussianNoise(), OffsetNoise(0.3), PyramidNoise(0.8), PyramidNoise(0.5, 2)])
def test_noise_is_deterministic_and_shaped(sampler):
    latents = torch.zeros(4, 4, 12, 20, dtype=torch.float64)  # non-square, non-power-of-two, other dtype
    a, b = sampler(latents, _gen(1)), sampler(latents, _gen(1))
    assert a.shape == latents.shape and a.dtype == latents.dtype and torch.equal(a, b)
    assert not torch.equal(a, sampler(latents, _gen(2)))
    assert repr(sampler).startswith(type(sampler).__name__ + "(")


def test_gaussian_noise_is_standard_normal_per_channel():
    noise = GaussianNoise()(LATENTS, _gen())
    per_channel = noise.transpose(0, 1).flatten(1)  # [C, B·H·W], 131072 draws each
    assert per_channel.mean(dim=1).abs().max().item() < 0.01
    assert torch.allclose(per_channel.std(dim=1), torch.ones(4), atol=0.01)
    assert torch.equal(noise, torch.randn(LATENTS.shape, generator=_gen()))  # exactly the plain draw


def test_offset_noise_adds_per_channel_variance():
    offset = 0.3
    noise = OffsetNoise(offset)(LATENTS, _gen())
    channel_means = noise.mean(dim=(2, 3))  # [B, C]
    # Var of a per-channel mean: offset² (shared shift) + 1/(H·W) (pixel noise).
    assert channel_means.var().item() == pytest.approx(offset**2 + 1 / 256, rel=0.15)
    plain = GaussianNoise()(LATENTS, _gen()).mean(dim=(2, 3)).var().item()
    assert plain == pytest.approx(1 / 256, rel=0.15)
    # Overall per-channel statistics: zero mean, variance 1 + offset².
    per_channel = noise.transpose(0, 1).flatten(1)
    assert per_channel.mean(dim=1).abs().max().item() < 0.05
    assert torch.allclose(per_channel.var(dim=1), torch.full((4,), 1 + offset**2), rtol=0.1)
    # Within one (sample, channel) the shift is constant, so the spatial spread is that of plain noise.
    assert noise.flatten(2).std(dim=2).mean().item() == pytest.approx(1.0, abs=0.02)
    assert torch.equal(OffsetNoise(0.0)(LATENTS[:8], _gen()), GaussianNoise()(LATENTS[:8], _gen()))


def test_pyramid_noise_has_unit_std_and_more_low_frequencies():
    pyramid = PyramidNoise(0.8)(LATENTS, _gen())
    gaussian = GaussianNoise()(LATENTS, _gen())
    assert torch.allclose(pyramid.flatten(1).std(dim=1), torch.ones(len(LATENTS)), atol=1e-5)  # per sample
    assert pyramid.mean().abs().item() < 0.05
    for pool in (2, 4):  # i.i.d. pixels average down to std 1/pool; correlated low frequencies do not
        assert F.avg_pool2d(gaussian, pool).std().item() == pytest.approx(1 / pool, rel=0.02)
        assert F.avg_pool2d(pyramid, pool).std() > 1.5 * F.avg_pool2d(gaussian, pool).std()
    # More levels and a larger discount put more energy into coarse scales.
    low = PyramidNoise(0.8, levels=1)(LATENTS, _gen())
    weak = PyramidNoise(0.3)(LATENTS, _gen())
    assert F.avg_pool2d(low, 4).std() < F.avg_pool2d(pyramid, 4).std()
    assert F.avg_pool2d(weak, 4).std() < F.avg_pool2d(pyramid, 4).std()


def test_pyramid_noise_with_zero_levels_is_renormalized_gaussian():
    plain = GaussianNoise()(LATENTS[:8], _gen())
    expected = plain / plain.flatten(1).std(dim=1).view(-1, 1, 1, 1)
    assert torch.allclose(PyramidNoise(0.8, levels=0)(LATENTS[:8], _gen()), expected)


def test_input_perturbation_perturbs_the_input_noise_only():
    noise = GaussianNoise()(LATENTS[:64], _gen())
    original = noise.clone()
    perturbed = InputPerturbation(0.1)(noise, _gen(5))
    assert torch.equal(noise, original)  # the target still sees the unperturbed ε
    delta = perturbed - noise
    assert delta.std().item() == pytest.approx(0.1, rel=0.02) and delta.mean().abs().item() < 0.005
    assert torch.allclose(delta, 0.1 * torch.randn(noise.shape, generator=_gen(5)), atol=1e-6)  # ε + γ·ξ
    assert torch.equal(InputPerturbation(0.0)(noise, _gen(5)), noise)
    # The noised input differs from the clean-noise one, the ε target does not.
    t = torch.full((64,), 500)
    objective = EpsilonObjective()
    latents = torch.randn(noise.shape, generator=_gen(9))
    assert not torch.allclose(objective.noisy(latents, perturbed, t), objective.noisy(latents, noise, t))
    assert torch.equal(objective.target(latents, noise, t), original)


# ------------------------------------------------------------------------------------------- weighting
def test_debiased_weights_by_hand():
    debiased = DebiasedEstimationWeighting()
    # ε: 1/sqrt(SNR) = 1/2, 1, 2.
    assert torch.allclose(debiased(TOY_T, EPS), torch.tensor([0.5, 1.0, 2.0]))
    # v: 1/sqrt(SNR) · SNR/(SNR + 1) = sqrt(SNR)/(SNR + 1) = 2/5, 1/2, (1/2)/(5/4) = 2/5.
    assert torch.allclose(debiased(TOY_T, V), torch.tensor([0.4, 0.5, 0.4]))
    # x0: sqrt(SNR) = 2, 1, 1/2.
    assert torch.allclose(debiased(TOY_T, X0), torch.tensor([2.0, 1.0, 0.5]))
    capped = DebiasedEstimationWeighting(max_weight=1.5)
    assert torch.allclose(capped(TOY_T, EPS), torch.tensor([0.5, 1.0, 1.5]))
    assert torch.allclose(capped(TOY_T, V), torch.tensor([0.4, 0.5, 1.5 * 0.2]))
    # On the real schedule.
    t = torch.tensor([20, 500, 950])
    ratio = [float(ALPHAS[i] / (1 - ALPHAS[i])) for i in t]
    assert torch.allclose(debiased(t, EpsilonObjective()), torch.tensor([1 / math.sqrt(r) for r in ratio]),
                          rtol=1e-5)
    assert torch.allclose(debiased(t, VPredictionObjective()),
                          torch.tensor([math.sqrt(r) / (r + 1) for r in ratio]), rtol=1e-5)


def test_debiased_weight_stays_finite_at_zero_terminal_snr():
    objective = VPredictionObjective(rescale_betas_zero_snr=True)
    t = torch.tensor([0, 999])
    eps = DebiasedEstimationWeighting(max_weight=1000.0)(t, toy(EpsilonObjective, objective.alphas_cumprod))
    v = DebiasedEstimationWeighting(max_weight=1000.0)(t, objective)
    assert eps[1].item() == 1000.0 and v[1].item() == 0.0 and torch.isfinite(v).all()
    assert torch.isinf(DebiasedEstimationWeighting(max_weight=None)(t, toy(EpsilonObjective, objective.alphas_cumprod))[1])
    with pytest.raises(ValueError, match="max_weight"):
        DebiasedEstimationWeighting(max_weight=0.0)


def test_p2_weights_by_hand():
    p2 = P2Weighting()  # k = 1, γ = 1
    # ε: 1/(1 + SNR) = 1/5, 1/2, 4/5.
    assert torch.allclose(p2(TOY_T, EPS), torch.tensor([0.2, 0.5, 0.8]))
    # v: SNR/(1 + SNR)² = 4/25, 1/4, (1/4)/(25/16) = 4/25.
    assert torch.allclose(p2(TOY_T, V), torch.tensor([0.16, 0.25, 0.16]))
    # x0: SNR/(1 + SNR) = 4/5, 1/2, 1/5.
    assert torch.allclose(p2(TOY_T, X0), torch.tensor([0.8, 0.5, 0.2]))
    # k = 3, γ = 0.5 on ε: (3 + SNR)^-1/2 = 1/sqrt(7), 1/2, 1/sqrt(3.25).
    expected = torch.tensor([7**-0.5, 0.5, 3.25**-0.5])
    assert torch.allclose(P2Weighting(k=3.0, gamma=0.5)(TOY_T, EPS), expected)
    assert torch.equal(P2Weighting(gamma=0.0)(TOY_T, EPS), torch.ones(3))
    # On the real schedule.
    t = torch.tensor([20, 500, 950])
    ratio = [float(ALPHAS[i] / (1 - ALPHAS[i])) for i in t]
    assert torch.allclose(p2(t, EpsilonObjective()), torch.tensor([1 / (1 + r) for r in ratio]), rtol=1e-5)
    assert torch.allclose(p2(t, VPredictionObjective()), torch.tensor([r / (1 + r) ** 2 for r in ratio]),
                          rtol=1e-5)
    with pytest.raises(ValueError, match="k"):
        P2Weighting(k=0.0)
    assert repr(p2) == "P2Weighting(k=1.0, gamma=1.0)"


@pytest.mark.parametrize("weighting", [MinSnrWeighting(5.0), DebiasedEstimationWeighting(), P2Weighting(1.0, 0.5)])
def test_every_objective_gets_the_same_effective_weight(weighting):
    """A prediction error δ in ε is δ/sqrt(ᾱ) in v and -δ/sqrt(SNR) in x0 at a fixed x_t; weighted losses agree."""
    generator = _gen(3)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    eps_hat = noise + 0.1 * torch.randn(4, 4, 8, 8, generator=generator)
    t = torch.tensor([50, 300, 600, 900])
    noisy = EpsilonObjective().noisy(latents, noise, t)
    sqrt_ab = ALPHAS[t].sqrt().view(-1, 1, 1, 1)
    sqrt_1mab = (1 - ALPHAS[t]).sqrt().view(-1, 1, 1, 1)
    v_hat = (eps_hat - sqrt_1mab * noisy) / sqrt_ab  # inverts VPredictionObjective.to_epsilon
    x0_hat = (noisy - sqrt_1mab * eps_hat) / sqrt_ab
    losses = []
    for objective, prediction in ((EpsilonObjective(), eps_hat), (VPredictionObjective(), v_hat),
                                  (SampleObjective(), x0_hat)):
        target = objective.target(latents, noise, t)
        per_sample = (prediction - target).pow(2).flatten(1).mean(dim=1)
        losses.append(weighting(t, objective) * per_sample)
    assert torch.allclose(losses[1], losses[0], rtol=1e-3)
    assert torch.allclose(losses[2], losses[0], rtol=1e-3)


# ------------------------------------------------------------------------------------ zero terminal SNR
@pytest.mark.parametrize("beta_schedule", ["scaled_linear", "squaredcos_cap_v2"])
def test_zero_terminal_snr_rescale_matches_lin_et_al_algorithm_1(beta_schedule):
    plain = VPredictionObjective(beta_schedule=beta_schedule).alphas_cumprod.double()
    rescaled = VPredictionObjective(beta_schedule=beta_schedule, rescale_betas_zero_snr=True).alphas_cumprod.double()
    assert plain[-1] > 0 and rescaled[-1].abs() < 1e-9
    # Algorithm 1: shift sqrt(ᾱ) so the last step is 0, then scale so the first step keeps its value.
    s = plain.sqrt()
    s0, s_last = s[0].clone(), s[-1].clone()
    expected = (s - s_last) * s0 / (s0 - s_last)
    assert torch.allclose(rescaled.sqrt(), expected, rtol=1e-4, atol=1e-6)
    assert rescaled[0].item() == pytest.approx(plain[0].item(), rel=1e-6)


@pytest.mark.parametrize("weighting", [MinSnrWeighting(5.0), DebiasedEstimationWeighting(), P2Weighting(1.0, 0.5)])
def test_flow_matching_gets_the_same_effective_weight_as_epsilon(weighting):
    """At a fixed x_σ, ε̂ - ε = (1 - σ)(v̂ - v): the weighted flow loss equals the weighted ε loss of the same error."""
    generator = _gen(4)
    latents, noise = torch.randn(4, 4, 8, 8, generator=generator), torch.randn(4, 4, 8, 8, generator=generator)
    flow = FlowMatchingObjective()
    t = flow.timesteps(torch.tensor([0.1, 0.3, 0.6, 0.9]))
    sigma = (t / 1000).view(-1, 1, 1, 1)
    velocity_hat = noise - latents + 0.1 * torch.randn(4, 4, 8, 8, generator=generator)
    eps_error = (1 - sigma) * (velocity_hat - (noise - latents))
    flow_loss = weighting(t, flow) * (velocity_hat - flow.target(latents, noise, t)).pow(2).flatten(1).mean(1)
    eps_loss = weighting.epsilon_weight(flow.snr(t)) * eps_error.pow(2).flatten(1).mean(1)
    assert torch.allclose(flow_loss, eps_loss, rtol=1e-4)


def test_sd3_weightings_use_sigma_and_refuse_ddpm_objectives():
    flow = FlowMatchingObjective()
    t = torch.tensor([100.0, 500.0, 900.0])
    sigma = t / 1000
    assert torch.allclose(SD3Weighting("sigma_sqrt")(t, flow), sigma**-2.0)
    assert torch.allclose(SD3Weighting("cosmap")(t, flow), 2 / (math.pi * (1 - 2 * sigma + 2 * sigma**2)))
    with pytest.raises(ValueError, match="objective=flow_matching"):
        SD3Weighting("cosmap")(torch.tensor([10]), EpsilonObjective())
    with pytest.raises(ValueError, match="scheme"):
        SD3Weighting("snr")
