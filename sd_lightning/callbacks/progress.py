"""How long will training take: step and validation timing, and a progress bar that shows the answer.

Lightning's progress bar projects the current epoch only; a step-budgeted run (``trainer.max_steps``)
spans many short epochs and periodic validations with sample grids. ``RunClock`` projects the whole run:
remaining optimizer steps times the measured step time plus the remaining validations times the last
measured validation time. The first steps after a (re)start are left out of the step time, since they
include warm-up work (allocations, caches, lazy initialization).
"""

from __future__ import annotations

import math
import statistics
import time
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


def validation_interval_steps(trainer: L.Trainer) -> float:
    """Optimizer steps between two validations under the trainer's schedule (inf when it never validates)."""
    batches = trainer.num_training_batches
    if not batches or not math.isfinite(batches) or trainer.limit_val_batches == 0:
        return math.inf
    accumulate = max(1, trainer.accumulate_grad_batches)
    every = trainer.val_check_batch
    if isinstance(every, (int, float)) and math.isfinite(every) and every < batches:
        return max(1.0, every / accumulate)
    return math.ceil(batches / accumulate) * (trainer.check_val_every_n_epoch or 1)


class RunClock(L.Callback):
    """Measures training-step and validation times and projects the remaining time of the run."""

    def __init__(self, skip_steps: int = 3) -> None:
        self.skip_steps = skip_steps
        self.step_times: list[float] = []
        self.validation_times: list[float] = []
        self._seen = 0
        self._batch_start: float | None = None
        self._batch_step = 0
        self._validation_start: float | None = None
        self._fit_start: float | None = None

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._fit_start = time.perf_counter()
        self._seen = 0

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        if self._batch_start is None:
            self._batch_start = time.perf_counter()
            self._batch_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        if self._batch_start is None or trainer.global_step == self._batch_step:
            return  # a gradient-accumulation micro-batch: the step is not finished yet
        elapsed = time.perf_counter() - self._batch_start
        steps = trainer.global_step - self._batch_step
        self._batch_start = None
        self._seen += steps
        if self._seen > self.skip_steps:
            self.step_times.extend([elapsed / steps] * steps)
            del self.step_times[:-200]

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if not trainer.sanity_checking:
            self._validation_start = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Sample grids are written in on_validation_epoch_end, before this hook: their time is included.
        if self._validation_start is not None and not trainer.sanity_checking:
            self.validation_times.append(time.perf_counter() - self._validation_start)
            self._validation_start = None
        self._batch_start = None

    @property
    def step_time(self) -> float | None:
        """Median seconds per optimizer step after warm-up (robust to the odd slow step)."""
        return statistics.median(self.step_times) if self.step_times else None

    def remaining(self, trainer: L.Trainer) -> float | None:
        """Projected seconds until ``max_steps``: steps left × step time + validations left × validation time."""
        if trainer.max_steps is not None and 0 <= trainer.max_steps <= trainer.global_step:
            return 0.0
        if self.step_time is None or trainer.max_steps is None or trainer.max_steps < 0:
            return None
        step = trainer.global_step
        left = max(0, trainer.max_steps - step) * self.step_time
        interval = validation_interval_steps(trainer)
        if self.validation_times and math.isfinite(interval):
            validations = math.floor(trainer.max_steps / interval) - math.floor(step / interval)
            left += max(0, validations) * self.validation_times[-1]
        return left

    def elapsed(self) -> float:
        return 0.0 if self._fit_start is None else time.perf_counter() - self._fit_start


class _Clocked:
    """Feeds a progress bar's ``RunClock`` from the same hooks the bar renders in."""

    clock: RunClock

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        super().on_train_start(trainer, pl_module)
        self.clock.on_train_start(trainer, pl_module)

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int) -> None:
        super().on_train_batch_start(trainer, pl_module, batch, batch_idx)
        self.clock.on_train_batch_start(trainer, pl_module, batch, batch_idx)

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
