"""Optimizers and learning-rate schedules, built from Hydra ``_partial_`` configs."""

from sd_lightning.optim.schedules import build_lr_scheduler, configure_optimization

__all__ = ["build_lr_scheduler", "configure_optimization"]
