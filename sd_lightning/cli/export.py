"""sdl-export: write the model's family pipeline folder (StableDiffusionPipeline, StableDiffusionXLPipeline or
StableDiffusion3Pipeline; safetensors, EMA weights by default).

For an adapter run (``adapter=lora|dora``) it writes the adapters instead (``pytorch_lora_weights.safetensors``,
which ``pipe.load_lora_weights(out_dir)`` of that family's pipeline reads) and, with ``merge_adapters=true``, also
the pipeline with the adapters folded into its weights in ``out_dir/merged``. A LoRA of SD 1.x/2.x or SDXL is also
written in kohya's keys (``kohya_lora.safetensors``), the file AUTOMATIC1111 and ComfyUI load. LoHa and LoKr have
no file diffusers loads: their export is the family pipeline with the adapters merged (``out_dir`` itself). A
textual-inversion run exports its embedding file (``learned_embeds.safetensors``). ``format=single_file`` writes
the whole model as one ``model.safetensors`` in the original Stable Diffusion keys (SD 1.x and SDXL, adapters
merged), which ``from_single_file`` of the family's pipeline reads back.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, missing_keys, run_entry
from sd_lightning.files import staged_folder
from sd_lightning.models.adapters import (
    KOHYA_WEIGHTS_FILE,
    has_adapters,
    loads_as_lora,
    merge_adapters,
    save_kohya_lora,
    save_lora,
)
from sd_lightning.models.checkpoint_io import SAMPLING_FILE
from sd_lightning.models.families import FAMILIES
from sd_lightning.models.pipelines import LatentSampler, load_pipeline
from sd_lightning.models.single_file import (
    SINGLE_FILE,
    SingleFileError,
    reader_caveat,
    save_single_file,
    single_file_state_dict,
)
from sd_lightning.models.textual_inversion import EMBEDDINGS_FILE, placeholder_encoders, save_embeddings

log = logging.getLogger(__name__)

FORMATS = ("pipeline", "single_file")


def export(cfg: DictConfig) -> Path:
    missing = missing_keys(cfg)
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    fmt = cfg.get("format", "pipeline")  # a config built in code may leave it out
    if fmt not in FORMATS:
        raise ConfigError(f"format={fmt!r}: choose one of {', '.join(FORMATS)}")
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
    encoders = {name: getattr(pipeline, name) for name in family.conditioner_class.encoder_names()}
    if placeholder_encoders(encoders):
        if fmt == "single_file":
            raise ConfigError(f"format=single_file: ckpt_path={cfg.ckpt_path} is a textual-inversion run, whose "
                              "export is its embedding file (leave format=pipeline)")
        return _export_embeddings(cfg, out_dir, encoders, sampling)
    if fmt == "single_file":
        return _export_single_file(cfg, out_dir, pipeline, family, [denoiser, *encoders.values()], sampling)
    adapted = has_adapters(denoiser)
    if cfg.merge_adapters and not adapted:
        raise ConfigError(f"merge_adapters=true: ckpt_path={cfg.ckpt_path} has no adapters (it is a full model)")
    lora_file = adapted and loads_as_lora(denoiser)
    parts = {family.denoiser_part: denoiser, **encoders}
    kohya = None
    with staged_folder(out_dir) as tmp:
        if lora_file:
            save_lora(tmp, family.pipeline_class, parts, family.denoiser_part)
            kohya = save_kohya_lora(tmp / KOHYA_WEIGHTS_FILE, parts)
        if adapted and (cfg.merge_adapters or not lora_file):
            for module in parts.values():
                if has_adapters(module):
                    merge_adapters(module)
        merged = tmp / "merged" if lora_file else tmp
        if not lora_file or cfg.merge_adapters:
            pipeline.save_pretrained(merged, safe_serialization=True)
            (merged / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
        (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
    what = f"a {type(pipeline).__name__}" + (" with the adapters merged" if adapted and not lora_file else "")
    if lora_file:
        what = ("LoRA adapters" + (f" (diffusers; kohya keys: {KOHYA_WEIGHTS_FILE})" if kohya else "")
                + (" and the merged pipeline (merged/)" if cfg.merge_adapters else ""))
    print(f"sdl-export: wrote {what} to {out_dir} (sampling defaults: {sampling})")
    return out_dir


def _export_embeddings(cfg: DictConfig, out_dir: Path, encoders: dict, sampling: dict) -> Path:
    """A textual-inversion run: the learned embedding file, for ``pipe.load_textual_inversion(file, token=…)``."""
    token = next(iter(placeholder_encoders(encoders).values())).token
    with staged_folder(out_dir) as tmp:
        save_embeddings(tmp / EMBEDDINGS_FILE, encoders)
        (tmp / SAMPLING_FILE).write_text(json.dumps({**sampling, "placeholder_token": token}, indent=2))
    print(f"sdl-export: wrote the textual-inversion embedding of {token} to {out_dir / EMBEDDINGS_FILE} "
          f"(pipe.load_textual_inversion(file, token={token!r}))")
    return out_dir


def _export_single_file(cfg: DictConfig, out_dir: Path, pipeline, family, modules: list, sampling: dict) -> Path:
    """The whole model (adapters merged) as one file in the original layout, the sampling defaults beside it."""
    for module in modules:
        if has_adapters(module):
            merge_adapters(module)
    metadata = {"sd_lightning.family": family.name,
                "sd_lightning.prediction_type": str(pipeline.scheduler.config.get("prediction_type", "epsilon")),
                "sd_lightning.sampling": json.dumps(sampling)}
    try:
        state = single_file_state_dict(pipeline)
    except SingleFileError as err:
        raise ConfigError(f"format=single_file: ckpt_path={cfg.ckpt_path}: {err}. Nothing was written.") from err
    with staged_folder(out_dir) as tmp:
        save_single_file(tmp / SINGLE_FILE, state, metadata)
        (tmp / SAMPLING_FILE).write_text(json.dumps(sampling, indent=2))
    caveat = reader_caveat(pipeline)
    if caveat:
        log.warning(caveat)
    print(f"sdl-export: wrote {len(state)} tensors in the original {family.title} layout to {out_dir / SINGLE_FILE} "
          f"(prediction type {metadata['sd_lightning.prediction_type']}; sampling defaults: {sampling})")
    return out_dir


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="export")
def main(cfg: DictConfig) -> None:
    run_entry("sdl-export", export, cfg)


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-export")
