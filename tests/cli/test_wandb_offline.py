"""The default logger: W&B offline (no account, no network), contained in the run folder, id kept on resume."""

import os

import pytest
import torch

from sd_lightning.cli.train import train

from conftest import compose_train


@pytest.mark.slow
def test_wandb_offline_run_is_local_and_resume_keeps_its_id(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(variable, raising=False)
    run_dir = tmp_path / "run"
    common = ["logger=wandb", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.sample_grid",
              "data.source.limit=48", "data.batch_size=8", "model.components.unet.block_out_channels=[16,32]",
              "trainer.log_every_n_steps=1"]
    train(compose_train(run_dir, [*common, "trainer.max_steps=3"]))
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    assert (run_dir / "csv" / "metrics.csv").is_file()
    train(compose_train(run_dir, [*common, "trainer.max_steps=5", "resume=auto"]))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(run_id) for p in offline)  # same id (a same-second rerun shares a folder)
    assert (run_dir / "wandb" / "run_id").read_text().strip() == run_id
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert os.environ.get("WANDB_DIR", "").startswith(str(run_dir))
