"""sdl-export: write the model's family pipeline folder (StableDiffusionPipeline, StableDiffusionXLPipeline or
StableDiffusion3Pipeline; safetensors, EMA weights by default).

For a LoRA run it writes the adapters instead (``pytorch_lora_weights.safetensors``, which
``pipe.load_lora_weights(out_dir)`` of that family's pipeline reads) and, with ``merge_lora=true``, also the
pipeline with the adapters folded into its weights in ``out_dir/merged``.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, missing_keys, run_entry
from sd_lightning.models.checkpoint_io import SAMPLING_FILE
from sd_lightning.models.families import FAMILIES
from sd_lightning.models.lora import has_lora, merge_lora, save_lora
from sd_lightning.models.pipelines import LatentSampler, load_pipeline


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
    if isinstance(pipeline, LatentSampler):
        denoiser = type(pipeline.components.denoiser.model).__name__
        raise ConfigError(
            f"ckpt_path={cfg.ckpt_path}: no plain diffusers pipeline runs this model ({denoiser} with "
            f"{type(pipeline.scheduler).__name__}, {type(pipeline.components.conditioner).__name__}): "
            "StableDiffusionPipeline and StableDiffusionXLPipeline need a UNet with a DDPM objective "
            "(FlowMatchEulerDiscreteScheduler has no init_noise_sigma); StableDiffusion3Pipeline needs the SD 3 "
            "family (model=sd3_tiny: an SD3 transformer, CLIP-L + CLIP-G, flow matching). Sample this checkpoint "
            "with sdl-sample instead. Nothing was written."
        )
    family = FAMILIES[type(pipeline).__name__]
    denoiser = getattr(pipeline, family.denoiser_part)
    unet_config = denoiser.config
    if unet_config.get("num_class_embeds") or unet_config.get("class_embed_type"):
        raise ConfigError(f"ckpt_path={cfg.ckpt_path}: the UNet has a learned class embedding (num_class_embeds="
                          f"{unet_config.get('num_class_embeds')}, class_embed_type={unet_config.get('class_embed_type')})"
                          ", which a plain StableDiffusionPipeline cannot pass class labels to; train class labels "
                          "through prompts instead (data.conditioning=class with data.caption_template)")
    lora = has_lora(denoiser)
    if cfg.merge_lora and not lora:
        raise ConfigError(f"merge_lora=true: ckpt_path={cfg.ckpt_path} has no LoRA adapters (it is a full model)")
    tmp = out_dir.with_name(out_dir.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    if lora:
        encoders = family.conditioner_class.encoder_names()
        parts = {family.denoiser_part: denoiser, **{name: getattr(pipeline, name) for name in encoders}}
        save_lora(tmp, family.pipeline_class, parts, family.denoiser_part)
        if cfg.merge_lora:
            for module in parts.values():
                if module is not None:
                    merge_lora(module)
            pipeline.save_pretrained(tmp / "merged", safe_serialization=True)
            (tmp / "merged" / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
    else:
        pipeline.save_pretrained(tmp, safe_serialization=True)
    (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    what = f"a {type(pipeline).__name__}"
    if lora:
        what = "LoRA adapters" + (" and the merged pipeline (merged/)" if cfg.merge_lora else "")
    print(f"sdl-export: wrote {what} to {out_dir} (sampling defaults: {sampling})")
    return out_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_entry("sdl-export", export, cfg)


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-export")
