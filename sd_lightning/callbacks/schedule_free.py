"""Train/eval mode switching for schedule-free optimizers (their weights differ between the two modes)."""

from __future__ import annotations

from typing import Any

import lightning as L


def _switchable(trainer: L.Trainer) -> list[Any]:
    return [opt for opt in trainer.optimizers if callable(getattr(opt, "train", None)) and callable(getattr(opt, "eval", None))]


class ScheduleFreeModeCallback(L.Callback):
    """Puts schedule-free optimizers in train mode while training and eval mode for validation and saving.

    A no-op for ordinary optimizers. Checkpoints hold the eval-mode (averaged) weights, which are the
    ones to sample from; training resumes by switching back to train mode.
    """

    def _set(self, trainer: L.Trainer, mode: str) -> None:
        for optimizer in _switchable(trainer):
            getattr(optimizer, mode)()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "train")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "train")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "eval")

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.training or trainer.state.fn == "fit":
            self._set(trainer, "train")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "eval")
