"""Model builders: denoiser, VAE and conditioner, from small configs or a local diffusers folder."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from diffusers import AutoencoderKL
from transformers import (
    AutoTokenizer,
    CLIPTextConfig,
    CLIPTextModel,
    CLIPTextModelWithProjection,
    PreTrainedTokenizerBase,
    T5Config,
    T5EncoderModel,
)

from sd_lightning.models.adapters import Adapter, inject_adapters
from sd_lightning.models.conditioners import SD3Conditioner, SDXLConditioner, TextConditioner
from sd_lightning.models.denoisers import Denoiser, build_unet, prepare_denoiser
from sd_lightning.models.families import MissingModelError, denoiser_config, family_of, folder_family
from sd_lightning.models.textual_inversion import TextualInversion, inject_textual_inversion

log = logging.getLogger(__name__)

TINY_TOKENIZER = "tiny"


@dataclass
class DiffusionComponents:
    """The parts of a latent diffusion model: a denoiser backbone, a VAE and a conditioner."""

    denoiser: Denoiser
    vae: AutoencoderKL
    conditioner: TextConditioner
    adapter: Adapter | None = None
    textual_inversion: TextualInversion | None = None

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
    projection_dim: int | None = None,
) -> CLIPTextModel | CLIPTextModelWithProjection:
    """A CLIP text transformer sized for ``tokenizer`` (random init); with ``projection_dim``, the pooled embedding
    goes through a learned projection (``CLIPTextModelWithProjection``, SDXL's second and SD 3's CLIP encoders)."""
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
        projection_dim=projection_dim or hidden_size,
    )
    return CLIPTextModel(config) if projection_dim is None else CLIPTextModelWithProjection(config)


def build_t5_encoder(tokenizer: PreTrainedTokenizerBase, d_model: int = 32, d_ff: int = 64, num_layers: int = 2,
                     num_heads: int = 2, d_kv: int = 16) -> T5EncoderModel:
    """A random-init T5 encoder (SD 3's optional third text encoder) sized for ``tokenizer``."""
    return T5EncoderModel(T5Config(vocab_size=len(tokenizer), d_model=d_model, d_ff=d_ff, num_layers=num_layers,
                                   num_heads=num_heads, d_kv=d_kv, pad_token_id=tokenizer.pad_token_id,
                                   eos_token_id=tokenizer.eos_token_id, decoder_start_token_id=tokenizer.pad_token_id))


# Conditioners built from configs (random encoders on the offline tiny tokenizer), one builder per family.
def build_clip_conditioner(text_encoder: dict | None = None, drop_prob: float = 0.1, train_text_encoder: bool = False,
                           tokenizer: str = TINY_TOKENIZER) -> TextConditioner:
    tok = load_tokenizer(tokenizer)
    return TextConditioner(tok, build_text_encoder(tok, **(text_encoder or {})), drop_prob=drop_prob,
                           train_text_encoder=train_text_encoder, tokenizer_source=tokenizer)


def build_sdxl_conditioner(text_encoder: dict | None = None, text_encoder_2: dict | None = None,
                           drop_prob: float = 0.1, train_text_encoder: bool = False, zero_null_condition: bool = False,
                           tokenizer: str = TINY_TOKENIZER) -> SDXLConditioner:
    """SDXL's pair: a CLIPTextModel and a CLIPTextModelWithProjection (``text_encoder_2.projection_dim`` pooled)."""
    tok, tok_2 = load_tokenizer(tokenizer), load_tokenizer(tokenizer)
    second = {"projection_dim": 32, **(text_encoder_2 or {})}
    return SDXLConditioner(tok, build_text_encoder(tok, **(text_encoder or {})), tokenizer_2=tok_2,
                           text_encoder_2=build_text_encoder(tok_2, **second), drop_prob=drop_prob,
                           train_text_encoder=train_text_encoder, zero_null_condition=zero_null_condition,
                           tokenizer_source=tokenizer)


def build_sd3_conditioner(text_encoder: dict | None = None, text_encoder_2: dict | None = None,
                          text_encoder_3: dict | None = None, joint_attention_dim: int | None = None,
                          t5_sequence_length: int = 8, drop_prob: float = 0.1, train_text_encoder: bool = False,
                          tokenizer: str = TINY_TOKENIZER) -> SD3Conditioner:
    """SD 3's CLIP-L and CLIP-G (both with projections) and, when ``text_encoder_3`` is set, a T5 encoder."""
    tok, tok_2 = load_tokenizer(tokenizer), load_tokenizer(tokenizer)
    first = {"projection_dim": 16, **(text_encoder or {})}
    second = {"projection_dim": 16, **(text_encoder_2 or {})}
    t5 = {}
    if text_encoder_3 is not None:
        tok_3 = load_tokenizer(tokenizer)
        t5 = {"tokenizer_3": tok_3, "text_encoder_3": build_t5_encoder(tok_3, **text_encoder_3)}
    return SD3Conditioner(tok, build_text_encoder(tok, **first), tokenizer_2=tok_2,
                          text_encoder_2=build_text_encoder(tok_2, **second), **t5,
                          joint_attention_dim=joint_attention_dim, t5_sequence_length=t5_sequence_length,
                          drop_prob=drop_prob, train_text_encoder=train_text_encoder, tokenizer_source=tokenizer)




def _finish(denoiser: Denoiser, vae: AutoencoderKL, conditioner: TextConditioner, adapter: Adapter | None,
            gradient_checkpointing: bool, attention: str, channels_last: bool, compile: str | None,
            textual_inversion: TextualInversion | None = None) -> DiffusionComponents:
    """Freeze what does not train, inject adapters or placeholder tokens, apply the speed switches: once, for
    every backbone."""
    vae.requires_grad_(False)
    vae.eval()
    conditioner.freeze()
    if adapter is not None and textual_inversion is not None:
        raise ValueError("adapter=… and model.components.textual_inversion together are not supported: train one "
                         "(adapter=none, or model.components.textual_inversion=null)")
    if adapter is not None:
        inject_adapters(denoiser.model, conditioner.text_encoders, adapter)
    if textual_inversion is not None:
        denoiser.requires_grad_(False)  # only the placeholder rows train
        inject_textual_inversion(conditioner, textual_inversion)
    prepare_denoiser(denoiser, gradient_checkpointing, attention, channels_last, compile)
    return DiffusionComponents(denoiser, vae, conditioner, adapter, textual_inversion)


def build_components(
    denoiser: Callable[..., Denoiser] | None = None,
    vae: dict | None = None,
    vae_path: str | None = None,
    vae_hint: str = "",
    conditioner: TextConditioner | None = None,
    adapter: Adapter | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: str | None = None,
) -> DiffusionComponents:
    """Components from configs: a trained VAE when ``vae_path`` is set, a random conditioner and denoiser.

    ``denoiser`` is a builder (a ``_partial_`` config) called with the sizes the other parts fix: latent channels
    and size from the VAE, sequence and pooled widths from the conditioner (a family's conditioner builder).
    """
    if vae_path:
        vae_model = load_vae(vae_path, hint=vae_hint)
    else:
        log.warning("model.components.vae_path is not set: using a randomly initialised VAE (train one with a VAE "
                    "experiment)")
        vae_model = build_vae(**(vae or {}))
    text = conditioner if conditioner is not None else build_clip_conditioner()
    factor = 2 ** (len(vae_model.config.block_out_channels) - 1)
    backbone = (denoiser or build_unet)(
        in_channels=vae_model.config.latent_channels,
        sample_size=vae_model.config.sample_size // factor,
        cross_attention_dim=text.sequence_dim,
        pooled_dim=text.pooled_dim,
    )
    family = family_of(DiffusionComponents(backbone, vae_model, text))
    if family is not None:
        family.check_vae(vae_model, f"model.components.vae_path={vae_path}")
    return _finish(backbone, vae_model, text, adapter, gradient_checkpointing, attention, channels_last, compile)


def pretrained_resolution(path: str | Path) -> int:
    """The image size a pretrained folder's backbone was trained at (512 for SD 1.x), read when the data is built."""
    backbone, vae = denoiser_config(path)
    sample_size = backbone["sample_size"]
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    return int(sample_size) * 2 ** (len(vae["block_out_channels"]) - 1)


def load_pretrained_components(
    path: str | Path,
    conditioner: dict | None = None,
    adapter: Adapter | None = None,
    gradient_checkpointing: bool = False,
    attention: str = "sdpa",
    channels_last: bool = False,
    compile: str | None = None,
    textual_inversion: TextualInversion | None = None,
) -> DiffusionComponents:
    """A local diffusers folder of a supported family (``model_index.json`` says which), read offline."""
    root = Path(path).expanduser()
    family = folder_family(root)
    options = {"tokenizer_source": str(root / "tokenizer"), **(conditioner or {})}
    backbone, vae, text = family.components(family.load(root), options)
    return _finish(backbone, vae, text, adapter, gradient_checkpointing, attention, channels_last, compile,
                   textual_inversion)
