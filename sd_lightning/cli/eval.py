"""sdl-eval: measure a checkpoint or an exported diffusers folder on any data config.

Three kinds of numbers, written to ``<out_dir>/eval.json`` and ``eval.md`` and printed as a table:

1. the model's own deterministic validation metrics (ε-space MSE/RMSE/MAE/R², x̂₀ MSE, per-timestep MSE),
   computed by ``LatentDiffusionModule.validation_step`` through ``trainer.validate`` on the data config's
   validation split — the same numbers training logs, now on any data set;
2. the VAE's reconstruction MSE/PSNR/SSIM on that split;
3. sample quality: FID and KID against the data's real images in the space of a feature network
   (``feature=trained``: a small CNN trained on the data itself and cached), conditional accuracy and
   diversity when the data's captions are classes (plus the SVC judge of ``class_conditional`` on the
   digits), and CLIP score when ``eval.clip_path`` names a local CLIP folder.
"""

from __future__ import annotations

import json
import logging
import math
import random
from pathlib import Path
from typing import Any

import hydra
import lightning as L
import numpy as np
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, check_sampling, missing_keys, run_entry
from sd_lightning.diffusion.objectives import objective_from_scheduler_config
from sd_lightning.diffusion.sampling import DEFAULT_GUIDANCE_SCALE, generate, make_grid
from sd_lightning.models.builders import DiffusionComponents
from sd_lightning.models.checkpoint_io import RUN_CONFIG_KEY, components_from_checkpoint, load_checkpoint
from sd_lightning.models.families import FAMILIES
from sd_lightning.models.pipelines import build_pipeline, load_pipeline

log = logging.getLogger("sd_lightning")

REFERENCES = ("all", "train", "val")


def check_eval_config(cfg: DictConfig) -> None:
    """Fail before loading anything, naming each bad key."""
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    problems: list[str] = []
    check_sampling(problems, cfg, prefix="eval.", optional=True)
    e = cfg.eval
    if not isinstance(e.num_samples, int) or e.num_samples < 2:
        problems.append(f"eval.num_samples={e.num_samples} must be an integer >= 2 (FID needs two samples)")
    if e.reference not in REFERENCES:
        problems.append(f"eval.reference={e.reference!r} must be one of {list(REFERENCES)}")
    for key, low in (("batch_size", 1), ("kid_subsets", 1), ("kid_subset_size", 2), ("max_real", 2)):
        value = e[key]
        if (value is not None or key != "max_real") and (isinstance(value, bool) or not isinstance(value, int)
                                                          or value < low):
            problems.append(f"eval.{key}={value} must be an integer >= {low}")
    if not Path(str(cfg.ckpt_path)).expanduser().exists():
        problems.append(f"ckpt_path={cfg.ckpt_path} does not exist (a .ckpt file or an sdl-export folder)")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def load_model(source: str, use_ema: bool = True, scheduler: str | None = None) -> tuple[Any, Any, dict, dict | None]:
    """(LatentDiffusionModule, pipeline, sampling defaults, training config or None) from a checkpoint or a folder.

    Both wrap the same modules: validation and sampling measure the same (EMA by default) weights.
    """
    from sd_lightning.models.latent_diffusion import LatentDiffusionModule

    path = Path(source).expanduser()
    hparams: dict[str, Any] = {}
    run_config = None
    if path.is_dir():
        pipeline, sampling = load_pipeline(path, scheduler=scheduler)
        denoiser, vae, conditioner = FAMILIES[type(pipeline).__name__].components(pipeline, {"drop_prob": 0.0})
        components = DiffusionComponents(denoiser, vae, conditioner)
        objective = objective_from_scheduler_config(dict(pipeline.scheduler.config), str(path))
    else:
        components, objective, sampling = components_from_checkpoint(path, use_ema=use_ema)
        checkpoint = load_checkpoint(path)
        hparams = dict(checkpoint.get("hyper_parameters") or {})
        run_config = checkpoint.get(RUN_CONFIG_KEY)
        pipeline = build_pipeline(components, objective, scheduler or sampling["scheduler"])
    extra = {k: hparams[k] for k in ("val_timesteps", "seed") if k in hparams}
    module = LatentDiffusionModule(components, objective, optimizer=torch.optim.AdamW, sampling=sampling, **extra)
    return module.eval(), pipeline, sampling, run_config


