"""Learning-rate schedules via diffusers' ``get_scheduler``, stepped once per optimizer step."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable
from functools import partial
from typing import Any

import torch
from diffusers.optimization import get_scheduler

log = logging.getLogger(__name__)


def build_lr_scheduler(
    optimizer: torch.optim.Optimizer,
    name: str = "cosine",
    num_warmup_steps: int = 0,
    num_training_steps: int | None = None,
    num_cycles: int = 1,
    power: float = 1.0,
) -> torch.optim.lr_scheduler.LRScheduler:
    """``name`` is one of diffusers' schedules (constant_with_warmup, cosine, linear, polynomial, …)."""
    kwargs: dict[str, Any] = {"num_warmup_steps": num_warmup_steps, "num_training_steps": num_training_steps}
    if name == "cosine_with_restarts":
        kwargs["num_cycles"] = num_cycles
    if name == "polynomial":
        kwargs["power"] = power
    return get_scheduler(name, optimizer, **kwargs)


def configure_optimization(
    optimizer_factory: Callable[..., torch.optim.Optimizer],
    lr_scheduler_factory: Callable[..., Any] | None,
    params: Iterable[torch.nn.Parameter] | list[dict[str, Any]],
    num_training_steps: int,
) -> Any:
    """What ``configure_optimizers`` returns: the optimizer and, if configured, a per-step LR schedule."""
    optimizer = optimizer_factory(params=list(params))
    if not lr_scheduler_factory:  # None, or lr_scheduler=none (an empty config)
        return optimizer
    if type(optimizer).__module__.startswith("schedulefree"):
        log.info("%s schedules itself: lr_scheduler is ignored", type(optimizer).__name__)
        return optimizer
    factory = lr_scheduler_factory
    if isinstance(factory, partial) and "num_training_steps" not in factory.keywords:
        factory = partial(factory, num_training_steps=num_training_steps)
    scheduler = factory(optimizer=optimizer)
    return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step", "frequency": 1}}
