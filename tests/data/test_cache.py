"""Latent + text-embedding cache: build, equivalence with the image path, skipping the encoders, refusals."""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any

import lightning as L
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from omegaconf import DictConfig
from safetensors import safe_open

from sd_lightning.cli.config import user_error
from sd_lightning.data.cache import (
    INDEX_FILE,
    PROMPTS_FILE,
    CacheError,
    LatentCache,
    build_cache,
    write_cache,
)

from conftest import FAST, compose_train

LIMIT = ["data.source.limit=64"]


def _compose(root: Path, *overrides: str) -> DictConfig:
    return compose_train(root / "run", [*FAST, *LIMIT, *overrides])


def _build_parts(cfg: DictConfig) -> tuple[Any, Any]:
    """Data module and model as ``sdl-train`` builds them (same seed, same order, same random weights)."""
    L.seed_everything(cfg.seed, workers=True)
    return instantiate(cfg.data), instantiate(cfg.model)


@pytest.fixture(scope="module")
def cache_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("latent_cache")


@pytest.fixture(scope="module")
def digits_cache(cache_root: Path) -> Path:
    return build_cache(_compose(cache_root, f"data.cache={cache_root / 'digits'}"))


@pytest.fixture(scope="module")
def flip_cache(cache_root: Path) -> Path:
    return build_cache(_compose(cache_root, "augmentation=flip", f"data.cache={cache_root / 'flip'}"))


class CallCounter:
    """Counts forward calls of a module through a hook."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.calls = 0
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, *_: Any) -> None:
        self.calls += 1


def test_build_writes_safetensors_shards_index_and_unique_prompts(digits_cache: Path) -> None:
    files = sorted(p.name for p in digits_cache.iterdir())
    assert files == [INDEX_FILE, "latents-00000.safetensors", PROMPTS_FILE]
    assert not [p for p in digits_cache.parent.iterdir() if ".tmp-" in p.name]  # the temporary folder was renamed
    index = json.loads((digits_cache / INDEX_FILE).read_text())
    assert set(index["fingerprint"]) == {"vae", "text_encoder", "tokenizer", "conditioner", "preprocessing"}
    assert index["fingerprint"]["preprocessing"]["resolution"] == 32
    # 64 digits carry the 10 digit prompts; the null prompt is always stored for condition dropout.
    assert len(index["prompts"]) == 11 and "" in index["prompts"]
    with safe_open(str(digits_cache / PROMPTS_FILE), framework="pt") as handle:
        assert handle.get_tensor("encoder_hidden_states").shape == (11, 77, 32)
    with safe_open(str(digits_cache / "latents-00000.safetensors"), framework="pt") as handle:
        assert sorted(handle.keys()) == ["mean", "micro", "std"]  # no flip copies without random_flip
        # SDXL's micro-conditioning of each stored image: the source's 32x32 digit, uncropped, at 32x32.
        assert handle.get_tensor("micro")[0].tolist() == [32, 32, 0, 0, 32, 32]
        assert handle.get_tensor("mean").shape == (64, 4, 8, 8)
        assert bool((handle.get_tensor("std") > 0).all())
    assert len(index["shards"][0]["ids"]) == 64


def test_cached_batches_give_the_image_path_losses_and_metrics_without_encoders(cache_root: Path,
                                                                                digits_cache: Path) -> None:
    cfg = _compose(cache_root, f"data.cache={digits_cache}")
    cached, model = _build_parts(cfg)
    plain = instantiate(_compose(cache_root).data)
    cached.setup("fit")
    plain.setup("fit")
    LatentCache(digits_cache).check(cached, model)
    vae_calls, text_calls = CallCounter(model.vae.encoder), CallCounter(model.text_encoder)

    losses = {}
    for name, datamodule in (("plain", plain), ("cached", cached)):
        batch = next(iter(datamodule.train_dataloader()))
        before = (vae_calls.calls, text_calls.calls)
        model.conditioner._memo.clear()  # so the image path really runs the text encoder
        losses[name] = (batch["id"], model.diffusion_loss(batch, torch.Generator().manual_seed(7)).detach())
        losses[name + "_calls"] = (vae_calls.calls - before[0], text_calls.calls - before[1])
        for val_batch in datamodule.val_dataloader():
            model.validation_step(val_batch, 0)
        losses[name + "_val"] = {k: float(v) for k, v in model.val_metrics.compute().items()}
        model.val_metrics.reset()

    assert losses["plain"][0] == losses["cached"][0]  # same sampler order, same items
    torch.testing.assert_close(losses["cached"][1], losses["plain"][1], rtol=1e-5, atol=1e-6)
    assert losses["plain_calls"][0] >= 1 and losses["plain_calls"][1] >= 1  # the image path does encode
    assert losses["cached_calls"] == (0, 0)  # the cached path never runs the VAE encoder or text encoder
    for key, value in losses["plain_val"].items():
        assert losses["cached_val"][key] == pytest.approx(value, rel=1e-5, abs=1e-7), key


@pytest.mark.slow
def test_training_from_the_cache_logs_the_losses_of_training_from_images(cache_root: Path, digits_cache: Path) -> None:
    """README: training with data.cache gives "the same losses as training from images (max difference
    1.2e-7)" — two short sdl-train runs, per-step train/loss from their CSV logs."""
    from sd_lightning.cli.train import train

    steps = 8
    overrides = [*FAST, *LIMIT, "data.batch_size=8", f"trainer.max_steps={steps}", "~callbacks.sample_grid",
                 "~callbacks.stability"]
    losses = {}
    for name, extra in (("images", []), ("cache", [f"data.cache={digits_cache}"])):
        run_dir = cache_root / f"train_from_{name}"
        train(compose_train(run_dir, [*overrides, *extra]))
        logged = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["train/loss"])
        losses[name] = logged.set_index("step")["train/loss"].sort_index()
    assert list(losses["images"].index) == list(losses["cache"].index) == list(range(steps))
    difference = (losses["images"] - losses["cache"]).abs()
    print(f"\nper-step train/loss, images vs cache over {steps} steps: max difference {difference.max():.3g} "
          f"(losses {losses['images'].min():.3f} … {losses['images'].max():.3f})")
    assert (losses["images"] != losses["images"].iloc[0]).any()  # the runs trained: the loss moved
    assert difference.max() <= 1.2e-7


