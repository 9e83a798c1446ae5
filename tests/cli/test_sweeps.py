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


RECORDER = '''
import json, os, time
from pathlib import Path

import lightning as L


class RecordDevices(L.Callback):
    """Writes the job's CUDA_VISIBLE_DEVICES and when it ran into its run folder."""

    def __init__(self):
        self.start = time.time()

    def on_fit_end(self, trainer, pl_module):
        record = {"devices": os.environ.get("CUDA_VISIBLE_DEVICES"), "start": self.start, "end": time.time()}
        (Path(trainer.default_root_dir) / "devices.json").write_text(json.dumps(record))
'''


def _max_overlap(spans: list[tuple[float, float]]) -> int:
    events = sorted([(start, 1) for start, _ in spans] + [(end, -1) for _, end in spans])
    running = peak = 0
    for _, change in events:
        running += change
        peak = max(peak, running)
    return peak


@pytest.mark.slow
def test_gpu_parallel_launcher_runs_each_job_on_its_own_device(tmp_path):
    import json

    (tmp_path / "record_devices.py").write_text(RECORDER)
    multirun(tmp_path, "hydra/launcher=gpu_parallel", "hydra.launcher.devices=[0,1]", "hydra.launcher.poll_seconds=0.2",
             "+callbacks.record._target_=record_devices.RecordDevices", "seed=0,1,2", "trainer.max_steps=2")
    jobs = _job_dirs(tmp_path)
    assert [job.name for job in jobs] == ["0", "1", "2"]  # every job once
    records = [json.loads((job / "devices.json").read_text()) for job in jobs]
    assert {r["devices"] for r in records} == {"0", "1"}
    assert _max_overlap([(r["start"], r["end"]) for r in records]) == 2  # two at once, the rest queued
    for a in records:
        for b in records:
            if a is not b and a["start"] < b["end"] and b["start"] < a["end"]:
                assert a["devices"] != b["devices"]  # no device shared by jobs running together


class FakeJob:
    """Finishes after ``polls`` calls of done(); records the slot it ran on."""

    def __init__(self, index, slot, clock, polls):
        self.index, self.slot, self.clock, self.polls = index, slot, clock, polls
        self.start = clock["now"]
        self.end = None

    def done(self):
        self.clock["now"] += 1
        self.polls -= 1
        if self.polls <= 0 and self.end is None:
            self.end = self.clock["now"]
        return self.end is not None

    def results(self):
        return [f"result {self.index}"]


def test_jobs_asking_for_two_devices_get_disjoint_pairs():
    from hydra_plugins.sd_lightning_launcher.gpu_parallel import device_slots, run_queued

    slots = device_slots([0, 1, 2, 3, 4], 2)
    assert slots == [(0, 1), (2, 3)]  # the odd device stays unused
    clock, jobs = {"now": 0}, []

    def submit(index, slot):
        jobs.append(FakeJob(index, slot, clock, polls=3 + index % 2))
        return jobs[-1]

    assert run_queued(5, slots, submit, poll_seconds=0) == [f"result {i}" for i in range(5)]
    assert sorted(job.index for job in jobs) == [0, 1, 2, 3, 4]
    assert _max_overlap([(job.start, job.end) for job in jobs]) == 2
    for a in jobs:
        for b in jobs:
            if a is not b and a.start < b.end and b.start < a.end:
                assert not set(a.slot) & set(b.slot)


def test_gpu_parallel_explains_a_machine_without_enough_devices(monkeypatch):
    from hydra_plugins.sd_lightning_launcher import gpu_parallel

    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert gpu_parallel.visible_devices() == [3, 5]
    with pytest.raises(ValueError, match="needs 4 device.*hydra.launcher.devices=.*cpu_parallel"):
        gpu_parallel.device_slots(gpu_parallel.visible_devices(), 4)
    with pytest.raises(ValueError, match="twice"):
        gpu_parallel.device_slots([1, 1], 1)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES")
    monkeypatch.setattr("torch.cuda.device_count", lambda: 3)
    assert gpu_parallel.visible_devices() == [0, 1, 2]
