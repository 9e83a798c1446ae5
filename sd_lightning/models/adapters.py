"""Adapters through peft (the ``adapter`` group): LoRA, DoRA, LoHa, LoKr — inject, save, merge.

Only the adapter weights train: the base denoiser (and text encoders) stay frozen and bit-identical, so the
optimizer and EMA see a few thousand parameters instead of the whole model. Each adapter starts at the base model
(its update is zero at initialization). LoRA and DoRA export the file ``pipe.load_lora_weights(dir)`` reads
(``pytorch_lora_weights.safetensors`` with diffusers' key names and the peft config as metadata); diffusers loads no
LoHa or LoKr file, so those export the family pipeline with the adapters merged into its weights.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import torch
from diffusers.utils import (
    convert_state_dict_to_diffusers,
    convert_state_dict_to_kohya,
    recurse_remove_peft_layers,
)
from peft import LoHaConfig, LoKrConfig, LoraConfig, PeftConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import PeftType, get_peft_model_state_dict
from safetensors.torch import save_file

from sd_lightning.models.conditioners import is_clip

LORA_WEIGHTS_FILE = "pytorch_lora_weights.safetensors"
KOHYA_WEIGHTS_FILE = "kohya_lora.safetensors"
# Kohya's prefix of each part (one text encoder: lora_te, as sd-scripts names SD 1.x LoRAs; SDXL's two: te1, te2).
KOHYA_PREFIXES = {"unet": "lora_unet", "text_encoder": "lora_te1", "text_encoder_2": "lora_te2"}
DENOISER_TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
TEXT_ENCODER_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")


@dataclass
class Adapter:
    """What to adapt and how: rank, scale ``alpha / rank``, target layers; the subclass names peft's method."""

    kind: ClassVar[str] = ""
    rank: int = 4
    alpha: float = 4.0
    target_modules: Sequence[str] = field(default_factory=lambda: list(DENOISER_TARGETS))
    text_encoder: bool = False
    text_encoder_target_modules: Sequence[str] = field(default_factory=lambda: list(TEXT_ENCODER_TARGETS))
    # false: checkpoints of a pretrained folder hold the adapters only (MBs, not GBs) and reread the base from
    # model.path; true: self-contained checkpoints with the frozen base weights too.
    save_base_weights: bool = False

    def __post_init__(self) -> None:
        self.target_modules = [str(m) for m in self.target_modules]
        self.text_encoder_target_modules = [str(m) for m in self.text_encoder_target_modules]
        problems = self.problems()
        if problems:
            raise ValueError("; ".join(problems))

    def problems(self) -> list[str]:
        problems = []
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            problems.append(f"adapter.rank={self.rank!r} must be an integer >= 1")
        if not self.alpha > 0:
            problems.append(f"adapter.alpha={self.alpha!r} must be > 0 (the adapter scale is alpha / rank)")
        if not self.target_modules:
            problems.append("adapter.target_modules is empty: name the layers to adapt (e.g. to_q)")
        for key in ("dropout", "rank_dropout", "module_dropout"):
            value = getattr(self, key, 0.0)
            if not 0.0 <= value < 1.0:
                problems.append(f"adapter.{key}={value!r} must be in [0, 1)")
        return problems

    def peft_config(self, target_modules: Sequence[str]) -> PeftConfig:
        raise NotImplementedError

    def to_record(self) -> dict[str, Any]:
        return {"kind": self.kind, "config": asdict(self)}


@dataclass
class LoraAdapter(Adapter):
    """LoRA (Hu et al. 2021): W + (alpha / rank) · B A, B zero at the start."""

    kind: ClassVar[str] = "lora"
    dropout: float = 0.0
    # "gaussian" as in diffusers' LoRA scripts (B starts at zero either way, so training starts at the base model).
    init_lora_weights: bool | str = "gaussian"

    def peft_config(self, target_modules: Sequence[str]) -> PeftConfig:
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, lora_dropout=self.dropout,
                          init_lora_weights=self.init_lora_weights, target_modules=list(target_modules),
                          use_dora=self.kind == "dora")


@dataclass
class DoraAdapter(LoraAdapter):
    """DoRA (Liu et al. 2024): LoRA on the direction of each weight, with a trained per-row magnitude."""

    kind: ClassVar[str] = "dora"


@dataclass
class LohaAdapter(Adapter):
    """LoHa (LyCORIS): the update is a Hadamard product of two low-rank products (rank² expressiveness)."""

    kind: ClassVar[str] = "loha"
    rank_dropout: float = 0.0
    module_dropout: float = 0.0

    def peft_config(self, target_modules: Sequence[str]) -> PeftConfig:
        return LoHaConfig(r=self.rank, alpha=self.alpha, rank_dropout=self.rank_dropout,
                          module_dropout=self.module_dropout, target_modules=list(target_modules))


@dataclass
class LokrAdapter(Adapter):
    """LoKr (LyCORIS): the update is a Kronecker product of a small and a low-rank factor."""

    kind: ClassVar[str] = "lokr"
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    # -1: the factor split peft chooses (closest to a square root); else the small factor's size.
    decompose_factor: int = -1

    def peft_config(self, target_modules: Sequence[str]) -> PeftConfig:
        return LoKrConfig(r=self.rank, alpha=self.alpha, rank_dropout=self.rank_dropout,
                          module_dropout=self.module_dropout, decompose_factor=self.decompose_factor,
                          target_modules=list(target_modules))


ADAPTERS: dict[str, type[Adapter]] = {cls.kind: cls for cls in (LoraAdapter, DoraAdapter, LohaAdapter, LokrAdapter)}