def test_flip_cache_reproduces_the_per_epoch_flips(cache_root: Path, flip_cache: Path) -> None:
    cached, model = _build_parts(_compose(cache_root, "augmentation=flip", f"data.cache={flip_cache}"))
    plain = instantiate(_compose(cache_root, "augmentation=flip").data)
    cached.setup("fit")
    plain.setup("fit")
    with safe_open(str(flip_cache / "latents-00000.safetensors"), framework="pt") as handle:
        assert {"mean_flipped", "std_flipped"} <= set(handle.keys())
    for epoch in (0, 1):
        cached.set_epoch(epoch)
        plain.set_epoch(epoch)
        for position in range(8):
            item, image_item = cached.train_dataset[position], plain.train_dataset[position]
            with torch.no_grad():
                expected = model.vae.encode(image_item["pixel_values"][None]).latent_dist.mean[0]
            torch.testing.assert_close(item["latents"], expected, rtol=1e-4, atol=1e-5)


@pytest.mark.slow
def test_training_from_cache_lowers_the_loss_and_never_encodes(cache_root: Path, digits_cache: Path) -> None:
    cfg = _compose(cache_root, f"data.cache={digits_cache}", "data.batch_size=8", "lr_scheduler.num_warmup_steps=10")
    datamodule, model = _build_parts(cfg)
    vae_calls, text_calls = CallCounter(model.vae.encoder), CallCounter(model.text_encoder)
    losses: list[float] = []

    class Record(L.Callback):
        def on_train_batch_end(self, trainer: L.Trainer, module: L.LightningModule, outputs: Any, *_: Any) -> None:
            losses.append(float(outputs["loss"]))

    trainer = L.Trainer(max_steps=150, max_epochs=-1, logger=False, enable_checkpointing=False, callbacks=[Record()],
                        enable_progress_bar=False, enable_model_summary=False, check_val_every_n_epoch=25,
                        num_sanity_val_steps=0)
    before = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/mse"]
    trainer.fit(model, datamodule=datamodule)
    after = trainer.validate(model, datamodule=datamodule, verbose=False)[0]["val/mse"]
    assert len(losses) == 150
    first, last = sum(losses[:30]) / 30, sum(losses[-30:]) / 30
    print(f"\ncached training: loss {first:.4f} (first 30 steps) -> {last:.4f} (last 30); "
          f"val/mse {before:.4f} -> {after:.4f}")
    # A random (untrained) VAE's latents leave little to learn in 150 steps; seeded, this run measured
    # loss 1.044 -> 1.009 and val/mse 0.369 -> 0.342.
    assert last < first
    assert after < 0.95 * before  # fixed validation noise and timesteps: a deterministic comparison
    assert (vae_calls.calls, text_calls.calls) == (0, 0)


