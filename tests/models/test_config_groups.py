"""Every option of every group composes; every option that changes the maths changes the weights after two real
optimizer steps; switches that must keep the maths are shown engaged and keep the weights."""

from pathlib import Path

import lightning as L
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor
from hydra.utils import instantiate

from sd_lightning.callbacks.ema import EMACallback
from sd_lightning.callbacks.schedule_free import ScheduleFreeModeCallback
from sd_lightning.cli.config import CONFIG_DIR

from conftest import compose_train

SMALL = ["model.components.denoiser.block_out_channels=[16,32]", "data.source.limit=64", "data.batch_size=8"]
DEFAULTS = {"objective": "v_prediction", "timesteps": "uniform", "noise": "gaussian", "input_perturbation": "none",
            "loss": "mse", "weighting": "uniform", "optimizer": "adamw", "lr_scheduler": "cosine",
            "augmentation": "none"}
# Options that need a GPU, a package missing here, or a partner option (tested where named).
NEEDS = {("optimizer", "adamw_8bit"): "CUDA + bitsandbytes (composes and falls back below)",
         ("objective", "auto"): "a pretrained folder (tests/models/test_pretrained.py)",
         ("timesteps", "auto"): "a pretrained folder (tests/models/test_families.py)",
         ("weighting", "sigma_sqrt"): "objective=flow_matching (below)", ("weighting", "cosmap"): "flow matching"}
REGULARIZATION_KEYS = ["optimizer.weight_decay=0.5", "model.exclude_from_weight_decay=true",
                       "model.components.denoiser.dropout=0.3", "trainer.gradient_clip_val=1e-3",
                       "trainer.gradient_clip_algorithm=value trainer.gradient_clip_val=1e-4",
                       "model.components.conditioner.drop_prob=0.9"]


def options(group: str) -> list[str]:
    """A group's options; files starting with ``_`` are shared partials, not choices."""
    return sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml") if not p.stem.startswith("_"))


def weights_after_two_steps(tmp_path: Path, *overrides: str, steps: int = 2) -> torch.Tensor:
    """Trainable weights after 2 (``steps``) real Lightning optimizer steps from one fixed init and data order."""
    cfg = compose_train(tmp_path / "run", [*SMALL, *overrides])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    trainer = instantiate(cfg.trainer, max_steps=steps, logger=False, enable_checkpointing=False,
                          enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0,
                          callbacks=[ScheduleFreeModeCallback()])
    trainer.fit(model, datamodule=instantiate(cfg.data))
    assert trainer.global_step == steps
    return torch.cat([p.detach().flatten() for p in model.trainable_parameters()])


@pytest.fixture(scope="module")
def default_weights(tmp_path_factory) -> torch.Tensor:
    return weights_after_two_steps(tmp_path_factory.mktemp("default"))


def test_every_option_of_every_group_composes(tmp_path):
    pretrained = ["model.path=/unused"]
    extra = {("experiment", "finetune_sd"): pretrained, ("experiment", "lora_sd"): pretrained,
             ("experiment", "textual_inversion_sd"): pretrained, ("experiment", "dreambooth_sd"): pretrained,
             ("model", "pretrained"): pretrained, ("objective", "auto"): pretrained, ("timesteps", "auto"): pretrained,
             ("data", "imagefolder"): ["data.root=/unused"], ("data", "shards"): ["data.root=/unused"],
             ("experiment", "scratch"): ["data.root=/unused"], ("experiment", "scratch_autoencoder"): ["data.root=/unused"]}
    groups = [p.name for p in Path(CONFIG_DIR).iterdir() if p.is_dir() and p.name not in ("hydra", "feature")]
    assert {"objective", "timesteps", "noise", "input_perturbation", "weighting", "model", "sweep"} <= set(groups)
    for group in groups:
        for option in options(group):
            overrides = [f"{group}={option}", *extra.get((group, option), [])]
            cfg = compose_train(tmp_path / f"{group}-{option}", overrides)
            assert cfg.name, (group, option)
    conditioners = options("model/components/conditioner")
    assert {"clip_tiny", "minilm"} <= set(conditioners)
    for option in conditioners:
        cfg = compose_train(tmp_path / f"conditioner-{option}", [f"model/components/conditioner={option}"])
        assert cfg.model.components.conditioner._target_.rsplit(".", 1)[1].startswith("build_")
    launchers = sorted(p.stem for p in (Path(CONFIG_DIR) / "hydra" / "launcher").glob("*.yaml"))
    for launcher in launchers:
        compose_train(tmp_path / launcher, [f"hydra/launcher={launcher}"])


@pytest.mark.parametrize("group", ["objective", "timesteps", "noise", "input_perturbation", "loss", "weighting",
                                   "optimizer", "lr_scheduler", "augmentation"])
