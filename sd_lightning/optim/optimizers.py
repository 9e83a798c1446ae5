"""Optimizers from maintained packages, as Hydra ``_partial_`` targets called with ``params=``."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch


def split_weight_decay(
    named_parameters: Iterable[tuple[str, torch.nn.Parameter]],
    weight_decay: float | None = None,
) -> list[dict[str, Any]]:
    """Parameter groups: weight matrices / kernels decayed, biases and normalization scales not.

    Decaying a bias or a norm's scale only drags it towards zero (a norm's scale towards a dead layer)
    without regularizing any interaction, so 1-D tensors and anything named ``norm`` (LayerNorm/GroupNorm,
    diffusers' ``norm1``, ``conv_norm_out``) go to a ``weight_decay=0`` group. The decayed group takes
    ``weight_decay`` when given, else the optimizer's own default. Frozen parameters never get a gradient
    and are left out; empty groups are dropped.
    """
    decay: list[torch.nn.Parameter] = []
    no_decay: list[torch.nn.Parameter] = []
    for name, param in named_parameters:
        if param.requires_grad:
            (no_decay if param.ndim <= 1 or "norm" in name.lower() else decay).append(param)
    decayed: dict[str, Any] = {"params": decay}
    if weight_decay is not None:
        decayed["weight_decay"] = weight_decay
    return [group for group in (decayed, {"params": no_decay, "weight_decay": 0.0}) if group["params"]]


def build_lion(params: Iterable[Any], lr: float = 2e-4, betas: tuple[float, float] = (0.9, 0.99),
               weight_decay: float = 0.1) -> torch.optim.Optimizer:
    """Lion (Chen et al. 2023, lion-pytorch): sign updates; use ~3-10x smaller lr and larger decay than AdamW."""
    from lion_pytorch import Lion

    return Lion(params, lr=lr, betas=tuple(betas), weight_decay=weight_decay)


def build_prodigy(params: Iterable[Any], lr: float = 1.0, weight_decay: float = 0.01, d_coef: float = 1.0,
                  safeguard_warmup: bool = True) -> torch.optim.Optimizer:
    """Prodigy (Mishchenko & Defazio 2023, prodigyopt): an Adam that estimates its own step size.

    The effective step is ``lr * d`` where ``d`` is Prodigy's running estimate of the distance to the
    solution, so ``lr`` is a dimensionless multiplier: 1.0 trusts the estimate (the recommended setting),
    0.5 halves it. Setting it to an AdamW-style 1e-3 would shrink every step a thousandfold.
    ``safeguard_warmup`` keeps ``d`` from overshooting while an LR warmup holds ``lr`` small.
    """
    from prodigyopt import Prodigy

    return Prodigy(params, lr=lr, weight_decay=weight_decay, d_coef=d_coef, safeguard_warmup=safeguard_warmup)


def build_schedule_free_adamw(params: Iterable[Any], lr: float = 2e-3, warmup_steps: int = 100,
                              weight_decay: float = 0.01) -> torch.optim.Optimizer:
    """Schedule-free AdamW (Defazio et al. 2024, schedulefree): iterate averaging replaces the LR schedule.

    Use it without a schedule (``configure_optimization`` drops one). In train mode the parameters hold the
    point where gradients are taken, in eval mode the averaged weights worth evaluating and saving, so the
    optimizer must follow the module's mode: ``ScheduleFreeModeCallback`` switches it.
    """
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
        raise RuntimeError(
            "optimizer=adamw_8bit needs bitsandbytes (`pip install bitsandbytes`, CUDA builds only), which is "
            "not importable here; use optimizer=adamw"
        ) from err
    return bnb.optim.AdamW8bit(params, lr=lr, weight_decay=weight_decay)


def build_memory_efficient_adamw(params: Iterable[Any], lr: float = 1e-5, weight_decay: float = 0.01
                                 ) -> torch.optim.Optimizer:
    """8-bit AdamW where CUDA and bitsandbytes are there, else torch's AdamW: decided when the optimizer is built."""
    import importlib.util
    import logging

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return build_adamw_8bit(params, lr=lr, weight_decay=weight_decay)
    reason = "no CUDA device" if not torch.cuda.is_available() else "bitsandbytes is not installed"
    logging.getLogger("sd_lightning").info("optimizer: 8-bit AdamW unavailable (%s), using torch.optim.AdamW", reason)
    return torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)


def auto_precision() -> str:
    """bf16 autocast on GPUs with bf16 units, else fp32 (CPU autocast is 50-200x slower); probed when the Trainer is
    built (``trainer.precision: {_target_: sd_lightning.optim.optimizers.auto_precision}``).

    Only native bf16 counts: ``torch.cuda.is_bf16_supported()`` alone also says yes on pre-Ampere GPUs (V100, T4),
    which have no bf16 tensor cores and where torch only emulates it.
    """
    if not torch.cuda.is_available():
        return "32-true"
    return "bf16-mixed" if torch.cuda.is_bf16_supported(including_emulation=False) else "32-true"
