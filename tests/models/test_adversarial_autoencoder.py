"""The adversarial autoencoder stage: PatchGAN + hinge loss + adaptive weight, two optimizers, clipping."""

import pandas as pd
import pytest
import torch

from sd_lightning.cli.train import train
from sd_lightning.models.discriminator import (
    FeaturePerceptualLoss,
    PatchDiscriminator,
    adaptive_generator_weight,
    hinge_discriminator_loss,
    hinge_generator_loss,
    small_conv_features,
)

from conftest import compose_train


def test_hinge_losses_by_hand():
    real, fake = torch.tensor([2.0, 0.5]), torch.tensor([-2.0, 0.5])
    # ½·(mean(relu(1 - [2, .5])) + mean(relu(1 + [-2, .5]))) = ½·(0.25 + 0.75)
    assert hinge_discriminator_loss(real, fake).item() == pytest.approx(0.5)
    assert hinge_generator_loss(fake).item() == pytest.approx(0.75)


def test_patch_discriminator_gives_a_logit_map():
    logits = PatchDiscriminator(channels=16)(torch.randn(2, 3, 32, 32))
    assert logits.ndim == 4 and logits.shape[:2] == (2, 1) and logits.shape[-1] > 1


def test_adaptive_weight_is_the_gradient_norm_ratio():
    layer = torch.nn.Parameter(torch.ones(3))
    rec = (layer * torch.tensor([1.0, 2.0, 2.0])).sum()  # gradient norm 3
    gan = (layer * 4.0).sum()  # gradient norm 4·sqrt(3)
    weight = adaptive_generator_weight(rec, gan, layer)
    assert weight.item() == pytest.approx(3 / (4 * 3**0.5 + 1e-4), rel=1e-6)


def test_perceptual_loss_is_zero_for_identical_images_and_frozen():
    loss = FeaturePerceptualLoss(small_conv_features())
    images = torch.randn(2, 3, 16, 16)
    assert loss(images, images).item() == 0.0 and loss(images, images + 0.5).item() > 0
    assert not any(p.requires_grad for p in loss.parameters())


def test_adversarial_training_runs_both_optimizers_one_step_per_batch(tmp_path):
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, ["experiment=digits_autoencoder", "model=autoencoder_gan", "logger=csv",
                                  "trainer.enable_progress_bar=false", "~callbacks.progress", "data.source.limit=96",
                                  "data.batch_size=8", "trainer.max_steps=12", "model.disc_start_step=4",
                                  "trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=1"])
    train(cfg)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 12  # one global step per batch despite two optimizers
    assert len(state["optimizer_states"]) == 2
    assert any(k.startswith("discriminator.") for k in state["state_dict"])
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert metrics["train/d_loss"].notna().sum() >= 5  # after the start step only
    assert metrics.loc[metrics["step"] < 4, "train/d_loss"].isna().all()
    assert metrics["train/disc_weight"].dropna().gt(0).all()
    assert (run_dir / "vae" / "config.json").is_file()
