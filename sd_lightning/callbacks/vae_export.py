"""Save a trained VAE with its data-derived latent scaling, for the diffusion stage to load."""

from __future__ import annotations

import copy
import json
import logging
from pathlib import Path

import lightning as L

from sd_lightning.files import staged_folder
from sd_lightning.models.autoencoder import fold_latent_standardization

log = logging.getLogger(__name__)

STANDARDIZATIONS = ("global", "shifted", "per_channel")


class VaeExportCallback(L.Callback):
    """At the end of fit, measures the training latents' statistics and writes ``out_dir`` atomically.

    ``standardization``: ``global`` sets the VAE's ``scaling_factor`` to 1/std over all latent values (as SD 1.x);
    ``shifted`` also sets ``shift_factor`` to their mean (SD 3's VAE: latents = (z - shift) · scale; only SD 3's
    pipeline reads the shift, so the SD 1.x/2.x and SDXL families refuse such a VAE);
    ``per_channel`` folds each channel's mean and std from the training split into the VAE's latent 1x1
    convolutions (see ``fold_latent_standardization``) and sets ``scaling_factor`` to 1, so diffusion sees
    zero-mean unit-variance channels and the exported VAE still works in a plain diffusers pipeline. The
    measured statistics are stored beside the weights in ``latent_statistics.json``.
    """

    def __init__(self, out_dir: str, max_batches: int | None = None, standardization: str = "global") -> None:
        if standardization not in STANDARDIZATIONS:
            raise ValueError(f"callbacks.vae_export.standardization={standardization!r} must be one of "
                             f"{list(STANDARDIZATIONS)}")
        self.out_dir = Path(out_dir)
        self.max_batches = max_batches
        self.standardization = standardization
        self.scaling_factor: float | None = None

    def on_fit_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.interrupted:
            return
        loader = trainer.datamodule.plain_train_dataloader()
        stats = pl_module.compute_latent_statistics(loader, self.max_batches)
        if not trainer.is_global_zero:
            return
        vae = copy.deepcopy(pl_module.vae)
        if self.standardization == "per_channel":
            fold_latent_standardization(vae, stats.mean, stats.std)
            self.scaling_factor = 1.0
        else:
            self.scaling_factor = 1.0 / stats.overall_std
        if self.standardization == "shifted":
            vae.register_to_config(shift_factor=stats.overall_mean)
        vae.register_to_config(scaling_factor=self.scaling_factor)
        statistics = {"standardization": self.standardization, "scaling_factor": self.scaling_factor,
                      "shift_factor": vae.config.get("shift_factor"), "channel_mean": stats.mean,
                      "channel_std": stats.std, "overall_mean": stats.overall_mean, "overall_std": stats.overall_std,
                      "max_batches": self.max_batches}
        with staged_folder(self.out_dir) as tmp:
            vae.save_pretrained(tmp, safe_serialization=True)
            (tmp / "latent_statistics.json").write_text(json.dumps(statistics, indent=2) + "\n")
        log.info("saved VAE (%s standardization, scaling factor %.5f) to %s", self.standardization,
                 self.scaling_factor, self.out_dir)
