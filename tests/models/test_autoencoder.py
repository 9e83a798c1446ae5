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


def _digits_module(vae_dir):
    from sd_lightning.data.datamodule import DiffusionDataModule
    from sd_lightning.data.sources import DigitsSource
    from sd_lightning.models.autoencoder import AutoencoderModule

    dm = DiffusionDataModule(DigitsSource(32, limit=300), val_fraction=0.1)
    dm.setup("fit")
    return AutoencoderModule(AutoencoderKL.from_pretrained(vae_dir), optimizer=torch.optim.AdamW), dm


def test_per_channel_standardization_is_folded_into_the_exported_vae_exactly(digits_vae_dir, tmp_path):
    """The callback stores per-channel statistics, the saved VAE encodes to standardized channels, and its decoder
    maps them to the same images the original decoder makes from the unstandardized latents."""
    from types import SimpleNamespace

    from sd_lightning.callbacks.vae_export import VaeExportCallback

    module, dm = _digits_module(digits_vae_dir)
    original = AutoencoderKL.from_pretrained(digits_vae_dir)
    callback = VaeExportCallback(str(tmp_path / "vae"), standardization="per_channel")
    callback.on_fit_end(SimpleNamespace(interrupted=False, is_global_zero=True, datamodule=dm), module)
    stats = json.loads((tmp_path / "vae" / "latent_statistics.json").read_text())
    folded = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert folded.config.scaling_factor == 1.0 and stats["standardization"] == "per_channel"
    mean, std = torch.tensor(stats["channel_mean"]), torch.tensor(stats["channel_std"])
    assert mean.abs().max() > 0.05 or (std - 1).abs().max() > 0.05  # the raw latents were not standardized already
    with torch.no_grad():
        pixels = torch.cat([b["pixel_values"] for b in dm.plain_train_dataloader()])
        raw, standardized = original.encode(pixels).latent_dist, folded.encode(pixels).latent_dist
        expected = (raw.mean - mean.view(1, -1, 1, 1)) / std.view(1, -1, 1, 1)
        torch.testing.assert_close(standardized.mean, expected, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(standardized.std, raw.std / std.view(1, -1, 1, 1), atol=1e-4, rtol=1e-3)
        noise = torch.randn(raw.mean.shape, generator=torch.Generator().manual_seed(0))
        samples = standardized.mean + standardized.std * noise
        assert samples.mean(dim=(0, 2, 3)).abs().max() < 0.05
        torch.testing.assert_close(samples.std(dim=(0, 2, 3)), torch.ones(len(mean)), atol=0.05, rtol=0)
        z = torch.randn(4, len(mean), 8, 8, generator=torch.Generator().manual_seed(1))
        torch.testing.assert_close(folded.decode(z).sample,
                                   original.decode(z * std.view(1, -1, 1, 1) + mean.view(1, -1, 1, 1)).sample,
                                   atol=1e-4, rtol=1e-4)


def test_global_standardization_keeps_the_weights_and_sets_the_scaling_factor(digits_vae_dir, tmp_path):
    from types import SimpleNamespace

    from sd_lightning.callbacks.vae_export import VaeExportCallback

    module, dm = _digits_module(digits_vae_dir)
    callback = VaeExportCallback(str(tmp_path / "vae"))
    callback.on_fit_end(SimpleNamespace(interrupted=False, is_global_zero=True, datamodule=dm), module)
    saved = AutoencoderKL.from_pretrained(tmp_path / "vae")
    assert saved.config.scaling_factor == pytest.approx(module.compute_scaling_factor(dm.plain_train_dataloader()))
    assert torch.equal(saved.quant_conv.weight, module.vae.quant_conv.weight)
    with pytest.raises(ValueError, match="callbacks.vae_export.standardization='pixel' must be one of"):
        VaeExportCallback(str(tmp_path / "x"), standardization="pixel")


def test_shifted_standardization_centres_the_latents_and_only_sd3_accepts_it(digits_vae_dir, tmp_path):
    """SD 3's convention (z - shift) · scale: the exported VAE carries both numbers; a family whose pipeline ignores
    the shift refuses that VAE before training, SD 3 builds on it."""
    from types import SimpleNamespace

    from hydra.errors import InstantiationException
    from hydra.utils import instantiate

    from sd_lightning.callbacks.vae_export import VaeExportCallback

    from conftest import compose_train

    module, dm = _digits_module(digits_vae_dir)
    callback = VaeExportCallback(str(tmp_path / "vae"), standardization="shifted")
    callback.on_fit_end(SimpleNamespace(interrupted=False, is_global_zero=True, datamodule=dm), module)
    saved = AutoencoderKL.from_pretrained(tmp_path / "vae")
    stats = json.loads((tmp_path / "vae" / "latent_statistics.json").read_text())
    assert saved.config.shift_factor == stats["overall_mean"] != 0.0
    assert saved.config.scaling_factor == pytest.approx(1 / stats["overall_std"])
    with torch.no_grad():
        latents = torch.cat([saved.encode(b["pixel_values"]).latent_dist.mean for b in dm.plain_train_dataloader()])
    standardized = (latents - saved.config.shift_factor) * saved.config.scaling_factor
    assert abs(standardized.mean().item()) < 0.05 and standardized.std().item() == pytest.approx(1.0, rel=0.05)
    assert abs((latents * saved.config.scaling_factor).mean().item()) > 0.05  # without the shift: not centred
    vae_path = f"model.components.vae_path={tmp_path / 'vae'}"
    with pytest.raises(InstantiationException, match=r"vae_path=.*shift_factor=.*StableDiffusionXLPipeline ignores"):
        instantiate(compose_train(tmp_path / "sdxl", ["model=sdxl_tiny", vae_path]).model.components)
    components = instantiate(compose_train(tmp_path / "sd3", ["model=sd3_tiny", vae_path]).model.components)
    assert components.vae.config.shift_factor == saved.config.shift_factor
