"""How long will training take: the real loop's cost per step, per validation and per epoch, and a progress bar
that shows the answer.

Lightning's progress bar projects the current epoch only; a step-budgeted run (``trainer.max_steps``) spans many
short epochs and periodic validations with sample grids and checkpoints. ``RunClock`` times the loop as it really
runs: a step is the time from one optimizer step's end to the next's, so data loading, every callback and every
logger between them count; a validation is the time from its start to the end of the next step, less one step, so
the checkpoints written after it count too; a step that crosses an epoch boundary adds that boundary's extra cost.
The remaining time is steps left × mean step time + validations left × validation cost + epochs left × boundary
cost. The first steps after a (re)start are left out (allocations, caches, lazy initialization).
"""

from __future__ import annotations

import math
import statistics
import time
from dataclasses import dataclass
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ProgressBar, RichProgressBar


def format_duration(seconds: float | None) -> str:
    """``3h05m``, ``12m03s`` or ``41s``; ``?`` when unknown."""
    if seconds is None or not math.isfinite(seconds):
        return "?"
    seconds = max(0, round(seconds))
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


def validation_interval(batches: float, accumulate: int, val_check_batch: float | None,
                        every_n_epochs: int | None, validates: bool = True) -> float:
    """Optimizer steps between two validations, as Lightning schedules them (inf when it never validates):
    every ``val_check_batch`` batches within an epoch (or across epochs when ``every_n_epochs`` is None),
    else every ``every_n_epochs`` epochs."""
    if not validates or not batches or not math.isfinite(batches):
        return math.inf
    accumulate = max(1, accumulate)
    if val_check_batch is not None and math.isfinite(val_check_batch) and (every_n_epochs is None
                                                                           or val_check_batch < batches):
        return max(1.0, val_check_batch / accumulate)
    return math.ceil(batches / accumulate) * (every_n_epochs or 1)


@dataclass(frozen=True)
class Schedule:
    """What a run's remaining time depends on besides its costs: its step budget, epoch length and validations."""

    max_steps: int
    steps_per_epoch: float
    validation_every: float

    @classmethod
    def of(cls, trainer: L.Trainer) -> Schedule:
        batches, accumulate = trainer.num_training_batches, max(1, trainer.accumulate_grad_batches)
        per_epoch = math.ceil(batches / accumulate) if batches and math.isfinite(batches) else math.inf
        every = trainer.val_check_batch if isinstance(trainer.val_check_batch, (int, float)) else None
        return cls(trainer.max_steps, per_epoch, validation_interval(
            batches, accumulate, every, trainer.check_val_every_n_epoch, trainer.limit_val_batches != 0))

    @classmethod
    def configured(cls, trainer: Any, batches: int) -> Schedule:
        """From a trainer config (``cfg.trainer``) and the training loader's batches per epoch."""
        limit = trainer.get("limit_train_batches")
        if isinstance(limit, float) and limit <= 1.0:
            batches = int(batches * limit)
        elif limit is not None:
            batches = min(batches, int(limit))
        accumulate = max(1, int(trainer.get("accumulate_grad_batches") or 1))
        interval = trainer.get("val_check_interval")
        every = batches * interval if isinstance(interval, float) else (interval or batches)
        validates = trainer.get("limit_val_batches", 1.0) not in (0, 0.0)
        return cls(int(trainer.max_steps), math.ceil(batches / accumulate),
                   validation_interval(batches, accumulate, every, trainer.get("check_val_every_n_epoch", 1),
                                       validates))

    def validations(self, step: int = 0) -> int:
        if not math.isfinite(self.validation_every):
            return 0
        return max(0, math.floor(self.max_steps / self.validation_every) - math.floor(step / self.validation_every))

    def boundaries(self, step: int = 0) -> int:
        """Epoch boundaries still to cross: the step after each multiple of the epoch length crosses one."""
        if not math.isfinite(self.steps_per_epoch):
            return 0
        per_epoch = self.steps_per_epoch
        return max(0, math.ceil(self.max_steps / per_epoch) - max(1, math.ceil(step / per_epoch)))

    def remaining(self, step: int, step_time: float, validation_time: float | None, boundary_time: float) -> float:
        left = max(0, self.max_steps - step) * step_time + self.boundaries(step) * boundary_time
        return left + (self.validations(step) * validation_time if validation_time is not None else 0.0)


