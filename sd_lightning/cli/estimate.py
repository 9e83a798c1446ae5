"""``sdl-train … estimate=true``: run the real loop briefly, project the whole run.

The run is built exactly as ``sdl-train`` builds it (``train.build_run``: data, model, every callback and logger,
checkpoints included) into a temporary folder, then trained for a few steps: past warm-up, across an epoch
boundary when epochs are short, through one validation with its sample grids and checkpoint, and one step more.
``RunClock`` times that loop end to end, so the projection pays what the real run pays, with no correction factor.
Nothing of a real run is created or touched.
"""

from __future__ import annotations

import resource
import sys
import tempfile
from pathlib import Path
from typing import Any

import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sd_lightning.callbacks.progress import RunClock, Schedule, format_duration

WARMUP_STEPS = 3
# Epochs up to this many steps are crossed once while timing, so their boundary cost is measured.
MAX_TIMED_EPOCH = 200


def peak_memory_mib() -> dict[str, float]:
    """Peak resident memory of this process (and peak CUDA allocation when on a GPU), in MiB."""
    rss_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    peaks = {"peak_rss_mib": rss_kib / (1024 if sys.platform != "darwin" else 1024 * 1024)}
    if torch.cuda.is_available():
        peaks["peak_cuda_mib"] = torch.cuda.max_memory_allocated() / 2**20
    return peaks


def estimate(cfg: DictConfig) -> dict[str, Any]:
    """Time the real loop; print and return the projection of the configured run (``total_seconds``: what
    ``trainer.fit`` takes from its start to ``max_steps``)."""
    from sd_lightning.cli.train import build_run, finish_loggers, log_run_config

    cfg = OmegaConf.create(OmegaConf.to_container(cfg, resolve=False))
    measured = int(cfg.get("estimate_steps", 10))
    accumulate = max(1, int(cfg.trainer.get("accumulate_grad_batches") or 1))
    with tempfile.TemporaryDirectory(prefix="sdl-estimate-") as scratch:
        run_dir = Path(scratch) / "run"
        OmegaConf.update(cfg, "paths.run_dir", str(run_dir))
        run = build_run(cfg, run_dir)
        run.datamodule.setup("fit")
        schedule = Schedule.configured(cfg.trainer, len(run.datamodule.train_dataloader()))
        timed = WARMUP_STEPS + measured
        if schedule.steps_per_epoch <= MAX_TIMED_EPOCH:
            timed = max(timed, int(schedule.steps_per_epoch) + 2)  # across one epoch boundary
        validates = schedule.validations() > 0
        clock = RunClock(skip_steps=WARMUP_STEPS)
        if validates:  # one validation after the timed steps, then one step that settles its cost
            timing = {"max_steps": timed + 1, "val_check_interval": timed * accumulate, "check_val_every_n_epoch": None}
        else:
            timing = {"max_steps": timed, "limit_val_batches": 0}
        trainer = instantiate(cfg.trainer, callbacks=[*run.callbacks, clock], logger=run.loggers or False, **timing)
        log_run_config(run)
        trainer.fit(run.model, datamodule=run.datamodule)
        finish_loggers(run.loggers)
    step_time = clock.step_time
    if step_time is None:
        raise RuntimeError(f"estimate: no step was timed after {WARMUP_STEPS} warm-up steps; raise estimate_steps")
    startup = max(0.0, (clock.first_step_seconds or 0.0) - step_time)
    validation = clock.validation_time or 0.0
    result = {
        "measured_steps": len(clock.step_times),
        "seconds_per_step": step_time,
        "max_steps": schedule.max_steps,
        "train_seconds": step_time * schedule.max_steps,
        "validations": schedule.validations(),
        "seconds_per_validation": validation,
        "epoch_boundaries": schedule.boundaries(),
        "seconds_per_epoch_boundary": clock.boundary_time,
        "startup_seconds": startup,
        "total_seconds": startup + schedule.remaining(0, step_time, validation, clock.boundary_time),
        "samples_per_second": trainer.world_size * int(cfg.data.batch_size) * accumulate / step_time,
        **peak_memory_mib(),
    }
    _print(cfg, result)
    return result


def _print(cfg: DictConfig, result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"estimate for '{cfg.name}' ({result['measured_steps']} steps of the real loop timed after "
                        "warm-up)", show_header=False)
    table.add_row("time per step", f"{result['seconds_per_step'] * 1000:.1f} ms "
                                   f"({result['samples_per_second']:.1f} samples/s; data, callbacks, loggers included)")
    table.add_row(f"training ({result['max_steps']} steps)", format_duration(result["train_seconds"]))
    table.add_row(f"validation ({result['validations']} × {result['seconds_per_validation']:.1f} s, with sample grids "
                  "and checkpoints)", format_duration(result["validations"] * result["seconds_per_validation"]))
    table.add_row(f"epoch boundaries ({result['epoch_boundaries']} × {result['seconds_per_epoch_boundary']:.2f} s)",
                  format_duration(result["epoch_boundaries"] * result["seconds_per_epoch_boundary"]))
    table.add_row("start-up (setup, sanity check, loggers)", format_duration(result["startup_seconds"]))
    table.add_row("projected total", format_duration(result["total_seconds"]))
    for key, label in (("peak_rss_mib", "peak memory (RSS)"), ("peak_cuda_mib", "peak GPU memory")):
        if key in result:
            table.add_row(label, f"{result[key]:.0f} MiB")
    Console().print(table)
