"""Self-contained checkpoints: rebuild a diffusion model from a Lightning checkpoint or an exported folder.

A checkpoint carries the component configs and tokenizer files next to the weights, so sampling and
export never depend on the training config's paths still existing. Loading uses
``torch.load(weights_only=True)``: nothing in a checkpoint is unpickled as code.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from diffusers import AutoencoderKL, DDPMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel

from sd_lightning.models.builders import DiffusionComponents

if TYPE_CHECKING:
    from sd_lightning.models.latent_diffusion import LatentDiffusionModule

RECORD_KEY = "sd_lightning"
EMA_STATE_KEY = "ema"
SAMPLING_FILE = "sd_lightning.json"


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a file, not a sd_lightning checkpoint, or mismatched."""


def _plain(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}


def component_record(module: LatentDiffusionModule) -> dict[str, Any]:
    """What a checkpoint needs besides weights to rebuild the model anywhere."""
    return {
        "format": 1,
        "unet_config": _plain(module.unet.config),
        "vae_config": _plain(module.vae.config),
        "text_encoder_config": module.text_encoder.config.to_dict(),
        "scheduler_config": _plain(module.noise_scheduler.config),
        "tokenizer_files": tokenizer_files(module.tokenizer),
        "sampling": dict(module.sampling),
        "train_text_encoder": module.train_text_encoder,
        "run_config": getattr(module, "run_config", None),
        # LoRA runs: the adapter settings (state_dict keys are peft's) and the base folder they adapt.
        "lora": None if getattr(module, "lora", None) is None else module.lora.to_dict(),
        "base_path": str(Path(module.hparams["path"]).expanduser().resolve()) if module.hparams.get("path") else None,
        # True: state_dict holds the trained (adapter) weights only; the frozen base is reread from base_path.
        "adapters_only": bool(getattr(module, "adapters_only_checkpoints", False)),
    }


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """A Lightning checkpoint read with ``weights_only=True``; clear errors for anything else."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise CheckpointError(f"ckpt_path={file} does not exist or is not a file")
    try:
        checkpoint = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:
        raise CheckpointError(
            f"ckpt_path={file} is not a readable checkpoint (truncated, corrupt, or it contains objects "
            f"that weights_only loading refuses): {type(err).__name__}: {str(err).splitlines()[0][:300]}"
        ) from err
    if not isinstance(checkpoint, dict) or "state_dict" not in checkpoint:
        raise CheckpointError(f"ckpt_path={file} is not a Lightning checkpoint (no 'state_dict')")
    return checkpoint


def _submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def apply_ema(unet: torch.nn.Module, text_encoder: torch.nn.Module, ema_state: dict[str, Any]) -> None:
    """Copy EMA shadow weights (saved by EMACallback with their parameter names) into the modules."""
    modules = {"unet": unet, "text_encoder": text_encoder}
    params = {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters()}
    names, shadows = ema_state["param_names"], ema_state["shadow_params"]
    if len(names) != len(shadows):
        raise CheckpointError("EMA state is inconsistent: names and shadow parameters differ in count")
    with torch.no_grad():
        for name, shadow in zip(names, shadows):
            if name not in params:
                raise CheckpointError(f"EMA weight {name} has no matching parameter in the model")
            params[name].copy_(shadow.to(params[name].dtype))


def components_from_checkpoint(path: str | Path, use_ema: bool = True) -> tuple[DiffusionComponents, dict[str, Any]]:
    """Rebuild the parts of a LatentDiffusionModule checkpoint; EMA weights by default when present."""
    checkpoint = load_checkpoint(path)
    record = checkpoint.get(RECORD_KEY)
    if record is None or "unet_config" not in record:
        raise CheckpointError(f"ckpt_path={path} was not written by a sd_lightning LatentDiffusionModule")
    adapters_only = bool(record.get("adapters_only"))
    if adapters_only:
        unet, vae, text_encoder = _base_model(path, record.get("base_path"))
    else:
        unet = UNet2DConditionModel.from_config(record["unet_config"])
        vae = AutoencoderKL.from_config(record["vae_config"])
        text_encoder = CLIPTextModel(CLIPTextConfig.from_dict(record["text_encoder_config"]))
    if record.get("lora"):
        from sd_lightning.models.lora import LoraSpec, inject_lora

        inject_lora(unet, text_encoder, LoraSpec(**record["lora"]))
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in record["tokenizer_files"].items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        tokenizer = AutoTokenizer.from_pretrained(tmp, local_files_only=True)
    state = checkpoint["state_dict"]
    for prefix, module in (("unet.", unet), ("vae.", vae), ("text_encoder.", text_encoder)):
        result = module.load_state_dict(_submodule_state(state, prefix), strict=False)
        fully_trained = prefix == "text_encoder." and record.get("train_text_encoder") and not (
            record.get("lora") or {}).get("text_encoder")
        if adapters_only and not fully_trained:  # the base came from base_path: only adapters must be present
            result.missing_keys[:] = [k for k in result.missing_keys if ".lora_" in k]
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"ckpt_path={path}: {prefix[:-1]} weights do not match its config "
                f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]})"
            )
    ema_state = checkpoint.get("callbacks", {}).get(EMA_STATE_KEY)
    if use_ema and ema_state is not None:
        apply_ema(unet, text_encoder, ema_state)
    components = DiffusionComponents(
        unet=unet.eval(),
        vae=vae.eval(),
        text_encoder=text_encoder.eval(),
        tokenizer=tokenizer,
        noise_scheduler=DDPMScheduler.from_config(record["scheduler_config"]),
    )
    return components, dict(record["sampling"])


def _base_model(path: str | Path, base_path: str | None) -> tuple[Any, Any, Any]:
    """The frozen base of an adapters-only LoRA checkpoint, from the folder it was trained on."""
    from sd_lightning.models.builders import MissingModelError, load_pretrained_components

    try:
        base = load_pretrained_components(base_path or "")
    except (MissingModelError, OSError) as err:
        raise CheckpointError(
            f"ckpt_path={path} holds LoRA adapters only and needs its base model folder {base_path}, which cannot be "
            f"read ({err}). Restore that folder, or train with model.lora.save_base_weights=true for "
            "self-contained checkpoints."
        ) from err
    return base.unet, base.vae, base.text_encoder


def pipeline_from_components(components: DiffusionComponents, scheduler: Any) -> StableDiffusionPipeline:
    pipeline = StableDiffusionPipeline(
        vae=components.vae,
        text_encoder=components.text_encoder,
        tokenizer=components.tokenizer,
        unet=components.unet,
        scheduler=scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    pipeline.set_progress_bar_config(disable=True)
    return pipeline


def load_pipeline(
    source: str | Path, scheduler: str | None = None, use_ema: bool = True
) -> tuple[StableDiffusionPipeline, dict[str, Any]]:
    """A pipeline and its sampling defaults from a checkpoint file or an exported folder."""
    from sd_lightning.diffusion.schedules import sampling_scheduler

    path = Path(source).expanduser()
    if path.is_dir():
        if not (path / "model_index.json").is_file():
            raise CheckpointError(f"{path} is a folder but not a diffusers pipeline (no model_index.json)")
        pipeline = StableDiffusionPipeline.from_pretrained(path, local_files_only=True, use_safetensors=True)
        pipeline.set_progress_bar_config(disable=True)
        sampling_file = path / SAMPLING_FILE
        sampling = json.loads(sampling_file.read_text()) if sampling_file.is_file() else {}
        sampling.setdefault("scheduler", "ddim")
        if (scheduler and scheduler != sampling["scheduler"]) or not sampling_file.is_file():
            pipeline.scheduler = sampling_scheduler(scheduler or sampling["scheduler"], pipeline.scheduler.config)
        return pipeline, sampling
    components, sampling = components_from_checkpoint(path, use_ema=use_ema)
    name = scheduler or sampling["scheduler"]
    return pipeline_from_components(components, sampling_scheduler(name, components.noise_scheduler.config)), sampling
