"""sdl-train: compose the config, build data, model, callbacks, loggers and trainer, then fit."""

from __future__ import annotations

import logging
import os
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
import lightning as L
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sd_lightning.callbacks.checkpointing import PREVIOUS_LAST
from sd_lightning.callbacks.data_epoch import RunConfigCallback
from sd_lightning.callbacks.progress import FitTimeCallback, format_duration
from sd_lightning.cli.config import CONFIG_DIR, run_entry, validate_train_config
from sd_lightning.data.cache import AUTO, resolve_auto_cache
from sd_lightning.data.dreambooth import DreamBoothDataModule, resolve_class_images
from sd_lightning.data.notices import length_notice, say
from sd_lightning.evaluation.manifest import build_manifest, log_manifest, write_manifest
from sd_lightning.models.checkpoint_io import RECORD_KEY, CheckpointError, load_checkpoint

log = logging.getLogger("sd_lightning")


# The wandb folder variables _contain_wandb set (not the user's): re-pointed at each run of the process.
_CONTAINED_WANDB_FOLDERS: dict[str, str] = {}


def _contain_wandb(run_dir: Path) -> None:
    """Keep wandb's files inside the run folder instead of ~/.cache and the system temp folder.

    A folder the user set is kept; one set here for an earlier run of this process (a multirun's previous
    job) moves to this run, else later jobs would stage their artifacts in the first job's folder.
    """
    for variable, sub in (("WANDB_DIR", ""), ("WANDB_CACHE_DIR", "wandb/cache"), ("WANDB_CONFIG_DIR", "wandb/config"),
                          ("WANDB_DATA_DIR", "wandb/data")):
        path = run_dir / sub
        path.mkdir(parents=True, exist_ok=True)
        if variable not in os.environ or os.environ[variable] == _CONTAINED_WANDB_FOLDERS.get(variable):
            os.environ[variable] = _CONTAINED_WANDB_FOLDERS[variable] = str(path)
    os.environ.setdefault("WANDB_SILENT", "true")


def _instantiate_all(section: DictConfig | None) -> list[Any]:
    return [instantiate(conf) for conf in (section or {}).values() if conf is not None and "_target_" in conf]


def _is_multirun() -> bool:
    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def update_latest_link(link: Path, run_dir: Path) -> None:
    """Point ``link`` at ``run_dir`` atomically (a relative link, so the outputs folder can move)."""
    link.parent.mkdir(parents=True, exist_ok=True)
    target = os.path.relpath(run_dir.resolve(), link.parent.resolve())
    tmp = link.with_name(f".{link.name}.tmp{os.getpid()}")
    if tmp.is_symlink() or tmp.exists():
        tmp.unlink()
    tmp.symlink_to(target, target_is_directory=True)
    os.replace(tmp, link)


def resolve_resume(cfg: DictConfig, run_dir: Path) -> str | None:
    """The checkpoint to resume from: ``ckpt_path`` if given, else last.ckpt of the run folder with resume=auto."""
    if cfg.ckpt_path is not None:
        return str(cfg.ckpt_path)
    last = run_dir / "checkpoints" / "last.ckpt"
    if cfg.resume != "auto" or not last.is_file():
        return None
    previous = last.with_name(PREVIOUS_LAST)
    try:
        load_checkpoint(last)
    except CheckpointError as err:
        if not previous.is_file():
            raise CheckpointError(f"resume=auto: {last} is unreadable and no earlier checkpoint ({previous.name}) "
                                  f"is there to fall back to. {err}") from err
        try:
            load_checkpoint(previous)
        except CheckpointError as older:
            raise CheckpointError(f"resume=auto: both {last} and {previous} are unreadable ({older})") from err
        log.warning("resume=auto: %s is unreadable (%s); resuming from the previous one, %s", last,
                    str(err).splitlines()[0][:200], previous)
        return str(previous)
    log.info("resume=auto: continuing from %s", last)
    return str(last)


def family_parts(record: dict) -> dict[str, str]:
    """What makes a checkpoint's family: its denoiser and conditioner kinds."""
    return {"denoiser": record.get("denoiser", {}).get("kind", "?"),
            "conditioner": record.get("conditioner", {}).get("kind", "?")}


