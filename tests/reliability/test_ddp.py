"""Data-parallel training is the same computation: 2 processes × batch B equal 1 process × batch 2B."""

from __future__ import annotations

import pandas as pd
import pytest
import torch

from sd_lightning.models.checkpoint_io import load_checkpoint

from conftest import FAST, compose_train

COMMON = [*FAST, "~callbacks.sample_grid", "~callbacks.stability", "model.components.vae_path=null",
          "data.source.limit=120", "trainer.max_steps=6", "trainer.val_check_interval=3",
          "trainer.check_val_every_n_epoch=null", "trainer.accelerator=cpu", "callbacks.ema.decay=0.9"]


def _run(tmp_path, name: str, *overrides: str):
    from sd_lightning.cli.train import train

    run_dir = tmp_path / name
    train(compose_train(run_dir, [*COMMON, *overrides]))
    state = load_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return state, metrics.dropna(subset=["val/mse"])


@pytest.mark.slow
def test_two_processes_match_one_process_with_the_same_global_batch(tmp_path):
    # ddp_spawn, not ddp: the ddp launcher would re-run this pytest command line in the second process.
    single, single_val = _run(tmp_path, "single", "data.batch_size=8")
    double, double_val = _run(tmp_path, "double", "data.batch_size=4", "trainer.devices=2",
                              "trainer.strategy=ddp_spawn")
    assert single["global_step"] == double["global_step"] == 6

    unet = [k for k in single["state_dict"] if k.startswith("unet.")]
    # Had each process drawn its own noise, 6 AdamW steps would leave differences of ~1e-3.
    gap = max((single["state_dict"][k] - double["state_dict"][k]).abs().max().item() for k in unet)
    assert gap < 2e-5, f"weights differ by {gap}"

    # Validation: every validation sample counted once across the two processes, so the metrics equal the
    # single process's (up to the tiny weight difference above).
    assert len(single_val) == len(double_val) == 2
    for key in ("val/mse", "val/mae", "val/r2", "val/x0_mse"):
        assert double_val[key].to_numpy() == pytest.approx(single_val[key].to_numpy(), rel=1e-4), key


def test_per_sample_randomness_does_not_depend_on_batch_composition(train_config):
    """A sample's noise, timestep and condition dropout depend on its id, not on who shares its batch."""
    from hydra.utils import instantiate

    cfg = train_config(*FAST, "model.components.vae_path=null", "data.source.limit=40", "noise=offset",
                       "model.cond_drop_prob=0.5")
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.plain_train_dataloader()))
    half = {k: (v[:4] if isinstance(v, (list, torch.Tensor)) else v) for k, v in batch.items()}
    full_loss = model.diffusion_loss(batch, model.sample_generators(batch, 0))
    half_loss = model.diffusion_loss(half, model.sample_generators(half, 5))
    assert torch.allclose(full_loss[:4], half_loss, atol=1e-5)