def test_every_option_changes_the_weights_after_two_steps(tmp_path, default_weights, group):
    # Every schedule warms up alike for its first 100 steps: compare the schedules themselves (no warmup), over 3
    # steps (at step 2 of 2, 3 cosine restarts sit where one cosine does).
    no_warmup = ["lr_scheduler.num_warmup_steps=0"] if group == "lr_scheduler" else []
    steps = 3 if no_warmup else 2
    baseline = weights_after_two_steps(tmp_path / "baseline", *no_warmup, steps=3) if no_warmup else default_weights
    changed = []
    for option in options(group):
        if option == DEFAULTS[group] or (group, option) in NEEDS:
            continue
        extra = no_warmup if option != "none" else []
        weights = weights_after_two_steps(tmp_path / option, f"{group}={option}", *extra, steps=steps)
        assert weights.shape == baseline.shape
        assert not torch.allclose(weights, baseline, rtol=0, atol=1e-7), f"{group}={option} had no effect"
        changed.append(option)
    assert changed


def test_sd3_weightings_change_flow_matching_weights(tmp_path):
    flow = weights_after_two_steps(tmp_path / "flow", "objective=flow_matching")
    for option in ("sigma_sqrt", "cosmap"):
        weights = weights_after_two_steps(tmp_path / option, "objective=flow_matching", f"weighting={option}")
        assert not torch.allclose(weights, flow, rtol=0, atol=1e-7), option
    with pytest.raises(Exception, match="objective=flow_matching"):
        instantiate(compose_train(tmp_path / "bad", [*SMALL, "weighting=cosmap"]).model)


@pytest.mark.parametrize("keys", REGULARIZATION_KEYS)
def test_every_regularization_key_changes_the_weights(tmp_path, default_weights, keys):
    weights = weights_after_two_steps(tmp_path, *keys.split())
    assert not torch.allclose(weights, default_weights, rtol=0, atol=1e-7), f"{keys} had no effect"


def test_ema_is_a_callback_setting(tmp_path):
    cfg = compose_train(tmp_path / "ema", ["callbacks.ema.decay=0.9999", "+callbacks.ema.use_ema_warmup=true"])
    ema = instantiate(cfg.callbacks.ema)
    assert isinstance(ema, EMACallback) and ema.decay == 0.9999 and ema.use_ema_warmup
    assert compose_train(tmp_path / "no", ["callbacks.ema=null"]).callbacks.ema is None


def test_zero_terminal_snr_is_an_objective_key(tmp_path):
    model = instantiate(compose_train(tmp_path / "z", [*SMALL, "objective.rescale_betas_zero_snr=true"]).model)
    assert model.objective.alphas_cumprod[-1] < 1e-9
    assert model.build_pipeline().scheduler.config.rescale_betas_zero_snr
    with pytest.raises(Exception, match="objective=v_prediction"):
        instantiate(compose_train(tmp_path / "e", [*SMALL, "objective=epsilon",
                                                   "objective.rescale_betas_zero_snr=true"]).model)


def test_offset_noise_and_logit_normal_timesteps_combine(tmp_path):
    model = instantiate(compose_train(tmp_path / "c", [*SMALL, "noise=offset", "timesteps=logit_normal"]).model)
    assert type(model.noise).__name__ == "OffsetNoise"
    assert type(model.timestep_distribution).__name__ == "LogitNormalTimesteps"


def test_model_sizes_grow(tmp_path):
    counts = {}
    for option in ("tiny", "small", "base"):
        model = instantiate(compose_train(tmp_path / option, [f"model={option}"]).model)
        counts[option] = sum(p.numel() for p in model.denoiser.parameters())
    assert counts["tiny"] < counts["small"] < counts["base"]
    vaes = {}
    for option in ("autoencoder_tiny", "autoencoder_small"):
        module = instantiate(compose_train(tmp_path / option, ["experiment=digits_autoencoder", f"model={option}"]).model)
        vaes[option] = sum(p.numel() for p in module.vae.parameters())
    assert vaes["autoencoder_tiny"] < vaes["autoencoder_small"]


def _counting(monkeypatch, cls, method: str) -> list[int]:
    calls = [0]
    original = getattr(cls, method)

    def counted(self, *args, **kwargs):
        calls[0] += 1
        return original(self, *args, **kwargs)

    monkeypatch.setattr(cls, method, counted)
    return calls


