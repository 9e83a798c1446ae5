"""Config location and validation shared by the entry points (the only modules that import Hydra)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sd_lightning.cli.scripts import (
    CONFIG_DIR as CONFIG_DIR,  # re-exported: entry points and tests read it here
)
from sd_lightning.data.checks import check_value, data_problems
from sd_lightning.diffusion.objectives import FLOW_SCHEDULERS
from sd_lightning.diffusion.schedules import SAMPLING_SCHEDULERS


class ConfigError(ValueError):
    """A config value that cannot work; the message names every offending key and how to fix it."""


def _get(cfg: DictConfig, key: str) -> Any:
    return OmegaConf.select(cfg, key, throw_on_missing=False)


def missing_keys(cfg: DictConfig | ListConfig, prefix: str = "") -> list[str]:
    """Keys still set to ``???``, found without resolving interpolations (which would fail on them)."""
    found: list[str] = []
    keys = cfg.keys() if isinstance(cfg, DictConfig) else range(len(cfg))
    for key in keys:
        name = f"{prefix}{key}"
        if OmegaConf.is_missing(cfg, key):
            found.append(name)
        elif not OmegaConf.is_interpolation(cfg, key):
            child = cfg._get_node(key)
            if isinstance(child, (DictConfig, ListConfig)) and not child._is_none():
                found.extend(missing_keys(child, f"{name}."))
    return sorted(found)


def _check_number(problems: list[str], cfg: DictConfig, key: str, kind: type, low: float | None = None,
                  high: float | None = None, low_open: bool = False, optional: bool = False) -> None:
    check_value(problems, key, _get(cfg, key), kind, low, high, low_open, optional)


def check_sampling(problems: list[str], cfg: DictConfig, prefix: str = "sampling.", optional: bool = False) -> None:
    scheduler = _get(cfg, f"{prefix}scheduler")  # null: the objective's default sampler
    if scheduler is not None and scheduler not in (*SAMPLING_SCHEDULERS, *FLOW_SCHEDULERS):
        problems.append(f"{prefix}scheduler={scheduler!r} must be one of {sorted((*SAMPLING_SCHEDULERS, *FLOW_SCHEDULERS))}")
    _check_number(problems, cfg, f"{prefix}steps", int, 1, 1000, optional=optional)
    _check_number(problems, cfg, f"{prefix}guidance_scale", float, 0.0, 100.0, optional=optional)


def check_data(problems: list[str], cfg: DictConfig) -> None:
    """The data module's own rules (``data/checks.py``) on the composed data config."""
    data = _get(cfg, "data")
    if isinstance(data, DictConfig):
        problems.extend(data_problems(OmegaConf.to_container(data, resolve=True)))


# Small pieces whose constructors check their own arguments: built once here, before any heavy work, so each
# rule has one source (the piece) and still fails early, naming the key.
CHECKED_PIECES = ("objective", "timesteps", "noise", "input_perturbation", "loss", "weighting",
                  "adapter")


def check_pieces(problems: list[str], cfg: DictConfig) -> None:
    from hydra.utils import instantiate

    for key in CHECKED_PIECES:
        node = _get(cfg, key)
        if not isinstance(node, DictConfig) or "_target_" not in node:
            continue
        try:
            instantiate(node)
        except Exception as err:  # Hydra wraps the constructor's error; report the innermost message
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            problems.append(f"{key}: {cause}")


