"""experiment=finetune_sd and experiment=lora_sd on a tiny SD-shaped folder; the adapter group (LoRA, DoRA, LoHa,
LoKr): training, resume and export to what diffusers loads."""

from __future__ import annotations

import csv
import json

import lightning as L
import numpy as np
import pytest
import test_pretrained
import torch
from diffusers import StableDiffusionPipeline
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from omegaconf import OmegaConf
from PIL import Image
from safetensors.torch import load_file

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, validate_train_config
from sd_lightning.cli.export import export
from sd_lightning.cli.sample import sample
from sd_lightning.cli.train import train
from sd_lightning.diffusion.sampling import generate
from sd_lightning.diffusion.schedules import sampling_scheduler
from sd_lightning.models.adapters import (
    KOHYA_WEIGHTS_FILE,
    LORA_WEIGHTS_FILE,
    adapter_key_prefixes,
    has_adapters,
    save_lora,
)
from sd_lightning.models.checkpoint_io import RECORD_KEY, CheckpointError, components_from_checkpoint

from conftest import FAST

sd_folder = test_pretrained.sd_folder  # the tiny SD-shaped diffusers folder (written with save_pretrained)
PROMPTS = ["a handwritten digit three", "a handwritten digit seven"]
PLAIN = dict(safety_checker=None, feature_extractor=None, requires_safety_checker=False, local_files_only=True)


class CrashAtStep(L.Callback):
    """An unexpected error in the middle of training (after the checkpoint at step 4, before the end)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step:
            raise RuntimeError(f"crash at step {self.step}")


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny steps (conftest)


def _experiment(train_config, sd_folder, name, *overrides, run="run"):
    """The experiment on the tiny folder; the digits (captioned 32x32 images) stand in for the user's folder."""
    folder, _ = sd_folder
    return train_config(*FAST, f"experiment={name}", f"model.path={folder}", "data=digits", "data.source.limit=48",
                        "data.batch_size=4", "trainer.accumulate_grad_batches=1", *overrides, run=run)


def _compose(name, *overrides):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=list(overrides))


