"""Shared fixtures: composed configs, a tiny trained VAE and a tiny trained diffusion run."""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from sd_lightning.callbacks.denormals import set_flush_denormal
from sd_lightning.cli.config import CONFIG_DIR

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

# Small, fast settings shared by tests that train: CSV logging only, a short schedule, tiny grids.
FAST = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress",
    "trainer.check_val_every_n_epoch=1",
    "trainer.log_every_n_steps=1",
    "sampling.steps=4",
    "callbacks.sample_grid.num_per_prompt=1",
]


def compose_train(run_dir: Path, overrides: Sequence[str] = ()) -> DictConfig:
    """The real ``sdl-train`` config with ``overrides``, writing into ``run_dir``."""
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(
            "train",
            overrides=[f"paths.run_dir={run_dir}", f"paths.output_root={run_dir.parent}", *overrides],
        )


def start_command(command: Sequence[str], **options) -> subprocess.Popen:
    """A command started in the background, its output captured: commands that do not depend on each other run side
    by side (their interpreter start-up is most of their time)."""
    return subprocess.Popen(list(command), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **options)


def finish_command(process: subprocess.Popen, timeout: float = 600) -> subprocess.CompletedProcess:
    stdout, stderr = process.communicate(timeout=timeout)
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


# The environment every test starts from. Lightning's launchers set MASTER_PORT and friends in the launching process
# (a module fixture's ddp_spawn run, say); a later test's subprocesses inherited them, so two DDP runs started side
# by side met on one port and reset each other's connections.
SESSION_ENVIRONMENT = dict(os.environ)


def reset_environment() -> None:
    for key in set(os.environ) - set(SESSION_ENVIRONMENT) - {"PYTEST_CURRENT_TEST"}:  # pytest's own, per test
        del os.environ[key]
    os.environ.update(SESSION_ENVIRONMENT)


@pytest.fixture(autouse=True)
def session_environment():
    reset_environment()
    set_flush_denormal(False)  # process state a training run sets (callbacks.flush_denormals), per test
    yield
    reset_environment()


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to ``count`` for a block, then as they were."""
    threads = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def one_thread():
    """Tiny steps: one thread avoids oversubscribing a shared 2-core machine (measured 30x slower)."""
    with torch_threads(1):
        yield


@pytest.fixture
def train_config(tmp_path: Path) -> Callable[..., DictConfig]:
    def make(*overrides: str, run: str = "run") -> DictConfig:
        return compose_train(tmp_path / run, overrides)

    return make


@pytest.fixture(scope="session")
def digits_vae_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The digits VAE as `make train` trains it (stage 1: experiment=digits_autoencoder), with its data-derived
    scaling factor."""
    from sd_lightning.cli.train import train

    run_dir = tmp_path_factory.mktemp("vae") / "run"
    cfg = compose_train(run_dir, ["experiment=digits_autoencoder", *FAST[:3]])
    train(cfg)
    assert (run_dir / "vae" / "config.json").is_file()
    return run_dir / "vae"


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory, digits_vae_dir: Path) -> Path:
    """A short text-conditional run on the digits; its folder holds last.ckpt."""
    from sd_lightning.cli.train import train

    run_dir = tmp_path_factory.mktemp("ldm") / "run"
    cfg = compose_train(run_dir, [*FAST, f"model.components.vae_path={digits_vae_dir}", "trainer.max_steps=60",
                                  "data.source.limit=400"])
    train(cfg)
    assert (run_dir / "checkpoints" / "last.ckpt").is_file()
    return run_dir


@pytest.fixture
def offline_wandb(monkeypatch: pytest.MonkeyPatch) -> None:
    """W&B offline with none of its folders preset, so sdl-train must keep them inside the run folder."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    for variable in ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR"):
        monkeypatch.delenv(variable, raising=False)
