"""sdl-export: write a plain diffusers StableDiffusionPipeline folder (safetensors, EMA weights by default)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, missing_keys, run_entry
from sd_lightning.models.checkpoint_io import SAMPLING_FILE, load_pipeline


def export(cfg: DictConfig) -> Path:
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    out_dir = Path(cfg.out_dir).expanduser().resolve()
    if out_dir.exists() and any(out_dir.iterdir()) and not cfg.overwrite:
        raise ConfigError(f"out_dir={out_dir} exists and is not empty; choose another or set overwrite=true")
    pipeline, sampling = load_pipeline(cfg.ckpt_path, scheduler=cfg.scheduler, use_ema=cfg.use_ema)
    if cfg.scheduler:
        sampling["scheduler"] = cfg.scheduler
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    print(f"sdl-export: wrote a StableDiffusionPipeline to {out_dir} (sampling defaults: {sampling})")
    return out_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_entry("sdl-export", export, cfg)


if __name__ == "__main__":
    main()
