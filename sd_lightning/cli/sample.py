"""sdl-sample: generate images from a Lightning checkpoint or an exported diffusers folder."""

from __future__ import annotations

from pathlib import Path

import hydra
import torch
from omegaconf import DictConfig, ListConfig

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, check_sampling, missing_keys, run_entry
from sd_lightning.diffusion.sampling import DEFAULT_GUIDANCE_SCALE, generate, make_grid
from sd_lightning.models.pipelines import load_pipeline


def read_prompts(cfg: DictConfig) -> tuple[list[str], bool]:
    """The prompts of this call and whether they are several (one folder each): ``prompt``, ``prompts=[…]`` or
    ``prompt_file`` (one prompt per line, blank lines skipped), exactly one of them."""
    given = [key for key in ("prompts", "prompt_file") if cfg.get(key)]
    single = cfg.prompt
    if isinstance(single, (list, ListConfig)):  # prompt=[a,b] reads as prompts=[a,b]
        given, single = [*given, "prompt"], None
    if single and given:
        given.append("prompt")
    if len(given) > 1:
        raise ConfigError(f"set one of prompt, prompts and prompt_file (got {', '.join(sorted(set(given)))})")
    if not given:
        return [single or ""], False
    if given == ["prompt_file"]:
        path = Path(cfg.prompt_file).expanduser()
        if not path.is_file():
            raise ConfigError(f"prompt_file={cfg.prompt_file} does not exist (a text file, one prompt per line)")
        prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        if not prompts:
            raise ConfigError(f"prompt_file={cfg.prompt_file} holds no prompt (one per line; blank lines are skipped)")
        return prompts, True
    listed = cfg.prompts if given == ["prompts"] else cfg.prompt
    return ([listed] if isinstance(listed, str) else [str(p) for p in listed]), True


def _write(images: list, folder: Path, columns: int) -> list[Path]:
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, image in enumerate(images):
        path = folder / f"{index:05d}.png"
        image.save(path)
        paths.append(path)
    make_grid(images, columns=columns).save(folder / "grid.png")
    return paths


def sample(cfg: DictConfig) -> list[Path]:
    """``num_images`` PNGs and ``grid.png`` in ``out_dir``, or with several prompts one numbered folder per prompt
    (``000/`` …, each with ``prompt.txt``) and an overall ``grid.png`` (a row per prompt). Deterministic for a seed:
    a prompt's images are the same whether it is sampled alone or among others (image j is seeded by seed + j)."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    problems: list[str] = []
    check_sampling(problems, cfg, prefix="", optional=True)
    if cfg.num_images < 1:
        problems.append(f"num_images={cfg.num_images} must be >= 1")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))
    prompts, several = read_prompts(cfg)
    pipeline, defaults = load_pipeline(cfg.ckpt_path, scheduler=cfg.scheduler, use_ema=cfg.use_ema,
                                       trusted_objectives=tuple(cfg.get("trusted_objectives") or ()))
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")
    count = cfg.num_images
    images = generate(
        pipeline,
        [p for p in prompts for _ in range(count)],
        seeds=[cfg.seed + j for _ in prompts for j in range(count)],
        steps=cfg.steps or defaults.get("steps", 30),
        guidance_scale=defaults.get("guidance_scale", DEFAULT_GUIDANCE_SCALE) if cfg.guidance_scale is None else cfg.guidance_scale,
        batch_size=cfg.batch_size,
    )
    out_dir = Path(cfg.out_dir)
    if not several:
        paths = _write(images, out_dir, count)
        print(f"sdl-sample: wrote {len(paths)} images and grid.png to {out_dir}")
        return paths
    paths = []
    width = max(3, len(str(len(prompts) - 1)))
    for k, prompt in enumerate(prompts):
        folder = out_dir / f"{k:0{width}d}"
        paths += _write(images[k * count:(k + 1) * count], folder, count)
        (folder / "prompt.txt").write_text(prompt + "\n", encoding="utf-8")
    make_grid(images, columns=count).save(out_dir / "grid.png")
    print(f"sdl-sample: wrote {len(prompts)} folders of {count} images (prompt.txt beside them) and grid.png to {out_dir}")
    return paths


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="sample")
def main(cfg: DictConfig) -> None:
    run_entry("sdl-sample", sample, cfg)


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-sample")
