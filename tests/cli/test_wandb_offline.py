"""The default logger: W&B offline (no account, no network), contained in the run folder, id kept on resume."""

import os

import pytest
import torch

from sd_lightning.cli.train import train

from conftest import compose_train


@pytest.mark.slow
def test_wandb_offline_run_is_local_and_resume_keeps_its_id(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    common = ["logger=wandb", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.sample_grid",
              "data.source.limit=48", "data.batch_size=8", "model.components.denoiser.block_out_channels=[16,32]",
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


@pytest.mark.slow
def test_wandb_gets_sample_grids_and_a_table_of_fixed_prompt_samples(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    train(compose_train(run_dir, ["logger=wandb", "trainer.enable_progress_bar=false", "~callbacks.progress",
                                  "~callbacks.stability", "data.source.limit=48", "data.batch_size=8",
                                  "model.components.vae_path=null", "trainer.max_steps=5",
                                  "trainer.check_val_every_n_epoch=1", "sampling.steps=2",
                                  "callbacks.sample_grid.num_per_prompt=1"]))
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    (run_folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    record = (run_folder / f"run-{run_id}.wandb").read_bytes()
    assert b"val/sample_table" in record and b"val/samples" in record
    tables = list((run_folder / "files" / "media" / "table" / "val").glob("sample_table_*.table.json"))
    assert tables
    import json

    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "prompt", "seed_index", "image"]
    assert len(table["data"]) == 11  # ten digit prompts and the unconditional one, one sample each
    assert {row[1] for row in table["data"]} >= {"a handwritten digit seven", "(unconditional)"}
