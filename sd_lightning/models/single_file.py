"""The original Stable Diffusion single-file layout (the keys AUTOMATIC1111, ComfyUI and Forge load), written from a
family pipeline's diffusers weights.

diffusers reads this layout (``diffusers.loaders.single_file_utils``) but does not write it: the functions here are
the inverse of those readers. ``single_file_state_dict`` runs diffusers' own readers on what it built and refuses a
layout they would not read back bit for bit, so a config these mappings do not cover fails before a file is written.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from sd_lightning.models.conditioners import is_clip

SINGLE_FILE = "model.safetensors"
UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."


class SingleFileError(ValueError):
    """A model whose weights the original layout cannot hold (another family, an unusual config)."""


# A diffusers UNet resnet's layers and their original names.
_UNET_RESNET = {"norm1": "in_layers.0", "conv1": "in_layers.2", "time_emb_proj": "emb_layers.1",
                "norm2": "out_layers.0", "conv2": "out_layers.3", "conv_shortcut": "skip_connection"}
_UNET_FIXED = {"time_embedding.linear_1": "time_embed.0", "time_embedding.linear_2": "time_embed.2",
               "conv_in": "input_blocks.0.0", "conv_norm_out": "out.0", "conv_out": "out.2",
               "add_embedding.linear_1": "label_emb.0.0", "add_embedding.linear_2": "label_emb.0.2"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}
_OPEN_CLIP_LAYER = {"layer_norm1": "ln_1", "layer_norm2": "ln_2", "mlp.fc1": "mlp.c_fc", "mlp.fc2": "mlp.c_proj",
                    "self_attn.out_proj": "attn.out_proj"}


def _resnet(rest: str) -> str:
    layer, _, tail = rest.partition(".")
    return f"{_UNET_RESNET[layer]}.{tail}"


def unet_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """``model.diffusion_model.*``: input_blocks / middle_block / output_blocks numbered as the original UNet."""
    per = config["layers_per_block"]
    if not isinstance(per, int):
        raise SingleFileError(f"the UNet has layers_per_block={per}; the original layout numbers blocks with one "
                              "count for every level")
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is None:
        raise SingleFileError("the UNet has no mid block (mid_block_type=null); the original layout has one "
                              "(middle_block): train with model.components.denoiser.mid_block_type="
                              "UNetMidBlock2DCrossAttn for a single file, or use format=pipeline")
    step = per + 1
    attended_up = {int(k.split(".")[1]) for k in state if re.match(r"up_blocks\.\d+\.attentions\.", k)}
    out = {}
    for key, tensor in state.items():
        module, _, param = key.rpartition(".")
        if module in _UNET_FIXED:
            out[f"{UNET_PREFIX}{_UNET_FIXED[module]}.{param}"] = tensor
            continue
        if match := re.fullmatch(r"down_blocks\.(\d+)\.(resnets|attentions|downsamplers)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            if kind == "downsamplers":
                name = f"input_blocks.{(block + 1) * step}.0.{rest.replace('conv.', 'op.', 1)}"
            else:
                index = block * step + layer + 1
                name = f"input_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"input_blocks.{index}.1.{rest}"
        elif match := re.fullmatch(r"up_blocks\.(\d+)\.(resnets|attentions|upsamplers)\.(\d+)\.(.+)", key):
            block, kind, layer, rest = int(match[1]), match[2], int(match[3]), match[4]
            if kind == "upsamplers":
                name = f"output_blocks.{block * step + per}.{2 if block in attended_up else 1}.{rest}"
            else:
                index = block * step + layer
                name = f"output_blocks.{index}.0.{_resnet(rest)}" if kind == "resnets" else f"output_blocks.{index}.1.{rest}"
        elif match := re.fullmatch(r"mid_block\.(resnets|attentions)\.(\d+)\.(.+)", key):
            kind, layer, rest = match[1], int(match[2]), match[3]
            name = f"middle_block.{2 * layer}.{_resnet(rest)}" if kind == "resnets" else f"middle_block.1.{rest}"
        else:
            raise SingleFileError(f"the UNet's {key} has no place in the original layout (class embeddings, "
                                  "encoder-hidden projections and other additions are not part of it)")
        out[UNET_PREFIX + name] = tensor
    return out


def vae_to_original(state: dict[str, torch.Tensor], config: Any) -> dict[str, torch.Tensor]:
    """``first_stage_model.*``: the decoder's levels numbered from the lowest resolution, attention as 1×1 convs."""
    levels = len(config["up_block_types"])
    out = {}
    for key, tensor in state.items():
        name = key
        if match := re.fullmatch(r"(encoder|decoder)\.mid_block\.attentions\.0\.(.+)\.(weight|bias)", key):
            name = f"{match[1]}.mid.attn_1.{_VAE_ATTENTION[match[2]]}.{match[3]}"
            if match[2] != "group_norm" and match[3] == "weight":
                tensor = tensor.reshape(*tensor.shape, 1, 1)
        elif match := re.fullmatch(r"(encoder|decoder)\.mid_block\.resnets\.(\d+)\.(.+)", key):
            name = f"{match[1]}.mid.block_{int(match[2]) + 1}.{match[3]}"
        elif match := re.fullmatch(r"encoder\.down_blocks\.(\d+)\.(resnets\.|downsamplers\.0\.)(.+)", key):
            name = f"encoder.down.{match[1]}.{'block.' if match[2] == 'resnets.' else 'downsample.'}{match[3]}"
        elif match := re.fullmatch(r"decoder\.up_blocks\.(\d+)\.(resnets\.|upsamplers\.0\.)(.+)", key):
            level = levels - 1 - int(match[1])
            name = f"decoder.up.{level}.{'block.' if match[2] == 'resnets.' else 'upsample.'}{match[3]}"
        name = name.replace("conv_shortcut", "nin_shortcut").replace("conv_norm_out", "norm_out")
        out[VAE_PREFIX + name] = tensor
    return out


def clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A transformers CLIP text model kept in its own keys under ``prefix`` (``…transformer.text_model.*``)."""
    return {f"{prefix}text_model.{key.removeprefix('text_model.')}": t for key, t in state.items()
            if not key.endswith("position_ids")}


def open_clip_to_original(state: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    """A CLIP text model with projection in OpenCLIP's keys (SDXL's second encoder): fused q/k/v, the projection
    stored transposed."""
    fixed = {"embeddings.token_embedding.weight": "token_embedding.weight",
             "embeddings.position_embedding.weight": "positional_embedding",
             "final_layer_norm.weight": "ln_final.weight", "final_layer_norm.bias": "ln_final.bias"}
    out, fused = {}, {}
    for key, tensor in state.items():
        key = key.removeprefix("text_model.")
        if key == "text_projection.weight":
            out[prefix + "text_projection"] = tensor.T
        elif key in fixed:
            out[prefix + fixed[key]] = tensor
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.self_attn\.([qkv])_proj\.(weight|bias)", key):
            fused.setdefault((int(match[1]), match[3]), {})[match[2]] = tensor
        elif match := re.fullmatch(r"encoder\.layers\.(\d+)\.(.+)\.(weight|bias)", key):
            out[f"{prefix}transformer.resblocks.{match[1]}.{_OPEN_CLIP_LAYER[match[2]]}.{match[3]}"] = tensor
        elif not key.endswith("position_ids"):
            raise SingleFileError(f"the text encoder's {key} has no place in OpenCLIP's layout")
    for (layer, param), qkv in fused.items():
        out[f"{prefix}transformer.resblocks.{layer}.attn.in_proj_{param}"] = torch.cat([qkv[c] for c in "qkv"])
    return out


def _read_clip(readers: Any, checkpoint: dict, encoder: Any, prefix: str) -> dict:
    return readers.convert_ldm_clip_checkpoint(checkpoint)


def _read_open_clip(readers: Any, checkpoint: dict, encoder: Any, prefix: str) -> dict:
    return readers.convert_open_clip_checkpoint(encoder, checkpoint, prefix=prefix)


# Per pipeline class: each text encoder's (writer, diffusers' reader, key prefix) in the original file.
TEXT_LAYOUTS: dict[str, dict[str, tuple[Callable, Callable, str]]] = {
    "StableDiffusionPipeline": {"text_encoder": (clip_to_original, _read_clip, "cond_stage_model.transformer.")},
    "StableDiffusionXLPipeline": {
        "text_encoder": (clip_to_original, _read_clip, "conditioner.embedders.0.transformer."),
        "text_encoder_2": (open_clip_to_original, _read_open_clip, "conditioner.embedders.1.model."),
    },
}


def single_file_state_dict(pipeline: Any) -> dict[str, torch.Tensor]:
    """Every weight of an SD 1.x or SDXL pipeline in the original keys, checked against diffusers' readers."""
    layout = TEXT_LAYOUTS.get(type(pipeline).__name__)
    if layout is None:
        raise SingleFileError(f"format=single_file writes SD 1.x and SDXL models; this is a "
                              f"{type(pipeline).__name__} (use format=pipeline)")
    for name in layout:
        if not is_clip(getattr(pipeline, name)):
            raise SingleFileError(f"the original layout holds CLIP text encoders (what A1111 and ComfyUI load); this "
                                  f"model's {name} is a {type(getattr(pipeline, name)).__name__} (use format=pipeline)")
    parts = {"unet": pipeline.unet.state_dict(), "vae": pipeline.vae.state_dict(),
             **{name: getattr(pipeline, name).state_dict() for name in layout}}
    out = {**unet_to_original(parts["unet"], pipeline.unet.config),
           **vae_to_original(parts["vae"], pipeline.vae.config)}
    for name, (write, _, prefix) in layout.items():
        out.update(write(parts[name], prefix))
    _check_round_trip(out, pipeline, parts)
    return out