class RunClock(L.Callback):
    """Times the training loop end to end and projects the remaining time of the run."""

    def __init__(self, skip_steps: int = 3) -> None:
        self.skip_steps = skip_steps
        self.step_times: list[float] = []
        self.validation_times: list[float] = []
        self.boundary_times: list[float] = []
        self._seen = 0
        self._last: tuple[float, int, int] | None = None  # (time, global step, epoch) at the last step's end
        self._validation_start: float | None = None
        self._after_validation: float | None = None
        self._fit_start: float | None = None
        self._fit_begin: float | None = None
        self.first_step_seconds: float | None = None  # from fit start (setup, sanity check) to the first step's end

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_begin = time.perf_counter()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._seen = 0
        self._last = None
        self._after_validation = None

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        now, step, epoch = time.perf_counter(), trainer.global_step, trainer.current_epoch
        last, self._last = self._last, (now, step, epoch)
        if last is None:
            if self.first_step_seconds is None and self._fit_begin is not None:
                self.first_step_seconds = now - self._fit_begin
            return
        if step == last[1]:
            self._last = last  # a gradient-accumulation micro-batch: the step is not finished yet
            return
        steps = step - last[1]
        self._seen += steps
        started_validation, self._after_validation = self._after_validation, None
        if self._seen <= self.skip_steps:
            return
        if started_validation is not None:
            if self.step_time is not None:
                self.validation_times.append(max(0.0, now - started_validation - steps * self.step_time))
        elif epoch != last[2]:
            self.boundary_times.append(now - last[0])
        else:
            self.step_times.extend([(now - last[0]) / steps] * steps)
            del self.step_times[:-200]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The validation's cost is settled at the next step's end: checkpoints are written after this hook.
        if self._validation_start is not None and not trainer.sanity_checking:
            self._after_validation, self._validation_start = self._validation_start, None

    @property
    def step_time(self) -> float | None:
        """Mean seconds per optimizer step after warm-up (the occasional slow step, e.g. a logger flush, is part of
        what a run pays)."""
        return statistics.fmean(self.step_times) if self.step_times else None

    @property
    def validation_time(self) -> float | None:
        return self.validation_times[-1] if self.validation_times else None

    @property
    def boundary_time(self) -> float:
        """Extra seconds an epoch boundary costs beyond a step (0 until one was timed)."""
        if not self.boundary_times or self.step_time is None:
            return 0.0
        return max(0.0, statistics.fmean(self.boundary_times) - self.step_time)

    def remaining(self, trainer: L.Trainer) -> float | None:
        """Projected seconds until ``max_steps``."""
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return 0.0
        if self.step_time is None or trainer.max_steps is None or trainer.max_steps < 0:
            return None
        return Schedule.of(trainer).remaining(trainer.global_step, self.step_time, self.validation_time,
                                              self.boundary_time)

    def elapsed(self) -> float:
        return 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start


class FitTimeCallback(L.Callback):
    """Logs ``time/fit_seconds``, the wall time of ``trainer.fit`` (what ``estimate=true`` predicts), from the
    process that trained (under ``ddp_spawn`` that is not the one that called fit)."""

    def __init__(self) -> None:
        self._started: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._started = time.perf_counter()

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._started is not None and trainer.is_global_zero and not trainer.interrupted:
            for logger in trainer.loggers:
                logger.log_metrics({"time/fit_seconds": time.perf_counter() - self._started}, step=trainer.global_step)


