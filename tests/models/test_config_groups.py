"""Every option of the swappable groups composes, instantiates, trains a step and visibly takes effect."""

from pathlib import Path

import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.callbacks.ema import EMACallback
from sd_lightning.cli.config import CONFIG_DIR
from sd_lightning.optim.optimizers import split_weight_decay

from conftest import compose_train

SMALL = ["model.components.unet.block_out_channels=[16,32]", "data.source.limit=64", "data.batch_size=8"]


def options(group: str) -> list[str]:
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml"))


@pytest.fixture(scope="module")
def batch(tmp_path_factory):
    cfg = compose_train(tmp_path_factory.mktemp("b") / "run", SMALL)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return next(iter(datamodule.train_dataloader()))


def loss_after_steps(cfg, batch, steps: int = 2) -> tuple[float, torch.nn.Module]:
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    model.train()
    optimizer = model.optimizer_factory(params=model.trainable_parameters())
    first = None
    for step in range(steps):
        optimizer.zero_grad()
        loss = model.diffusion_loss(batch, torch.Generator().manual_seed(step)).mean()
        assert torch.isfinite(loss)
        first = loss.item() if first is None else first
        loss.backward()
        optimizer.step()
    return first, model


@pytest.mark.parametrize("group", ["objective", "loss", "weighting", "noise"])
def test_every_option_changes_the_loss_against_the_default(tmp_path, batch, group):
    defaults = {"objective": "v_prediction", "loss": "mse", "weighting": "uniform", "noise": "gaussian"}
    base, _ = loss_after_steps(compose_train(tmp_path / "base", SMALL), batch)
    for option in options(group):
        if option == defaults[group]:
            continue
        cfg = compose_train(tmp_path / option, [*SMALL, f"{group}={option}"])
        loss, _ = loss_after_steps(cfg, batch)
        assert loss != pytest.approx(base, rel=1e-6), f"{group}={option} had no effect"


def test_zero_terminal_snr_needs_v_prediction(tmp_path):
    model = instantiate(compose_train(tmp_path / "z", [*SMALL, "noise=zero_terminal_snr"]).model)
    assert model.noise_scheduler.alphas_cumprod[-1] < 1e-9
    assert model.build_pipeline().scheduler.config.rescale_betas_zero_snr
    with pytest.raises(Exception, match="objective=v_prediction"):
        instantiate(compose_train(tmp_path / "e", [*SMALL, "noise=zero_terminal_snr", "objective=epsilon"]).model)


def test_model_sizes_grow(tmp_path):
    counts = {}
    for option in ("tiny", "small", "base"):
        model = instantiate(compose_train(tmp_path / option, [f"model={option}"]).model)
        counts[option] = sum(p.numel() for p in model.unet.parameters())
    assert counts["tiny"] < counts["small"] < counts["base"]
    vaes = {}
    for option in ("autoencoder_tiny", "autoencoder_small"):
        module = instantiate(compose_train(tmp_path / option, ["experiment=digits_autoencoder", f"model={option}"]).model)
        vaes[option] = sum(p.numel() for p in module.vae.parameters())
    assert vaes["autoencoder_tiny"] < vaes["autoencoder_small"]


def test_regularizers_take_effect(tmp_path, batch):
    def cfg(option):
        return compose_train(tmp_path / option, [*SMALL, f"regularizer={option}"])

    assert set(options("regularizer")) >= {"none", "weight_decay", "dropout", "grad_clip_norm", "grad_clip_value",
                                            "no_ema", "strong_ema", "cond_dropout"}
    model = instantiate(cfg("weight_decay").model)
    assert model.exclude_from_weight_decay and cfg("weight_decay").optimizer.weight_decay == 0.05
    named = list(model.unet.named_parameters())
    decay, no_decay = split_weight_decay(named)
    norm_or_bias = {id(p) for n, p in named if p.ndim <= 1 or "norm" in n}
    assert no_decay["weight_decay"] == 0.0 and "weight_decay" not in decay
    assert {id(p) for p in no_decay["params"]} == norm_or_bias
    assert not norm_or_bias & {id(p) for p in decay["params"]}
    assert len(decay["params"]) + len(no_decay["params"]) == len(named)
    optimizer = model.optimizer_factory(params=[decay, no_decay])
    assert [g["weight_decay"] for g in optimizer.param_groups] == [0.05, 0.0]
    dropout = instantiate(cfg("dropout").model)
    assert any(isinstance(m, torch.nn.Dropout) and m.p == 0.1 for m in dropout.unet.modules())
    assert cfg("grad_clip_norm").trainer.gradient_clip_val == 1.0
    assert cfg("grad_clip_value").trainer.gradient_clip_algorithm == "value"
    assert cfg("no_ema").callbacks.ema is None
    assert isinstance(instantiate(cfg("strong_ema").callbacks.ema), EMACallback)
    assert cfg("strong_ema").callbacks.ema.decay == 0.9999
    assert instantiate(cfg("cond_dropout").model).cond_drop_prob == 0.25
    base, _ = loss_after_steps(cfg("none"), batch, steps=3)
    with_dropout, _ = loss_after_steps(cfg("dropout"), batch, steps=3)
    assert with_dropout != pytest.approx(base, rel=1e-6)


def test_gradient_checkpointing_and_attention_switches_keep_the_math(tmp_path, batch):
    def gradients(*extra):
        torch.manual_seed(0)
        model = instantiate(compose_train(tmp_path / "g", [*SMALL, *extra]).model)
        model.train()
        loss = model.diffusion_loss(batch, torch.Generator().manual_seed(0)).mean()
        loss.backward()
        return loss.item(), torch.cat([p.grad.flatten() for p in model.unet.parameters() if p.grad is not None])

    base_loss, base_grad = gradients()
    for extra in (["model.gradient_checkpointing=true"], ["model.attention=classic"], ["model.channels_last=true"],
                  ["model.compile=eager"]):
        loss, grad = gradients(*extra)
        assert loss == pytest.approx(base_loss, rel=1e-5)
        assert torch.allclose(grad, base_grad, atol=1e-5)


def test_speed_knobs_take_effect_and_keep_parameter_names(tmp_path):
    plain = instantiate(compose_train(tmp_path / "p", SMALL).model)
    fast = instantiate(compose_train(tmp_path / "f", [*SMALL, "model.channels_last=true", "model.compile=eager"]).model)
    conv = fast.unet.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.unet._compiled_call_impl is not None and plain.unet._compiled_call_impl is None
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints and exports see the same keys


@pytest.mark.slow
def test_a_channels_last_run_trains_checkpoints_and_exports(tmp_path):
    from diffusers import StableDiffusionPipeline
    from hydra import compose, initialize_config_dir

    from sd_lightning.cli.export import export
    from sd_lightning.cli.train import train

    from conftest import FAST

    run_dir = tmp_path / "run"
    train(compose_train(run_dir, [*FAST, *SMALL, "trainer.max_steps=3", "model.channels_last=true",
                                  "~callbacks.sample_grid"]))
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("export", overrides=[f"ckpt_path={run_dir / 'checkpoints' / 'last.ckpt'}",
                                           f"out_dir={tmp_path / 'pipe'}"])
    pipe = StableDiffusionPipeline.from_pretrained(export(cfg), local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    image = pipe("a handwritten digit one", num_inference_steps=2, output_type="np").images[0]
    assert image.shape == (32, 32, 3) and bool(((image >= 0) & (image <= 1)).all())
