"""Objectives: each owns its diffusion process (forward noising, target, conversions, time domain, sampler).

A timestep distribution draws u ∈ [0, 1] per sample; ``objective.timesteps(u)`` maps it into the objective's own
time domain (DDPM step indices, or flow-matching σ · 1000 as SD3 feeds its transformer). Everything else the
module and the weightings need — ``noisy``, ``target``, ``to_sample``, ``to_epsilon``, ``snr``, ``sigma`` and
``epsilon_loss_scale`` — is asked of the objective, never decided by a name.

DDPM (Ho et al. 2020, eq. 4): x_t = sqrt(ᾱ_t) x_0 + sqrt(1 - ᾱ_t) ε; v = sqrt(ᾱ_t) ε - sqrt(1 - ᾱ_t) x_0
(Salimans & Ho 2022, sec. 4). Rectified flow (Esser et al. 2024, eq. 3 with a_t = 1 - t, b_t = t):
x_σ = (1 - σ) x_0 + σ ε, velocity target ε - x_0.
"""

from __future__ import annotations

import inspect
from typing import Any

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from sd_lightning.diffusion.schedules import sampling_scheduler
from sd_lightning.diffusion.timesteps import LogitNormalTimesteps, TimestepDistribution, UniformTimesteps


def _view(values: torch.Tensor, ndim: int) -> torch.Tensor:
    return values.view((-1,) + (1,) * (ndim - 1))