def build_datamodule(cfg: DictConfig, run_config: dict | None) -> Any:
    """``data=…`` when given, else the data config the checkpoint was trained with."""
    if cfg.get("data") is not None:
        return instantiate(cfg.data)
    if run_config and run_config.get("data"):
        # Evaluation reads pixels: reconstruction needs them, and a training run's latent cache may be gone.
        return instantiate(OmegaConf.create({**run_config["data"], "cache": None}))
    raise ConfigError(f"ckpt_path={cfg.ckpt_path} carries no data config (an exported folder): choose the data to "
                      "evaluate on with data=digits or data=imagefolder data.root=DIR")


def build_feature(cfg: DictConfig, real: Any) -> tuple[torch.nn.Module, Any, dict[str, Any]]:
    """(feature module, TrainedFeatures or None, report entry) from the ``feature`` config group."""
    from sd_lightning.evaluation.features import TrainedFeatures

    try:
        built = instantiate(cfg.feature)
        trained = built if isinstance(built, torch.nn.Module) else built(real)
    except (ValueError, ImportError) as err:
        raise ConfigError(f"feature: {err}") from err
    if isinstance(trained, TrainedFeatures):
        info = {"network": "trained", "objective": trained.objective, "key": trained.key,
                "weights": str(trained.weights_path), "from_cache": trained.from_cache, **trained.metrics}
        return trained.network, trained, info
    if not isinstance(trained, torch.nn.Module):
        raise ConfigError(f"feature._target_={cfg.feature.get('_target_')} built a {type(trained).__name__}; it must "
                          "be an nn.Module mapping images [N, C, H, W] in [0, 1] to features [N, d]")
    return trained.eval(), None, {"network": str(cfg.feature.get("_target_"))}