class _Clocked:
    """Feeds a progress bar's ``RunClock`` from the same hooks the bar renders in."""

    clock: RunClock

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.clock.on_train_start(trainer, pl_module)

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        self.clock.on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_start(trainer, pl_module)
        self.clock.on_validation_start(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self.clock.on_validation_end(trainer, pl_module)
        super().on_validation_end(trainer, pl_module)

    def run_metrics(self, trainer: L.Trainer) -> dict[str, str]:
        """Step out of ``max_steps`` and the projected time left and in total."""
        remaining = self.clock.remaining(trainer)
        items = {"step": f"{trainer.global_step}/{trainer.max_steps}", "eta": format_duration(remaining)}
        if remaining is not None:
            items["total"] = format_duration(self.clock.elapsed() + remaining)
        return items


def epoch_description(trainer: L.Trainer) -> str:
    """``epoch 3``, or ``epoch 3/9`` when the run is budgeted in epochs (never ``Epoch 3/-2`` for a step budget)."""
    epochs = trainer.max_epochs
    budgeted = epochs is not None and epochs > 0 and not (trainer.max_steps and trainer.max_steps > 0)
    return f"epoch {trainer.current_epoch}" + (f"/{epochs - 1}" if budgeted else "")


class EtaProgressBar(_Clocked, RichProgressBar):
    """Rich progress bar for a terminal: the epoch's batches, the step out of ``max_steps``, time left and total."""

    def __init__(self, *args: Any, skip_steps: int = 3, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock = RunClock(skip_steps=skip_steps)

    def _get_train_description(self, current_epoch: int) -> str:
        return epoch_description(self.trainer)

    def get_metrics(self, trainer: L.Trainer, pl_module: L.LightningModule) -> dict[str, Any]:
        return {**super().get_metrics(trainer, pl_module), **self.run_metrics(trainer)}


class PlainProgressBar(_Clocked, ProgressBar):
    """Progress for logs that are not a terminal (CI, ``| tee``, SLURM output files), where a live bar shows
    nothing until the end: one plain line every ``interval_seconds``, after each validation and at the end."""

    def __init__(self, interval_seconds: float = 30.0, skip_steps: int = 3) -> None:
        super().__init__()
        self.clock = RunClock(skip_steps=skip_steps)
        self.interval_seconds = interval_seconds
        self._enabled = True
        self._last_line: float | None = None

    def disable(self) -> None:
        self._enabled = False

    def enable(self) -> None:
        self._enabled = True

    @property
    def is_enabled(self) -> bool:
        return self._enabled

    def line(self, trainer: L.Trainer, pl_module: L.LightningModule, event: str = "") -> str:
        metrics = {key: value for key, value in self.get_metrics(trainer, pl_module).items() if key != "v_num"}
        shown = " ".join(f"{key} {value:.4g}" if isinstance(value, float) else f"{key} {value}"
                         for key, value in metrics.items())
        run = self.run_metrics(trainer)
        total = f" (total {run['total']})" if "total" in run else ""
        return (f"{event}step {run['step']} {epoch_description(trainer)} {shown} | elapsed "
                f"{format_duration(self.clock.elapsed())} eta {run['eta']}{total}").replace("  ", " ")

    def _emit(self, trainer: L.Trainer, pl_module: L.LightningModule, event: str = "") -> None:
        if self._enabled and trainer.is_global_zero and not trainer.sanity_checking:
            print(self.line(trainer, pl_module, event), flush=True)
            self._last_line = time.perf_counter()

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        super().on_train_batch_end(trainer, pl_module, outputs, batch, batch_idx)
        due = self._last_line is None or time.perf_counter() - self._last_line >= self.interval_seconds
        if due and self.clock.step_time is not None:
            self._emit(trainer, pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_validation_end(trainer, pl_module)
        self._emit(trainer, pl_module, "validated: ")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._emit(trainer, pl_module, "finished: ")


def progress_bar(interactive: bool | None = None, interval_seconds: float = 30.0, skip_steps: int = 3) -> ProgressBar:
    """The rich bar where the output is a terminal or notebook (as Rich itself decides), plain lines elsewhere;
    ``interactive=true|false`` forces either."""
    if interactive is None:
        from rich.console import Console

        console = Console()
        interactive = console.is_terminal or console.is_jupyter
    if interactive:
        return EtaProgressBar(skip_steps=skip_steps)
    return PlainProgressBar(interval_seconds=interval_seconds, skip_steps=skip_steps)
