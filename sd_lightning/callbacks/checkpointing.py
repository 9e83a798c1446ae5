"""Checkpoint policy that ModelCheckpoint lacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning as L
from lightning.pytorch.callbacks import ModelCheckpoint


class FinalCheckpointCallback(L.Callback):
    """Saves ``last.ckpt`` when training ends between validations (e.g. at ``max_steps`` mid-epoch).

    ModelCheckpoint saves after validation only, so without this the steps after the last validation
    would be lost and a resumed or sampled "last" model would be older than the run.
    """

    def __init__(self) -> None:
        self._last_saved_step = -1

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        self._last_saved_step = trainer.global_step

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        checkpoint = trainer.checkpoint_callback
        if not isinstance(checkpoint, ModelCheckpoint) or not checkpoint.save_last or checkpoint.dirpath is None:
            return
        if trainer.global_step == self._last_saved_step or trainer.global_step == 0:
            return
        path = Path(checkpoint.dirpath) / f"{checkpoint.CHECKPOINT_NAME_LAST}{checkpoint.FILE_EXTENSION}"
        trainer.save_checkpoint(path)
        checkpoint.last_model_path = str(path)