def _prompts(cfg: DictConfig, real: Any, class_names: list[str] | None) -> list[str]:
    """Equal samples per class when the data has classes, else prompts drawn from the data's own captions."""
    if class_names:
        per_class = max(1, cfg.eval.num_samples // len(class_names))
        return [name for name in class_names for _ in range(per_class)]
    captions = [c or "" for c in real.train_captions + real.val_captions] or [""]
    return random.Random(cfg.eval.seed).choices(captions, k=cfg.eval.num_samples)


def _by_caption(images: torch.Tensor, captions: list[str | None], class_names: list[str]) -> dict[int, torch.Tensor]:
    index = {name: i for i, name in enumerate(class_names)}
    labels = np.array([index.get(c or "", -1) for c in captions])
    return {k: images[torch.from_numpy(labels == k)] for k in range(len(class_names)) if (labels == k).any()}


def _digits_judge(datamodule: Any, samples: torch.Tensor, prompts: list[str]) -> dict[str, Any] | None:
    """The scikit-learn SVC judge of ``class_conditional`` for the digits (comparable with experiments/)."""
    from sd_lightning.data.sources import DigitsSource, digit_caption
    from sd_lightning.evaluation.class_conditional import evaluate_digit_samples

    if not isinstance(datamodule.source, DigitsSource):
        return None
    label_of = {digit_caption(k): k for k in range(10)}
    by_label: dict[int, list[int]] = {}
    for i, prompt in enumerate(prompts):
        if prompt in label_of:
            by_label.setdefault(label_of[prompt], []).append(i)
    if not by_label or min(len(v) for v in by_label.values()) < 2:
        return None
    report = evaluate_digit_samples({k: samples[v].numpy() for k, v in by_label.items()})
    return {"accuracy": report.accuracy, "diversity": report.diversity}


def evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Run every measurement; returns the report also written to ``<out_dir>/eval.json``."""
    from sd_lightning.evaluation.features import load_split_images
    from sd_lightning.evaluation.image_metrics import (
        FeatureClassifierJudge,
        class_conditional_metrics,
        clip_score,
        frechet_distance,
        kernel_distance,
        reconstruction_metrics,
    )

    check_eval_config(cfg)
    out_dir = Path(cfg.out_dir).expanduser()
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg, resolve=True))
    L.seed_everything(cfg.seed, verbose=False)
    e = cfg.eval
    module, pipeline, sampling, run_config = load_model(str(cfg.ckpt_path), cfg.use_ema, e.scheduler)
    datamodule = build_datamodule(cfg, run_config)
    datamodule.setup("validate")
    report: dict[str, Any] = {"ckpt_path": str(cfg.ckpt_path), "data": datamodule.source.describe(),
                              "out_dir": str(out_dir)}

    if e.validate and len(datamodule.val_dataset) > 0:
        trainer = L.Trainer(accelerator=cfg.accelerator, devices=1, logger=False, enable_checkpointing=False,
                            enable_progress_bar=False, enable_model_summary=False)
        report["validation"] = {k: float(v) for k, v in trainer.validate(module, datamodule=datamodule,
                                                                          verbose=False)[0].items()}
        module.cpu()

    real = load_split_images(datamodule, max_items=e.max_real)
    reference = {"all": torch.cat([real.train, real.val]), "train": real.train, "val": real.val}[e.reference]
    reference_captions = {"all": real.train_captions + real.val_captions, "train": real.train_captions,
                          "val": real.val_captions}[e.reference]
    if len(reference) < 2:
        raise ConfigError(f"eval.reference={e.reference} holds {len(reference)} real images: FID needs at least 2")
    if e.reconstruction:
        held_out = real.val if len(real.val) else real.train
        report["reconstruction"] = reconstruction_metrics(module.vae, held_out, batch_size=e.batch_size)

    network, trained, report["feature"] = build_feature(cfg, real)
    class_names = trained.class_names if trained is not None else None
    prompts = _prompts(cfg, real, class_names)
    settings = {"scheduler": e.scheduler or sampling.get("scheduler", "ddim"), "steps": e.steps or sampling.get("steps", 30),
                "guidance_scale": sampling.get("guidance_scale", DEFAULT_GUIDANCE_SCALE) if e.guidance_scale is None else e.guidance_scale}
    pipeline.to("cuda" if torch.cuda.is_available() and cfg.accelerator != "cpu" else "cpu")
    samples = generate(pipeline, prompts, seed=e.seed, steps=settings["steps"], guidance_scale=settings["guidance_scale"],
                       batch_size=e.batch_size, output_type="np")
    samples = torch.as_tensor(samples).permute(0, 3, 1, 2).float().cpu()
    pipeline.to("cpu")
    make_grid(_to_pil(samples[:100]), columns=min(10, len(samples))).save(out_dir / "samples.png")

    quality: dict[str, Any] = {"num_samples": len(samples), "num_real": len(reference), "reference": e.reference,
                               "sampling": settings, "seed": e.seed}
    quality["fid"] = frechet_distance(network, reference, samples)
    quality["kid"], quality["kid_std"] = kernel_distance(network, reference, samples, subsets=e.kid_subsets,
                                                         subset_size=e.kid_subset_size, seed=e.seed)
    if len(real.train) >= 2 and len(real.val) >= 2:
        # The floor a perfect model would reach with this many images: real training vs real validation images.
        quality["fid_real_train_vs_val"] = frechet_distance(network, real.train, real.val)
    if class_names:
        judge = FeatureClassifierJudge(trained.network, samples.shape[1:])
        classes = class_conditional_metrics(judge, _by_caption(samples, prompts, class_names),
                                            _by_caption(reference, reference_captions, class_names))
        quality["conditional_accuracy"], quality["diversity"] = classes["accuracy"], classes["diversity"]
        quality["per_class_accuracy"] = {class_names[k]: v for k, v in classes["per_class_accuracy"].items()}
        quality["per_class_diversity"] = {class_names[k]: v for k, v in classes["per_class_diversity"].items()}
    digits = _digits_judge(datamodule, samples, prompts)
    if digits is not None:
        quality["digits_svc"] = digits
    score = clip_score(samples, prompts, e.clip_path)
    if score is not None:
        quality["clip_score"] = score
    report["samples"] = quality

    (out_dir / "eval.json").write_text(json.dumps(report, indent=2, default=_jsonable))
    (out_dir / "eval.md").write_text(markdown_report(report))
    _print_table(report)
    return report


def _to_pil(images: torch.Tensor) -> list:
    from PIL import Image

    array = (images.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    return [Image.fromarray(a) for a in array]


def _jsonable(value: Any) -> Any:
    return float(value) if isinstance(value, (np.floating, torch.Tensor)) else str(value)


def _headline(report: dict[str, Any]) -> list[tuple[str, str]]:
    rows: list[tuple[str, str]] = []
    for key, value in (report.get("validation") or {}).items():
        if "_t" not in key:
            rows.append((key, f"{value:.6g}"))
    for key, value in (report.get("reconstruction") or {}).items():
        rows.append((f"vae/{key}", f"{value:.6g}"))
    quality = report["samples"]
    for key in ("fid", "fid_real_train_vs_val", "kid", "kid_std", "conditional_accuracy", "diversity", "clip_score"):
        if key in quality and not (isinstance(quality[key], float) and math.isnan(quality[key])):
            rows.append((f"samples/{key}", f"{quality[key]:.6g}"))
    for key, value in (quality.get("digits_svc") or {}).items():
        rows.append((f"samples/digits_svc_{key}", f"{value:.6g}"))
    return rows


def markdown_report(report: dict[str, Any]) -> str:
    """The human-readable twin of eval.json."""
    quality, feature = report["samples"], report["feature"]
    lines = [
        "# sdl-eval report", "",
        f"- model: `{report['ckpt_path']}`",
        f"- data: {report['data']}",
        f"- samples: {quality['num_samples']} ({quality['sampling']['scheduler']}, {quality['sampling']['steps']} steps, "
        f"guidance {quality['sampling']['guidance_scale']}, seed {quality['seed']}) vs {quality['num_real']} real images "
        f"({quality['reference']})",
        f"- feature network: {feature['network']}" + (f" ({feature['objective']}, key `{feature['key']}`, "
                                                      f"{'cached' if feature['from_cache'] else 'trained now'})"
                                                      if "key" in feature else ""),
        "", "| metric | value |", "|---|---|",
        *[f"| {name} | {value} |" for name, value in _headline(report)],
    ]
    if quality.get("per_class_accuracy"):
        lines += ["", "| class | accuracy | diversity |", "|---|---|---|"]
        for name, accuracy in quality["per_class_accuracy"].items():
            diversity = quality.get("per_class_diversity", {}).get(name, float("nan"))
            lines.append(f"| {name} | {accuracy:.3f} | {diversity:.3f} |")
    lines += ["", "FID/KID are comparable only between reports with the same feature network key. KID is an unbiased "
              "estimate: values within about kid_std of 0 (negative ones included) mean indistinguishable sets.",
              "![samples](samples.png)", ""]
    return "\n".join(lines)


def _print_table(report: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sdl-eval: {report['ckpt_path']}", show_header=False)
    table.add_row("data", report["data"])
    for name, value in _headline(report):
        table.add_row(name, value)
    table.add_row("report", str(Path(report["out_dir"]) / "eval.md"))
    Console().print(table)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="eval")
def main(cfg: DictConfig) -> None:
    run_entry("sdl-eval", evaluate, cfg)


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-eval")
