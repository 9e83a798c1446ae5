"""Fixed-seed sample grids at the end of validation, saved as PNG and sent to image-capable loggers."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import lightning as L
import torch
from PIL import Image

from sd_lightning.diffusion.sampling import generate, make_grid

log = logging.getLogger(__name__)


class SampleGridCallback(L.Callback):
    """Generates ``num_per_prompt`` images for each fixed prompt with the module's sampling settings.

    Runs on global rank 0 only, from fixed seeds, so grids of successive epochs are comparable.
    """

    def __init__(self, prompts: Sequence[str], num_per_prompt: int = 4, seed: int = 1234,
                 every_n_validations: int = 1, out_dir: str | None = None) -> None:
        self.prompts = list(prompts)
        self.num_per_prompt = num_per_prompt
        self.seed = seed
        self.every_n_validations = max(1, every_n_validations)
        self.out_dir = out_dir
        self._count = 0
        self.last_grid_path: Path | None = None

    def on_validation_epoch_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        if trainer.sanity_checking or not self.prompts:
            return
        self._count += 1
        if (self._count - 1) % self.every_n_validations or not trainer.is_global_zero:
            return
        pipeline = pl_module.build_pipeline()
        with torch.no_grad():
            images = generate(
                pipeline,
                prompts=[p for p in self.prompts for _ in range(self.num_per_prompt)],
                seed=self.seed,
                steps=pl_module.sampling["steps"],
                guidance_scale=pl_module.sampling["guidance_scale"],
            )
        grid = make_grid(images, columns=self.num_per_prompt)
        out_dir = Path(self.out_dir or Path(trainer.default_root_dir) / "samples")
        out_dir.mkdir(parents=True, exist_ok=True)
        path = out_dir / f"step_{trainer.global_step:07d}.png"
        grid.save(path)
        self.last_grid_path = path
        for logger in trainer.loggers:
            _log_image(logger, grid, trainer.global_step)
            _log_sample_table(logger, images, self.prompts, self.num_per_prompt, trainer.global_step)


def _log_image(logger: object, grid: Image.Image, step: int) -> None:
    if hasattr(logger, "log_image"):
        logger.log_image(key="val/samples", images=[grid], step=step)
    elif hasattr(getattr(logger, "experiment", None), "add_image"):
        import numpy as np

        logger.experiment.add_image("val/samples", np.asarray(grid), step, dataformats="HWC")


def _log_sample_table(logger: object, images: Sequence[Image.Image], prompts: Sequence[str], num_per_prompt: int,
                      step: int) -> None:
    """W&B only: one row per fixed-prompt sample, so the table view filters and compares them across steps."""
    from lightning.pytorch.loggers import WandbLogger

    if not isinstance(logger, WandbLogger):
        return
    import wandb

    rows = [[step, prompt or "(unconditional)", index, wandb.Image(images[p * num_per_prompt + index])]
            for p, prompt in enumerate(prompts) for index in range(num_per_prompt)]
    logger.log_table(key="val/sample_table", columns=["step", "prompt", "seed_index", "image"], data=rows, step=step)
