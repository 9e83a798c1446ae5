"""LoRA (Hu et al. 2021) adapters through peft: inject, save in diffusers' format, merge into the base weights.

Only the adapter weights train: the base UNet (and text encoder) stay frozen and bit-identical, so the
optimizer and EMA see a few thousand parameters instead of the whole model. The exported file is what
``StableDiffusionPipeline.load_lora_weights(dir)`` reads (``pytorch_lora_weights.safetensors`` with the
diffusers key names and the peft config as metadata, so an alpha different from the rank survives).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers.utils import convert_state_dict_to_diffusers, recurse_remove_peft_layers
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class LoraSpec:
    """What to adapt and how: rank, scale ``alpha / rank``, dropout on the adapter input, target layers."""

    rank: int = 4
    alpha: float = 4.0
    dropout: float = 0.0
    unet_target_modules: Sequence[str] = field(default_factory=lambda: list(UNET_TARGETS))
    text_encoder: bool = False
    text_encoder_target_modules: Sequence[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    # "gaussian" as in diffusers' LoRA scripts (B starts at zero either way, so training starts at the base model).
    init_lora_weights: bool | str = "gaussian"
    # false: checkpoints of a pretrained folder hold the adapters only (MBs, not GBs) and reread the base from
    # model.path; true: self-contained checkpoints with the frozen base weights too.
    save_base_weights: bool = False

    def __post_init__(self) -> None:
        self.unet_target_modules = [str(m) for m in self.unet_target_modules]
        self.text_encoder_target_modules = [str(m) for m in self.text_encoder_target_modules]
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"model.components.lora.rank={self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            problems.append(f"model.components.lora.alpha={self.alpha!r} must be > 0 (the adapter scale is alpha / rank)")
        if not 0.0 <= self.dropout < 1.0:
            problems.append(f"model.components.lora.dropout={self.dropout!r} must be in [0, 1)")
        if not self.unet_target_modules:
            problems.append("model.components.lora.unet_target_modules is empty: name the layers to adapt (e.g. to_q)")
        if problems:
            raise ValueError("; ".join(problems))

    def peft_config(self, target_modules: Sequence[str]) -> LoraConfig:
        return LoraConfig(
            r=self.rank,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            init_lora_weights=self.init_lora_weights,
            target_modules=list(target_modules),
        )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_targets(module: torch.nn.Module, targets: Sequence[str], key: str) -> None:
    """peft's own error for a wrong name lists nothing useful; name the config key and what exists."""
    names = {name for name, _ in module.named_modules()}
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"{key}: no layer named {unknown} in the {type(module).__name__}; linear layers: {linear}")


def inject_lora(denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], spec: LoraSpec) -> None:
    """Freeze the base weights and add trainable adapters (the denoiser's, and the CLIP text encoders' if asked)."""
    _check_targets(denoiser, spec.unet_target_modules, "model.components.lora.unet_target_modules")
    denoiser.requires_grad_(False)
    denoiser.add_adapter(spec.peft_config(spec.unet_target_modules))
    if spec.text_encoder:
        clips = [e for e in text_encoders if type(e).__name__.startswith("CLIP")]  # not SD 3's T5
        for encoder in clips:
            _check_targets(encoder, spec.text_encoder_target_modules, "model.components.lora.text_encoder_target_modules")
            encoder.requires_grad_(False)
            # peft directly: transformers' add_adapter wants a newer peft than diffusers does.
            inject_adapter_in_model(spec.peft_config(spec.text_encoder_target_modules), encoder, "default")


def has_lora(module: torch.nn.Module) -> bool:
    return any(isinstance(m, BaseTunerLayer) for m in module.modules())


def lora_state_dicts(parts: dict[str, torch.nn.Module | None]) -> dict[str, dict[str, torch.Tensor]]:
    """Adapter weights of each adapted part (named as the pipeline names it), with diffusers' key names."""
    return {
        name: convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
        for name, module in parts.items()
        if module is not None and has_lora(module)
    }


def save_lora(directory: str | Path, pipeline_class: type, parts: dict[str, torch.nn.Module | None],
              denoiser_part: str = "unet") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(directory)`` loads, through the
    family pipeline's own ``save_lora_weights`` (``<part>_lora_layers`` for unet/transformer, text_encoder(_2))."""
    states = lora_state_dicts(parts)
    if denoiser_part not in states:
        raise ValueError("this model has no LoRA adapters to export (it was not trained with model.lora)")
    layers = {f"{name}_lora_layers": state for name, state in states.items()}
    metadata = {f"{name}_lora_adapter_metadata": _peft_metadata(parts[name]) for name in states}
    pipeline_class.save_lora_weights(directory, safe_serialization=True, **layers, **metadata)
    return Path(directory) / LORA_WEIGHTS_FILE


def _peft_metadata(module: torch.nn.Module) -> dict[str, Any]:
    config = module.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def merge_lora(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base layer (W + scale · B A) and remove the peft wrappers, in place."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
    recurse_remove_peft_layers(module)
    vars(module).pop("peft_config", None)
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
    return module
