"""sdl-sample: generate images from a Lightning checkpoint or an exported diffusers folder."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, check_sampling, missing_keys, run_entry
from sd_lightning.diffusion.sampling import DEFAULT_GUIDANCE_SCALE, generate, make_grid
from sd_lightning.models.pipelines import load_pipeline


def sample(cfg: DictConfig) -> list[Path]:
    """Writes ``num_images`` PNGs per prompt and ``grid.png`` to ``out_dir``; deterministic for a seed."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    problems: list[str] = []
    check_sampling(problems, cfg, prefix="", optional=True)
    if cfg.num_images < 1:
        problems.append(f"num_images={cfg.num_images} must be >= 1")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    pipeline, defaults = load_pipeline(cfg.ckpt_path, scheduler=cfg.scheduler, use_ema=cfg.use_ema,
                                       trusted_objectives=tuple(cfg.get("trusted_objectives") or ()))
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    prompts = list(cfg.prompt) if isinstance(cfg.prompt, (list, ListConfig)) else [cfg.prompt or ""]
    all_prompts = [p for p in prompts for _ in range(cfg.num_images)]
    images = generate(
        pipeline,
        all_prompts,
        seed=cfg.seed,
        steps=cfg.steps or defaults.get("steps", 30),
        guidance_scale=defaults.get("guidance_scale", DEFAULT_GUIDANCE_SCALE) if cfg.guidance_scale is None else cfg.guidance_scale,
        batch_size=cfg.batch_size,
    )
    out_dir = Path(cfg.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = out_dir / f"{index:05d}.png"
        image.save(path)
        paths.append(path)
    make_grid(images, columns=cfg.num_images).save(out_dir / "grid.png")
    print(f"sdl-sample: wrote {len(paths)} images and grid.png to {out_dir}")
    return paths


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_entry("sdl-sample", sample, cfg)


if __name__ == "__main__":
    main()
