"""Model builders: the parts of a latent diffusion model, from small configs or a local diffusers folder."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
from transformers import AutoTokenizer, CLIPTextConfig, CLIPTextModel, PreTrainedTokenizerBase

from sd_lightning.diffusion.schedules import build_noise_scheduler

log = logging.getLogger(__name__)

TINY_TOKENIZER = "tiny"


class MissingModelError(FileNotFoundError):
    """A model folder that a config points at does not exist or is incomplete."""


@dataclass
class DiffusionComponents:
    """The parts of a Stable-Diffusion-shaped model; ``tokenizer_source`` says where the tokenizer came from."""

    unet: UNet2DConditionModel
    vae: AutoencoderKL
    text_encoder: CLIPTextModel
    tokenizer: PreTrainedTokenizerBase
    noise_scheduler: DDPMScheduler
    tokenizer_source: str = TINY_TOKENIZER


def build_unet(
    sample_size: int = 8,
    in_channels: int = 4,
    block_out_channels: Sequence[int] = (32, 64),
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block: int = 1,
    cross_attention_dim: int = 32,
    attention_head_dim: int | Sequence[int] = 8,
    norm_num_groups: int = 8,
    dropout: float = 0.0,
) -> UNet2DConditionModel:
    """A UNet2DConditionModel of the given size (random init)."""
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(
            "model.unet: down_block_types, up_block_types and block_out_channels must have the same length, "
            f"got {len(down_block_types)}, {len(up_block_types)}, {len(block_out_channels)}"
        )
    return UNet2DConditionModel(
        sample_size=sample_size,
        in_channels=in_channels,
        out_channels=in_channels,
        block_out_channels=tuple(block_out_channels),
        down_block_types=tuple(down_block_types),
        up_block_types=tuple(up_block_types),
        layers_per_block=layers_per_block,
        cross_attention_dim=cross_attention_dim,
        attention_head_dim=attention_head_dim if isinstance(attention_head_dim, int) else tuple(attention_head_dim),
        norm_num_groups=norm_num_groups,
        dropout=dropout,
    )


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


def build_components(
    unet: dict | None = None,
    vae: dict | None = None,
    vae_path: str | None = None,
    vae_hint: str = "",
    text_encoder: dict | None = None,
    noise_scheduler: dict | None = None,
) -> DiffusionComponents:
    """Components from configs: a random UNet and text encoder, and a trained VAE when ``vae_path`` is set."""
    tokenizer = load_tokenizer(TINY_TOKENIZER)
    if vae_path:
        vae_model = load_vae(vae_path, hint=vae_hint)
    else:
        log.warning("model.vae_path is not set: using a randomly initialised VAE (train one with a VAE experiment)")
        vae_model = build_vae(**(vae or {}))
    unet_kwargs = dict(unet or {})
    unet_kwargs.setdefault("in_channels", vae_model.config.latent_channels)
    vae_factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
    unet_kwargs.setdefault("sample_size", vae_model.config.sample_size // vae_factor)
    text_kwargs = dict(text_encoder or {})
    text_model = build_text_encoder(tokenizer, **text_kwargs)
    unet_kwargs.setdefault("cross_attention_dim", text_model.config.hidden_size)
    if unet_kwargs["cross_attention_dim"] != text_model.config.hidden_size:
        raise ValueError(
            f"model.unet.cross_attention_dim={unet_kwargs['cross_attention_dim']} must equal "
            f"model.text_encoder.hidden_size={text_model.config.hidden_size}"
        )
    return DiffusionComponents(
        unet=build_unet(**unet_kwargs),
        vae=vae_model,
        text_encoder=text_model,
        tokenizer=tokenizer,
        noise_scheduler=build_noise_scheduler(**(noise_scheduler or {})),
        tokenizer_source=TINY_TOKENIZER,
    )


def load_pretrained_components(path: str | Path) -> DiffusionComponents:
    """A local Stable Diffusion folder (unet/, vae/, text_encoder/, tokenizer/, scheduler/), offline."""
    root = Path(path).expanduser()
    missing = [sub for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler") if not (root / sub).is_dir()]
    if missing:
        raise MissingModelError(
            f"model.path={root} is not a Stable Diffusion diffusers folder: missing {', '.join(m + '/' for m in missing)}"
        )
    scheduler = DDPMScheduler.from_pretrained(root, subfolder="scheduler", local_files_only=True)
    scheduler = DDPMScheduler.from_config(scheduler.config, clip_sample=False)
    return DiffusionComponents(
        unet=UNet2DConditionModel.from_pretrained(root, subfolder="unet", local_files_only=True),
        vae=AutoencoderKL.from_pretrained(root, subfolder="vae", local_files_only=True),
        text_encoder=CLIPTextModel.from_pretrained(root, subfolder="text_encoder", local_files_only=True),
        tokenizer=AutoTokenizer.from_pretrained(root, subfolder="tokenizer", local_files_only=True),
        noise_scheduler=scheduler,
        tokenizer_source=str(root / "tokenizer"),
    )
