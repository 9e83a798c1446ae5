"""The SDXL and SD 3 families: tiny folders written with plain diffusers, read offline, fine-tuned (full and LoRA),
exported to their own pipelines, and sampled there exactly as sdl-sample samples the checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from PIL import Image
from safetensors.torch import load_file

from sd_lightning.cli.config import CONFIG_DIR
from sd_lightning.cli.export import export
from sd_lightning.cli.sample import sample
from sd_lightning.cli.train import train
from sd_lightning.diffusion.sampling import generate
from sd_lightning.diffusion.schedules import sampling_scheduler
from sd_lightning.models.adapters import KOHYA_WEIGHTS_FILE, LORA_WEIGHTS_FILE
from sd_lightning.models.builders import load_pretrained_components
from sd_lightning.models.families import (
    SD3,
    SDXL,
    MissingModelError,
    UnsupportedModelError,
    family_of,
    folder_family,
)
from sd_lightning.models.pipelines import load_pipeline

from conftest import FAST

PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
# Per family: the tiny model config and the objective its folder's scheduler describes.
FAMILY_CONFIGS = {
    "sdxl": (SDXL, ["model=sdxl_tiny", "objective=epsilon"]),
    "sd3": (SD3, ["model=sd3_tiny", "objective=flow_matching", "objective.shift=3.0"]),
    "sd3_t5": (SD3, ["model=sd3_tiny", "objective=flow_matching",
                     "model.components.conditioner.text_encoder_3={d_model: 64, d_ff: 64, num_layers: 1}"]),
}


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (conftest)


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _write_folder(root, name, *extra):
    family, overrides = FAMILY_CONFIGS[name]
    cfg = _compose("train", *overrides, "data=digits", *extra)
    torch.manual_seed(0)
    components = instantiate(cfg.model.components)
    if family is SD3:  # SD 3's VAE convention: (z - shift) · scale, which export and sampling must keep
        components.vae.register_to_config(shift_factor=0.1, scaling_factor=1.5)
    objective = instantiate(cfg.objective)
    folder = root / f"tiny-{name}"
    family.pipeline(components, objective.sampling_scheduler(objective.default_sampler)).save_pretrained(
        folder, safe_serialization=True)
    return folder, components, family


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: _write_folder(root, name) for name in FAMILY_CONFIGS}


@pytest.mark.parametrize("name", list(FAMILY_CONFIGS))
def test_folder_is_read_offline_as_its_family(folders, name):
    folder, original, family = folders[name]
    assert folder_family(folder) is family
    loaded = load_pretrained_components(folder)
    assert family_of(loaded) is family
    for part in ("denoiser", "vae", "conditioner"):
        a, b = getattr(original, part).state_dict(), getattr(loaded, part).state_dict()
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), part
    # The conditioner encodes prompts exactly as the family's own pipeline does (its encode_prompt).
    pipeline = family.load(folder)
    prompts = ["a handwritten digit three", ""]
    ours = loaded.conditioner(prompts)
    kwargs = {"max_sequence_length": loaded.conditioner.t5_sequence_length} if family is SD3 else {}
    theirs = pipeline.encode_prompt(prompts, prompt_2=None, **({"prompt_3": None} if family is SD3 else {}),
                                    do_classifier_free_guidance=False, device="cpu", **kwargs)
    assert torch.allclose(ours["encoder_hidden_states"], theirs[0], atol=1e-5)
    assert torch.allclose(ours["pooled_prompt_embeds"], theirs[2], atol=1e-5)


def test_unsupported_or_incomplete_folders_fail_before_any_work(folders, tmp_path):
    flux = tmp_path / "flux"
    flux.mkdir()
    (flux / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline"}))
    with pytest.raises(UnsupportedModelError, match=r"flux: model_index.json names 'FluxPipeline'.*StableDiffusionXLPipeline"):
        load_pretrained_components(flux)
    folder, _, _ = folders["sdxl"]
    broken = tmp_path / "no-te2"
    broken.mkdir()
    index = json.loads((folder / "model_index.json").read_text())
    index["text_encoder_2"] = [None, None]
    (broken / "model_index.json").write_text(json.dumps(index))
    with pytest.raises(MissingModelError, match="no-te2 is a StableDiffusionXLPipeline folder without .*text_encoder_2"):
        load_pretrained_components(broken)
    with pytest.raises(MissingModelError, match="no model_index.json"):
        load_pretrained_components(tmp_path)


def _images(pipeline, sampling, prompts=PROMPTS):
    """The plain pipeline's images for prompts x seeds 0, 1 with the export's sampler and guidance."""
    pipeline.scheduler = sampling_scheduler(sampling["scheduler"], pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    result = generate(pipeline, [p for p in prompts for _ in range(2)], seeds=[j for _ in prompts for j in range(2)],
                      steps=4, guidance_scale=sampling["guidance_scale"], pipeline_kwargs=sampling.get("pipeline_kwargs"))
    return np.stack([np.asarray(image) for image in result]).astype(int)


def _sampled(ckpt, out_dir, prompts=PROMPTS):
    """sdl-sample's images of the checkpoint for the same prompts and seeds."""
    sample(_compose("sample", f"ckpt_path={ckpt}", f"out_dir={out_dir}",
                    "prompt=[" + ",".join(f"'{p}'" for p in prompts) + "]", "num_images=2", "seed=0", "steps=4"))
    return np.stack([np.asarray(Image.open(out_dir / f"{k:03d}" / f"{j:05d}.png"))
                     for k in range(len(prompts)) for j in range(2)]).astype(int)


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_finetune_and_lora_export_to_the_family_pipeline(folders, name, train_config, tmp_path):
    folder, _, family = folders[name]
    common = [*FAST, f"model.path={folder}", "data=digits", "data.source.limit=32", "data.batch_size=4",
              "trainer.accumulate_grad_batches=1", "trainer.max_steps=4", "lr_scheduler.num_warmup_steps=0",
              "callbacks.ema.decay=0.5", "trainer.check_val_every_n_epoch=100"]
    # LoRA on the CLIP text encoders too (SD 3's T5, when present, stays frozen).
    runs = {"full": ["experiment=finetune_sd", "optimizer.lr=1e-3"],
            "lora": ["experiment=lora_sd", "optimizer.lr=3e-2", "adapter.text_encoder=true"]}
    base = family.load(folder)
    for kind, overrides in runs.items():
        cfg = train_config(*common, *overrides, run=kind)
        # The folder's objective trains with its own timestep density: logit-normal for SD 3, uniform for SDXL.
        density = type(instantiate(cfg.timesteps)).__name__
        assert density == ("LogitNormalTimesteps" if family is SD3 else "UniformTimesteps"), density
        train(cfg)
        ckpt = f"{cfg.paths.run_dir}/checkpoints/last.ckpt"
        out = tmp_path / f"export-{kind}"
        export(_compose("export", f"ckpt_path={ckpt}", f"out_dir={out}"))
        sampling = json.loads((out / "sd_lightning.json").read_text())
        from_checkpoint = _sampled(ckpt, tmp_path / f"samples-{kind}")
        if kind == "full":
            no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family is SD3 else {}  # as diffusers documents
            exported = family.pipeline_class.from_pretrained(out, local_files_only=True, use_safetensors=True, **no_t5)
            assert type(exported) is family.pipeline_class
            images = _images(exported, sampling)
        else:
            assert (out / LORA_WEIGHTS_FILE).is_file()
            parts = {key.split(".")[0] for key in load_file(out / LORA_WEIGHTS_FILE)}
            assert parts == {family.denoiser_part, "text_encoder", "text_encoder_2"}, parts  # both CLIPs adapted
            before = _images(base, sampling)
            base.load_lora_weights(out)
            images = _images(base, sampling)
            assert np.abs(images - before).mean() > 1  # the adapters matter
            if family is SDXL:  # kohya's keys (lora_unet_, lora_te1_, lora_te2_), what A1111 / ComfyUI load
                assert {k.split("_")[1] for k in load_file(out / KOHYA_WEIGHTS_FILE)} == {"unet", "te1", "te2"}
                kohya = family.load(folder)
                kohya.load_lora_weights(out, weight_name=KOHYA_WEIGHTS_FILE)
                assert np.abs(_images(kohya, sampling) - images).max() <= 2
            else:
                assert not (out / KOHYA_WEIGHTS_FILE).exists()  # kohya has no SD 3 transformer names
        assert np.abs(images - from_checkpoint).max() <= 2, f"{kind}: the plain pipeline differs from sdl-sample"