def test_gradient_checkpointing_recomputes_and_keeps_the_weights(tmp_path, default_weights, monkeypatch):
    from diffusers.models.resnet import ResnetBlock2D

    calls = _counting(monkeypatch, ResnetBlock2D, "forward")
    weights_after_two_steps(tmp_path / "plain")
    plain_calls = calls[0]
    calls[0] = 0
    weights = weights_after_two_steps(tmp_path / "ckpt", "model.components.gradient_checkpointing=true")
    assert calls[0] > plain_calls * 1.5  # every checkpointed block runs again in backward
    assert torch.allclose(weights, default_weights, atol=1e-5)


def test_classic_attention_is_in_use_and_keeps_the_weights(tmp_path, default_weights, monkeypatch):
    calls = _counting(monkeypatch, AttnProcessor, "__call__")
    cfg = compose_train(tmp_path / "a", [*SMALL, "model.components.attention=classic"])
    model = instantiate(cfg.model)
    assert all(type(p) is AttnProcessor for p in model.denoiser.model.attn_processors.values())
    weights = weights_after_two_steps(tmp_path / "classic", "model.components.attention=classic")
    assert calls[0] > 0
    assert torch.allclose(weights, default_weights, atol=1e-5)
    with pytest.raises(Exception, match="attention='classic' is not available"):
        instantiate(compose_train(tmp_path / "t", ["model=transformer_tiny", "model.components.attention=classic"]).model)


def test_channels_last_and_compile_are_engaged_and_keep_the_weights(tmp_path, default_weights):
    plain = instantiate(compose_train(tmp_path / "p", SMALL).model)
    knobs = ["model.components.channels_last=true", "model.components.compile=eager"]
    fast = instantiate(compose_train(tmp_path / "f", [*SMALL, *knobs]).model)
    conv = fast.denoiser.model.conv_in.weight
    assert conv.is_contiguous(memory_format=torch.channels_last) and not conv.is_contiguous()
    assert fast.denoiser.model._compiled_call_impl is not None and plain.denoiser.model._compiled_call_impl is None
    assert list(fast.state_dict()) == list(plain.state_dict())  # checkpoints and exports see the same keys
    assert torch.allclose(weights_after_two_steps(tmp_path / "cl", knobs[0]), default_weights, atol=1e-5)


def test_cuda_only_options_compose_and_refuse_or_fall_back(tmp_path):
    """What this machine has (CUDA, deepspeed, bitsandbytes) decides whether each option builds or refuses."""
    cuda = torch.cuda.is_available()
    cfg = compose_train(tmp_path / "fsdp", ["trainer=fsdp"])
    if cuda:
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer.strategy, L.pytorch.strategies.FSDPStrategy)
    else:
        with pytest.raises(Exception, match="(?i)gpu|cuda|accelerator"):
            instantiate(cfg.trainer)
    cfg = compose_train(tmp_path / "ds", ["trainer=deepspeed"])
    if cuda and _has("deepspeed"):
        trainer = instantiate(cfg.trainer, logger=False, enable_checkpointing=False)
        assert isinstance(trainer.strategy, L.pytorch.strategies.DeepSpeedStrategy)
    else:  # the strategy (refusing without deepspeed) is built before the Trainer (refusing without a GPU)
        with pytest.raises(Exception, match="needs the deepspeed package" if not _has("deepspeed") else "(?i)gpu|cuda"):
            instantiate(cfg.trainer)
    cfg = compose_train(tmp_path / "8bit", ["optimizer=adamw_8bit"])
    build = instantiate(cfg.optimizer)
    if cuda and _has("bitsandbytes"):
        assert type(build(params=[torch.nn.Parameter(torch.zeros(2, device="cuda"))])).__name__ == "AdamW8bit"
    else:
        missing = "a CUDA GPU" if not cuda else "bitsandbytes"
        with pytest.raises(RuntimeError, match=f"optimizer=adamw_8bit needs {missing}"):
            build(params=[torch.nn.Parameter(torch.zeros(2))])
    ddp = instantiate(compose_train(tmp_path / "ddp", ["trainer=ddp", "trainer.accelerator=cpu"]).trainer,
                      logger=False, enable_checkpointing=False)
    assert isinstance(ddp.strategy, L.pytorch.strategies.DDPStrategy) and ddp.num_devices == 2


def _has(package: str) -> bool:
    import importlib.util

    return importlib.util.find_spec(package) is not None


def test_tensorboard_logger_composes_and_writes(tmp_path):
    cfg = compose_train(tmp_path / "tb", ["logger=tensorboard"])
    loggers = [instantiate(c) for c in cfg.logger.values() if c is not None and "_target_" in c]
    (board,) = [logger for logger in loggers if type(logger).__name__ == "TensorBoardLogger"]
    board.log_metrics({"train/loss": 0.5}, step=1)
    board.finalize("success")
    assert list((tmp_path / "tb" / "tensorboard").glob("events.out.tfevents.*"))
