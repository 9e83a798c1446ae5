"""Optimizers from maintained packages, as Hydra ``_partial_`` targets called with ``params=``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def build_lion(params: Iterable[Any], lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.99),
               weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023, lion-pytorch): sign updates; use ~3-10x smaller lr and larger decay than AdamW."""
    from lion_pytorch import Lion

    return Lion(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def build_prodigy(params: Iterable[Any], lr: float = 1.0, weight_decay: float = 0.01, d_coef: float = 1.0,
                  safeguard_warmup: bool = True) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, prodigyopt): estimates the step size itself, so lr stays ≈ 1."""
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr, weight_decay=weight_decay, d_coef=d_coef, safeguard_warmup=safeguard_warmup)


def build_schedule_free_adamw(params: Iterable[Any], lr: float = 2e-3, warmup_steps: int = 100,
                              weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """Schedule-free AdamW (Defazio et al. 2024, schedulefree): no LR schedule; needs train()/eval() switching,
    which ``ScheduleFreeModeCallback`` does with the module."""
    from schedulefree import AdamWScheduleFree

    return AdamWScheduleFree(params, lr=lr, warmup_steps=warmup_steps, weight_decay=weight_decay)


def build_adafactor(params: Iterable[Any], lr: float = 1e-3, weight_decay: float = 0.0,
                    clip_threshold: float = 1.0) -> torch.optim.Optimizer:
    """Adafactor (transformers): factored second moments, little optimizer memory; fixed lr here."""
    from transformers.optimization import Adafactor

    return Adafactor(params, lr=lr, weight_decay=weight_decay, clip_threshold=clip_threshold,
                     scale_parameter=False, relative_step=False, warmup_init=False)


def build_adamw_8bit(params: Iterable[Any], lr: float = 2e-3, weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """8-bit AdamW (bitsandbytes): quarter of AdamW's optimizer memory, CUDA only."""
    if not torch.cuda.is_available():
        raise RuntimeError(
            "optimizer=adamw_8bit needs a CUDA GPU (bitsandbytes' 8-bit optimizers); on this machine use "
            "optimizer=adamw (or optimizer=adafactor for low optimizer memory)"
        )
    try:
        import bitsandbytes as bnb
    except ImportError as err:
        raise RuntimeError("optimizer=adamw_8bit needs `pip install bitsandbytes`; or use optimizer=adamw") from err
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)