def check_resume_checkpoint(path: str, model: L.LightningModule, run_dir: Path) -> None:
    """Refuse a malformed checkpoint or one from another model config before Lightning touches it."""
    if path == "last":
        last = run_dir / "checkpoints" / "last.ckpt"
        if not last.is_file():
            return
        path = str(last)
    checkpoint = load_checkpoint(path)
    record = checkpoint.get(RECORD_KEY)
    if isinstance(record, dict) and hasattr(model, "denoiser") and hasattr(model, "conditioner"):
        saved = family_parts(record)
        built = {"denoiser": model.denoiser.kind, "conditioner": model.conditioner.kind}
        if saved != built:
            parts = ", ".join(f"{k}: {saved[k]} in the checkpoint, {built[k]} in this config"
                              for k in saved if saved[k] != built[k])
            raise CheckpointError(f"ckpt_path={path} is another model family than this config builds ({parts}). "
                                  "Resume with the model=… the checkpoint was trained with.")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    found = {k: tuple(v.shape) for k, v in checkpoint["state_dict"].items()}
    differing = sorted(
        [f"missing {k}" for k in expected.keys() - found.keys()]
        + [f"unexpected {k}" for k in found.keys() - expected.keys()]
        + [f"{k}: {found[k]} vs {expected[k]}" for k in expected.keys() & found.keys() if found[k] != expected[k]]
    )
    if differing:
        shown = "\n  - ".join(differing[:20])
        more = f"\n  … and {len(differing) - 20} more" if len(differing) > 20 else ""
        raise CheckpointError(
            f"ckpt_path={path} was saved from a different model config ({len(differing)} differing weights):"
            f"\n  - {shown}{more}\nResume with the overrides the checkpoint was trained with."
        )


def _wandb_run_id(run_dir: Path) -> str:
    """The run folder's W&B id, so a resumed job continues (or later syncs into) the same W&B run."""
    id_file = run_dir / "wandb" / "run_id"
    if id_file.is_file():
        return id_file.read_text().strip()
    run_id = uuid.uuid4().hex[:8]
    id_file.parent.mkdir(parents=True, exist_ok=True)
    id_file.write_text(run_id)
    return run_id


def _sweep_grouping(cfg: DictConfig) -> dict[str, str]:
    """In a multirun, W&B groups the jobs by sweep and names each by the overrides that differ."""
    if not _is_multirun():
        return {}
    hydra_cfg = HydraConfig.get()
    group = cfg.logger.wandb.get("group") or f"{cfg.name}-{Path(hydra_cfg.sweep.dir).name}"
    tags = [*(cfg.logger.wandb.get("tags") or []), "sweep", group]
    return {"group": group, "name": hydra_cfg.job.override_dirname or f"job{hydra_cfg.job.num}", "tags": tags}


@dataclass
class Run:
    """What ``sdl-train`` fits: the pieces of one run, built the same way for training and for ``estimate=true``."""

    datamodule: L.LightningDataModule
    model: L.LightningModule
    callbacks: list[Any]
    loggers: list[Any]
    config: dict[str, Any]


def build_run(cfg: DictConfig, run_dir: Path) -> Run:
    """Data, model, every configured callback and logger of ``cfg``, writing into ``run_dir``."""
    if "wandb" in (cfg.get("logger") or {}):
        _contain_wandb(run_dir)
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    if getattr(datamodule, "cache", None) == AUTO:
        datamodule.cache = resolve_auto_cache(datamodule, model, Path(cfg.paths.output_root) / "cache")
    if isinstance(datamodule, DreamBoothDataModule):  # the class images: a folder, or generated once by the base
        datamodule.class_root = resolve_class_images(datamodule, model, Path(cfg.paths.output_root) / "class_images")
    tokenizer = getattr(getattr(model, "conditioner", None), "tokenizer", None)
    if tokenizer is not None and getattr(datamodule, "source", None) is not None:
        say(length_notice(datamodule.source, tokenizer))
    run_config = OmegaConf.to_container(cfg, resolve=True)
    callbacks = [*_instantiate_all(cfg.get("callbacks")), RunConfigCallback(run_config), FitTimeCallback()]
    logger_cfg = cfg.get("logger") or {}
    if "wandb" in logger_cfg:
        logger_cfg = OmegaConf.merge(logger_cfg, {"wandb": {"id": logger_cfg.wandb.id or _wandb_run_id(run_dir),
                                                            **_sweep_grouping(cfg)}})
    return Run(datamodule, model, callbacks, _instantiate_all(logger_cfg), run_config)