def adapter_from_record(record: dict[str, Any]) -> Adapter:
    if record["kind"] not in ADAPTERS:
        raise ValueError(f"adapter kind {record['kind']!r} is not one of {sorted(ADAPTERS)}")
    return ADAPTERS[record["kind"]](**record["config"])


def _check_targets(module: torch.nn.Module, targets: Sequence[str], key: str) -> None:
    """peft's own error for a wrong name lists nothing useful; name the config key and what exists."""
    names = {name for name, _ in module.named_modules()}
    unknown = [t for t in targets if not any(n == t or n.endswith("." + t) for n in names)]
    if unknown:
        linear = sorted({n.rsplit(".", 1)[-1] for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)})
        raise ValueError(f"{key}: no layer named {unknown} in the {type(module).__name__}; linear layers: {linear}")


def inject_adapters(denoiser: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], adapter: Adapter) -> None:
    """Freeze the base weights and add trainable adapters (the denoiser's, and the CLIP text encoders' if asked)."""
    _check_targets(denoiser, adapter.target_modules, "adapter.target_modules")
    modules = [(denoiser, adapter.target_modules)]
    if adapter.text_encoder:
        clips = [e for e in text_encoders if is_clip(e)]
        for encoder in clips:
            _check_targets(encoder, adapter.text_encoder_target_modules, "adapter.text_encoder_target_modules")
        modules += [(encoder, adapter.text_encoder_target_modules) for encoder in clips]
    for module, targets in modules:
        module.requires_grad_(False)
        # peft directly (diffusers' and transformers' add_adapter accept LoRA only, or want another peft).
        inject_adapter_in_model(adapter.peft_config(targets), module, "default")


def has_adapters(module: torch.nn.Module | None) -> bool:
    return module is not None and any(isinstance(m, BaseTunerLayer) for m in module.modules())


def adapter_key_prefixes(module: torch.nn.Module) -> tuple[str, ...]:
    """State-dict key prefixes of the adapter weights (``…to_q.lora_A.``, ``…to_q.hada_w1_a.``, …)."""
    return tuple(f"{name}.{attr}." for name, layer in module.named_modules() if isinstance(layer, BaseTunerLayer)
                 for attr in layer.adapter_layer_names)


def loads_as_lora(module: torch.nn.Module) -> bool:
    """diffusers' ``load_lora_weights`` reads peft's LoRA type (LoRA and DoRA), not LoHa or LoKr."""
    return module.peft_config["default"].peft_type == PeftType.LORA


def save_lora(directory: str | Path, pipeline_class: type, parts: dict[str, torch.nn.Module | None],
              denoiser_part: str = "unet") -> Path:
    """Write ``pytorch_lora_weights.safetensors`` that ``pipe.load_lora_weights(directory)`` loads, through the
    family pipeline's own ``save_lora_weights`` (``<part>_lora_layers`` for unet/transformer, text_encoder(_2))."""
    adapted = {name: module for name, module in parts.items() if has_adapters(module)}
    if denoiser_part not in adapted:
        raise ValueError("this model has no adapters to export (it was not trained with adapter=…)")
    layers = {f"{name}_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(module))
              for name, module in adapted.items()}
    metadata = {f"{name}_lora_adapter_metadata": _peft_metadata(module) for name, module in adapted.items()}
    pipeline_class.save_lora_weights(directory, safe_serialization=True, **layers, **metadata)
    return Path(directory) / LORA_WEIGHTS_FILE


def save_kohya_lora(file: str | Path, parts: dict[str, torch.nn.Module | None]) -> Path | None:
    """The same LoRA in kohya's keys (``lora_unet_…``, ``lora_te_…`` with ``.alpha``), the file AUTOMATIC1111,
    ComfyUI and Forge load (diffusers' ``load_lora_weights`` too). None when it has no kohya form: DoRA, or a part
    kohya does not name (SD 3's transformer)."""
    adapted = {name: module for name, module in parts.items() if has_adapters(module)}
    configs = {name: module.peft_config["default"] for name, module in adapted.items()}
    if any(name not in KOHYA_PREFIXES for name in adapted) or any(getattr(c, "use_dora", False) for c in configs.values()):
        return None
    single_encoder = "text_encoder_2" not in parts
    state: dict[str, torch.Tensor] = {}
    for name, module in adapted.items():
        prefix = "lora_te" if name == "text_encoder" and single_encoder else KOHYA_PREFIXES[name]
        peft_state = {f"{name}.{key}": value for key, value in get_peft_model_state_dict(module).items()}
        for key, value in convert_state_dict_to_kohya(peft_state).items():
            key = prefix + key[len(KOHYA_PREFIXES[name]):]
            # diffusers writes alpha = rank (scale 1); the adapter's own alpha keeps its scale alpha / rank.
            alpha = torch.tensor(float(configs[name].lora_alpha))
            state[key] = alpha if key.endswith(".alpha") else value.contiguous()
    save_file(state, str(file), metadata={"ss_network_module": "networks.lora"})
    return Path(file)


def _peft_metadata(module: torch.nn.Module) -> dict[str, Any]:
    config = module.peft_config["default"].to_dict()
    return {k: sorted(v) if isinstance(v, set) else v for k, v in config.items()}


def merge_adapters(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every adapter into its base layer (W + ΔW) and remove the peft wrappers, in place."""
    with torch.no_grad():
        for layer in module.modules():
            if isinstance(layer, BaseTunerLayer):
                layer.merge()
    recurse_remove_peft_layers(module)
    vars(module).pop("peft_config", None)
    if hasattr(module, "_hf_peft_config_loaded"):
        module._hf_peft_config_loaded = False
    return module