class Objective:
    """Base class. ``prediction_type`` is the diffusers name of what the denoiser predicts."""

    prediction_type: str = ""

    def config(self) -> dict[str, Any]:
        """Constructor arguments as plain values (stored in checkpoints and the run config)."""
        names = [name for cls in type(self).__mro__ if "__init__" in vars(cls)
                 for name, p in inspect.signature(vars(cls)["__init__"]).parameters.items()
                 if name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
        return {name: getattr(self, name) for name in dict.fromkeys(names) if hasattr(self, name)}

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        """Map u ∈ [0, 1] (from a timestep distribution) into this objective's time domain."""
        raise NotImplementedError

    def noisy(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_sample(self, prediction: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def to_epsilon(self, prediction: torch.Tensor, noisy_latents: torch.Tensor, timesteps: torch.Tensor
                   ) -> torch.Tensor:
        raise NotImplementedError

    def snr(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Signal-to-noise ratio of x_t (α_t² / σ_t²)."""
        raise NotImplementedError

    def sigma(self, timesteps: torch.Tensor) -> torch.Tensor:
        """Flow-matching σ ∈ [0, 1]; only objectives with a σ-parameterized process have one."""
        raise ValueError(f"objective {type(self).__name__} has no flow-matching σ: the SD3 weightings "
                         "(weighting=sigma_sqrt|cosmap) need objective=flow_matching")

    def epsilon_loss_scale(self, timesteps: torch.Tensor) -> torch.Tensor:
        """||target error||² / ||ε error||² at a fixed x_t: turns a weight defined on the ε-MSE into this target's."""
        raise NotImplementedError

    # The sampler ``sampling.scheduler=null`` picks (what a pretrained folder of this objective usually samples with).
    default_sampler: str = "ddim"

    def default_timesteps(self) -> TimestepDistribution:
        """What ``timesteps=auto`` trains on: the distribution this objective's pretrained models were trained with."""
        return UniformTimesteps()

    def sampling_scheduler(self, name: str) -> SchedulerMixin:
        """The diffusers scheduler that samples (and is exported with) this objective."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"


class DDPMObjective(Objective):
    """A discrete variance-preserving DDPM process over ``num_train_timesteps`` steps (diffusers' DDPMScheduler)."""

    default_sampler = "dpm"

    def __init__(self, num_train_timesteps: int = 1000, beta_schedule: str = "squaredcos_cap_v2",
                 beta_start: float = 0.00085, beta_end: float = 0.012, rescale_betas_zero_snr: bool = False) -> None:
        if num_train_timesteps < 1:
            raise ValueError(f"objective.num_train_timesteps must be >= 1, got {num_train_timesteps}")
        self.num_train_timesteps = int(num_train_timesteps)
        self.beta_schedule, self.beta_start, self.beta_end = beta_schedule, float(beta_start), float(beta_end)
        self.rescale_betas_zero_snr = bool(rescale_betas_zero_snr)
        self.scheduler = DDPMScheduler(
            num_train_timesteps=self.num_train_timesteps, beta_schedule=beta_schedule, beta_start=self.beta_start,
            beta_end=self.beta_end, prediction_type=self.prediction_type, clip_sample=False,
            timestep_spacing="trailing", rescale_betas_zero_snr=self.rescale_betas_zero_snr,
        )
        self.alphas_cumprod = self.scheduler.alphas_cumprod.clone().float()

    def _coefficients(self, timesteps: torch.Tensor, ndim: int) -> tuple[torch.Tensor, torch.Tensor]:
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return _view(alpha_bar.sqrt(), ndim), _view((1 - alpha_bar).sqrt(), ndim)

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        return (u * self.num_train_timesteps).long().clamp(0, self.num_train_timesteps - 1)

    def noisy(self, latents, noise, timesteps):
        alpha, sigma = self._coefficients(timesteps, latents.ndim)
        return (alpha * latents.float() + sigma * noise.float()).to(latents.dtype)

    def to_epsilon_from_sample(self, sample, noisy_latents, timesteps):
        alpha, sigma = self._coefficients(timesteps, noisy_latents.ndim)
        return (noisy_latents - alpha * sample) / sigma.clamp_min(1e-8)

    def to_sample_from_epsilon(self, epsilon, noisy_latents, timesteps):
        alpha, sigma = self._coefficients(timesteps, noisy_latents.ndim)
        return (noisy_latents - sigma * epsilon) / alpha.clamp_min(1e-8)

    def snr(self, timesteps):
        alpha_bar = self.alphas_cumprod.to(timesteps.device)[timesteps.long()]
        return alpha_bar / (1 - alpha_bar)

    def sampling_scheduler(self, name: str) -> SchedulerMixin:
        return sampling_scheduler(name, self.scheduler.config)


class EpsilonObjective(DDPMObjective):
    """Predict the added noise ε (DDPM, Stable Diffusion 1.x)."""

    prediction_type = "epsilon"

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self.rescale_betas_zero_snr:
            raise ValueError("objective.rescale_betas_zero_snr=true makes the last timestep pure noise, where an "
                             "epsilon target is undefined: use objective=v_prediction (Lin et al. 2023)")

    def target(self, latents, noise, timesteps):
        return noise

    def to_epsilon(self, prediction, noisy_latents, timesteps):
        return prediction

    def to_sample(self, prediction, noisy_latents, timesteps):
        return self.to_sample_from_epsilon(prediction, noisy_latents, timesteps)

    def epsilon_loss_scale(self, timesteps):
        return torch.ones(timesteps.shape, device=timesteps.device)


class VPredictionObjective(DDPMObjective):
    """Predict the velocity v (Stable Diffusion 2.x); well-conditioned at every noise level."""

    prediction_type = "v_prediction"

    def target(self, latents, noise, timesteps):
        alpha, sigma = self._coefficients(timesteps, latents.ndim)
        return alpha * noise - sigma * latents

    def to_epsilon(self, prediction, noisy_latents, timesteps):
        alpha, sigma = self._coefficients(timesteps, noisy_latents.ndim)
        return alpha * prediction + sigma * noisy_latents

    def to_sample(self, prediction, noisy_latents, timesteps):
        alpha, sigma = self._coefficients(timesteps, noisy_latents.ndim)
        return alpha * noisy_latents - sigma * prediction

    def epsilon_loss_scale(self, timesteps):
        ratio = self.snr(timesteps)  # v̂ - v = (ε̂ - ε) / sqrt(ᾱ_t)
        return (ratio + 1) / ratio


class SampleObjective(DDPMObjective):
    """Predict the clean latent x_0 directly."""

    prediction_type = "sample"

    def target(self, latents, noise, timesteps):
        return latents

    def to_epsilon(self, prediction, noisy_latents, timesteps):
        return self.to_epsilon_from_sample(prediction, noisy_latents, timesteps)

    def to_sample(self, prediction, noisy_latents, timesteps):
        return prediction

    def epsilon_loss_scale(self, timesteps):
        return 1 / self.snr(timesteps)  # x̂0 - x0 = -(ε̂ - ε) / sqrt(SNR)


class FlowMatchingObjective(Objective):
    """Rectified flow as in SD3: x_σ = (1 - σ) x_0 + σ ε, target ε - x_0, sampled by FlowMatchEulerDiscreteScheduler.

    ``shift`` > 1 moves σ toward noise, σ' = shift·σ / (1 + (shift - 1)·σ) (Esser et al. 2024, eq. 23), in training
    and in the exported scheduler alike. The denoiser sees σ · ``num_train_timesteps``.
    """

    prediction_type = "flow_prediction"

    def __init__(self, num_train_timesteps: int = 1000, shift: float = 1.0) -> None:
        if shift <= 0:
            raise ValueError(f"objective.shift must be positive, got {shift}")
        self.num_train_timesteps, self.shift = int(num_train_timesteps), float(shift)

    def shifted(self, sigma: torch.Tensor) -> torch.Tensor:
        return self.shift * sigma / (1 + (self.shift - 1) * sigma)

    def timesteps(self, u: torch.Tensor) -> torch.Tensor:
        # σ ∈ [1/T, 1] as the scheduler's training sigmas: σ = 0 would be a noiseless, uninformative input.
        sigma = self.shifted(u.float().clamp(1.0 / self.num_train_timesteps, 1.0))
        return sigma * self.num_train_timesteps

    def sigma(self, timesteps):
        return timesteps.float() / self.num_train_timesteps

    def noisy(self, latents, noise, timesteps):
        sigma = _view(self.sigma(timesteps), latents.ndim)
        return ((1 - sigma) * latents.float() + sigma * noise.float()).to(latents.dtype)

    def target(self, latents, noise, timesteps):
        return noise - latents

    def to_sample(self, prediction, noisy_latents, timesteps):
        return noisy_latents - _view(self.sigma(timesteps), noisy_latents.ndim) * prediction

    def to_epsilon(self, prediction, noisy_latents, timesteps):
        return noisy_latents + _view(1 - self.sigma(timesteps), noisy_latents.ndim) * prediction

    def snr(self, timesteps):
        sigma = self.sigma(timesteps)
        return ((1 - sigma) / sigma.clamp_min(1e-8)) ** 2

    def epsilon_loss_scale(self, timesteps):
        return 1 / (1 - self.sigma(timesteps)).clamp_min(1e-4) ** 2  # ε̂ - ε = (1 - σ)(v̂ - v)

    default_sampler = "flow_euler"

    def default_timesteps(self) -> TimestepDistribution:
        return LogitNormalTimesteps()  # SD 3's training density (Esser et al. 2024, sec. 3.1)

    def sampling_scheduler(self, name: str = "flow_euler") -> SchedulerMixin:
        if name not in FLOW_SCHEDULERS:
            raise ValueError(f"sampling.scheduler={name!r} cannot sample a flow-matching model: use one of "
                             f"{sorted(FLOW_SCHEDULERS)}")
        return FlowMatchEulerDiscreteScheduler(num_train_timesteps=self.num_train_timesteps, shift=self.shift)


FLOW_SCHEDULERS = ("flow_euler",)

# The built-in objectives by name: the one table checkpoints, pretrained folders and configs are mapped through.
OBJECTIVES: dict[str, type[Objective]] = {
    "epsilon": EpsilonObjective,
    "v_prediction": VPredictionObjective,
    "sample": SampleObjective,
    "flow_matching": FlowMatchingObjective,
}


def objective_name(objective: Objective) -> str:
    """The registry name of a built-in objective, or ``module.Class`` for a user's own."""
    for name, cls in OBJECTIVES.items():
        if type(objective) is cls:
            return name
    return f"{type(objective).__module__}.{type(objective).__qualname__}"


def objective_record(objective: Objective) -> dict[str, Any]:
    return {"name": objective_name(objective), "config": objective.config()}


def objective_from_record(record: dict[str, Any], trusted: tuple[str, ...] = ()) -> Objective:
    """Rebuild a checkpoint's objective; a user's class only when ``trusted`` names it (no class from a file)."""
    name, config = record["name"], dict(record.get("config") or {})
    if name in OBJECTIVES:
        return OBJECTIVES[name](**config)
    if name not in trusted:
        raise ValueError(f"the checkpoint's objective is {name!r}, not a built-in one ({sorted(OBJECTIVES)}); "
                         f"to use your own class, name it: trusted_objectives=[{name}]")
    import importlib

    module, _, cls = name.rpartition(".")
    return getattr(importlib.import_module(module), cls)(**config)


def objective_from_scheduler_config(config: dict[str, Any], folder: str = "") -> Objective:
    """The objective a pretrained folder's scheduler config describes (``objective=auto``)."""
    if "shift" in config and "beta_schedule" not in config:
        return FlowMatchingObjective(config.get("num_train_timesteps", 1000), config.get("shift", 1.0))
    prediction_type = config.get("prediction_type", "epsilon")
    if prediction_type not in ("epsilon", "v_prediction", "sample"):
        raise ValueError(f"model.path={folder}: scheduler prediction_type={prediction_type!r} is not supported")
    return OBJECTIVES[prediction_type](
        num_train_timesteps=config.get("num_train_timesteps", 1000),
        beta_schedule=config.get("beta_schedule", "scaled_linear"),
        beta_start=config.get("beta_start", 0.00085), beta_end=config.get("beta_end", 0.012),
        rescale_betas_zero_snr=config.get("rescale_betas_zero_snr", False),
    )


def from_pretrained(path: str) -> Objective:
    """``objective=auto``: what the folder's ``scheduler/scheduler_config.json`` says its model predicts."""
    import json
    from pathlib import Path

    file = Path(str(path)).expanduser() / "scheduler" / "scheduler_config.json"
    if not file.is_file():
        raise FileNotFoundError(f"model.path={path} is not a diffusers folder: no scheduler/scheduler_config.json")
    return objective_from_scheduler_config(json.loads(file.read_text()), str(path))


def timesteps_from_pretrained(path: str) -> TimestepDistribution:
    """``timesteps=auto``: the density the folder's objective trains with (logit-normal for SD 3, else uniform)."""
    return from_pretrained(path).default_timesteps()