def reader_caveat(pipeline: Any) -> str | None:
    """diffusers' ``from_single_file`` tells SDXL's encoders apart by width: equal widths load CLIP-L into both."""
    second = getattr(pipeline, "text_encoder_2", None)
    if second is None or second.config.hidden_size != pipeline.text_encoder.config.hidden_size:
        return None
    return (f"both text encoders are {second.config.hidden_size} wide: the file holds each under its own keys, but "
            "diffusers' from_single_file tells them apart by width and would read the first into both (the released "
            "SDXL's are 768 and 1280 wide); load this model in diffusers from format=pipeline")


def _check_round_trip(checkpoint: dict, pipeline: Any, parts: dict[str, dict]) -> None:
    """Read ``checkpoint`` back with diffusers' own single-file readers; every weight must come back unchanged."""
    from diffusers.loaders import single_file_utils as readers

    back = {"unet": readers.convert_ldm_unet_checkpoint(checkpoint, pipeline.unet.config),
            "vae": readers.convert_ldm_vae_checkpoint(checkpoint, pipeline.vae.config)}
    for name, (_, reader, prefix) in TEXT_LAYOUTS[type(pipeline).__name__].items():
        read = reader(readers, checkpoint, getattr(pipeline, name), prefix)
        wrapped = any(k.startswith("text_model.") for k in parts[name])
        back[name] = read if wrapped else {k.removeprefix("text_model."): v for k, v in read.items()}
    for name, state in parts.items():
        expected = {k: v for k, v in state.items() if not k.endswith("position_ids")}
        got = back[name]
        wrong = sorted(set(expected) ^ set(got)) or [k for k in expected if not torch.equal(expected[k], got[k])]
        if wrong:
            raise SingleFileError(f"the {name}'s weights do not survive diffusers' single-file reader ({len(wrong)} "
                                  f"differ, e.g. {wrong[:3]}); its config is outside the original layout")


def save_single_file(path: Path, state: dict[str, torch.Tensor], metadata: dict[str, str]) -> None:
    """One safetensors file (every tensor its own contiguous storage, as safetensors requires)."""
    save_file({k: v.detach().contiguous().clone() for k, v in state.items()}, str(path),
              metadata={"format": "pt", **metadata})
