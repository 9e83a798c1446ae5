"""Training stability over time: how much fixed-seed samples move between validations, the EMA-vs-raw
gap, and divergence (non-finite validation metrics or a jump of the monitored metric over its best).

Loss curves of diffusion models are flat and noisy; samples drawn from the same noise at every validation
show when the model is still changing (large sample MSE / low SSIM between validations) or has settled,
and a validation metric several times its best so far is the usual first sign of a run that blew up.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import lightning as L
import torch
from lightning.pytorch.utilities import rank_zero_warn
from torchmetrics.functional.image import structural_similarity_index_measure

from sd_lightning.callbacks.ema import EMACallback, _named_trainable
from sd_lightning.diffusion.sampling import generate

log = logging.getLogger(__name__)


def divergence_reason(metrics: Mapping[str, float], monitor: str, best: float | None, factor: float) -> str | None:
    """Why these validation metrics mean the run diverged, or None (``monitor`` is lower-is-better)."""
    bad = sorted(name for name, value in metrics.items() if not math.isfinite(value))
    if bad:
        return f"non-finite validation metrics: {', '.join(bad)}"
    value = metrics.get(monitor)
    if value is not None and best is not None and best > 0 and value > factor * best:
        return f"{monitor}={value:.4g} is over {factor:g}x its best so far ({best:.4g})"
    return None


def sample_change(current: torch.Tensor, previous: torch.Tensor) -> dict[str, float]:
    """Pixel MSE and SSIM between two batches of images in [0, 1], shaped [N, C, H, W]."""
    current, previous = current.float(), previous.float()
    ssim = structural_similarity_index_measure(current, previous, data_range=1.0)
    return {"stability/sample_mse": float(torch.mean((current - previous) ** 2)),
            "stability/sample_ssim": float(ssim)}


def ema_distance(ema_callback: EMACallback, pl_module: L.LightningModule) -> float | None:
    """Relative L2 distance ||EMA - raw|| / ||raw|| over the trained weights (None without EMA)."""
    ema = ema_callback.ema
    if ema is None:
        return None
    # While validation runs on EMA weights, the raw ones are parked in ``temp_stored_params``.
    raw = ema.temp_stored_params if ema_callback._swapped else [p for _, p in _named_trainable(pl_module)]
    if raw is None or len(raw) != len(ema.shadow_params):
        return None
    difference = sum(float(torch.sum((s.float() - r.float().to(s.device)) ** 2)) for s, r in zip(ema.shadow_params, raw))
    norm = sum(float(torch.sum(r.float() ** 2)) for r in raw)
    return math.sqrt(difference) / max(math.sqrt(norm), 1e-12)


class StabilityCallback(L.Callback):
    """Logs ``stability/*`` after each validation: ``sample_mse``/``sample_ssim`` of fixed-seed samples vs
    the previous validation, ``ema_param_distance``, ``diverged`` (0/1) and ``monitor_over_best``.

    Samples come from the module's own pipeline (``build_pipeline`` + ``generate``, as the sample grid),
    with few DDIM steps so they stay cheap. The previous samples, the best monitored value and the
    divergence count are saved in checkpoints, so a resumed run compares against what it saw before.
    """

    def __init__(self, prompts: Sequence[str] = (), num_samples: int = 4, steps: int = 4, seed: int = 4321,
                 monitor: str = "val/mse", divergence_factor: float = 3.0, stop_on_divergence: bool = False) -> None:
        if num_samples < 1:
            raise ValueError(f"callbacks.stability.num_samples must be >= 1, got {num_samples}")
        if divergence_factor <= 1.0:
            raise ValueError(f"callbacks.stability.divergence_factor must be > 1, got {divergence_factor}")
        prompts = list(prompts) or [""]
        self.prompts = [prompts[i % len(prompts)] for i in range(num_samples)]
        self.steps = steps
        self.seed = seed
        self.monitor = monitor
        self.divergence_factor = divergence_factor
        self.stop_on_divergence = stop_on_divergence
        self.previous: torch.Tensor | None = None
        self.best: float | None = None
        self.divergences = 0
        self.validations = 0
        self.history: list[dict[str, float]] = []
        self._pending: dict[str, float] = {}

    @property
    def state_key(self) -> str:
        return "stability"

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Runs while validation weights (EMA, when enabled) are in place, i.e. on what the grids show.
        if trainer.sanity_checking:
            return
        self._pending = {}
        ema_callback = next((c for c in trainer.callbacks if isinstance(c, EMACallback)), None)
        if ema_callback is not None and (distance := ema_distance(ema_callback, pl_module)) is not None:
            self._pending["stability/ema_param_distance"] = distance
        if not trainer.is_global_zero or not hasattr(pl_module, "build_pipeline"):
            return
        with torch.no_grad():
            images = generate(pl_module.build_pipeline(), prompts=self.prompts, seed=self.seed, steps=self.steps,
                              guidance_scale=pl_module.sampling["guidance_scale"], output_type="pt")
        images = images.detach().float().cpu()
        if self.previous is not None and self.previous.shape == images.shape:
            self._pending.update(sample_change(images, self.previous))
        self.previous = images

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation metrics reach ``callback_metrics`` only after every on_validation_epoch_end hook.
        if trainer.sanity_checking:
            return
        self.validations += 1
        metrics = {k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("val/") and v.numel() == 1}
        reason = divergence_reason(metrics, self.monitor, self.best, self.divergence_factor)
        value = metrics.get(self.monitor)
        if value is not None and math.isfinite(value):
            if self.best is not None and self.best > 0:
                self._pending["stability/monitor_over_best"] = value / self.best
            self.best = value if self.best is None else min(self.best, value)
        self._pending["stability/diverged"] = float(reason is not None)
        if reason is not None:
            self.divergences += 1
            message = (f"training looks diverged at step {trainer.global_step}: {reason}. Lower optimizer.lr, "
                       "add regularizer=grad_clip_norm, or resume from an earlier checkpoint.")
            log.warning(message)
            rank_zero_warn(message)
            if self.stop_on_divergence:
                trainer.should_stop = True
        # The step Lightning logs this validation's val/* metrics at (as LearningRateMonitor does), so the
        # stability values share their row, and a resume's CSV trimming treats both alike.
        step = getattr(trainer.fit_loop.epoch_loop, "_batches_that_stepped", trainer.global_step)
        self.history.append({"step": float(step), **self._pending})
        for logger in trainer.loggers:
            logger.log_metrics(dict(self._pending), step=step)
        self._pending = {}

    def state_dict(self) -> dict[str, Any]:
        return {"previous": self.previous, "best": self.best, "divergences": self.divergences,
                "validations": self.validations}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.previous = state_dict.get("previous")
        self.best = state_dict.get("best")
        self.divergences = int(state_dict.get("divergences", 0))
        self.validations = int(state_dict.get("validations", 0))
