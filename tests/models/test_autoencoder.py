"""Stage 1: the AutoencoderModule learns to reconstruct and saves a VAE with its data-derived scale."""

import json

import pandas as pd
import pytest
import torch
from diffusers import AutoencoderKL


def test_vae_training_lowers_reconstruction_error_and_saves_scaling(digits_vae_dir):
    run_dir = digits_vae_dir.parent
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    losses = metrics["train/mse"].dropna()
    assert losses.iloc[-5:].mean() < 0.3 * losses.iloc[:5].mean()
    assert metrics["val/psnr"].dropna().iloc[-1] > 15
    config = json.loads((digits_vae_dir / "config.json").read_text())
    assert config["scaling_factor"] != 0.18215 and 0.05 < config["scaling_factor"] < 20
    files = {p.name for p in digits_vae_dir.iterdir()}
    assert "diffusion_pytorch_model.safetensors" in files


def test_scaling_factor_is_one_over_latent_std(digits_vae_dir):
    from sd_lightning.data.datamodule import DiffusionDataModule
    from sd_lightning.data.sources import DigitsSource
    from sd_lightning.models.autoencoder import AutoencoderModule

    vae = AutoencoderKL.from_pretrained(digits_vae_dir)
    dm = DiffusionDataModule(DigitsSource(32, limit=300), val_fraction=0.1)
    dm.setup("fit")
    module = AutoencoderModule(vae, optimizer=torch.optim.AdamW)
    factor = module.compute_scaling_factor(dm.plain_train_dataloader())
    with torch.no_grad():
        latents = torch.cat([vae.encode(b["pixel_values"]).latent_dist.mean for b in dm.plain_train_dataloader()])
    assert factor == pytest.approx(1 / latents.double().std().item(), rel=0.02)
    assert (latents * factor).std().item() == pytest.approx(1.0, rel=0.02)
