"""Tell the data module which epoch starts, so augmentation varies by epoch and stays reproducible."""

from __future__ import annotations

import lightning as L


class DataEpochCallback(L.Callback):
    """Calls ``datamodule.set_epoch(epoch)`` at each training epoch start (data modules without it are left alone)."""

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        set_epoch = getattr(trainer.datamodule, "set_epoch", None)
        if callable(set_epoch):
            set_epoch(trainer.current_epoch)


class RunConfigCallback(L.Callback):
    """Stores the resolved run config in every checkpoint, so evaluation can rebuild the data it trained on."""

    def __init__(self, config: dict | None = None) -> None:
        self.config = config

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict) -> None:
        from sd_lightning.models.checkpoint_io import RUN_CONFIG_KEY

        checkpoint[RUN_CONFIG_KEY] = self.config