def test_changed_vae_or_text_encoder_is_refused(cache_root: Path, digits_cache: Path) -> None:
    datamodule, model = _build_parts(_compose(cache_root, f"data.cache={digits_cache}"))
    datamodule.setup("fit")
    with torch.no_grad():
        model.vae.decoder.conv_out.bias.add_(0.5)  # the decoder does not change latents: still valid
    LatentCache(digits_cache).check(datamodule, model)
    with torch.no_grad():
        model.vae.encoder.conv_in.bias.add_(1e-3)
    with pytest.raises(CacheError, match=r"data\.cache=.*stale.*VAE encoder weights.*sdl-data cache"):
        LatentCache(digits_cache).check(datamodule, model)
    _, other = _build_parts(_compose(cache_root, "seed=1"))  # another random text encoder (and VAE)
    with pytest.raises(CacheError, match="text-encoder weights"):
        LatentCache(digits_cache).check(datamodule, other)


def test_stale_cache_is_refused_by_the_training_entry_point(cache_root: Path, digits_cache: Path) -> None:
    from sd_lightning.cli.train import train

    cfg = _compose(cache_root, f"data.cache={digits_cache}", "data.resolution=64", "trainer.max_steps=1")
    with pytest.raises(CacheError, match=r"data\.cache=.*stale.*resolution=32.*resolution=64.*rebuild") as err:
        train(cfg)
    assert user_error(err.value) is err.value  # sdl-train prints it as one line and exits 2
    changed_prompts = _compose(cache_root, f"data.cache={digits_cache}", "data.conditioning=class",
                               "data.caption_template='digit {class_name}'")
    with pytest.raises(CacheError, match="prompt 'a handwritten digit .*' is now 'digit "):
        instantiate(changed_prompts.data).setup("fit")


def test_model_check_runs_when_a_trainer_attaches(cache_root: Path, digits_cache: Path) -> None:
    datamodule, _ = _build_parts(_compose(cache_root, f"data.cache={digits_cache}"))
    _, other = _build_parts(_compose(cache_root, "seed=3"))
    datamodule.setup("fit")  # before a model is attached (as the run manifest does): data checks only
    trainer = L.Trainer(max_steps=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        enable_model_summary=False)
    with pytest.raises(CacheError, match="stale"):
        trainer.fit(other, datamodule=datamodule)


def test_corrupt_or_missing_files_are_refused(cache_root: Path, digits_cache: Path) -> None:
    broken = cache_root / "broken"
    shutil.copytree(digits_cache, broken)
    shard = broken / "latents-00000.safetensors"
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.write_bytes(bytes(data))
    with pytest.raises(CacheError, match=r"data\.cache=.*shard latents-00000\.safetensors is corrupt.*sdl-data cache"):
        LatentCache(broken)
    shard.unlink()
    with pytest.raises(CacheError, match="latents-00000.safetensors is missing"):
        LatentCache(broken)
    (broken / INDEX_FILE).write_text('{"version": 1, "shards": [')
    with pytest.raises(CacheError, match="index.json is corrupt"):
        LatentCache(broken)


