"""Denoiser backbones behind one call: ``denoiser(noisy_latents, timesteps, conditioning) -> prediction``.

``conditioning`` is the conditioner's dict (``encoder_hidden_states``, ``pooled_prompt_embeds``, …); each
adapter passes the backbone what it takes. The wrapped diffusers model is ``denoiser.model``: it is what
pipelines, exports and LoRA see. A backbone of your own is one ``Denoiser`` subclass plus a builder YAML.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from diffusers import SD3Transformer2DModel, UNet2DConditionModel
from diffusers.models.attention_processor import AttnProcessor

Conditioning = dict[str, torch.Tensor]


class Denoiser(torch.nn.Module):
    """Base adapter. ``kind`` names it in checkpoint records (the registry ``DENOISERS``)."""

    kind: str = ""
    model_class: type[torch.nn.Module]

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> Denoiser:
        return cls(cls.model_class.from_config(config))

    def forward(self, noisy_latents: torch.Tensor, timesteps: torch.Tensor, conditioning: Conditioning) -> torch.Tensor:
        raise NotImplementedError

    # Speed switches (math-preserving); an adapter whose backbone lacks one refuses it by name.
    def enable_gradient_checkpointing(self) -> None:
        self.model.enable_gradient_checkpointing()

    def set_attention(self, attention: str) -> None:
        if attention == "sdpa":
            return
        raise ValueError(f"model.components.attention={attention!r} is not available for {type(self.model).__name__}: "
                         "use attention=sdpa")


class UNetDenoiser(Denoiser):
    """``UNet2DConditionModel`` (SD 1.x/2.x): cross-attention on the sequence states."""

    kind = "unet"
    model_class = UNet2DConditionModel

    def forward(self, noisy_latents, timesteps, conditioning):
        return self.model(noisy_latents, timesteps, encoder_hidden_states=conditioning["encoder_hidden_states"],
                          added_cond_kwargs=self.added_conditions(conditioning)).sample

    def added_conditions(self, conditioning: Conditioning) -> dict[str, torch.Tensor] | None:
        return None

    def set_attention(self, attention: str) -> None:
        if attention == "classic":
            self.model.set_attn_processor(AttnProcessor())
        elif attention != "sdpa":
            raise ValueError(f"model.components.attention={attention!r} must be 'sdpa' or 'classic'")


class SDXLUNetDenoiser(UNetDenoiser):
    """SDXL's ``UNet2DConditionModel`` (``addition_embed_type="text_time"``): cross-attention on the sequence
    states, and an added embedding of the pooled text embedding with the micro-conditioning ids."""

    kind = "sdxl_unet"

    def added_conditions(self, conditioning: Conditioning) -> dict[str, torch.Tensor]:
        return {"text_embeds": conditioning["pooled_prompt_embeds"], "time_ids": conditioning["micro_conditioning"]}


class SD3TransformerDenoiser(Denoiser):
    """``SD3Transformer2DModel`` (MMDiT, SD 3/3.5): joint attention over latents and text, pooled embedding."""

    kind = "sd3_transformer"
    model_class = SD3Transformer2DModel

    def forward(self, noisy_latents, timesteps, conditioning):
        if timesteps.ndim == 0:
            timesteps = timesteps.expand(noisy_latents.shape[0])
        return self.model(hidden_states=noisy_latents, timestep=timesteps,
                          encoder_hidden_states=conditioning["encoder_hidden_states"],
                          pooled_projections=conditioning["pooled_prompt_embeds"]).sample


DENOISERS: dict[str, type[Denoiser]] = {cls.kind: cls for cls in (UNetDenoiser, SDXLUNetDenoiser, SD3TransformerDenoiser)}


def denoiser_from_record(record: dict[str, Any]) -> Denoiser:
    kind = record["kind"]
    if kind not in DENOISERS:
        raise ValueError(f"the checkpoint's denoiser kind {kind!r} is not one of {sorted(DENOISERS)}")
    return DENOISERS[kind].from_config(record["config"])


def build_unet(
    in_channels: int = 4,
    sample_size: int = 8,
    cross_attention_dim: int = 32,
    pooled_dim: int | None = None,
    block_out_channels: Sequence[int] = (32, 64),
    down_block_types: Sequence[str] = ("CrossAttnDownBlock2D", "DownBlock2D"),
    up_block_types: Sequence[str] = ("UpBlock2D", "CrossAttnUpBlock2D"),
    layers_per_block: int = 1,
    attention_head_dim: int | Sequence[int] = 8,
    norm_num_groups: int = 8,
    dropout: float = 0.0,
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
    text_embedding: bool = False,
    **unet_options: Any,
) -> UNetDenoiser:
    """A random-init UNet2DConditionModel; the first three sizes come from the VAE and conditioner.

    ``text_embedding``: the prompt also reaches every residual block, through diffusers' attention-pooled text
    embedding added to the time embedding (``addition_embed_type="text"``, as many heads as the attention) — a
    cheap global path that keeps conditioning strong without the mid block's cross-attention.
    """
    if len(down_block_types) != len(block_out_channels) or len(up_block_types) != len(block_out_channels):
        raise ValueError(
            "model.components.denoiser: down_block_types, up_block_types and block_out_channels must have the same "
            f"length, got {len(down_block_types)}, {len(up_block_types)}, {len(block_out_channels)}"
        )
    if text_embedding:
        heads = attention_head_dim if isinstance(attention_head_dim, int) else attention_head_dim[0]
        unet_options = {"addition_embed_type": "text", "addition_embed_type_num_heads": heads, **unet_options}
    return UNetDenoiser(UNet2DConditionModel(
        mid_block_type=mid_block_type,
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
        **unet_options,
    ))


def build_sdxl_unet(
    in_channels: int = 4,
    sample_size: int = 8,
    cross_attention_dim: int = 64,
    pooled_dim: int | None = 32,
    block_out_channels: Sequence[int] = (32, 64),
    down_block_types: Sequence[str] = ("DownBlock2D", "CrossAttnDownBlock2D"),
    up_block_types: Sequence[str] = ("CrossAttnUpBlock2D", "UpBlock2D"),
    layers_per_block: int = 1,
    attention_head_dim: int | Sequence[int] = 2,
    transformer_layers_per_block: int | Sequence[int] = 1,
    addition_time_embed_dim: int = 8,
    norm_num_groups: int = 8,
    dropout: float = 0.0,
    mid_block_type: str | None = "UNetMidBlock2DCrossAttn",
    text_embedding: bool = False,
) -> SDXLUNetDenoiser:
    """A random-init SDXL-shaped UNet: the pooled embedding and the six micro-conditioning ids (each embedded
    in ``addition_time_embed_dim`` sinusoids) are added to the timestep embedding, as in SDXL."""
    if pooled_dim is None:
        raise ValueError("the SDXL UNet needs a pooled text embedding; this conditioner produces none")
    if text_embedding:
        raise ValueError("model.components.denoiser.text_embedding=true is for SD 1.x-style UNets: the SDXL UNet adds "
                         "its pooled text embedding already (addition_embed_type=text_time)")
    unet = build_unet(in_channels, sample_size, cross_attention_dim, pooled_dim, block_out_channels, down_block_types,
                      up_block_types, layers_per_block, attention_head_dim, norm_num_groups, dropout, mid_block_type,
                      addition_embed_type="text_time", addition_time_embed_dim=addition_time_embed_dim,
                      projection_class_embeddings_input_dim=6 * addition_time_embed_dim + pooled_dim,
                      transformer_layers_per_block=transformer_layers_per_block if isinstance(
                          transformer_layers_per_block, int) else tuple(transformer_layers_per_block))
    return SDXLUNetDenoiser(unet.model)


def build_sd3_transformer(
    in_channels: int = 4,
    sample_size: int = 8,
    cross_attention_dim: int = 32,
    pooled_dim: int | None = 32,
    patch_size: int = 2,
    num_layers: int = 2,
    attention_head_dim: int = 16,
    num_attention_heads: int = 2,
    caption_projection_dim: int | None = None,
) -> SD3TransformerDenoiser:
    """A random-init SD3Transformer2DModel (MMDiT) sized to the VAE's latents and the conditioner's states."""
    if sample_size % patch_size:
        raise ValueError(f"model.components.denoiser.patch_size={patch_size} must divide the latent size {sample_size}")
    if pooled_dim is None:
        raise ValueError("the SD3 transformer needs a pooled text embedding; this conditioner produces none")
    return SD3TransformerDenoiser(SD3Transformer2DModel(
        sample_size=sample_size,
        patch_size=patch_size,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=num_layers,
        attention_head_dim=attention_head_dim,
        num_attention_heads=num_attention_heads,
        joint_attention_dim=cross_attention_dim,
        caption_projection_dim=caption_projection_dim or attention_head_dim * num_attention_heads,
        pooled_projection_dim=pooled_dim,
        pos_embed_max_size=max(sample_size // patch_size, 1),
    ))


def prepare_denoiser(denoiser: Denoiser, gradient_checkpointing: bool = False, attention: str = "sdpa",
                     channels_last: bool = False, compile: str | None = None) -> Denoiser:
    """Apply the speed switches; they keep the maths (tested) and leave parameter names unchanged."""
    denoiser.set_attention(attention)
    if gradient_checkpointing:
        denoiser.enable_gradient_checkpointing()
    if channels_last:
        denoiser.model.to(memory_format=torch.channels_last)
    if compile:
        denoiser.model.compile(backend=compile)
    return denoiser
