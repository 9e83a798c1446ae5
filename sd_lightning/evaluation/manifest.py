"""The reproducibility manifest saved with every run: what ran, on which code, data, stack and hardware.

``manifest.json`` in the run folder answers "can I reproduce / compare this run?" without W&B: the
resolved config, the git commit (and whether the tree had uncommitted changes), the versions of the
libraries that shape results, the hardware, the command line, and a hash of the exact train/validation
split, so two runs can be checked to have seen the same data.
"""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
from collections.abc import Iterable, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path
from typing import Any

MANIFEST_NAME = "manifest.json"
# The packages whose versions can change numbers or behaviour of a run.
STACK_PACKAGES = (
    "sd_lightning", "torch", "lightning", "diffusers", "transformers", "tokenizers", "accelerate", "peft",
    "safetensors", "hydra-core", "omegaconf", "torchmetrics", "torchdata", "numpy", "pillow", "scikit-learn",
    "wandb",
)


def git_state(directory: str | Path) -> dict[str, Any]:
    """Commit and dirty flag of the repository holding ``directory``; nulls when git or the repo is absent."""
    state: dict[str, Any] = {"commit": None, "dirty": None}

    def run(*args: str) -> str | None:
        try:
            result = subprocess.run(["git", *args], cwd=directory, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return result.stdout.strip() if result.returncode == 0 else None

    commit = run("rev-parse", "HEAD")
    if commit:
        state["commit"] = commit
        status = run("status", "--porcelain", "--untracked-files=no")
        state["dirty"] = None if status is None else bool(status)
    return state


def package_versions(names: Iterable[str] = STACK_PACKAGES) -> dict[str, str | None]:
    """Installed distribution versions (None for a package that is not installed)."""
    versions: dict[str, str | None] = {}
    for name in names:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _total_ram_bytes() -> int | None:
    try:
        import psutil

        return int(psutil.virtual_memory().total)
    except ImportError:
        try:
            return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        except (ValueError, OSError, AttributeError):
            return None


def hardware_info() -> dict[str, Any]:
    """CPU model, core count, RAM, GPU names and the torch thread count in effect."""
    import torch

    ram = _total_ram_bytes()
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu": _cpu_model(),
        "cpu_cores": os.cpu_count(),
        "ram_gb": None if ram is None else round(ram / 2**30, 2),
        "gpus": gpus,
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
    }


def split_ids(datamodule: Any) -> dict[str, list[str]]:
    """Sorted train/validation item ids of a set-up ``DiffusionDataModule`` (sets it up when needed)."""
    if getattr(datamodule, "train_dataset", None) is None:
        datamodule.setup("fit")
    ids: dict[str, list[str]] = {}
    for split in ("train", "val"):
        dataset = getattr(datamodule, f"{split}_dataset", None)
        ids[split] = [] if dataset is None else sorted(dataset.source.items[i].id for i in dataset.indices)
    return ids


def data_hash(datamodule: Any) -> dict[str, Any]:
    """sha256 of the sorted train and validation ids (the split and exclusions, not the pixels)."""
    ids = split_ids(datamodule)
    payload = json.dumps(ids, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return {
        "sha256": hashlib.sha256(payload).hexdigest(),
        "train_items": len(ids["train"]),
        "val_items": len(ids["val"]),
        "source": datamodule.source.describe() if hasattr(datamodule, "source") else type(datamodule).__name__,
    }


def build_manifest(config: dict[str, Any], datamodule: Any | None = None, command: Sequence[str] | None = None,
                   repo_dir: str | Path | None = None) -> dict[str, Any]:
    """Everything needed to reproduce or compare a run; ``config`` is the resolved run config."""
    repo = Path(repo_dir) if repo_dir is not None else Path(__file__).resolve().parents[2]
    return {
        "created_at": datetime.now(UTC).isoformat(timespec="seconds"),
        "command": list(sys.orig_argv) if command is None else list(command),
        "cwd": os.getcwd(),
        "git": git_state(repo),
        "python": sys.version.split()[0],
        "packages": package_versions(),
        "hardware": hardware_info(),
        "data": None if datamodule is None else data_hash(datamodule),
        "config": config,
    }


def write_manifest(manifest: dict[str, Any], run_dir: str | Path) -> Path:
    """Write ``manifest.json`` atomically (a killed job never leaves half a file)."""
    path = Path(run_dir) / MANIFEST_NAME
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(json.dumps(manifest, indent=2, sort_keys=False, default=str) + "\n", encoding="utf-8")
    os.replace(tmp, path)
    return path


def read_manifest(run_dir: str | Path) -> dict[str, Any] | None:
    """The run folder's manifest, or None when it has none or it is not valid JSON."""
    path = Path(run_dir) / MANIFEST_NAME
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None


def log_manifest(loggers: Iterable[Any], manifest: dict[str, Any], path: Path) -> None:
    """Send the manifest to W&B: its fields (minus the config, logged already) into the run config, the
    file as a ``manifest`` artifact, and every metric plotted against ``trainer/global_step``.

    Metrics keyed by global step (not W&B's own counter) keep every point of a resumed run, whose first
    steps would otherwise fall behind W&B's step and be dropped.
    """
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if not isinstance(logger, WandbLogger):
            continue
        import wandb

        run = logger.experiment
        run.define_metric("trainer/global_step")
        run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
        run.config.update({"manifest": {k: v for k, v in manifest.items() if k != "config"}}, allow_val_change=True)
        artifact = wandb.Artifact(name=f"manifest-{run.id}", type="manifest")
        artifact.add_file(str(path), name=MANIFEST_NAME)
        run.log_artifact(artifact)