def _pipeline_images(pipeline, sampling):
    """The plain pipeline's images for PROMPTS x seeds 0, 1 with the export's sampler and guidance."""
    pipeline.scheduler = sampling_scheduler(sampling["scheduler"], pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    result = generate(pipeline, [p for p in PROMPTS for _ in range(2)], seeds=[j for _ in PROMPTS for j in range(2)],
                      steps=4, guidance_scale=sampling["guidance_scale"])
    return np.stack([np.asarray(image) for image in result]).astype(int)


def _this_machines_precision() -> str:
    """What auto_precision should pick here: bf16 autocast only on a GPU with bf16 units (not emulated bf16)."""
    native_bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    return "bf16-mixed" if native_bf16 else "32-true"


def test_precision_and_optimizer_are_probed_when_built(monkeypatch, tmp_path):
    """One composed finetune_sd config decides precision and optimizer from the machine it is built on.

    The machines are faked through torch.cuda; the per-machine decisions are tested in tests/optim/test_optimizers.py.
    """
    cfg = _compose("train", "experiment=finetune_sd", f"model.path={tmp_path / 'not-there'}",
                   f"paths.run_dir={tmp_path / 'run'}", "data.root=/photos")
    assert instantiate(cfg.trainer.precision) == _this_machines_precision()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert instantiate(cfg.trainer.precision) == "bf16-mixed"  # the same config on a GPU with bf16 units
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert instantiate(cfg.trainer.precision) == "32-true"
    optimizer = instantiate(cfg.optimizer)(params=[torch.nn.Parameter(torch.zeros(2))])
    assert type(optimizer) is torch.optim.AdamW  # no CUDA: the 8-bit optimizer is not available
    assert optimizer.defaults["lr"] == pytest.approx(1e-5)


def test_finetune_sd_composes_without_reading_the_folder(tmp_path):
    """Composing and resolving the whole config neither reads model.path nor probes hardware."""
    cfg = _compose("train", "experiment=finetune_sd", f"model.path={tmp_path / 'not-there'}",
                   f"paths.run_dir={tmp_path / 'run'}", "data.root=/photos")
    OmegaConf.to_yaml(cfg, resolve=True)
    assert cfg.data.resolution._target_.endswith("pretrained_resolution")


def test_finetune_sd_composes_from_the_folder(sd_folder, train_config):
    cfg = _experiment(train_config, sd_folder, "finetune_sd")
    assert instantiate(cfg.trainer.precision) == _this_machines_precision()
    assert cfg.optimizer._target_.endswith("build_memory_efficient_adamw")
    assert cfg.optimizer.lr == pytest.approx(1e-5)
    assert instantiate(cfg.data.resolution) == 32  # the tiny folder's UNet sample size (8) times the VAE factor (4)
    assert instantiate(cfg.data).transform.resolution == 32
    assert cfg.objective._target_.endswith("from_pretrained")  # objective=auto: read when the model is built
    assert type(instantiate(cfg.objective)).__name__ == "EpsilonObjective"  # the folder's scheduler: epsilon
    assert cfg.model.components.gradient_checkpointing is True
    user = train_config("experiment=finetune_sd", f"model.path={sd_folder[0]}", "data.root=/photos", run="user")
    assert user.data.source._target_.endswith("ImageFolderSource")  # a real fine-tune reads the user's folder


def test_bad_lora_settings_name_the_key(sd_folder, train_config):
    cfg = _experiment(train_config, sd_folder, "lora_sd", "adapter.rank=0", "adapter.dropout=1.5")
    with pytest.raises(ConfigError, match=r"adapter.rank=0 must be an integer >= 1(.|\n)*adapter.dropout=1.5"):
        validate_train_config(cfg)


@pytest.mark.slow
def test_finetune_sd_trains_the_whole_unet(sd_folder, train_config):
    _, original = sd_folder
    cfg = _experiment(train_config, sd_folder, "finetune_sd", "trainer.max_steps=3",
                      "optimizer.lr=1e-3")
    train(cfg)
    ckpt = torch.load(cfg.paths.run_dir + "/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3
    base = original.denoiser.state_dict()
    changed = [k for k, v in ckpt["state_dict"].items() if k.startswith("denoiser.") and not torch.equal(v, base[k[9:]])]
    assert len(changed) > 0.9 * len(base)
    assert all(torch.isfinite(v).all() for v in ckpt["state_dict"].values())
    with open(cfg.paths.run_dir + "/csv/metrics.csv") as file:
        losses = [float(row["train/loss"]) for row in csv.DictReader(file) if row.get("train/loss")]
    assert len(losses) == 3 and np.isfinite(losses).all()


def test_lora_trains_only_adapters_and_loss_falls(sd_folder, train_config):
    """50 steps on one fixed batch (fixed noise and timesteps): the loss falls, the base is untouched."""
    cfg = _experiment(train_config, sd_folder, "lora_sd", "optimizer.lr=1e-2", "model.components.gradient_checkpointing=false")
    model = instantiate(cfg.model)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    assert {n.split(".")[-4] for n in trainable} == {"to_q", "to_k", "to_v", "0"}  # to_out.0
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for n, p in model.named_parameters() if n in trainable}
    frozen_before = {n: p.detach().clone() for n, p in model.named_parameters() if n not in trainable}
    lora_before = {n: p.detach().clone() for n, p in model.named_parameters() if n in trainable}

    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    optimizer = model.optimizer_factory(params=model.trainable_parameters())
    model.train()
    losses = []
    for _ in range(50):
        loss = model.diffusion_loss(batch, torch.Generator().manual_seed(0)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert all(np.isfinite(losses))
    assert np.mean(losses[-5:]) < 0.8 * losses[0], losses  # measured: 1.10 -> 0.73
    for name, p in model.named_parameters():
        if name in trainable:
            assert not torch.equal(p, lora_before[name]), f"adapter weight {name} did not train"
        else:
            assert torch.equal(p, frozen_before[name]), f"frozen weight {name} changed"


def test_lora_text_encoder_adapters_export_and_bad_target(sd_folder, train_config, tmp_path):
    cfg = _experiment(train_config, sd_folder, "lora_sd", "adapter.text_encoder=true")
    model = instantiate(cfg.model)
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    assert any(n.startswith("conditioner.text_encoder.") for n in names) and all(".lora_" in n for n in names)
    assert model.conditioner.trains  # trained adapters: no memoized prompt states
    with torch.no_grad():  # stand-in for training: B starts at zero, which would make the check vacuous
        for name, p in model.named_parameters():
            if ".lora_B." in name:
                p.normal_(std=0.1, generator=torch.Generator().manual_seed(len(name)))
    model.eval()
    ids = model.conditioner.tokenize(PROMPTS)
    save_lora(tmp_path / "lora", StableDiffusionPipeline, {"unet": model.denoiser.model, "text_encoder": model.text_encoder})
    pipe = StableDiffusionPipeline.from_pretrained(sd_folder[0], **PLAIN)
    with torch.no_grad():
        base = pipe.text_encoder(ids)[0]
        pipe.load_lora_weights(tmp_path / "lora")
        assert torch.allclose(pipe.text_encoder(ids)[0], model.text_encoder(ids)[0], atol=1e-5)
        assert (pipe.text_encoder(ids)[0] - base).abs().max() > 1e-2
    bad = _experiment(train_config, sd_folder, "lora_sd", "adapter.target_modules=[to_qq]")
    with pytest.raises(Exception, match=r"adapter.target_modules: no layer named \['to_qq'\]"):
        instantiate(bad.model)


@pytest.mark.slow
def test_lora_resume_export_and_sample(sd_folder, train_config, tmp_path):
    folder, original = sd_folder
    # alpha = 2 x rank: the scale alpha / rank must survive both export formats.
    steps = ["optimizer.lr=3e-2", "lr_scheduler.num_warmup_steps=0", "trainer.deterministic=true",
             "callbacks.ema.decay=0.5", "trainer.max_steps=8", "adapter.alpha=8",
             "callbacks.checkpoint.every_n_train_steps=4"]
    full = _experiment(train_config, sd_folder, "lora_sd", *steps, "adapter.save_base_weights=true", run="full")
    train(full)
    part = _experiment(train_config, sd_folder, "lora_sd", *steps, "+callbacks.crash._target_=test_adapters.CrashAtStep",
                       "+callbacks.crash.step=6", run="part")
    with pytest.raises(RuntimeError, match="crash at step 6"):
        train(part)
    assert torch.load(part.paths.run_dir + "/checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    resumed = _experiment(train_config, sd_folder, "lora_sd", *steps, "ckpt_path=last", f"hydra.run.dir={part.paths.run_dir}", run="part")
    train(resumed)
    ckpt_full = torch.load(full.paths.run_dir + "/checkpoints/last.ckpt", weights_only=True)
    ckpt = torch.load(part.paths.run_dir + "/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == ckpt_full["global_step"] == 8
    base = original.denoiser.state_dict()
    for key, value in ckpt_full["state_dict"].items():  # the self-contained checkpoint: base weights untouched
        if key.startswith("denoiser.") and ".lora_" not in key:
            assert torch.equal(value, base[key[9:].replace(".base_layer", "")]), f"base weight {key} changed"
    assert ckpt["state_dict"] and all(".lora_" in k for k in ckpt["state_dict"])  # adapters-only checkpoint
    for key, value in ckpt["state_dict"].items():
        assert torch.equal(value, ckpt_full["state_dict"][key]), f"resumed {key} differs from the uninterrupted run"
    ema_names = ckpt["callbacks"]["ema"]["param_names"]
    assert ema_names and all(".lora_" in n for n in ema_names)

    out = tmp_path / "export"
    export(_compose("export", f"ckpt_path={part.paths.run_dir}/checkpoints/last.ckpt", f"out_dir={out}",
                    "merge_adapters=true"))
    assert (out / LORA_WEIGHTS_FILE).is_file() and (out / "merged" / "model_index.json").is_file()
    sampling = json.loads((out / "sd_lightning.json").read_text())
    samples = tmp_path / "samples"
    sample(_compose("sample", f"ckpt_path={part.paths.run_dir}/checkpoints/last.ckpt", f"out_dir={samples}",
                    f"prompt=[{','.join(PROMPTS)}]", "num_images=2", "seed=0", "steps=4"))
    from_checkpoint = np.stack([np.asarray(Image.open(samples / f"{k:03d}" / f"{j:05d}.png"))
                                for k in range(len(PROMPTS)) for j in range(2)]).astype(int)  # a folder per prompt

    pipe = StableDiffusionPipeline.from_pretrained(folder, **PLAIN)
    base_images = _pipeline_images(pipe, sampling)
    pipe.load_lora_weights(out)
    adapted = _pipeline_images(pipe, sampling)
    merged = _pipeline_images(StableDiffusionPipeline.from_pretrained(out / "merged", **PLAIN), sampling)
    kohya = load_file(out / KOHYA_WEIGHTS_FILE)  # what AUTOMATIC1111 / ComfyUI load
    assert {k.split("_")[1] for k in kohya} == {"unet"} and all(k.startswith("lora_unet_") for k in kohya)
    assert {float(v) for k, v in kohya.items() if k.endswith(".alpha")} == {8.0}
    pipe = StableDiffusionPipeline.from_pretrained(folder, **PLAIN)
    pipe.load_lora_weights(out, weight_name=KOHYA_WEIGHTS_FILE)  # diffusers converts kohya's keys itself
    assert np.abs(_pipeline_images(pipe, sampling) - adapted).max() <= 2
    assert np.abs(adapted - from_checkpoint).max() <= 2
    assert np.abs(merged - adapted).max() <= 2
    assert np.abs(base_images - adapted).mean() > 2  # the adapters matter: the images are not the base model's
    single = export(_compose("export", f"ckpt_path={part.paths.run_dir}/checkpoints/last.ckpt",
                             f"out_dir={tmp_path / 'single'}", "format=single_file"))  # adapters merged into it
    from_file = StableDiffusionPipeline.from_single_file(str(single / "model.safetensors"), config=str(out / "merged"),
                                                         local_files_only=True)
    assert np.array_equal(_pipeline_images(from_file, sampling), merged)

    ckpt[RECORD_KEY]["base_path"] = str(tmp_path / "moved-away")
    torch.save(ckpt, tmp_path / "orphan.ckpt")
    with pytest.raises(CheckpointError, match="holds adapters only and needs its base model folder"):
        components_from_checkpoint(tmp_path / "orphan.ckpt")


@pytest.mark.parametrize("kind", ["dora", "loha", "lokr"])
def test_each_adapter_starts_at_the_base_trains_alone_and_exports_what_diffusers_loads(sd_folder, train_config,
                                                                                       kind, tmp_path):
    """DoRA exports the LoRA file (`load_lora_weights`); LoHa and LoKr the merged pipeline. Either way the plain
    pipeline's images equal sdl-sample's and differ from the base model's. (LoRA: the resume test above.)"""
    folder, original = sd_folder
    cfg = _experiment(train_config, sd_folder, "lora_sd", f"adapter={kind}", "optimizer.lr=3e-2",
                      "lr_scheduler.num_warmup_steps=0", "callbacks.ema.decay=0.5", "trainer.max_steps=6",
                      "trainer.check_val_every_n_epoch=100", run=kind)
    model = instantiate(cfg.model)
    assert model.adapter.kind == kind
    prefixes = adapter_key_prefixes(model.denoiser.model)
    trained = {n for n, p in model.denoiser.model.named_parameters() if p.requires_grad}
    assert trained and all(n.startswith(prefixes) for n in trained)  # only the adapters train
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    states = model.conditioner(PROMPTS)
    with torch.no_grad():  # the update is zero at initialization: training starts at the base model
        torch.testing.assert_close(model.denoiser(latents, torch.tensor([10, 500]), states),
                                   original.denoiser(latents, torch.tensor([10, 500]), states), atol=1e-5, rtol=1e-4)
    train(cfg)
    ckpt = f"{cfg.paths.run_dir}/checkpoints/last.ckpt"
    state = torch.load(ckpt, weights_only=True)["state_dict"]
    assert state and all(k.removeprefix("denoiser.model.").startswith(prefixes) for k in state)  # adapters-only checkpoint
    out = tmp_path / "export"
    export(_compose("export", f"ckpt_path={ckpt}", f"out_dir={out}"))
    sampling = json.loads((out / "sd_lightning.json").read_text())
    samples = tmp_path / "samples"
    sample(_compose("sample", f"ckpt_path={ckpt}", f"out_dir={samples}", f"prompt=[{','.join(PROMPTS)}]",
                    "num_images=2", "seed=0", "steps=4"))
    from_checkpoint = np.stack([np.asarray(Image.open(samples / f"{k:03d}" / f"{j:05d}.png"))
                                for k in range(len(PROMPTS)) for j in range(2)]).astype(int)
    base = StableDiffusionPipeline.from_pretrained(folder, **PLAIN)
    before = _pipeline_images(base, sampling)
    if kind == "dora":
        assert (out / LORA_WEIGHTS_FILE).is_file() and not (out / "model_index.json").exists()
        base.load_lora_weights(out)
        exported = base
    else:
        assert not (out / LORA_WEIGHTS_FILE).exists()
        exported = StableDiffusionPipeline.from_pretrained(out, **PLAIN)
        assert not has_adapters(exported.unet)  # plain weights, no peft layers
    images = _pipeline_images(exported, sampling)
    assert np.abs(images - from_checkpoint).max() <= 2, f"{kind}: the plain pipeline differs from sdl-sample"
    assert np.abs(images - before).mean() > 1  # the adapters matter