def test_interrupted_build_leaves_no_cache(cache_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = cache_root / "interrupted"
    datamodule, model = _build_parts(_compose(cache_root))
    original = model.vae.encode
    calls = []

    def failing_encode(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) > 1:
            raise KeyboardInterrupt
        return original(*args, **kwargs)

    monkeypatch.setattr(model.vae, "encode", failing_encode)
    with pytest.raises(KeyboardInterrupt):
        write_cache(target, datamodule, model, batch_size=16)
    assert not target.exists()
    assert not [p for p in cache_root.iterdir() if p.name.startswith(".interrupted.tmp-")]


def test_unrepresentable_settings_and_existing_folders_are_refused(cache_root: Path, digits_cache: Path) -> None:
    datamodule, model = _build_parts(_compose(cache_root, "augmentation=color_jitter"))
    with pytest.raises(CacheError, match=r"data\.center_crop=false.*data\.color_jitter"):
        write_cache(cache_root / "jitter", datamodule, model)
    datamodule, model = _build_parts(_compose(cache_root, "data.tag_dropout=0.1"))
    with pytest.raises(CacheError, match=r"tag dropout \(data\.tag_dropout=0\.1\)"):
        write_cache(cache_root / "tags", datamodule, model)
    datamodule, model = _build_parts(_compose(cache_root, "model.components.conditioner.train_text_encoder=true"))
    with pytest.raises(CacheError, match="train_text_encoder"):
        write_cache(cache_root / "text", datamodule, model)
    user_folder = cache_root / "user_folder"
    user_folder.mkdir()
    (user_folder / "notes.txt").write_text("mine")
    datamodule, model = _build_parts(_compose(cache_root))
    with pytest.raises(CacheError, match="not a latent cache"):
        write_cache(user_folder, datamodule, model)
    assert (user_folder / "notes.txt").read_text() == "mine"
    assert write_cache(digits_cache, datamodule, model) == digits_cache  # up to date: reused, not rebuilt


@pytest.mark.slow
def test_full_digits_cache_does_the_same_steps_without_the_encoders(cache_root: Path) -> None:
    """All 1,797 digits, default tiny model and batch, loading included, the two paths interleaved.

    Asserted is the counted work, not a time (2 shared cores make a speed assertion a coin toss): both paths
    train on the same samples in the same order, the image path runs the VAE encoder in every step and the
    text encoder at least once, the cached path runs neither. Steps/s are printed (the README table measures
    them on a quiet machine)."""
    full = cache_root / "full"
    overrides = [*FAST, f"data.cache={full}"]
    start = time.perf_counter()
    build_cache(compose_train(cache_root / "run", overrides))
    build_seconds = time.perf_counter() - start
    cached, model = _build_parts(compose_train(cache_root / "run", overrides))
    plain = instantiate(compose_train(cache_root / "run", FAST).data)
    cached.setup("fit")
    plain.setup("fit")
    assert len(cached.train_dataset) == len(plain.train_dataset) > 1500
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-3)
    vae_calls, text_calls = CallCounter(model.vae.encoder), CallCounter(model.text_encoder)
    loaders = {"images": iter(plain.train_dataloader()), "cache": iter(cached.train_dataloader())}
    times: dict[str, float] = {"images": 0.0, "cache": 0.0}
    work: dict[str, dict[str, Any]] = {name: {"ids": [], "vae": [], "text": 0} for name in loaders}
    steps_per_block, blocks = 5, 4
    for block in range(blocks):
        for name, loader in loaders.items():
            start = time.perf_counter()
            for step in range(steps_per_block):
                batch = next(loader)
                before = (vae_calls.calls, text_calls.calls)
                loss = model.diffusion_loss(batch, torch.Generator().manual_seed(block * 100 + step)).mean()
                loss.backward()
                optimizer.step()
                optimizer.zero_grad()
                work[name]["ids"].extend(batch["id"])
                work[name]["vae"].append(vae_calls.calls - before[0])
                work[name]["text"] += text_calls.calls - before[1]
            times[name] += time.perf_counter() - start
    steps = steps_per_block * blocks
    assert work["images"]["ids"] == work["cache"]["ids"] and len(work["cache"]["ids"]) == steps * plain.batch_size
    assert all(calls >= 1 for calls in work["images"]["vae"]) and work["images"]["text"] >= 1
    assert work["cache"]["vae"] == [0] * steps and work["cache"]["text"] == 0
    rates = {name: steps / seconds for name, seconds in times.items()}
    print(f"\nsteps/s, digits 32px, batch {plain.batch_size}, tiny model ({steps} steps each, "
          f"loading included): images {rates['images']:.2f}, cache {rates['cache']:.2f}, "
          f"ratio {rates['cache'] / rates['images']:.2f}x; cache build {build_seconds:.1f} s")