@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_from_scratch_validation_and_sample_grid_run_through_the_family(name, train_config):
    family, overrides = FAMILY_CONFIGS[name]
    cfg = train_config(*FAST, *overrides, "data=digits", "data.source.limit=40", "data.batch_size=8",
                       "trainer.max_steps=4")
    train(cfg)
    metrics = pd.read_csv(Path(cfg.paths.run_dir) / "csv" / "metrics.csv")
    validated = metrics.dropna(subset=["val/mse"])
    assert len(validated) >= 1
    for key in ("val/mse", "val/rmse", "val/mae", "val/r2", "val/x0_mse", "val/mse_t500"):
        assert np.isfinite(validated[key].to_numpy()).all(), key
    assert list((Path(cfg.paths.run_dir) / "samples").glob("step_*.png"))  # the grid of the validation
    pipeline, _ = load_pipeline(Path(cfg.paths.run_dir) / "checkpoints" / "last.ckpt")
    assert type(pipeline) is family.pipeline_class  # what the grid and sdl-sample sample with


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
@pytest.mark.parametrize("name", ["sdxl", "sd3"])
def test_every_adapter_exports_what_the_family_pipeline_loads(folders, name, kind, train_config, tmp_path):
    """DoRA's file loads with load_lora_weights; LoHa and LoKr export the merged family pipeline. Either way its
    images equal sdl-sample's and differ from the base model's."""
    folder, _, family = folders[name]
    cfg = train_config(*FAST, f"model.path={folder}", "data=digits", "data.source.limit=32", "data.batch_size=4",
                       "trainer.max_steps=4", "lr_scheduler.num_warmup_steps=0", "callbacks.ema.decay=0.5",
                       "trainer.check_val_every_n_epoch=100", "experiment=lora_sd", f"adapter={kind}",
                       # LoHa's and LoKr's updates start as products with a zero factor: they move slower.
                       f"optimizer.lr={3e-2 if kind == 'dora' else 1e-1}", run=kind)
    train(cfg)
    ckpt = f"{cfg.paths.run_dir}/checkpoints/last.ckpt"
    out = tmp_path / "export"
    export(_compose("export", f"ckpt_path={ckpt}", f"out_dir={out}"))
    sampling = json.loads((out / "sd_lightning.json").read_text())
    from_checkpoint = _sampled(ckpt, tmp_path / "samples")
    base = family.load(folder)
    before = _images(base, sampling)
    if kind == "dora":
        base.load_lora_weights(out)
        exported = base
    else:
        no_t5 = {"text_encoder_3": None, "tokenizer_3": None} if family is SD3 else {}
        exported = family.pipeline_class.from_pretrained(out, local_files_only=True, use_safetensors=True, **no_t5)
    images = _images(exported, sampling)
    assert np.abs(images - from_checkpoint).max() <= 2, f"{kind}: the plain pipeline differs from sdl-sample"
    assert np.abs(images - before).mean() > 1  # the adapters matter
