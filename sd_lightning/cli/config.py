"""Config location and validation shared by the entry points (the only modules that import Hydra)."""

from __future__ import annotations

import errno
from pathlib import Path
from typing import Any

import torch
from omegaconf import DictConfig, ListConfig, OmegaConf

from sd_lightning.data.transforms import UNLABELED_POLICIES
from sd_lightning.diffusion.objectives import FLOW_SCHEDULERS
from sd_lightning.diffusion.schedules import SAMPLING_SCHEDULERS


def _config_dir() -> str:
    """The configs: inside the installed package (a wheel carries them as sd_lightning/conf), else the checkout's."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    return str(installed if (installed / "train.yaml").is_file() else package.parent / "conf")


CONFIG_DIR = _config_dir()


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
    elif scheduler is not None and scheduler not in (*SAMPLING_SCHEDULERS, *FLOW_SCHEDULERS):
        problems.append(f"{prefix}scheduler={scheduler!r} must be one of {sorted((*SAMPLING_SCHEDULERS, *FLOW_SCHEDULERS))}")
    _check_number(problems, cfg, f"{prefix}steps", int, 1, 1000, optional=optional)
    _check_number(problems, cfg, f"{prefix}guidance_scale", float, 0.0, 100.0, optional=optional)


def check_conditioning(problems: list[str], cfg: DictConfig) -> None:
    """data.conditioning / labeled_fraction / unlabeled / train_fraction / keep_tokens, when the data config has them."""
    conditioning = _get(cfg, "data.conditioning")
    if conditioning is not None and conditioning not in ("text", "class", "none"):
        problems.append(f"data.conditioning={conditioning!r} must be 'text', 'class' or 'none'")
    _check_number(problems, cfg, "data.labeled_fraction", float, 0.0, 1.0, optional=True)
    _check_number(problems, cfg, "data.train_fraction", float, 0.0, 1.0, low_open=True, optional=True)
    _check_number(problems, cfg, "data.labeled_oversample", int, 1, optional=True)
    unlabeled = _get(cfg, "data.unlabeled")
    if unlabeled is not None and unlabeled not in UNLABELED_POLICIES:
        problems.append(f"data.unlabeled={unlabeled!r} must be " + " or ".join(repr(p) for p in UNLABELED_POLICIES))
    _check_number(problems, cfg, "data.keep_tokens", int, 0, optional=True)
    template = _get(cfg, "data.caption_template")
    if template is not None and "{class_name}" not in str(template):
        problems.append(f"data.caption_template={template!r} must contain '{{class_name}}'")
    buckets = _get(cfg, "data.buckets")
    if buckets is not None and not isinstance(buckets, DictConfig):
        problems.append(f"data.buckets={buckets!r} must be null or a mapping such as {{multiple: 8, max_aspect: 2.0}}")


# Small pieces whose constructors check their own arguments: built once here, before any heavy work, so each
# rule has one source (the piece) and still fails early, naming the key.
CHECKED_PIECES = ("objective", "timesteps", "noise", "input_perturbation", "loss", "weighting",
                  "model.components.lora")


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
    _check_number(problems, cfg, "data.batch_size", int, 1)
    _check_number(problems, cfg, "data.num_workers", int, 0)
    _check_number(problems, cfg, "data.resolution", int, 8)
    _check_number(problems, cfg, "data.val_fraction", float, 0.0, 0.99)
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
    check_conditioning(problems, cfg)
    if _get(cfg, "resume") not in ("never", "auto"):
        problems.append(f"resume={_get(cfg, 'resume')!r} must be 'never' or 'auto'")
    ckpt = _get(cfg, "ckpt_path")
    if ckpt not in (None, "last") and not Path(str(ckpt)).expanduser().is_file():
        problems.append(f"ckpt_path={ckpt} does not exist (use ckpt_path=last to resume the run folder's last.ckpt)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def auto_precision() -> str:
    """``${sdl.auto_precision:}``: bf16 autocast on GPUs with bf16 units, else fp32 (CPU autocast is 50-200x slower)."""
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def memory_efficient_adamw() -> str:
    """``${sdl.memory_efficient_adamw:}``: bitsandbytes' 8-bit AdamW with CUDA, else torch's AdamW (logged)."""
    import importlib.util
    import logging

    if torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes") is not None:
        return "sd_lightning.optim.optimizers.build_adamw_8bit"
    reason = "no CUDA device" if not torch.cuda.is_available() else "bitsandbytes is not installed"
    logging.getLogger("sd_lightning").info("optimizer: 8-bit AdamW unavailable (%s), using torch.optim.AdamW", reason)
    return "torch.optim.AdamW"


def _pretrained_config(path: str, sub: str, name: str = "config.json") -> dict[str, Any]:
    import json

    from sd_lightning.models.builders import MissingModelError

    file = Path(str(path)).expanduser() / sub / name
    if not file.is_file():
        raise MissingModelError(f"model.path={path} is not a Stable Diffusion diffusers folder: no {sub}/{name}")
    return json.loads(file.read_text())


def pretrained_resolution(path: str) -> int:
    """``${sdl.pretrained_resolution:${model.path}}``: the image size the folder's UNet was trained at (512 for SD 1.x)."""
    unet, vae = _pretrained_config(path, "unet"), _pretrained_config(path, "vae")
    sample_size = unet["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return int(sample_size) * 2 ** (len(vae["block_out_channels"]) - 1)


for _name, _resolver in (("sdl.auto_precision", auto_precision), ("sdl.memory_efficient_adamw", memory_efficient_adamw),
                         ("sdl.pretrained_resolution", pretrained_resolution)):
    OmegaConf.register_new_resolver(_name, _resolver, replace=True)


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
