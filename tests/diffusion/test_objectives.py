"""Objectives own their diffusion process: conversions invert, processes match diffusers, one registry."""

import math

import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.training_utils import compute_density_for_timestep_sampling

from sd_lightning.diffusion.losses import HuberLoss, L1Loss, MSELoss
from sd_lightning.diffusion.objectives import (
    OBJECTIVES,
    EpsilonObjective,
    FlowMatchingObjective,
    SampleObjective,
    VPredictionObjective,
    objective_from_record,
    objective_from_scheduler_config,
    objective_record,
)
from sd_lightning.diffusion.timesteps import (
    LogitNormalTimesteps,
    ModeTimesteps,
    ShiftedTimesteps,
    UniformTimesteps,
)
from sd_lightning.diffusion.weighting import MinSnrWeighting, UniformWeighting

ALL = [EpsilonObjective(), VPredictionObjective(), SampleObjective(), FlowMatchingObjective(),
       FlowMatchingObjective(shift=3.0)]


def _pair(seed: int, n: int = 6) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(n, 4, 8, 8, generator=generator, dtype=torch.float64),
            torch.randn(n, 4, 8, 8, generator=generator, dtype=torch.float64))


@pytest.mark.parametrize("objective", ALL, ids=repr)
def test_a_perfect_prediction_recovers_noise_and_latents(objective):
    latents, noise = _pair(0)
    timesteps = objective.timesteps(torch.tensor([0.02, 0.1, 0.25, 0.5, 0.75, 0.98]))
    noisy = objective.noisy(latents, noise, timesteps)
    target = objective.target(latents, noise, timesteps)
    assert torch.allclose(objective.to_epsilon(target, noisy, timesteps), noise, atol=1e-5)
    assert torch.allclose(objective.to_sample(target, noisy, timesteps), latents, atol=1e-5)


def test_ddpm_forward_process_and_v_target_match_diffusers():
    latents, noise = _pair(1, 3)
    objective = VPredictionObjective()
    timesteps = torch.tensor([5, 400, 999])
    scheduler = objective.scheduler
    assert torch.allclose(objective.noisy(latents, noise, timesteps), scheduler.add_noise(latents, noise, timesteps),
                          atol=1e-6)
    assert torch.allclose(objective.target(latents, noise, timesteps), scheduler.get_velocity(latents, noise, timesteps),
                          atol=1e-6)
    assert objective.timesteps(torch.tensor([0.0, 0.5, 0.9999])).tolist() == [0, 500, 999]


@pytest.mark.parametrize("shift", [1.0, 3.0])
def test_flow_matching_forward_process_equals_scale_noise(shift):
    objective = FlowMatchingObjective(shift=shift)
    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=shift)
    latents, noise = _pair(2, 4)
    picks = torch.tensor([0, 250, 600, 999])
    timesteps = scheduler.timesteps[picks]  # the scheduler's own (shifted) training timesteps, σ·1000
    expected = scheduler.scale_noise(latents.float(), timesteps, noise.float())
    assert torch.allclose(objective.noisy(latents.float(), noise.float(), timesteps), expected, atol=1e-6)
    # The training map u → σ agrees with the scheduler's shifted sigma table.
    u = 1 - picks.float() / 1000
    assert torch.allclose(objective.sigma(objective.timesteps(u)), scheduler.sigmas[picks].float(), atol=1e-3)
    assert torch.allclose(objective.target(latents, noise, timesteps), noise - latents)
    assert isinstance(objective.sampling_scheduler("flow_euler"), FlowMatchEulerDiscreteScheduler)
    assert objective.sampling_scheduler("flow_euler").config.shift == shift
    with pytest.raises(ValueError, match="flow_euler"):
        objective.sampling_scheduler("ddim")


def test_timestep_densities_are_the_diffusers_helpers():
    def draw(fn):
        return fn(torch.Generator().manual_seed(7))

    assert torch.equal(draw(lambda g: LogitNormalTimesteps(0.3, 1.2)(5000, g)), draw(
        lambda g: compute_density_for_timestep_sampling("logit_normal", 5000, 0.3, 1.2, generator=g)))
    assert torch.equal(draw(lambda g: ModeTimesteps(1.29)(5000, g)), draw(
        lambda g: compute_density_for_timestep_sampling("mode", 5000, mode_scale=1.29, generator=g)))
    uniform = draw(lambda g: compute_density_for_timestep_sampling("uniform", 5000, generator=g))
    assert torch.equal(draw(lambda g: UniformTimesteps()(5000, g)), uniform)
    assert torch.allclose(draw(lambda g: UniformTimesteps(0.0, 0.5)(5000, g)), 0.5 * uniform)
    assert torch.allclose(draw(lambda g: ShiftedTimesteps(3.0)(5000, g)), 3 * uniform / (1 + 2 * uniform))
    logit = draw(lambda g: LogitNormalTimesteps()(20000, g))
    assert abs(logit.median().item() - 0.5) < 0.01
    # Middle-heavy: P(0.25 ≤ u < 0.75) = 2Φ(ln 3) - 1 ≈ 0.728 (uniform: 0.5).
    assert ((logit >= 0.25) & (logit < 0.75)).float().mean().item() == pytest.approx(0.728, abs=0.015)
    with pytest.raises(ValueError, match="timesteps.low"):
        UniformTimesteps(0.5, 0.2)


