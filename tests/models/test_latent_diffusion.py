"""The LatentDiffusionModule trains, validates deterministically and composes its pieces."""

from pathlib import Path

import lightning as L
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import OmegaConf

from sd_lightning.cli.train import train
from sd_lightning.models.checkpoint_io import load_checkpoint

from conftest import FAST


def _batch(datamodule, size=8):
    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    return next(iter(loader))


def test_one_training_step_changes_denoiser_weights_only(train_config):
    cfg = train_config(*FAST, "data.source.limit=64", "data.batch_size=8")
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    batch = _batch(datamodule)
    optimizer = model.optimizer_factory(params=model.trainable_parameters())
    before_denoiser = [p.detach().clone() for p in model.denoiser.parameters()]
    before_vae = [p.detach().clone() for p in model.vae.parameters()]
    before_text = [p.detach().clone() for p in model.text_encoder.parameters()]
    model.train()
    loss = model.diffusion_loss(batch, torch.Generator().manual_seed(0)).mean()
    assert torch.isfinite(loss) and loss.item() > 0
    loss.backward()
    optimizer.step()
    assert any(not torch.equal(a, b) for a, b in zip(before_denoiser, model.denoiser.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_vae, model.vae.parameters()))
    assert all(torch.equal(a, b) for a, b in zip(before_text, model.text_encoder.parameters()))
    assert not model.vae.training and not model.text_encoder.training
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.denoiser.parameters()}


def test_the_sampling_scheduler_follows_the_objective(train_config):
    for name, expected in (("epsilon", "epsilon"), ("v_prediction", "v_prediction"), ("sample", "sample")):
        model = instantiate(train_config(f"objective={name}", "model.components.denoiser.block_out_channels=[8,16]").model)
        assert model.objective.prediction_type == expected
        assert model.build_pipeline().scheduler.config.prediction_type == expected
    flow = instantiate(train_config("objective=flow_matching", "model.components.denoiser.block_out_channels=[8,16]").model)
    assert type(flow.build_pipeline().scheduler).__name__ == "FlowMatchEulerDiscreteScheduler"
    assert type(flow.timestep_distribution).__name__ == "LogitNormalTimesteps"  # brought by the objective's YAML


def test_condition_dropout_uses_the_empty_prompt(train_config):
    model = instantiate(train_config("model.components.conditioner.drop_prob=0.5").model)
    prompts = ["a"] * 1000
    dropped = model.conditioner.drop(prompts, torch.Generator().manual_seed(0))
    share = dropped.count("") / len(prompts)
    assert 0.45 < share < 0.55 and set(dropped) == {"", "a"}
    model.conditioner.drop_prob = 0.0
    assert model.conditioner.drop(prompts, torch.Generator().manual_seed(0)) == prompts


def test_prompt_embeddings_match_the_text_encoder(train_config):
    model = instantiate(train_config().model)
    prompts = ["a handwritten digit one", "", "a handwritten digit one"]
    cached = model.conditioner(prompts)
    with torch.no_grad():
        direct = model.text_encoder(model.conditioner.tokenize(prompts))
    assert torch.equal(cached["encoder_hidden_states"], direct[0])
    assert torch.equal(cached["pooled_prompt_embeds"], direct[1])  # the pooled (EOS) embedding is kept
    assert cached["encoder_hidden_states"].shape == (3, model.tokenizer.model_max_length,
                                                     model.text_encoder.config.hidden_size)


def _val_metrics(run_dir: Path) -> pd.DataFrame:
    frame = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return frame.dropna(subset=["val/mse"])


@pytest.mark.slow
def test_short_run_lowers_validation_mse_and_logs_all_metrics(tmp_path, digits_vae_dir):
    from conftest import compose_train

    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, [*FAST, f"model.components.vae_path={digits_vae_dir}", "trainer.max_steps=150",
                                  "data.source.limit=600", "trainer.num_sanity_val_steps=0",
                                  "trainer.val_check_interval=50", "trainer.check_val_every_n_epoch=null"])
    train(cfg)
    values = _val_metrics(run_dir)
    assert len(values) >= 3
    for key in ("val/mse", "val/rmse", "val/mae", "val/r2", "val/x0_mse", "val/mse_t100", "val/mse_t900"):
        assert key in values.columns and values[key].notna().all(), key
    assert values["val/mse"].iloc[-1] < values["val/mse"].iloc[0]
    assert values["val/r2"].iloc[-1] > values["val/r2"].iloc[0]
    last = values.iloc[-1]
    assert last["val/rmse"] == pytest.approx(last["val/mse"] ** 0.5, rel=1e-5)
    assert (run_dir / "samples").is_dir() and any((run_dir / "samples").glob("*.png"))
    fit = pd.read_csv(run_dir / "csv" / "metrics.csv")["time/fit_seconds"].dropna()
    assert len(fit) == 1 and 1.0 < fit.iloc[0] < 600  # the fit's wall time, what estimate=true predicts


