"""EMACallback: averages only the trained weights, is used for validation, and lives in the checkpoint."""

import lightning as L
import pytest
import torch
from diffusers.training_utils import EMAModel
from hydra.utils import instantiate

from sd_lightning.callbacks.ema import EMACallback

from conftest import FAST


def test_ema_covers_the_denoiser_only_and_tracks_the_average(trained_run):
    checkpoint = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    state = checkpoint["callbacks"]["ema"]
    assert state["param_names"] and all(name.startswith("denoiser.") for name in state["param_names"])
    denoiser_params = [k for k in checkpoint["state_dict"] if k.startswith("denoiser.")]
    assert len(state["param_names"]) == len(denoiser_params)
    assert state["optimization_step"] == checkpoint["global_step"]
    differs = [not torch.equal(s, checkpoint["state_dict"][n]) for n, s in zip(state["param_names"], state["shadow_params"])]
    assert any(differs)


def test_ema_swaps_weights_for_validation_and_restores_them(train_config):
    cfg = train_config(*FAST, "data.source.limit=64", "data.batch_size=8")
    model = instantiate(cfg.model)
    callback = EMACallback(decay=0.9)
    callback.ema = EMAModel(model.trainable_parameters(), decay=0.9)
    callback.param_names = [n for n, _ in model.named_parameters() if n.startswith("denoiser.")]
    raw = [p.detach().clone() for p in model.denoiser.parameters()]
    with torch.no_grad():
        for shadow in callback.ema.shadow_params:
            shadow.add_(1.0)
    callback.on_validation_start(None, model)
    assert all(torch.equal(p, r + 1.0) for p, r in zip(model.denoiser.parameters(), raw))
    # A checkpoint taken mid-validation stores the raw weights, not the EMA ones.
    checkpoint = {"state_dict": model.state_dict()}
    callback.on_save_checkpoint(None, model, checkpoint)
    name = callback.param_names[0]
    assert torch.equal(checkpoint["state_dict"][name], raw[0])
    callback.on_validation_end(None, model)
    assert all(torch.equal(p, r) for p, r in zip(model.denoiser.parameters(), raw))


def test_ema_state_round_trips_through_resume(train_config, digits_vae_dir):
    cfg = train_config(*FAST, "data.source.limit=96", "data.batch_size=16", "trainer.max_steps=6",
                       f"model.components.vae_path={digits_vae_dir}")
    from sd_lightning.cli.train import train

    train(cfg)
    first = torch.load(f"{cfg.paths.run_dir}/checkpoints/last.ckpt", weights_only=True)["callbacks"]["ema"]
    resumed_cfg = train_config(*FAST, "data.source.limit=96", "data.batch_size=16", "trainer.max_steps=7",
                               f"model.components.vae_path={digits_vae_dir}",
                               f"ckpt_path={cfg.paths.run_dir}/checkpoints/last.ckpt", run="resumed")
    train(resumed_cfg)
    second = torch.load(f"{resumed_cfg.paths.run_dir}/checkpoints/last.ckpt", weights_only=True)["callbacks"]["ema"]
    assert second["optimization_step"] == first["optimization_step"] + 1 == 7
    # One more EMA update from the restored average: the shadow moved, but stayed close to the old one.
    moved = [float((a - b).abs().max()) for a, b in zip(first["shadow_params"], second["shadow_params"])]
    assert max(moved) > 0 and max(moved) < 0.1


def test_invalid_decay_is_rejected():
    with pytest.raises(ValueError, match="callbacks.ema.decay"):
        EMACallback(decay=1.5)
    assert isinstance(EMACallback(), L.Callback)