def test_registry_round_trip_and_user_objectives_need_trust():
    for name, cls in OBJECTIVES.items():
        objective = cls()
        record = objective_record(objective)
        assert record["name"] == name
        rebuilt = objective_from_record(record)
        assert type(rebuilt) is cls and rebuilt.config() == objective.config()
    for cls in (EpsilonObjective, VPredictionObjective, SampleObjective):  # the schedule travels, whatever the class
        custom = objective_record(cls(beta_schedule="scaled_linear", num_train_timesteps=500))
        assert custom["config"]["beta_schedule"] == "scaled_linear"
        rebuilt = objective_from_record(custom)
        assert rebuilt.beta_schedule == "scaled_linear" and rebuilt.num_train_timesteps == 500
    assert objective_record(FlowMatchingObjective(shift=3.0))["config"] == {"num_train_timesteps": 1000, "shift": 3.0}

    class Mine(EpsilonObjective):
        pass

    record = objective_record(Mine())
    assert record["name"].endswith("Mine")
    with pytest.raises(ValueError, match="trusted_objectives"):
        objective_from_record(record)


def test_pretrained_scheduler_configs_map_to_objectives():
    sd15 = {"_class_name": "PNDMScheduler", "beta_schedule": "scaled_linear", "prediction_type": "epsilon"}
    assert isinstance(objective_from_scheduler_config(sd15), EpsilonObjective)
    sd2 = {**sd15, "prediction_type": "v_prediction"}
    assert isinstance(objective_from_scheduler_config(sd2), VPredictionObjective)
    sd3 = {"_class_name": "FlowMatchEulerDiscreteScheduler", "num_train_timesteps": 1000, "shift": 3.0}
    flow = objective_from_scheduler_config(sd3)
    assert isinstance(flow, FlowMatchingObjective) and flow.shift == 3.0
    with pytest.raises(ValueError, match="prediction_type='weird'"):
        objective_from_scheduler_config({**sd15, "prediction_type": "weird"}, "/models/x")
    with pytest.raises(ValueError, match="objective=v_prediction"):
        EpsilonObjective(rescale_betas_zero_snr=True)


def test_losses_are_per_sample():
    prediction = torch.zeros(2, 1, 2, 2)
    target = torch.tensor([[[[1.0, 1.0], [1.0, 1.0]]], [[[0.0, 0.0], [0.0, 2.0]]]])
    assert torch.allclose(MSELoss()(prediction, target), torch.tensor([1.0, 1.0]))
    assert torch.allclose(L1Loss()(prediction, target), torch.tensor([1.0, 0.5]))
    # Huber(δ=1): 0.5 r² below δ, δ(|r| - δ/2) above.
    assert torch.allclose(HuberLoss(delta=1.0)(prediction, target), torch.tensor([0.5, 1.5 / 4]))


def test_min_snr_weights_match_hand_computed_values():
    timesteps = torch.tensor([10, 500, 900])
    eps, v = EpsilonObjective(), VPredictionObjective()
    alpha_bar = eps.alphas_cumprod[timesteps]
    ratio = eps.snr(timesteps)
    assert torch.allclose(ratio, alpha_bar / (1 - alpha_bar))
    gamma = 5.0
    weighting = MinSnrWeighting(gamma)
    expected_eps = [min(float(r), gamma) / float(r) for r in ratio]
    expected_v = [min(float(r), gamma) / (float(r) + 1) for r in ratio]
    assert torch.allclose(weighting(timesteps, eps), torch.tensor(expected_eps), rtol=1e-5)
    assert torch.allclose(weighting(timesteps, v), torch.tensor(expected_v), rtol=1e-5)
    assert float(ratio[0]) > gamma and math.isclose(float(weighting(timesteps, eps)[0]), gamma / float(ratio[0]),
                                                    rel_tol=1e-5)
    assert torch.equal(UniformWeighting()(timesteps, eps), torch.ones(3))


@pytest.mark.parametrize("name", ["ddpm", "ddim", "dpm", "euler", "euler_a"])
def test_sampling_schedulers_share_the_training_schedule(name):
    scheduler = VPredictionObjective().sampling_scheduler(name)
    assert scheduler.config.prediction_type == "v_prediction"
    assert scheduler.config.timestep_spacing == "trailing"
    scheduler.set_timesteps(10)
    assert int(scheduler.timesteps[0]) == 999


def test_unknown_scheduler_is_named():
    with pytest.raises(ValueError, match="scheduler='heun'"):
        EpsilonObjective().sampling_scheduler("heun")