def _validate(cfg, ckpt: Path, batch_size: int) -> dict[str, float]:
    cfg.data.val_batch_size = batch_size
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    state = load_checkpoint(ckpt)["state_dict"]
    model.load_state_dict(state)
    trainer = L.Trainer(logger=False, enable_progress_bar=False, enable_checkpointing=False, accelerator="cpu")
    (result,) = trainer.validate(model, datamodule=datamodule, verbose=False)
    return result


def test_validation_metrics_are_deterministic_and_batch_size_free(trained_run, train_config):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    saved = OmegaConf.load(trained_run / "config.yaml")
    cfg = train_config(*FAST, "data.source.limit=400", f"model.components.vae_path={saved.model.components.vae_path}")
    first = _validate(cfg, ckpt, 16)
    again = _validate(cfg, ckpt, 16)
    assert first == again  # bit-identical on a rerun
    other = _validate(cfg, ckpt, 5)
    for key, value in first.items():
        assert other[key] == pytest.approx(value, rel=1e-6), key
    assert set(first) >= {"val/mse", "val/rmse", "val/mae", "val/r2", "val/x0_mse"}


@pytest.mark.parametrize("predictor", ["perfect", "mean"])
def test_validation_r2_of_a_perfect_and_of_a_mean_predictor(train_config, predictor):
    """Hand-computable ends of the scale: predicting the true noise gives MSE 0 and R² 1; predicting its
    mean (0 for standard normal noise) gives MSE ≈ E[ε²] = 1 and R² ≈ 0."""
    cfg = train_config(*FAST, "objective=epsilon", "model.components.vae_path=null", "data.source.limit=60",
                       "~callbacks.sample_grid")
    model = instantiate(cfg.model)
    noisy = model.objective.noisy
    seen: dict[str, torch.Tensor] = {}

    def recording_noisy(latents, noise, timesteps):
        seen["noise"] = noise
        return noisy(latents, noise, timesteps)

    model.objective.noisy = recording_noisy
    model.forward = lambda noisy, t, states: seen["noise"].clone() if predictor == "perfect" else torch.zeros_like(noisy)
    trainer = L.Trainer(accelerator="cpu", logger=False, enable_progress_bar=False, enable_model_summary=False)
    (metrics,) = trainer.validate(model, datamodule=instantiate(cfg.data), verbose=False)
    if predictor == "perfect":
        assert metrics["val/mse"] == 0.0 and metrics["val/r2"] == pytest.approx(1.0, abs=1e-9)
    else:
        assert metrics["val/mse"] == pytest.approx(1.0, abs=0.05)
        assert metrics["val/r2"] == pytest.approx(0.0, abs=1e-3)


def test_checkpoints_of_the_old_engine_are_refused_with_a_message(trained_run, tmp_path):
    from sd_lightning.models.checkpoint_io import RECORD_FORMAT, CheckpointError
    from sd_lightning.models.pipelines import load_pipeline

    checkpoint = load_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    record = checkpoint["sd_lightning"]
    assert record["format"] == RECORD_FORMAT == 4 and record["denoiser"]["kind"] == "unet"
    assert record["objective"] == {"name": "v_prediction", "config": {
        "num_train_timesteps": 1000, "beta_schedule": "squaredcos_cap_v2", "beta_start": 0.00085, "beta_end": 0.012,
        "rescale_betas_zero_snr": False}}
    checkpoint["sd_lightning"] = {"format": 1, "unet_config": record["denoiser"]["config"]}  # the old record's shape
    torch.save(checkpoint, tmp_path / "old.ckpt")
    with pytest.raises(CheckpointError, match="older sd_lightning .*format 1.*retrain"):
        load_pipeline(tmp_path / "old.ckpt")
