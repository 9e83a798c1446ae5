"""Checkpoint policy that ModelCheckpoint lacks."""

from __future__ import annotations

import logging
import os
import signal
from pathlib import Path
from typing import Any

import lightning as L
from lightning.fabric.plugins import TorchCheckpointIO
from lightning.pytorch.callbacks import Checkpoint, ModelCheckpoint
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


class FinalCheckpointCallback(Checkpoint):
    """Saves ``last.ckpt`` at the step that ends training (``max_steps``) and when training ends between validations.

    ModelCheckpoint saves after validation only, so without this the steps after the last validation would be lost
    and a resumed or sampled "last" model would be older than the run. At ``max_steps`` the save happens inside the
    epoch — at that step's ``on_train_batch_end``, and again after a validation of that step — a point Lightning
    resumes mid-epoch from: a finished run continued with a higher ``max_steps`` then draws the batches an
    uninterrupted run would (saved at ``on_train_end``, Lightning counts the epoch finished, and the continued run
    would start the next epoch's order instead). A ``Checkpoint``, so that Lightning runs it after the other
    callbacks' hooks (the EMA update of that step).
    """

    def __init__(self) -> None:
        self._saved_step = -1

    @staticmethod
    def _final_step(trainer: L.Trainer) -> bool:
        return 0 < trainer.max_steps <= trainer.global_step  # global_step moves only on a real optimizer step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self._final_step(trainer):
            self._save(trainer)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if self._final_step(trainer) and not trainer.sanity_checking and trainer.state.fn == "fit":
            self._save(trainer, after_validation=True)

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._save(trainer)

    def _save(self, trainer: L.Trainer, after_validation: bool = False) -> None:
        checkpoint = last_checkpoint_callback(trainer)
        if checkpoint is None or trainer.global_step == 0:
            return
        # Another checkpoint (e.g. the best one) saved at this step does not make last.ckpt current.
        if not after_validation and trainer.global_step in (self._saved_step, checkpoint._last_global_step_saved):
            return
        path = last_checkpoint_path(trainer)
        trainer.save_checkpoint(path, weights_only=False)
        checkpoint.last_model_path = str(path)
        # ModelCheckpoint's on_train_end writes last.ckpt again, from the finished-epoch state, unless it knows one
        # was written.
        checkpoint._last_checkpoint_saved = str(path)
        self._saved_step = trainer.global_step


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
