"""Config location and validation shared by the entry points (the only modules that import Hydra)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sd_lightning.diffusion.schedules import SAMPLING_SCHEDULERS

CONFIG_DIR = str(Path(__file__).resolve().parents[2] / "conf")


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
    value = _get(cfg, key)
    if value is None:
        if not optional:
            problems.append(f"{key} is required")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        problems.append(f"{key}={value!r} must be {'a number' if kind is float else 'an integer'}")
        return
    if low is not None and (value <= low if low_open else value < low):
        problems.append(f"{key}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        problems.append(f"{key}={value} must be <= {high}")


def check_sampling(problems: list[str], cfg: DictConfig, prefix: str = "sampling.", optional: bool = False) -> None:
    scheduler = _get(cfg, f"{prefix}scheduler")
    if scheduler is None and not optional:
        problems.append(f"{prefix}scheduler is required")
    elif scheduler is not None and scheduler not in SAMPLING_SCHEDULERS:
        problems.append(f"{prefix}scheduler={scheduler!r} must be one of {sorted(SAMPLING_SCHEDULERS)}")
    _check_number(problems, cfg, f"{prefix}steps", int, 1, 1000, optional=optional)
    _check_number(problems, cfg, f"{prefix}guidance_scale", float, 0.0, 100.0, optional=optional)


def validate_train_config(cfg: DictConfig) -> None:
    """Fail before any heavy work, naming each bad key (Hydra itself rejects unknown keys)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    problems: list[str] = []
    _check_number(problems, cfg, "seed", int, 0)
    _check_number(problems, cfg, "trainer.max_steps", int, 1)
    _check_number(problems, cfg, "trainer.accumulate_grad_batches", int, 1)
    _check_number(problems, cfg, "data.batch_size", int, 1)
    _check_number(problems, cfg, "data.num_workers", int, 0)
    _check_number(problems, cfg, "data.resolution", int, 8)
    _check_number(problems, cfg, "data.val_fraction", float, 0.0, 0.99)
    _check_number(problems, cfg, "model.cond_drop_prob", float, 0.0, 1.0, optional=True)
    _check_number(problems, cfg, "optimizer.lr", float, 0.0, low_open=True, optional=True)
    check_sampling(problems, cfg)
    resolution, vae_channels = _get(cfg, "data.resolution"), _get(cfg, "model.components.vae.block_out_channels")
    if isinstance(resolution, int) and vae_channels:
        factor = 2 ** (len(vae_channels) - 1) * 2 ** (len(_get(cfg, "model.components.unet.block_out_channels") or [1]) - 1)
        if resolution % factor:
            problems.append(f"data.resolution={resolution} must be a multiple of {factor} for this VAE and UNet")
    if _get(cfg, "resume") not in ("never", "auto"):
        problems.append(f"resume={_get(cfg, 'resume')!r} must be 'never' or 'auto'")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).expanduser().is_file():
        problems.append(f"ckpt_path={ckpt} does not exist (use ckpt_path=last to resume the run folder's last.ckpt)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def user_error(err: BaseException) -> BaseException | None:
    """The user-facing cause inside an exception chain (Hydra wraps errors raised while instantiating)."""
    from sd_lightning.callbacks.nonfinite import NonFiniteTrainingError
    from sd_lightning.data.sources import DataRootError
    from sd_lightning.models.builders import MissingModelError
    from sd_lightning.models.checkpoint_io import CheckpointError

    seen: BaseException | None = err
    while seen is not None:
        if isinstance(seen, (ConfigError, MissingModelError, DataRootError, CheckpointError, NonFiniteTrainingError)):
            return seen
        if isinstance(seen, OSError) and seen.errno == errno.ENOSPC:
            return OSError(
                seen.errno,
                "disk full while writing (checkpoint writes are atomic: the previous checkpoint is intact). Free "
                "space, point paths.output_root at a larger disk, or keep fewer files with "
                f"callbacks.best_checkpoint.save_top_k=1. ({seen})",
            )
        if isinstance(seen, torch.OutOfMemoryError):
            return MemoryError(
                f"out of memory ({str(seen).splitlines()[0][:200]}). Nothing was saved from this step. Reduce memory "
                "with data.batch_size=<smaller> and trainer.accumulate_grad_batches=<k> (same effective batch), "
                "model.gradient_checkpointing=true, trainer.precision=bf16-mixed on GPUs that support it, "
                "or a smaller data.resolution / model size."
            )
        seen = seen.__cause__ or seen.__context__
    return None


def run_entry(name: str, function: Any, cfg: DictConfig) -> Any:
    """Run an entry point; a user error becomes one clear line on stderr and exit status 2."""
    import sys

    silence_known_noise()
    try:
        return function(cfg)
    except Exception as err:
        cause = user_error(err)
        if cause is None:
            raise
        print(f"{name}: {cause}", file=sys.stderr)
        sys.exit(2)


def silence_known_noise() -> None:
    """Drop warnings that are known, harmless on this stack and would bury the run's own messages."""
    import logging
    import warnings

    for pattern in (r".*LeafSpec.*", r".*set_vital.*", r".*module\(s\) in eval mode.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage()
    )
    from transformers.utils import logging as hf_logging

    for handler in hf_logging._get_library_root_logger().handlers:
        handler.addFilter(lambda record: "requires torchvision" not in record.getMessage())
