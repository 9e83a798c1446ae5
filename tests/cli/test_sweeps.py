"""Multirun sweeps: one folder per job, Optuna trials, a parallel local launcher, and the SLURM launcher."""

import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from sd_lightning.cli.config import CONFIG_DIR

TINY = ["logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.sample_grid",
        "data.source.limit=64", "data.batch_size=8", "model.components.denoiser.block_out_channels=[16,32]",
        "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null",
        "trainer.log_every_n_steps=1"]


def multirun(tmp_path: Path, *overrides: str) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", "-m", f"hydra.sweep.dir={tmp_path / 'sweep'}",
         f"paths.output_root={tmp_path}", *TINY, *overrides],
        capture_output=True, text=True, timeout=900, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _job_dirs(tmp_path: Path) -> list[Path]:
    return sorted(p for p in (tmp_path / "sweep").iterdir() if p.is_dir() and p.name.isdigit())


@pytest.mark.slow
def test_optimizer_and_loss_sweeps_write_one_folder_per_job(tmp_path):
    multirun(tmp_path, "optimizer=adamw,lion", "loss=mse,huber")
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == 4
    seen = set()
    for job in jobs:
        config = (job / "config.yaml").read_text()
        optimizer = "Lion" if "build_lion" in config else "AdamW"
        loss = "Huber" if "HuberLoss" in config else "MSE"
        seen.add((optimizer, loss))
        metrics = pd.read_csv(job / "csv" / "metrics.csv")
        assert metrics["val/mse"].notna().any() and (job / "checkpoints" / "last.ckpt").is_file()
    assert seen == {("AdamW", "MSE"), ("AdamW", "Huber"), ("Lion", "MSE"), ("Lion", "Huber")}


@pytest.mark.slow
def test_optuna_search_runs_trials_minimizing_val_mse(tmp_path):
    result = multirun(tmp_path, "hparams_search=optuna", "hydra.sweeper.n_trials=2",
                      "hydra.sweeper.sampler.n_startup_trials=2")
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == 2
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        searched = compose("train", overrides=["hparams_search=optuna"], return_hydra_config=True).hydra.sweeper.params
    assert "optimizer.lr" in searched and set(best.best_params) == set(searched)
    # Each trial's value is the final val/mse its job logged; the sweeper keeps the smaller one.
    finals = [float(pd.read_csv(job / "csv" / "metrics.csv")["val/mse"].dropna().iloc[-1]) for job in jobs]
    assert finals[0] != finals[1]
    assert best.best_value == pytest.approx(min(finals), rel=1e-6)
    assert f"Best value: {best.best_value}" in result.stdout + result.stderr


@pytest.mark.slow
def test_parallel_local_launcher_overlaps_jobs(tmp_path):
    multirun(tmp_path, "hydra/launcher=cpu_parallel", "seed=0,1")
    jobs = _job_dirs(tmp_path)
    assert len(jobs) == 2
    spans = []
    for job in jobs:
        log = job / "train.log"
        times = [line[1:24] for line in log.read_text().splitlines() if line.startswith("[20")]
        config = job / "config.yaml"
        spans.append((config.stat().st_mtime, (job / "checkpoints" / "last.ckpt").stat().st_mtime, times))
    (start_a, end_a, _), (start_b, end_b, _) = spans
    assert start_a < end_b and start_b < end_a  # the two jobs ran at the same time


def test_slurm_launcher_composes_what_it_would_submit():
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["hydra/launcher=slurm", "trainer.devices=4", "hydra.launcher.partition=gpu"],
                      return_hydra_config=True)
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.tasks_per_node == 4 and launcher.gpus_per_node == 4 and launcher.partition == "gpu"


@pytest.mark.slow
def test_ddp_inside_a_multirun_with_ddp_spawn(tmp_path):
    """The recommended combination: strategy=ddp_spawn (plain ddp re-launches Hydra's command line)."""
    multirun(tmp_path, "seed=0", "trainer.strategy=ddp_spawn", "trainer.devices=2", "trainer.accelerator=cpu",
             "data.source.limit=200")
    (job,) = _job_dirs(tmp_path)
    import torch

    state = torch.load(job / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    assert pd.read_csv(job / "csv" / "metrics.csv")["val/mse"].notna().any()