def log_run_config(run: Run) -> None:
    """The whole resolved config as every logger's hyperparameters (after the Trainer exists: it sets the ranks)."""
    for logger in run.loggers:
        if hasattr(logger, "log_hyperparams"):
            logger.log_hyperparams(run.config)


def train(cfg: DictConfig) -> float | None:
    """Fit the configured model; returns ``cfg.optimized_metric`` for sweepers."""
    validate_train_config(cfg)
    if cfg.get("estimate"):
        from sd_lightning.cli.estimate import estimate

        estimate(cfg)
        return None
    run_dir = Path(cfg.paths.run_dir).resolve()
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    run = build_run(cfg, run_dir)
    ckpt_path = resolve_resume(cfg, run_dir)
    if ckpt_path is not None:
        check_resume_checkpoint(ckpt_path, run.model, run_dir)
    trainer: L.Trainer = instantiate(cfg.trainer, callbacks=run.callbacks, logger=run.loggers or False)
    log_run_config(run)
    if trainer.is_global_zero:
        # The resolved config, code, stack, hardware and data split of this run (see evaluation/manifest.py).
        manifest = build_manifest(run.config, run.datamodule)
        log_manifest(run.loggers, manifest, write_manifest(manifest, run_dir))

    started = time.perf_counter()
    trainer.fit(run.model, datamodule=run.datamodule, ckpt_path=ckpt_path, weights_only=True)
    fit_seconds = time.perf_counter() - started
    finish_loggers(run.loggers)

    metric = trainer.callback_metrics.get(cfg.optimized_metric)
    if trainer.is_global_zero and not trainer.interrupted:
        if not _is_multirun():
            update_latest_link(Path(cfg.paths.latest), run_dir)
        _print_summary(trainer, run_dir, cfg, fit_seconds)
    return None if metric is None else float(metric)


def finish_loggers(loggers: list[Any]) -> None:
    """Close the W&B run now, so its offline file is complete when train() returns (a multirun's next job
    runs in this same process, and Lightning leaves the run open until the process exits)."""
    from lightning.pytorch.loggers import WandbLogger

    for logger in loggers:
        if isinstance(logger, WandbLogger) and logger._experiment is not None:
            logger.experiment.finish()


def _print_summary(trainer: L.Trainer, run_dir: Path, cfg: DictConfig, fit_seconds: float) -> None:
    from lightning.pytorch.callbacks import ModelCheckpoint
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sd_lightning run '{cfg.name}' finished", show_header=False)
    table.add_row("run folder", str(run_dir))
    for checkpoint in trainer.checkpoint_callbacks:
        if not isinstance(checkpoint, ModelCheckpoint):  # FinalCheckpointCallback writes ModelCheckpoint's last.ckpt
            continue
        if checkpoint.save_last:
            table.add_row("last checkpoint", str(checkpoint.last_model_path or "-"))
        if checkpoint.monitor:
            table.add_row(f"best checkpoint ({checkpoint.monitor})", str(checkpoint.best_model_path or "-"))
    for path, label in ((run_dir / "samples", "sample grids"), (run_dir / "vae", "trained VAE"),
                        (run_dir / "csv" / "metrics.csv", "metrics (CSV)"), (run_dir / "wandb", "W&B offline run")):
        if path.exists():
            table.add_row(label, str(path))
    for key in sorted(k for k in trainer.callback_metrics if k.startswith("val/") and "_t" not in k):
        table.add_row(key, f"{float(trainer.callback_metrics[key]):.6g}")
    table.add_row("steps", str(trainer.global_step))
    table.add_row("training time (fit)", format_duration(fit_seconds))
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="train")
def main(cfg: DictConfig) -> float | None:
    return run_entry("sdl-train", train, cfg)


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-train")
