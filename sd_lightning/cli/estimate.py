"""``sdl-train … estimate=true``: time a few real steps and one validation, project the whole run.

The configured model, data, optimizer and trainer run as they would in training (same precision,
batch, accumulation, callbacks that cost time per step such as EMA), but into a temporary folder with
no logger and no checkpoints, so nothing of a real run is created or touched.
"""

from __future__ import annotations

import logging
import math
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sd_lightning.callbacks.progress import RunClock, format_duration, validation_interval_steps

log = logging.getLogger("sd_lightning")

# Callbacks that change the cost of a training step or of a validation; the rest only write files.
_TIMED_CALLBACKS = ("ema", "schedule_free", "nonfinite", "sample_grid")


def peak_memory_mib() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"peak_rss_mib": rss_kib / (1024 if sys.platform != "darwin" else 1024 * 1024)}
    if torch.cuda.is_available():
        peaks["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def estimate(cfg: DictConfig) -> dict[str, Any]:
    """Measure ``estimate_steps`` steps (after warm-up) and one validation; print and return the projection."""
    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    warmup = 3
    measured = int(cfg.get("estimate_steps", 10))
    with tempfile.TemporaryDirectory(prefix="sdl-estimate-") as scratch:
        OmegaConf.update(cfg, "paths.run_dir", str(Path(scratch) / "run"))
        datamodule = instantiate(cfg.data)
        model = instantiate(cfg.model)
        clock = RunClock(skip_steps=warmup)
        kept = [instantiate(cfg.callbacks[name]) for name in _TIMED_CALLBACKS
                if name in (cfg.get("callbacks") or {}) and cfg.callbacks[name] is not None]
        max_steps = int(cfg.trainer.max_steps)
        trainer = instantiate(cfg.trainer, max_steps=warmup + measured, callbacks=[clock, *kept], logger=False,
                              enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                              num_sanity_val_steps=0)
        started = time.perf_counter()
        trainer.fit(model, datamodule=datamodule)
        fit_seconds = time.perf_counter() - started
        interval = _interval(cfg, trainer)
        validations = 0 if not math.isfinite(interval) else math.floor(max_steps / interval)
        validation_seconds = 0.0
        if validations:
            validator = instantiate(cfg.trainer, callbacks=kept, logger=False, enable_checkpointing=False,
                                    enable_progress_bar=False)
            started = time.perf_counter()
            validator.validate(model, datamodule=datamodule, verbose=False)
            validation_seconds = time.perf_counter() - started
    step_time = clock.step_time or fit_seconds / max(1, trainer.global_step)
    result = {
        "measured_steps": len(clock.step_times),
        "seconds_per_step": step_time,
        "max_steps": max_steps,
        "train_seconds": step_time * max_steps,
        "validations": validations,
        "seconds_per_validation": validation_seconds,
        "total_seconds": step_time * max_steps + validations * validation_seconds,
        "samples_per_second": trainer.world_size * int(cfg.data.batch_size) * max(1, trainer.accumulate_grad_batches)
        / step_time,
        **peak_memory_mib(),
    }
    _print(cfg, result)
    return result


def _interval(cfg: DictConfig, trainer: Any) -> float:
    """Steps between validations of the configured run (the timing run itself had validation switched off)."""
    trainer.limit_val_batches = cfg.trainer.get("limit_val_batches", 1.0)
    return validation_interval_steps(trainer)


def _print(cfg: DictConfig, result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"estimate for '{cfg.name}' ({result['measured_steps']} steps timed after warm-up)",
                  show_header=False)
    table.add_row("time per step", f"{result['seconds_per_step'] * 1000:.1f} ms "
                                   f"({result['samples_per_second']:.1f} samples/s)")
    table.add_row(f"training ({result['max_steps']} steps)", format_duration(result["train_seconds"]))
    table.add_row(f"validation ({result['validations']} × {result['seconds_per_validation']:.1f} s, with sample grids)",
                  format_duration(result["validations"] * result["seconds_per_validation"]))
    table.add_row("projected total", format_duration(result["total_seconds"]))
    for key, label in (("peak_rss_mib", "peak memory (RSS)"), ("peak_cuda_mib", "peak GPU memory")):
        if key in result:
            table.add_row(label, f"{result[key]:.0f} MiB")
    Console().print(table)
