"""Checkpoint policy that ModelCheckpoint lacks."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.utilities.exceptions import SIGTERMException

log = logging.getLogger(__name__)


PREVIOUS_LAST = "last.prev.ckpt"


class KeepPreviousCheckpointIO(TorchCheckpointIO):
    """Before ``last.ckpt`` is overwritten, the previous one is renamed ``last.prev.ckpt``: a disk fault that
    damages the newest resume point (found by ``resume=auto``) still leaves an intact one, one save older."""

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any = None) -> None:
        path = Path(path)
        if path.name != "last.ckpt" or not path.is_file():
            super().save_checkpoint(checkpoint, path, storage_options)
            return
        pending = path.with_name(f".{path.name}.writing")  # the new one, complete before anything is renamed
        try:
            super().save_checkpoint(checkpoint, pending, storage_options)
        except BaseException:
            pending.unlink(missing_ok=True)
            raise
        os.replace(path, path.with_name(PREVIOUS_LAST))
        os.replace(pending, path)


def last_checkpoint_callback(trainer: L.Trainer) -> ModelCheckpoint | None:
    """The ModelCheckpoint that writes ``last.ckpt`` (the resume point), if any."""
    for callback in trainer.checkpoint_callbacks:
        if isinstance(callback, ModelCheckpoint) and callback.save_last and callback.dirpath is not None:
            return callback
    return None


def last_checkpoint_path(trainer: L.Trainer) -> Path | None:
    checkpoint = last_checkpoint_callback(trainer)
    if checkpoint is None:
        return None
    return Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"


def at_optimizer_step_boundary(trainer: L.Trainer) -> bool:
    """True unless gradients of an unfinished accumulation cycle are pending (they are not checkpointed)."""
    completed = trainer.fit_loop.epoch_loop.batch_progress.current.completed
    return trainer.accumulate_grad_batches == 1 or completed % trainer.accumulate_grad_batches == 0


class FinalCheckpointCallback(L.Callback):
    """Saves ``last.ckpt`` when training ends between validations (e.g. at ``max_steps`` mid-epoch).

    ModelCheckpoint saves after validation only, so without this the steps after the last validation
    would be lost and a resumed or sampled "last" model would be older than the run.
    """

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = last_checkpoint_callback(trainer)
        path = last_checkpoint_path(trainer)
        # Another checkpoint (e.g. the best one) saved at this step does not make last.ckpt current.
        if path is None or trainer.global_step == 0 or getattr(checkpoint, "_last_global_step_saved", -1) == trainer.global_step:
            return
        trainer.save_checkpoint(path, weights_only=False)
        checkpoint.last_model_path = str(path)


class PreemptionCheckpointCallback(L.Callback):
    """On SIGTERM (and SIGUSR1 when no cluster plugin owns it), save ``last.ckpt`` and stop.

    Lightning turns SIGTERM into a clean stop after the current batch; this writes the checkpoint that
    the next job resumes from. A stop inside a gradient-accumulation cycle saves nothing (the pending
    gradients cannot be checkpointed), so the resume starts from the previous checkpoint instead.
    """

    def __init__(self, signals: tuple[str, ...] = ("SIGUSR1",)) -> None:
        self.signals = signals
        self._previous: dict[int, Any] = {}

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        for name in self.signals:
            number = getattr(signal, name, None)
            if number is not None and signal.getsignal(number) in (signal.SIG_DFL, None):
                # Forward to SIGTERM, which Lightning turns into a clean stop after the current batch.
                self._previous[number] = signal.signal(number, lambda *_: os.kill(os.getpid(), signal.SIGTERM))

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._restore()

    def _restore(self) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous = {}

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()
        if not isinstance(exception, SIGTERMException):
            return
        path = last_checkpoint_path(trainer)
        if path is None:
            return
        if not at_optimizer_step_boundary(trainer):
            log.warning("stopped inside a gradient-accumulation cycle: keeping the previous checkpoint")
            return
        trainer.save_checkpoint(path, weights_only=False)
        log.warning("preempted at step %d: saved %s (resume with ckpt_path=last)", trainer.global_step, path)
