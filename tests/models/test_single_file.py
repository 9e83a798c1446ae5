"""sdl-export format=single_file: the original Stable Diffusion layout, read back offline by plain diffusers'
``from_single_file`` (config = the folder) with every weight and the folder's images; real-size SD 1.5 and SDXL
layouts recognised by diffusers' own checkpoint detection."""

from __future__ import annotations

import json
import logging

import numpy as np
import pytest
import test_families
import test_pretrained
import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
from diffusers.loaders import single_file_utils as readers
from hydra import compose, initialize_config_dir
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

from sd_lightning.cli.config import CONFIG_DIR, ConfigError
from sd_lightning.cli.export import export
from sd_lightning.models.single_file import (
    SINGLE_FILE,
    clip_to_original,
    open_clip_to_original,
    unet_to_original,
    vae_to_original,
)

sd_folder = test_pretrained.sd_folder  # the tiny SD 1.x folder written with save_pretrained
PIPELINES = {"sd": StableDiffusionPipeline, "sdxl": StableDiffusionXLPipeline}
PROMPT = "a handwritten digit five"

pytestmark = pytest.mark.usefixtures("one_thread")


# diffusers' reader tells SDXL's two encoders apart by width (768 / 1280 in the released model): the tiny SDXL's
# second encoder is made wider than its first so that it can (export warns when they are equal).
WIDER_SECOND_ENCODER = [f"model.components.conditioner.text_encoder_2.{k}=48" for k in ("hidden_size", "projection_dim")]


@pytest.fixture(scope="module")
def folders(tmp_path_factory, sd_folder):
    sdxl = test_families._write_folder(tmp_path_factory.mktemp("sf"), "sdxl", *WIDER_SECOND_ENCODER)[0]
    return {"sd": sd_folder[0], "sdxl": sdxl}


def _export(ckpt, out, **values):
    overrides = [f"ckpt_path={ckpt}", f"out_dir={out}", "format=single_file",
                 *(f"{k}={v}" for k, v in values.items())]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return export(compose("export", overrides=overrides))


def _images(pipe, **kwargs):
    pipe.set_progress_bar_config(disable=True)
    return pipe([PROMPT] * 2, num_inference_steps=4, guidance_scale=2.0, output_type="np",
                generator=[torch.Generator().manual_seed(5 + i) for i in range(2)], **kwargs).images


def _parameters(pipe, names):
    return {f"{n}.{k}": v for n in names for k, v in getattr(pipe, n).state_dict().items() if "position_ids" not in k}


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_from_single_file_reads_every_weight_and_makes_the_folders_images(name, folders, tmp_path):
    folder, cls = folders[name], PIPELINES[name]
    out = _export(folder, tmp_path / "single")
    assert sorted(p.name for p in out.iterdir()) == [SINGLE_FILE, "sd_lightning.json"]
    with safe_open(out / SINGLE_FILE, "pt") as handle:
        keys, metadata = set(handle.keys()), handle.metadata()
    assert metadata["sd_lightning.family"] == name and metadata["format"] == "pt"
    assert all(k.startswith(("model.diffusion_model.", "first_stage_model.", "cond_stage_model.transformer.",
                             "conditioner.embedders.")) for k in keys)
    reference = cls.from_pretrained(folder, local_files_only=True)
    loaded = cls.from_single_file(str(out / SINGLE_FILE), config=str(folder), local_files_only=True)
    names = ["unet", "vae", *[n for n in ("text_encoder", "text_encoder_2") if hasattr(reference, n)]]
    ours, theirs = _parameters(loaded, names), _parameters(reference, names)
    assert ours.keys() == theirs.keys()
    assert all(torch.equal(ours[k], theirs[k]) for k in theirs)
    expected = _images(reference)
    assert np.array_equal(_images(loaded), expected)

    # Negative control: two same-shaped layers trade places — the file still loads, the images change.
    state = load_file(out / SINGLE_FILE)
    convs = [k for k in state if k.startswith("model.diffusion_model.") and k.endswith("in_layers.2.weight")]
    a, b = next((a, b) for a in convs for b in convs if a < b and state[a].shape == state[b].shape)
    state[a], state[b] = state[b], state[a]
    save_file(state, tmp_path / "swapped.safetensors")
    swapped = cls.from_single_file(str(tmp_path / "swapped.safetensors"), config=str(folder), local_files_only=True)
    assert not np.array_equal(_images(swapped), expected)


