"""Save a trained VAE with its data-derived latent scaling factor, for the diffusion stage to load."""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import lightning as L

log = logging.getLogger(__name__)


class VaeExportCallback(L.Callback):
    """At the end of fit, measures 1/std of the training latents and writes ``out_dir`` atomically."""

    def __init__(self, out_dir: str, max_batches: int | None = None) -> None:
        self.out_dir = Path(out_dir)
        self.max_batches = max_batches
        self.scaling_factor: float | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        loader = trainer.datamodule.plain_train_dataloader()
        self.scaling_factor = pl_module.compute_scaling_factor(loader, self.max_batches)
        if not trainer.is_global_zero:
            return
        pl_module.vae.register_to_config(scaling_factor=self.scaling_factor)
        tmp = self.out_dir.with_name(self.out_dir.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        pl_module.vae.save_pretrained(tmp, safe_serialization=True)
        if self.out_dir.exists():
            shutil.rmtree(self.out_dir)
        tmp.rename(self.out_dir)
        log.info("saved VAE (scaling factor %.5f) to %s", self.scaling_factor, self.out_dir)
