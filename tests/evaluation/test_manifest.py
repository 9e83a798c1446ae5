"""The reproducibility manifest: written with every run, git-optional, and a data hash that follows the split."""

import subprocess

import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.cli.train import train
from sd_lightning.evaluation.manifest import (
    build_manifest,
    data_hash,
    git_state,
    hardware_info,
    read_manifest,
)

from conftest import FAST, compose_train

TINY = [*FAST, "~callbacks.sample_grid", "data.source.limit=64", "data.batch_size=8",
        "model.components.denoiser.block_out_channels=[16,32]", "trainer.max_steps=2"]


def _data_hash(tmp_path, *overrides):
    return data_hash(instantiate(compose_train(tmp_path / "run", list(overrides)).data))


def test_data_hash_follows_the_split_and_exclusions(tmp_path):
    base = _data_hash(tmp_path, "data.source.limit=200")
    assert base == _data_hash(tmp_path, "data.source.limit=200", "seed=7", "data.batch_size=4")
    assert base["train_items"] + base["val_items"] == 200 and base["val_items"] > 0

    other_fraction = _data_hash(tmp_path, "data.source.limit=200", "data.val_fraction=0.3")
    assert other_fraction["sha256"] != base["sha256"]

    exclude = tmp_path / "exclude.txt"
    exclude.write_text("digits/0003  # blurry\n")
    excluded = _data_hash(tmp_path, "data.source.limit=200", f"data.exclude={exclude}")
    assert excluded["sha256"] != base["sha256"]
    assert excluded["train_items"] + excluded["val_items"] == 199
    assert exclude.read_text() == "digits/0003  # blurry\n"  # the user's file is untouched


def _visible_gpus() -> list[str]:
    """The GPUs torch sees on this machine, by name ([] without CUDA)."""
    return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []


def test_hardware_records_the_gpus_torch_sees(monkeypatch):
    """On a two-GPU machine (faked through torch.cuda) the manifest names both GPUs, in device order; with CUDA
    unusable it names none, even where a device count is reported."""
    names = ["NVIDIA A100-SXM4-80GB", "NVIDIA GeForce RTX 3090"]
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: len(names))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: names[device])
    assert build_manifest({"seed": 0}, command=["sdl-train"])["hardware"]["gpus"] == names
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # e.g. a driver that failed to initialize
    assert hardware_info()["gpus"] == []


def test_hardware_on_this_machine():
    hardware = hardware_info()
    assert hardware["gpus"] == _visible_gpus()
    assert hardware["cpu_cores"] >= 1 and hardware["torch_threads"] == torch.get_num_threads()


def test_git_state_is_null_outside_a_repo_or_without_git(tmp_path, monkeypatch):
    assert git_state(tmp_path) == {"commit": None, "dirty": None}
    monkeypatch.setenv("PATH", str(tmp_path))  # no git executable at all
    manifest = build_manifest({"seed": 0}, command=["sdl-train", "seed=0"])
    assert manifest["git"] == {"commit": None, "dirty": None}
    assert manifest["command"] == ["sdl-train", "seed=0"] and manifest["data"] is None


def test_git_state_records_commit_and_dirty_flag(tmp_path):
    def git(*args):
        subprocess.run(["git", *args], cwd=tmp_path, check=True, capture_output=True)

    try:
        git("init", "-q")
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("git is not installed")
    (tmp_path / "a.txt").write_text("1")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-q", "-m", "init")
    clean = git_state(tmp_path)
    assert len(clean["commit"]) == 40 and clean["dirty"] is False
    (tmp_path / "a.txt").write_text("2")
    assert git_state(tmp_path) == {"commit": clean["commit"], "dirty": True}


@pytest.mark.slow
def test_a_run_writes_its_manifest_and_logs_it_to_wandb(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, [*TINY, "logger=wandb"])
    train(cfg)
    manifest = read_manifest(run_dir)
    assert manifest is not None
    assert manifest["data"] == data_hash(instantiate(cfg.data))  # the same data hashes the same
    assert manifest["config"]["trainer"]["max_steps"] == 2 and manifest["config"]["paths"]["run_dir"] == str(run_dir)
    assert manifest["packages"]["torch"] == torch.__version__
    for package in ("lightning", "diffusers", "transformers", "hydra-core"):
        assert manifest["packages"][package]
    hardware = manifest["hardware"]
    assert hardware["cpu_cores"] >= 1 and hardware["ram_gb"] > 0 and hardware["cpu"]
    assert hardware["gpus"] == _visible_gpus()
    assert manifest["python"].count(".") == 2 and manifest["git"].keys() == {"commit", "dirty"}
    assert manifest["command"]

    # W&B (offline): the manifest's fields went into the run config and the file into a `manifest` artifact;
    # both are records of the offline run file that `wandb sync` uploads.
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    record = next((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb")).read_bytes()
    assert manifest["data"]["sha256"].encode() in record and f"manifest-{run_id}".encode() in record