def test_the_digits_model_round_trips_with_its_folder_exports_images(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        folder = export(compose("export", overrides=[f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'pipe'}"]))
    out = _export(ckpt, tmp_path / "single")
    assert json.loads((out / "sd_lightning.json").read_text()) == json.loads((folder / "sd_lightning.json").read_text())
    reference = StableDiffusionPipeline.from_pretrained(folder, local_files_only=True)
    loaded = StableDiffusionPipeline.from_single_file(str(out / SINGLE_FILE), config=str(folder), local_files_only=True)
    assert loaded.scheduler.config.prediction_type == "v_prediction"  # read from the config folder
    assert np.array_equal(_images(loaded), _images(reference))


def test_models_outside_the_layout_are_refused_before_anything_is_written(folders, tmp_path):
    unet = UNet2DConditionModel.from_pretrained(folders["sd"] / "unet", local_files_only=True)
    pipe = StableDiffusionPipeline.from_pretrained(folders["sd"], local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_config({**unet.config, "layers_per_block": [1, 2]})
    pipe.save_pretrained(tmp_path / "uneven", safe_serialization=True)
    with pytest.raises(ConfigError, match=r"format=single_file: .*layers_per_block=\[1, 2\].*Nothing was written"):
        _export(tmp_path / "uneven", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    pipe.unet = UNet2DConditionModel.from_config({**unet.config, "mid_block_type": None})
    pipe.save_pretrained(tmp_path / "midless", safe_serialization=True)
    with pytest.raises(ConfigError, match=r"format=single_file: .*no mid block.*Nothing was written"):
        _export(tmp_path / "midless", tmp_path / "out")
    pipe.unet = UNet2DConditionModel.from_config({**unet.config, "addition_embed_type": "text",
                                                  "addition_embed_type_num_heads": 1})
    pipe.save_pretrained(tmp_path / "text_embedding", safe_serialization=True)
    with pytest.raises(ConfigError, match=r"format=single_file: .*add_embedding.*no place in the original layout"):
        _export(tmp_path / "text_embedding", tmp_path / "out")
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()
    with pytest.raises(ConfigError, match="format='ckpt': choose one of pipeline, single_file"):
        _export(folders["sd"], tmp_path / "out", format="ckpt")


def test_equal_encoder_widths_are_written_with_a_warning(tmp_path, caplog):
    folder = test_families._write_folder(tmp_path, "sdxl")[0]  # both encoders 32 wide
    with caplog.at_level(logging.WARNING, logger="sd_lightning.cli.export"):
        out = _export(folder, tmp_path / "out")
    assert "both text encoders are 32 wide" in caplog.text and "format=pipeline" in caplog.text
    with safe_open(out / SINGLE_FILE, "pt") as handle:  # each encoder under its own keys all the same
        assert handle.get_tensor("conditioner.embedders.1.model.text_projection").shape == (32, 32)


SD15_UNET = {"sample_size": 64, "cross_attention_dim": 768, "attention_head_dim": 8}
SDXL_UNET = {"sample_size": 128, "cross_attention_dim": 2048, "attention_head_dim": [5, 10, 20],
             "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
             "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
             "block_out_channels": [320, 640, 1280], "transformer_layers_per_block": [1, 2, 10],
             "use_linear_projection": True, "addition_embed_type": "text_time", "addition_time_embed_dim": 256,
             "projection_class_embeddings_input_dim": 2816}
SD_VAE = {"block_out_channels": [128, 256, 512, 512], "layers_per_block": 2, "latent_channels": 4,
          "down_block_types": ["DownEncoderBlock2D"] * 4, "up_block_types": ["UpDecoderBlock2D"] * 4}
CLIP_L = {"hidden_size": 768, "intermediate_size": 3072, "num_hidden_layers": 12, "num_attention_heads": 12,
          "projection_dim": 768}
CLIP_G = {"hidden_size": 1280, "intermediate_size": 5120, "num_hidden_layers": 32, "num_attention_heads": 20,
          "projection_dim": 1280, "hidden_act": "gelu"}


@pytest.mark.parametrize("name", ["sd15", "sdxl"])
def test_real_size_layouts_are_what_diffusers_detects_and_reads(name):
    """Full-size SD 1.5 and SDXL architectures (on the meta device, no weights): diffusers names the file's model
    type as it does for the released checkpoints, and its readers map every key back."""
    with torch.device("meta"):
        unet = UNet2DConditionModel(**(SD15_UNET if name == "sd15" else SDXL_UNET))
        vae = AutoencoderKL(**SD_VAE)
        encoders = {"text_encoder": CLIPTextModel(CLIPTextConfig(**CLIP_L))}
        if name == "sdxl":
            encoders["text_encoder_2"] = CLIPTextModelWithProjection(CLIPTextConfig(**CLIP_G))
    checkpoint = {**unet_to_original(unet.state_dict(), unet.config), **vae_to_original(vae.state_dict(), vae.config)}
    if name == "sd15":
        checkpoint.update(clip_to_original(encoders["text_encoder"].state_dict(), "cond_stage_model.transformer."))
    else:
        checkpoint.update(clip_to_original(encoders["text_encoder"].state_dict(), "conditioner.embedders.0.transformer."))
        checkpoint.update(open_clip_to_original(encoders["text_encoder_2"].state_dict(), "conditioner.embedders.1.model."))
    marker = readers.CHECKPOINT_KEY_NAMES["v1" if name == "sd15" else "xl_base"]  # the key detection looks for
    assert marker in checkpoint
    assert readers.infer_diffusers_model_type(checkpoint) == ("v1" if name == "sd15" else "xl_base")
    assert readers.is_clip_model(checkpoint) == (name == "sd15")
    assert readers.is_open_clip_sdxl_model(checkpoint) == (name == "sdxl")
    assert readers.convert_ldm_unet_checkpoint(checkpoint, unet.config).keys() == unet.state_dict().keys()
    assert readers.convert_ldm_vae_checkpoint(checkpoint, vae.config).keys() == vae.state_dict().keys()
    count = sum(p.numel() for p in unet.parameters())
    assert count > (2.5e9 if name == "sdxl" else 8.5e8)  # the released models' sizes, not a tiny stand-in
