"""A killed multirun resumes its unfinished jobs with resume=auto; finished jobs and folders stay intact."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

HERE = Path(__file__).resolve().parent
TINY = ["logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.sample_grid",
        "trainer.check_val_every_n_epoch=1", "trainer.log_every_n_steps=1", "+logger.csv.flush_logs_every_n_steps=1",
        "data.source.limit=64", "data.batch_size=8", "model.components.denoiser.block_out_channels=[16,32]",
        "callbacks.checkpoint.every_n_train_steps=3", "trainer.max_steps=12"]


def sweep(tmp_path: Path, *extra: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", "-m", "seed=0,1", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"paths.output_root={tmp_path}", *TINY, *extra],
        capture_output=True, text=True, env=env, timeout=600, cwd=tmp_path,
    )


@pytest.mark.slow
def test_killed_multirun_resumes_unfinished_jobs(tmp_path):
    killed = sweep(tmp_path, "+callbacks.fault._target_=faults.KillAtStep", "+callbacks.fault.step=7")
    assert killed.returncode == -9
    job0 = tmp_path / "sweep" / "0"
    assert torch.load(job0 / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 6
    assert not (tmp_path / "sweep" / "1" / "checkpoints").exists()

    resumed = sweep(tmp_path, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for job in ("0", "1"):
        state = torch.load(tmp_path / "sweep" / job / "checkpoints" / "last.ckpt", weights_only=True)
        assert state["global_step"] == 12
        steps = pd.read_csv(tmp_path / "sweep" / job / "csv" / "metrics.csv").dropna(subset=["train/loss"])["step"]
        assert steps.tolist() == list(range(12))  # no gap, no repeat
    # Each job kept its own seed and config.
    assert "seed: 0" in (job0 / "config.yaml").read_text()
    assert "seed: 1" in (tmp_path / "sweep" / "1" / "config.yaml").read_text()
