"""Model families: which denoiser and conditioner make SD 1.x/2.x, SDXL and SD 3, and their diffusers pipeline.

A family is a set of component classes plus the pipeline that samples and exports them; nothing else in the
engine knows families. A pretrained folder names its family in ``model_index.json`` (``_class_name``), checked
here before any weight is read: an unsupported pipeline or a missing component fails with the folder, what was
found and what is supported.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionPipeline,
    StableDiffusionXLPipeline,
)

from sd_lightning.models.conditioners import SD3Conditioner, SDXLConditioner, TextConditioner
from sd_lightning.models.denoisers import Denoiser, SD3TransformerDenoiser, SDXLUNetDenoiser, UNetDenoiser
from sd_lightning.models.sentence_conditioner import SentenceConditioner

# The attribute of a pipeline built or loaded here holding what its ``__call__`` needs to condition as the model was
# trained (SD 3: max_sequence_length); ``generate`` passes it.
CALL_KWARGS = "sd_lightning_call_kwargs"


class MissingModelError(FileNotFoundError):
    """A model folder that a config points at does not exist or is incomplete."""


class UnsupportedModelError(ValueError):
    """A pretrained folder of a pipeline or component class this project does not train."""


def _ddpm_scheduler(scheduler: Any) -> bool:
    return hasattr(scheduler, "init_noise_sigma")


def _flow_scheduler(scheduler: Any) -> bool:
    return isinstance(scheduler, FlowMatchEulerDiscreteScheduler)


@dataclass(frozen=True)
class Family:
    """``name`` is the README's; ``denoiser_part`` the pipeline's name for the backbone (unet / transformer)."""

    name: str
    title: str
    pipeline_class: type
    denoiser_class: type[Denoiser]
    conditioner_class: type[TextConditioner]
    denoiser_part: str
    scheduler_fits: Callable[[Any], bool]
    pipeline_options: dict[str, Any] = field(default_factory=dict)
    # Component classes a folder's model_index.json may name for each part (diffusers / transformers names).
    part_classes: dict[str, tuple[str, ...]] = field(default_factory=dict)
    # VAE config values the pipeline reads that a VAE of ours may leave unset (SD 3 reads shift_factor; 0 = none).
    vae_defaults: dict[str, Any] = field(default_factory=dict)
    # Other conditioners the pipeline runs as trained, by their text encoder's class (SD 1.x: a BERT sentence
    # encoder, whose attention mask StableDiffusionPipeline passes when the encoder's config asks for it).
    other_conditioners: dict[str, type[TextConditioner]] = field(default_factory=dict)

    @property
    def required_parts(self) -> list[str]:
        names = [name for pair in self.conditioner_class.parts for name in pair]
        return [self.denoiser_part, "vae", "scheduler", *names]

    def check_vae(self, vae: Any, source: str) -> None:
        """A VAE with a latent shift samples wrongly in a pipeline that does not read ``shift_factor``: refuse it."""
        shift = vae.config.get("shift_factor") or 0.0
        if shift and "shift_factor" not in self.vae_defaults:
            raise ValueError(f"{source}: this VAE has shift_factor={shift:.4g} (exported with "
                             f"callbacks.vae_export.standardization=shifted), which {self.pipeline_class.__name__} "
                             "ignores; only the SD 3 family reads it. Train the VAE with standardization=global")

    def matches(self, components: Any) -> bool:
        return (type(components.denoiser) is self.denoiser_class
                and type(components.conditioner) in (self.conditioner_class, *self.other_conditioners.values()))

    def pipeline(self, components: Any, scheduler: Any) -> Any:
        """The plain diffusers pipeline over these components (sharing their modules)."""
        unset = {k: v for k, v in self.vae_defaults.items() if components.vae.config.get(k) is None}
        if unset:
            components.vae.register_to_config(**unset)
        pipeline = self.pipeline_class(vae=components.vae, scheduler=scheduler,
                                       **{self.denoiser_part: components.denoiser.model},
                                       **components.conditioner.pipeline_kwargs(), **self.pipeline_options)
        pipeline.set_progress_bar_config(disable=True)
        setattr(pipeline, CALL_KWARGS, components.conditioner.pipeline_call_kwargs())
        return pipeline

    def components(self, pipeline: Any, conditioner: dict[str, Any] | None = None) -> tuple[Any, Any, TextConditioner]:
        """(denoiser, VAE, conditioner) wrapping a loaded pipeline's modules."""
        kind = self.other_conditioners.get(type(pipeline.text_encoder).__name__, self.conditioner_class)
        text = kind.from_pipeline(pipeline, **(conditioner or {}))
        return self.denoiser_class(getattr(pipeline, self.denoiser_part)), pipeline.vae, text

    def load(self, root: Path, safetensors_only: bool = False) -> Any:
        """The folder's pipeline, offline; the SD safety checker is not loaded (training never uses it)."""
        options = {"safety_checker": None, "feature_extractor": None,
                   "requires_safety_checker": False} if self.pipeline_class is StableDiffusionPipeline else {}
        index = json.loads((root / "model_index.json").read_text())
        for pair in self.conditioner_class.optional_parts:  # absent in the folder (SD 3 without T5): passed as None
            entry = index.get(pair[1])
            if not (isinstance(entry, list) and entry[0]):
                options.update(dict.fromkeys(pair))
        if safetensors_only:
            options["use_safetensors"] = True
        return self.pipeline_class.from_pretrained(root, local_files_only=True, **options)


