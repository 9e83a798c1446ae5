"""Denoiser backbones behind one call, the generic sampler, and a tiny MMDiT trained with flow matching."""

from functools import partial

import numpy as np
import pandas as pd
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra.utils import instantiate

from sd_lightning.cli.train import train
from sd_lightning.diffusion.objectives import FlowMatchingObjective, VPredictionObjective
from sd_lightning.diffusion.sampling import generate
from sd_lightning.models.builders import build_components
from sd_lightning.models.denoisers import (
    SD3TransformerDenoiser,
    UNetDenoiser,
    build_sd3_transformer,
    build_unet,
)
from sd_lightning.models.pipelines import LatentSampler, build_pipeline, diffusers_pipeline

from conftest import FAST

PROMPTS = ["a handwritten digit one", "a handwritten digit seven"]


def _components(denoiser):
    torch.manual_seed(0)
    return build_components(denoiser=denoiser, vae={"block_out_channels": [8, 16, 32]})


def test_both_backbones_take_one_call():
    for builder, kind in ((partial(build_unet, block_out_channels=[16, 32]), UNetDenoiser),
                          (build_sd3_transformer, SD3TransformerDenoiser)):
        parts = _components(builder)
        assert isinstance(parts.denoiser, kind)
        conditioning = parts.conditioner(PROMPTS)
        latents = torch.randn(2, 4, 8, 8)
        out = parts.denoiser(latents, torch.tensor([10.0, 900.0]), conditioning)
        assert out.shape == latents.shape and torch.isfinite(out).all()
    unet = parts = _components(partial(build_unet, block_out_channels=[16, 32]))
    conditioning = parts.conditioner(PROMPTS)
    direct = unet.denoiser.model(latents, torch.tensor([10, 900]), conditioning["encoder_hidden_states"]).sample
    assert torch.equal(unet.denoiser(latents, torch.tensor([10, 900]), conditioning), direct)


@pytest.mark.parametrize("unet", [{}, {"mid_block_type": None, "text_embedding": True}], ids=["tiny", "tiny_fast"])
def test_latent_sampler_reproduces_the_diffusers_pipeline(unet, tmp_path):
    """The generic CFG loop, on a model StableDiffusionPipeline also runs, gives the pipeline's images — also for
    model=tiny_fast's UNet, saved and read back by plain diffusers."""
    parts = _components(partial(build_unet, block_out_channels=[16, 32], attention_head_dim=2, **unet))
    scheduler = VPredictionObjective().sampling_scheduler("ddim")
    diffusers_pipeline(parts, scheduler).save_pretrained(tmp_path / "pipe", safe_serialization=True)
    pipeline = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe", local_files_only=True)
    ours = generate(LatentSampler(parts, VPredictionObjective().sampling_scheduler("ddim")), PROMPTS * 2, seed=3,
                    steps=5, guidance_scale=2.0, output_type="np")
    theirs = generate(pipeline, PROMPTS * 2, seed=3, steps=5, guidance_scale=2.0, output_type="np")
    assert np.abs(np.asarray(ours) - np.asarray(theirs)).max() < 1e-4
    other_seed = generate(pipeline, PROMPTS * 2, seed=4, steps=5, guidance_scale=2.0, output_type="np")
    assert np.abs(np.asarray(ours) - np.asarray(other_seed)).max() > 1e-2  # the comparison can fail


def test_a_flow_matching_unet_samples_with_the_flow_scheduler():
    parts = _components(partial(build_unet, block_out_channels=[16, 32]))
    pipeline = build_pipeline(parts, FlowMatchingObjective(), "flow_euler")
    assert isinstance(pipeline, LatentSampler)
    assert type(pipeline.scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    images = generate(pipeline, PROMPTS, steps=3, output_type="np")
    assert np.asarray(images).shape == (2, 32, 32, 3)


def test_the_text_embedding_carries_the_prompt_without_cross_attention_or_mid_block():
    """model=tiny_fast's UNet: no mid block, and the prompt reaches the residual blocks through the pooled text
    embedding. With every cross-attention's output zeroed, the prompt still changes the prediction; without the
    text embedding (the negative control) it no longer does."""
    latents, timesteps = torch.randn(2, 4, 8, 8), torch.tensor([500.0, 500.0])
    changes = {}
    for text_embedding in (True, False):
        parts = _components(partial(build_unet, block_out_channels=[16, 32], attention_head_dim=2,
                                    mid_block_type=None, text_embedding=text_embedding))
        unet = parts.denoiser.model
        assert unet.mid_block is None
        assert (unet.config.addition_embed_type == "text") is text_embedding
        with torch.no_grad():
            for name, module in unet.named_modules():
                if name.endswith("attn2.to_out.0"):
                    module.weight.zero_(), module.bias.zero_()
            outputs = [parts.denoiser(latents, timesteps, parts.conditioner([prompt] * 2)) for prompt in PROMPTS]
        changes[text_embedding] = (outputs[0] - outputs[1]).abs().max().item()
    assert changes[True] > 1e-3 and changes[False] == 0.0


def test_the_sdxl_unet_refuses_the_text_embedding():
    from sd_lightning.models.denoisers import build_sdxl_unet

    with pytest.raises(ValueError, match="text_embedding=true is for SD 1.x-style UNets"):
        build_sdxl_unet(text_embedding=True)


@pytest.mark.slow
def test_a_tiny_transformer_trains_20_steps_with_flow_matching_and_samples(tmp_path, digits_vae_dir):
    from sd_lightning.cli.sample import sample
    from sd_lightning.models.pipelines import load_pipeline

    from conftest import compose_train

    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, [*FAST, "model=transformer_tiny", "objective=flow_matching",
                                  f"model.components.vae_path={digits_vae_dir}", "trainer.max_steps=20",
                                  "lr_scheduler.num_warmup_steps=0", "data.batch_size=32", "data.source.limit=400",
                                  "~callbacks.stability"])
    assert type(instantiate(cfg.model).denoiser).__name__ == "SD3TransformerDenoiser"
    train(cfg)
    losses = pd.read_csv(run_dir / "csv" / "metrics.csv")["train/loss"].dropna().to_numpy()
    assert len(losses) == 20 and np.isfinite(losses).all()
    assert losses[-5:].mean() < 0.8 * losses[:5].mean(), losses  # the flow-matching loss falls
    pipeline, sampling = load_pipeline(run_dir / "checkpoints" / "last.ckpt")
    assert isinstance(pipeline, LatentSampler) and sampling["scheduler"] == "flow_euler"
    from omegaconf import OmegaConf

    paths = sample(OmegaConf.create({"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"), "out_dir": str(
        tmp_path / "s"), "prompt": PROMPTS, "num_images": 2, "seed": 0, "scheduler": None, "steps": 4,
        "guidance_scale": None, "batch_size": 16, "use_ema": True, "trusted_objectives": []}))
    assert len(paths) == 4 and (tmp_path / "s" / "grid.png").is_file()
    # No plain diffusers pipeline runs this model: the export refuses before writing, naming the family pipeline.
    from sd_lightning.cli.config import ConfigError
    from sd_lightning.cli.export import export

    out = tmp_path / "export"
    with pytest.raises(ConfigError, match="no plain diffusers pipeline runs this model.*StableDiffusion3Pipeline"):
        export(OmegaConf.create({"ckpt_path": str(run_dir / "checkpoints" / "last.ckpt"), "out_dir": str(out),
                                 "use_ema": True, "scheduler": None, "overwrite": False, "merge_adapters": False}))
    assert not out.exists() and not out.with_name("export.partial").exists()
