"""Fault injection for the reliability tests (importable by training subprocesses via PYTHONPATH)."""

import os
import signal

import lightning as L


class KillAtStep(L.Callback):
    """kill -9 of the training process itself when ``global_step`` reaches ``step`` (between checkpoints)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Deliver ``signum`` (a preemption notice) to the process at ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and batch_idx >= 0:
            os.kill(os.getpid(), self.signum)
            self.step = -1


class PoisonBatches(L.Callback):
    """Makes the pixels of batches from ``start`` on NaN (a broken image that got through)."""

    def __init__(self, start: int, count: int = 1000) -> None:
        self.start = start
        self.stop = start + count

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start <= trainer.global_step < self.stop:
            batch["pixel_values"].fill_(float("nan"))
