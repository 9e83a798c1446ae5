"""experiment=dreambooth_sd on a tiny SD folder: class images generated once by the base model, instance and class
images paired in every batch, the prior loss computed on the class images only, both losses logged."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import test_families
import test_pretrained
import torch
from hydra.utils import instantiate

from sd_lightning.cli.train import build_run, train
from sd_lightning.data.dreambooth import CLASS_IMAGES_INDEX
from sd_lightning.data.sources import DigitsSource

from conftest import FAST

sd_folder = test_pretrained.sd_folder
INSTANCE, CLASS = "a photo of sks digit", "a handwritten digit"

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def subject(tmp_path: Path) -> Path:
    """Six images of one digit (the "subject"), as a user's folder."""
    source = DigitsSource(32)
    root = tmp_path / "subject"
    root.mkdir()
    threes = [i for i, item in enumerate(source.items) if item.label == "three"][:6]
    for k, index in enumerate(threes):
        source.load_image(index).save(root / f"three_{k}.png")
    return root


def _config(train_config, sd_folder, subject, *overrides, run="run"):
    return train_config(*FAST, "experiment=dreambooth_sd", f"model.path={sd_folder[0]}", f"data.root={subject}",
                        f"data.instance_prompt='{INSTANCE}'", f"data.class_prompt='{CLASS}'", "data.num_class_images=4",
                        "data.batch_size=2", "sampling.steps=2", "trainer.max_steps=3", "optimizer.lr=1e-3",
                        "trainer.check_val_every_n_epoch=100", *overrides, run=run)


@pytest.fixture(scope="module")
def family_folders(tmp_path_factory, sd_folder):
    root = tmp_path_factory.mktemp("dreambooth")
    return {"sd": sd_folder, **{name: test_families._write_folder(root, name)[:2] for name in ("sdxl", "sd3")}}


@pytest.mark.parametrize("family", ["sd", "sdxl", "sd3"])
def test_class_images_are_generated_once_and_the_prior_loss_sees_only_them(family_folders, family, subject,
                                                                           train_config):
    base = family_folders[family]
    cfg = _config(train_config, base, subject, run=family)
    run = build_run(cfg, Path(cfg.paths.run_dir))
    datamodule, model = run.datamodule, run.model
    folder = Path(datamodule.class_root)
    assert folder.parent == Path(cfg.paths.output_root) / "class_images"
    assert sorted(p.name for p in folder.glob("*.png")) == [f"{k:05d}.png" for k in range(4)]
    assert json.loads((folder / CLASS_IMAGES_INDEX).read_text())["prompt"] == CLASS
    made = (folder / CLASS_IMAGES_INDEX).stat().st_mtime_ns
    again = build_run(_config(train_config, base, subject, run=f"{family}-again"), Path(cfg.paths.run_dir) / "again")
    assert again.datamodule.class_root == str(folder) and (folder / CLASS_IMAGES_INDEX).stat().st_mtime_ns == made

    datamodule.setup("fit")
    loader = datamodule.train_dataloader()
    batch = next(iter(loader))
    assert batch["prior"].tolist() == [False, False, True, True]  # 2 pairs: their instance, then their class images
    assert batch["prompt"] == [INSTANCE, INSTANCE, CLASS, CLASS]
    assert all(i.startswith("class/") for i, p in zip(batch["id"], batch["prior"]) if p)
    epoch = [b["id"] for b in datamodule.train_dataloader()]
    assert epoch == [b["id"] for b in datamodule.train_dataloader()]  # composed deterministically
    assert len(epoch) == 3 and len({i for ids in epoch for i in ids if not i.startswith("class/")}) == 6

    generator = model.sample_generators(batch, 0)
    with torch.no_grad():
        losses = model.diffusion_loss(batch, generator)
        parts = {k: v.item() for k, v in model.batch_loss(losses, batch).items()}
    assert parts["instance_loss"] == pytest.approx(losses[:2].mean().item())
    assert parts["prior_loss"] == pytest.approx(losses[2:].mean().item())
    assert parts["loss"] == pytest.approx(losses[:2].mean().item() + model.prior_loss_weight * losses[2:].mean().item())
    changed = {**batch, "pixel_values": batch["pixel_values"].clone()}
    changed["pixel_values"][:2] = -1.0  # other instance images: the prior loss must not move
    with torch.no_grad():
        moved = {k: v.item() for k, v in model.batch_loss(model.diffusion_loss(
            changed, model.sample_generators(changed, 0)), changed).items()}
    assert moved["prior_loss"] == pytest.approx(parts["prior_loss"], abs=0)
    assert moved["instance_loss"] != pytest.approx(parts["instance_loss"])


def test_dreambooth_trains_logs_both_losses_and_resumes_exactly(sd_folder, subject, train_config):
    steps = ["trainer.max_steps=4", "trainer.deterministic=true", "callbacks.ema.decay=0.5"]
    cfg = _config(train_config, sd_folder, subject, *steps)
    train(cfg)
    metrics = pd.read_csv(Path(cfg.paths.run_dir) / "csv" / "metrics.csv")
    for key in ("train/loss", "train/instance_loss", "train/prior_loss"):
        assert len(metrics[key].dropna()) == 4, key
    part = _config(train_config, sd_folder, subject, *steps, "callbacks.checkpoint.every_n_train_steps=2",
                   "+callbacks.crash._target_=test_adapters.CrashAtStep", "+callbacks.crash.step=3", run="part")
    with pytest.raises(RuntimeError, match="crash at step 3"):  # mid-epoch, after the checkpoint of step 2
        train(part)
    train(_config(train_config, sd_folder, subject, *steps, "ckpt_path=last", f"hydra.run.dir={part.paths.run_dir}",
                  run="part"))
    whole = torch.load(f"{cfg.paths.run_dir}/checkpoints/last.ckpt", weights_only=True)
    resumed = torch.load(f"{part.paths.run_dir}/checkpoints/last.ckpt", weights_only=True)
    assert resumed["global_step"] == whole["global_step"] == 4
    base = sd_folder[1].denoiser.state_dict()
    assert any(not torch.equal(v, base[k[len("denoiser."):]]) for k, v in whole["state_dict"].items()
               if k.startswith("denoiser."))  # it trained
    for key, value in whole["state_dict"].items():
        assert torch.equal(resumed["state_dict"][key], value), key
    with pytest.raises(Exception, match="data.instance_prompt and data.class_prompt must be set"):
        instantiate(_config(train_config, sd_folder, subject, "data.class_prompt=' '", run="bad").data)