def validate_train_config(cfg: DictConfig) -> None:
    """Fail before any heavy work, naming each bad key (Hydra itself rejects unknown keys)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    problems: list[str] = []
    _check_number(problems, cfg, "seed", int, 0)
    _check_number(problems, cfg, "trainer.max_steps", int, 1)
    _check_number(problems, cfg, "trainer.accumulate_grad_batches", int, 1)
    _check_number(problems, cfg, "optimizer.lr", float, 0.0, low_open=True, optional=True)
    _check_number(problems, cfg, "model.components.conditioner.drop_prob", float, 0.0, 1.0, optional=True)
    check_sampling(problems, cfg)
    check_pieces(problems, cfg)
    resolution, vae_channels = _get(cfg, "data.resolution"), _get(cfg, "model.components.vae.block_out_channels")
    if isinstance(resolution, int) and vae_channels:
        denoiser_levels = _get(cfg, "model.components.denoiser.block_out_channels") or [1]
        factor = 2 ** (len(vae_channels) - 1) * 2 ** (len(denoiser_levels) - 1)
        if resolution % factor:
            problems.append(f"data.resolution={resolution} must be a multiple of {factor} for this VAE and denoiser")
        multiple = (_get(cfg, "data.buckets.multiple") or 8) if isinstance(_get(cfg, "data.buckets"), DictConfig) else None
        if isinstance(multiple, int) and multiple % factor:
            problems.append(f"data.buckets.multiple={multiple} must be a multiple of {factor} for this VAE and denoiser")
    check_data(problems, cfg)
    if _get(cfg, "resume") not in ("never", "auto"):
        problems.append(f"resume={_get(cfg, 'resume')!r} must be 'never' or 'auto'")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).expanduser().is_file():
        problems.append(f"ckpt_path={ckpt} does not exist (use ckpt_path=last to resume the run folder's last.ckpt)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _is_peer_failure(err: BaseException) -> bool:
    """A collective that failed because another process died (gloo: connection closed) or timed out."""
    distributed = getattr(torch.distributed, "DistBackendError", ())
    text = str(err)
    return (distributed and isinstance(err, distributed)) or (isinstance(err, RuntimeError) and any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting",
                                      "timed out after", "ProcessGroupGloo")))


def user_error(err: BaseException) -> BaseException | None:
    """The user-facing cause inside an exception chain (Hydra wraps errors raised while instantiating)."""
    from sd_lightning.callbacks.nonfinite import NonFiniteTrainingError
    from sd_lightning.data.sources import DataRootError
    from sd_lightning.models.checkpoint_io import CheckpointError
    from sd_lightning.models.families import MissingModelError, UnsupportedModelError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (ConfigError, MissingModelError, UnsupportedModelError, DataRootError, CheckpointError,
                             NonFiniteTrainingError)):
            return seen
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return OSError(
                seen.errno,
                "disk full while writing (checkpoint writes are atomic: the previous checkpoint is intact). Free "
                "space, point paths.output_root at a larger disk, or keep fewer files with "
                f"callbacks.best_checkpoint.save_top_k=1. ({seen})",
            )
        if _is_peer_failure(seen):
            return RuntimeError(
                f"a data-parallel process stopped or stopped answering ({str(seen).splitlines()[0][:200]}), so this "
                "one exited instead of waiting (trainer.strategy.timeout_seconds bounds the wait). Resume the run with "
                "resume=auto and the same hydra.run.dir: it continues from the run folder's last.ckpt."
            )
        if isinstance(seen, torch.OutOfMemoryError):
            return MemoryError(
                f"out of memory ({str(seen).splitlines()[0][:200]}). Nothing was saved from this step. Reduce memory "
                "with data.batch_size=<smaller> and trainer.accumulate_grad_batches=<k> (same effective batch), "
                "model.components.gradient_checkpointing=true, trainer.precision=bf16-mixed on GPUs that support it, "
                "or a smaller data.resolution / model size."
            )
        seen = seen.__cause__ or seen.__context__
    return None


def run_entry(name: str, function: Any, cfg: DictConfig) -> Any:
    """Run an entry point; a user error becomes one clear line on stderr and exit status 2.

    The working directory is importable (as under ``python -m``), so ``_target_``s may name a user's own modules
    in the project folder they run from.
    """
    import os
    import sys

    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        return function(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"{name}: {cause}", file=sys.stderr)
        sys.exit(2)