def test_loader_workers_write_the_same_cache_as_the_main_process(cache_root: Path, digits_cache: Path) -> None:
    """digits_cache was built with data.cache_workers=null (one loader worker per core); one process gives the
    same index (shard sha256s included) byte for byte."""
    serial = build_cache(_compose(cache_root, "data.cache_workers=0", f"data.cache={cache_root / 'serial'}"))
    assert (serial / INDEX_FILE).read_bytes() == (digits_cache / INDEX_FILE).read_bytes()
    for name in ("latents-00000.safetensors", PROMPTS_FILE):
        assert (serial / name).read_bytes() == (digits_cache / name).read_bytes()
    with pytest.raises(CacheError, match=r"data.cache_workers=-1 must be an integer >= 0"):
        build_cache(_compose(cache_root, "data.cache_workers=-1", f"data.cache={cache_root / 'never'}"))
    assert not (cache_root / "never").exists()


def test_auto_cache_is_built_once_per_data_and_encoders_then_reused(cache_root: Path) -> None:
    """data.cache=auto: sdl-train's build_run builds the cache under <output_root>/cache, reuses it on the next run,
    keys it by the encoders (another seed's random text encoder gets its own), and falls back to encoding in
    every step when the preprocessing changes every epoch."""
    from sd_lightning.cli.train import build_run

    def cache_of(*overrides: str) -> str | None:
        run_dir = cache_root / "auto" / ("run_" + "_".join(overrides).replace("=", "-"))  # output_root: its parent
        cfg = compose_train(run_dir, [*FAST, *LIMIT, "data.cache=auto", *overrides])
        return build_run(cfg, run_dir).datamodule.cache

    first = Path(cache_of())
    assert first.parent == cache_root / "auto" / "cache" and (first / INDEX_FILE).is_file()
    built = (first / INDEX_FILE).stat().st_mtime_ns
    assert Path(cache_of("trainer.max_steps=7")) == first  # another run of the same data and model
    assert (first / INDEX_FILE).stat().st_mtime_ns == built  # reused, not rebuilt
    assert Path(cache_of("seed=1")) != first  # other random text-encoder weights: another cache
    assert cache_of("augmentation=crop_flip") is None  # random crops: encoded in every step
    assert len(list((cache_root / "auto" / "cache").iterdir())) == 2  # nothing else written there

    cfg = _compose(cache_root, "data.cache=auto")
    datamodule, _ = _build_parts(cfg)
    with pytest.raises(ValueError, match="data.cache=auto is resolved by sdl-train"):
        datamodule.setup("fit")


# Per family: its tiny model, and the widths of the cached states and pooled embedding.
FAMILY_CACHES = {"sdxl": (["model=sdxl_tiny"], 64, 32),  # 32 + 32: both CLIPs side by side; the second's projection
                 "sd3": (["model=sd3_tiny", "objective=flow_matching"], 64, 32)}  # joint width; both projections


@pytest.mark.parametrize("family", list(FAMILY_CACHES))
def test_the_families_train_from_the_cache_as_from_images(cache_root: Path, family: str) -> None:
    """The SDXL and SD 3 caches hold both CLIPs' states, the pooled embeddings and each image's (flipped)
    micro-conditioning: 5 steps from the cache log the losses of 5 steps from images, to 1e-6."""
    from sd_lightning.cli.train import train

    model, sequence_width, pooled_width = FAMILY_CACHES[family]
    sdxl = [*model, "augmentation=flip", "data.batch_size=8", "trainer.max_steps=5", "~callbacks.sample_grid",
            "~callbacks.stability", "trainer.check_val_every_n_epoch=100"]
    cache = build_cache(_compose(cache_root, *sdxl, f"data.cache={cache_root / family}"))
    with safe_open(str(cache / PROMPTS_FILE), framework="pt") as handle:
        assert handle.get_tensor("encoder_hidden_states").shape[-1] == sequence_width
        assert handle.get_tensor("pooled_prompt_embeds").shape[-1] == pooled_width
    with safe_open(str(cache / "latents-00000.safetensors"), framework="pt") as handle:
        assert {"micro", "micro_flipped"} <= set(handle.keys())
    losses = {}
    for name, extra in (("images", []), ("cache", [f"data.cache={cache}"])):
        run_dir = cache_root / f"{family}_from_{name}"
        train(compose_train(run_dir, [*FAST, *LIMIT, *sdxl, *extra]))
        logged = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["train/loss"])
        losses[name] = logged.set_index("step")["train/loss"].sort_index()
    assert list(losses["images"].index) == list(losses["cache"].index) == list(range(5))
    assert (losses["images"] != losses["images"].iloc[0]).any()
    assert (losses["images"] - losses["cache"]).abs().max() <= 1e-6
