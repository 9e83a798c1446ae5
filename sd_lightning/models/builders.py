"""Model builders: denoiser, VAE and conditioner, from small configs or a local diffusers folder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from sd_lightning.models.conditioners import TextConditioner
from sd_lightning.models.denoisers import Denoiser, UNetDenoiser, build_unet, prepare_denoiser
from sd_lightning.models.lora import LoraSpec, inject_lora

log = logging.getLogger(__name__)

TINY_TOKENIZER = "tiny"


class MissingModelError(FileNotFoundError):
    """A model folder that a config points at does not exist or is incomplete."""


@dataclass
class DiffusionComponents:
    """The parts of a latent diffusion model: a denoiser backbone, a VAE and a conditioner."""

    denoiser: Denoiser
    vae: AutoencoderKL
    conditioner: TextConditioner
    lora: LoraSpec | None = None

    @property
    def latent_shape(self) -> tuple[int, int]:
        config = self.vae.config
        factor = 2 ** (len(config.block_out_channels) - 1)
        return int(config.latent_channels), int(config.sample_size) // factor


def build_vae(
    block_out_channels: Sequence[int] = (8, 16, 32),
    latent_channels: int = 4,
    layers_per_block: int = 1,
    norm_num_groups: int = 8,
    scaling_factor: float = 1.0,
    sample_size: int = 32,
) -> AutoencoderKL:
    """An AutoencoderKL whose downsampling factor is 2 ** (len(block_out_channels) - 1)."""
    depth = len(block_out_channels)
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * depth,
        up_block_types=("UpDecoderBlock2D",) * depth,
        block_out_channels=tuple(block_out_channels),
        latent_channels=latent_channels,
        layers_per_block=layers_per_block,
        norm_num_groups=norm_num_groups,
        scaling_factor=scaling_factor,
        sample_size=sample_size,
    )


def load_vae(path: str | Path, hint: str = "") -> AutoencoderKL:
    """A trained VAE folder (diffusers format, safetensors), with its data-derived scaling factor."""
    folder = Path(path).expanduser()
    if not (folder / "config.json").is_file():
        message = f"no VAE at {folder} (expected a diffusers AutoencoderKL folder with config.json)"
        raise MissingModelError(f"{message}. {hint}".strip())
    return AutoencoderKL.from_pretrained(folder, local_files_only=True, use_safetensors=True)


def load_tokenizer(source: str | Path) -> PreTrainedTokenizerBase:
    if str(source) == TINY_TOKENIZER:
        from sd_lightning.models.tokenizer import load_tiny_tokenizer

        return load_tiny_tokenizer()
    return AutoTokenizer.from_pretrained(source, local_files_only=True)


def build_text_encoder(
    tokenizer: PreTrainedTokenizerBase,
    hidden_size: int = 32,
    intermediate_size: int = 64,
    num_hidden_layers: int = 2,
    num_attention_heads: int = 2,
) -> CLIPTextModel:
    """A CLIP text transformer sized for ``tokenizer`` (random init)."""
    config = CLIPTextConfig(
        vocab_size=len(tokenizer),
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_hidden_layers,
        num_attention_heads=num_attention_heads,
        max_position_embeddings=tokenizer.model_max_length,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return CLIPTextModel(config)


def _finish(denoiser: Denoiser, vae: AutoencoderKL, conditioner: TextConditioner, lora: LoraSpec | None,
            gradient_checkpointing: bool, attention: str, channels_last: bool, compile: str | None
            ) -> DiffusionComponents:
    """Freeze what does not train, inject adapters, apply the speed switches: once, for every backbone."""
    vae.requires_grad_(False)
    vae.eval()
    conditioner.freeze()
    if lora is not None:
        inject_lora(denoiser.model, conditioner.text_encoder, lora)
    prepare_denoiser(denoiser, gradient_checkpointing, attention, channels_last, compile)
    return DiffusionComponents(denoiser, vae, conditioner, lora)


def build_components(
    denoiser: Callable[..., Denoiser] | None = None,
    vae: dict | None = None,
    vae_path: str | None = None,
    vae_hint: str = "",
    text_encoder: dict | None = None,
    conditioner: dict | None = None,
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: str | None = None,
) -> DiffusionComponents:
    """Components from configs: a trained VAE when ``vae_path`` is set, a random text encoder and denoiser.

    ``denoiser`` is a builder (a ``_partial_`` config) called with the sizes the other parts fix: latent channels
    and size from the VAE, sequence and pooled widths from the conditioner.
    """
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    if vae_path:
        vae_model = load_vae(vae_path, hint=vae_hint)
    else:
        log.warning("model.components.vae_path is not set: using a randomly initialised VAE (train one with a VAE "
                    "experiment)")
        vae_model = build_vae(**(vae or {}))
    text = TextConditioner(tokenizer, build_text_encoder(tokenizer, **(text_encoder or {})),
                           tokenizer_source=TINY_TOKENIZER, **(conditioner or {}))
    factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
    backbone = (denoiser or build_unet)(
        in_channels=vae_model.config.latent_channels,
        sample_size=vae_model.config.sample_size // factor,
        cross_attention_dim=text.sequence_dim,
        pooled_dim=text.pooled_dim,
    )
    return _finish(backbone, vae_model, text, lora, gradient_checkpointing, attention, channels_last, compile)


def pretrained_resolution(path: str | Path) -> int:
    """The image size a pretrained folder's UNet was trained at (512 for SD 1.x), read when the data is built."""
    import json

    root = Path(path).expanduser()
    configs = {}
    for sub in ("unet", "vae"):
        file = root / sub / "config.json"
        if not file.is_file():
            raise MissingModelError(f"model.path={path} is not a Stable Diffusion diffusers folder: no {sub}/config.json")
        configs[sub] = json.loads(file.read_text())
    sample_size = configs["unet"]["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return int(sample_size) * 2 ** (len(configs["vae"]["block_out_channels"]) - 1)


def load_pretrained_components(
    path: str | Path,
    conditioner: dict | None = None,
    lora: LoraSpec | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: str | None = None,
) -> DiffusionComponents:
    """A local Stable Diffusion 1.x/2.x folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), offline."""
    root = Path(path).expanduser()
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / sub).is_dir()]
    if missing:
        raise MissingModelError(
            f"model.path={root} is not a Stable Diffusion diffusers folder: missing {', '.join(m + '/' for m in missing)}"
        )
    text = TextConditioner(
        AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
        CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True),
        tokenizer_source=str(root / "tokenizer"), **(conditioner or {}),
    )
    return _finish(
        UNetDenoiser(UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True)),
        AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True),
        text, lora, gradient_checkpointing, attention, channels_last, compile,
    )
