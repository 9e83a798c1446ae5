"""Self-contained checkpoints: rebuild a diffusion model from a Lightning checkpoint or an exported folder.

A checkpoint carries a record of plain values — denoiser kind and config, VAE config, conditioner config and
tokenizer files, objective name and arguments, sampling defaults — next to the weights, so sampling and export
never depend on the training config's paths still existing. Loading uses ``torch.load(weights_only=True)`` and
builds only registered classes: nothing a file names is imported unless the user names it too.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from transformers import (
    AutoTokenizer,
    BertConfig,
    BertModel,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    T5Config,
    T5EncoderModel,
)

from sd_lightning.diffusion.objectives import Objective, objective_from_record, objective_record
from sd_lightning.models.adapters import adapter_from_record, adapter_key_prefixes, inject_adapters
from sd_lightning.models.builders import DiffusionComponents
from sd_lightning.models.conditioners import SD3Conditioner, SDXLConditioner, TextConditioner
from sd_lightning.models.denoisers import denoiser_from_record
from sd_lightning.models.sentence_conditioner import SentenceConditioner
from sd_lightning.models.textual_inversion import TextualInversion, frozen_rows, rewrap

RECORD_KEY = "sd_lightning"
RUN_CONFIG_KEY = "sd_lightning_run_config"
RECORD_FORMAT = 4
EMA_STATE_KEY = "ema"
SAMPLING_FILE = "sd_lightning.json"
# The text encoder classes a checkpoint may name (with their config classes): nothing else is built from a file.
TEXT_ENCODERS = {"CLIPTextModel": (CLIPTextModel, CLIPTextConfig),
                 "CLIPTextModelWithProjection": (CLIPTextModelWithProjection, CLIPTextConfig),
                 "T5EncoderModel": (T5EncoderModel, T5Config),
                 "BertModel": (BertModel, BertConfig)}
# The conditioner kinds a checkpoint may name.
CONDITIONERS: dict[str, type[TextConditioner]] = {
    c.kind: c for c in (TextConditioner, SDXLConditioner, SD3Conditioner, SentenceConditioner)}


class CheckpointError(ValueError):
    """A checkpoint that cannot be used: not a file, not a sd_lightning checkpoint, or mismatched."""


def _plain(config: Any) -> dict[str, Any]:
    return json.loads(json.dumps(dict(config), default=lambda o: list(o) if isinstance(o, tuple) else str(o)))


def tokenizer_files(tokenizer: Any) -> dict[str, str]:
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        return {p.name: p.read_text(encoding="utf-8") for p in Path(tmp).iterdir() if p.is_file()}


@dataclass
class ModelRecord:
    """What a checkpoint needs besides weights; built from the parts, never from the module's internals."""

    components: DiffusionComponents
    objective: Objective
    sampling: dict[str, Any]
    base_path: str | None = None
    adapters_only: bool = False
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        parts = self.components
        return {
            "format": RECORD_FORMAT,
            "denoiser": {"kind": parts.denoiser.kind, "config": _plain(parts.denoiser.config)},
            "vae_config": _plain(parts.vae.config),
            "conditioner": {**parts.conditioner.record(), "tokenizers": {
                name: tokenizer_files(getattr(parts.conditioner, name)) for name, _ in parts.conditioner.present_parts()}},
            "objective": objective_record(self.objective),
            "sampling": dict(self.sampling),
            "adapter": None if parts.adapter is None else parts.adapter.to_record(),
            "textual_inversion": None if parts.textual_inversion is None else {
                **parts.textual_inversion.to_record(), "frozen_rows": frozen_rows(parts.conditioner)},
            "base_path": self.base_path,
            # True: state_dict holds the trained (adapter) weights only; the frozen base is reread from base_path.
            "adapters_only": self.adapters_only,
            **self.extra,
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


def model_record(checkpoint: dict[str, Any], path: str | Path) -> dict[str, Any]:
    record = checkpoint.get(RECORD_KEY)
    if not isinstance(record, dict) or not ("denoiser" in record or "unet_config" in record):
        raise CheckpointError(f"ckpt_path={path} was not written by a sd_lightning LatentDiffusionModule")
    if record.get("format") != RECORD_FORMAT:
        raise CheckpointError(
            f"ckpt_path={path} was written by an older sd_lightning (checkpoint format {record.get('format')}, this "
            f"version reads format {RECORD_FORMAT}: the denoiser/conditioner/objective engine changed). Sample or "
            "export it with the version that trained it, or retrain."
        )
    return record


def _submodule_state(state_dict: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    return {k[len(prefix):]: v for k, v in state_dict.items() if k.startswith(prefix)}


def apply_ema(modules: dict[str, torch.nn.Module], ema_state: dict[str, Any]) -> None:
    """Copy EMA shadow weights (saved by EMACallback with their module-level names) into the modules."""
    params = {f"{name}.{k}": p for name, m in modules.items() for k, p in m.named_parameters()}
    names, shadows = ema_state["param_names"], ema_state["shadow_params"]
    if len(names) != len(shadows):
        raise CheckpointError("EMA state is inconsistent: names and shadow parameters differ in count")
    with torch.no_grad():
        for name, shadow in zip(names, shadows):
            if name not in params:
                raise CheckpointError(f"EMA weight {name} has no matching parameter in the model")
            params[name].copy_(shadow.to(params[name].dtype))


def _tokenizer(files: dict[str, str]) -> Any:
    with tempfile.TemporaryDirectory() as tmp:
        for name, text in files.items():
            (Path(tmp) / Path(name).name).write_text(text, encoding="utf-8")
        return AutoTokenizer.from_pretrained(tmp, local_files_only=True)


def _conditioner(record: dict[str, Any], base: TextConditioner | None = None) -> TextConditioner:
    """The recorded conditioner: its tokenizers, and its encoders from their configs (or ``base``'s, for adapters)."""
    kind = record.get("kind")
    if kind not in CONDITIONERS:
        raise CheckpointError(f"the checkpoint's conditioner kind {kind!r} is not one of {sorted(CONDITIONERS)}")
    parts: dict[str, Any] = {}
    for tokenizer_name, encoder_name in (*CONDITIONERS[kind].parts, *CONDITIONERS[kind].optional_parts):
        if encoder_name not in record["encoders"]:
            continue
        encoder = record["encoders"][encoder_name]
        if encoder["class"] not in TEXT_ENCODERS:
            raise CheckpointError(f"the checkpoint's {encoder_name} is a {encoder['class']!r}, not one of "
                                  f"{sorted(TEXT_ENCODERS)}")
        model_class, config_class = TEXT_ENCODERS[encoder["class"]]
        parts[tokenizer_name] = _tokenizer(record["tokenizers"][tokenizer_name])
        parts[encoder_name] = (getattr(base, encoder_name) if base is not None
                               else model_class(config_class.from_dict(encoder["config"])))
    return CONDITIONERS[kind](**parts, **record.get("options", {}))


def components_from_checkpoint(path: str | Path, use_ema: bool = True, trusted_objectives: tuple[str, ...] = ()
                               ) -> tuple[DiffusionComponents, Objective, dict[str, Any]]:
    """Rebuild the parts of a LatentDiffusionModule checkpoint; EMA weights by default when present."""
    checkpoint = load_checkpoint(path)
    record = model_record(checkpoint, path)
    adapters_only = bool(record.get("adapters_only"))
    if adapters_only:
        base = _base_model(path, record.get("base_path"))
        denoiser, vae = base.denoiser, base.vae
        conditioner = _conditioner(record["conditioner"], base.conditioner)
    else:
        denoiser = denoiser_from_record(record["denoiser"])
        vae = AutoencoderKL.from_config(record["vae_config"])
        conditioner = _conditioner(record["conditioner"])
    textual_inversion = None
    if record.get("textual_inversion"):
        rewrap(conditioner, record["textual_inversion"])
        textual_inversion = TextualInversion(**{k: v for k, v in record["textual_inversion"].items()
                                                if k != "frozen_rows"})
    adapter = None
    if record.get("adapter"):
        adapter = adapter_from_record(record["adapter"])
        inject_adapters(denoiser.model, conditioner.text_encoders, adapter)
    state = checkpoint["state_dict"]
    fully_trained_text = (record["conditioner"]["options"].get("train_text_encoder")
                          and not (adapter and adapter.text_encoder))
    for prefix, module in (("denoiser.", denoiser), ("vae.", vae), ("conditioner.", conditioner)):
        result = module.load_state_dict(_submodule_state(state, prefix), strict=False)
        if adapters_only and not (prefix == "conditioner." and fully_trained_text):
            adapter_keys = adapter_key_prefixes(module)
            result.missing_keys[:] = [k for k in result.missing_keys if k.startswith(adapter_keys)]
        if result.missing_keys or result.unexpected_keys:
            raise CheckpointError(
                f"ckpt_path={path}: {prefix[:-1]} weights do not match its config "
                f"(missing: {result.missing_keys[:5]}, unexpected: {result.unexpected_keys[:5]})"
            )
    ema_state = checkpoint.get("callbacks", {}).get(EMA_STATE_KEY)
    if use_ema and ema_state:
        apply_ema({"denoiser": denoiser, "conditioner": conditioner}, ema_state)
    try:
        objective = objective_from_record(record["objective"], trusted_objectives)
    except ValueError as err:
        raise CheckpointError(f"ckpt_path={path}: {err}") from err
    components = DiffusionComponents(denoiser.eval(), vae.eval(), conditioner.eval(), adapter, textual_inversion)
    return components, objective, dict(record["sampling"])


def _base_model(path: str | Path, base_path: str | None) -> DiffusionComponents:
    """The frozen base of an adapters-only checkpoint, from the folder it was trained on."""
    from sd_lightning.models.builders import load_pretrained_components
    from sd_lightning.models.families import MissingModelError, UnsupportedModelError

    try:
        return load_pretrained_components(base_path or "")
    except (MissingModelError, UnsupportedModelError, OSError) as err:
        raise CheckpointError(
            f"ckpt_path={path} holds adapters only and needs its base model folder {base_path}, which cannot be "
            f"read ({err}). Restore that folder, or train with adapter.save_base_weights=true for "
            "self-contained checkpoints."
        ) from err
