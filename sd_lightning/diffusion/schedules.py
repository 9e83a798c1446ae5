"""Samplers built from the training schedule's config: the DDPM objectives' and flow matching's (``flow_euler``)."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    FlowMatchEulerDiscreteScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

SAMPLING_SCHEDULERS: dict[str, type[SchedulerMixin]] = {
    "ddpm": DDPMScheduler,
    "ddim": DDIMScheduler,
    "dpm": DPMSolverMultistepScheduler,
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
}


def sampling_scheduler(name: str, training_config: dict[str, Any]) -> SchedulerMixin:
    """A sampler named ``name`` sharing the training schedule (betas, prediction type, spacing; a flow's shift)."""
    if name == "flow_euler":
        return FlowMatchEulerDiscreteScheduler.from_config(dict(training_config))
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