SD = Family(
    "sd", "SD 1.x / 2.x", StableDiffusionPipeline, UNetDenoiser, TextConditioner, "unet", _ddpm_scheduler,
    {"safety_checker": None, "feature_extractor": None, "requires_safety_checker": False},
    {"unet": ("UNet2DConditionModel",), "text_encoder": ("CLIPTextModel", "BertModel")},
    other_conditioners={"BertModel": SentenceConditioner},
)
SDXL = Family(
    "sdxl", "SDXL", StableDiffusionXLPipeline, SDXLUNetDenoiser, SDXLConditioner, "unet", _ddpm_scheduler,
    {"add_watermarker": False},
    {"unet": ("UNet2DConditionModel",), "text_encoder": ("CLIPTextModel",),
     "text_encoder_2": ("CLIPTextModelWithProjection",)},
)
SD3 = Family(
    "sd3", "SD 3 / 3.5", StableDiffusion3Pipeline, SD3TransformerDenoiser, SD3Conditioner, "transformer",
    _flow_scheduler, {},
    {"transformer": ("SD3Transformer2DModel",), "text_encoder": ("CLIPTextModelWithProjection",),
     "text_encoder_2": ("CLIPTextModelWithProjection",), "text_encoder_3": ("T5EncoderModel",)},
    {"shift_factor": 0.0},
)
FAMILIES: dict[str, Family] = {f.pipeline_class.__name__: f for f in (SD, SDXL, SD3)}


def family_of(components: Any) -> Family | None:
    """The family whose component classes these are, or None (e.g. a transformer under one CLIP)."""
    return next((f for f in FAMILIES.values() if f.matches(components)), None)


def supported() -> str:
    return ", ".join(f"{name} ({f.title})" for name, f in FAMILIES.items())


def folder_family(path: str | Path, key: str = "model.path") -> Family:
    """The family of a local diffusers folder, checked from ``model_index.json`` and the component folders;
    ``key`` names the setting that pointed at it in the messages."""
    root = Path(path).expanduser()
    index_file = root / "model_index.json"
    if not index_file.is_file():
        raise MissingModelError(f"{key}={root} is not a diffusers pipeline folder: no model_index.json "
                                f"(supported: {supported()})")
    index = json.loads(index_file.read_text())
    name = index.get("_class_name")
    family = FAMILIES.get(name)
    if family is None:
        raise UnsupportedModelError(f"{key}={root}: model_index.json names {name!r}, which sd_lightning does not "
                                    f"train; supported: {supported()}")
    missing = [part for part in family.required_parts
               if not (isinstance(index.get(part), list) and index[part][0]) or not (root / part).is_dir()]
    if missing:
        raise MissingModelError(f"{key}={root} is a {name} folder without {', '.join(missing)} (a {family.title} "
                                f"model needs {', '.join(family.required_parts)})")
    for part, allowed in family.part_classes.items():
        entry = index.get(part)
        found = entry[1] if isinstance(entry, list) and entry[0] else None
        if found is not None and found not in allowed:
            raise UnsupportedModelError(f"{key}={root}: {part} is a {found}; the {family.title} family trains "
                                        f"{' or '.join(allowed)}")
    return family


def denoiser_config(path: str | Path) -> tuple[dict[str, Any], dict[str, Any]]:
    """(backbone config, VAE config) of a folder, read without loading weights."""
    root = Path(path).expanduser()
    family = folder_family(root)
    configs = [json.loads((root / sub / "config.json").read_text()) for sub in (family.denoiser_part, "vae")]
    return configs[0], configs[1]
