"""Noise schedulers: the training schedule and the samplers built from it."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLING_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


def build_noise_scheduler(
    prediction_type: str = "epsilon",
    num_train_timesteps: int = 1000,
    beta_schedule: str = "squaredcos_cap_v2",
    beta_start: float = 0.00085,
    beta_end: float = 0.012,
    rescale_betas_zero_snr: bool = False,
) -> DDPMScheduler:
    """The forward process used in training; the module sets ``prediction_type`` from its objective."""
    return DDPMScheduler(
        num_train_timesteps=num_train_timesteps,
        beta_schedule=beta_schedule,
        beta_start=beta_start,
        beta_end=beta_end,
        prediction_type=prediction_type,
        clip_sample=False,
        timestep_spacing="trailing",
        rescale_betas_zero_snr=rescale_betas_zero_snr,
    )


def sampling_scheduler(name: str, training_config: dict[str, Any]) -> SchedulerMixin:
    """A sampler named ``name`` sharing the training schedule (betas, prediction type, spacing)."""
    if name not in SAMPLING_SCHEDULERS:
        raise ValueError(f"scheduler={name!r} is not one of {sorted(SAMPLING_SCHEDULERS)}")
    config = {k: v for k, v in dict(training_config).items() if not k.startswith("_")}
    config["timestep_spacing"] = "trailing"
    config["clip_sample"] = False
    config["steps_offset"] = 1  # what StableDiffusionPipeline expects (it rewrites 0 with a warning)
    return SAMPLING_SCHEDULERS[name].from_config(config)


def scheduler_name(scheduler: SchedulerMixin) -> str:
    for name, cls in SAMPLING_SCHEDULERS.items():
        if type(scheduler) is cls:
            return name
    raise ValueError(f"unsupported scheduler class {type(scheduler).__name__}")
