"""data=lfw: scikit-image's bundled LFW subset, captioned by class, trains end to end."""

import csv
import math

import numpy as np
import pytest
from hydra.utils import instantiate
from PIL import Image
from skimage.data import lfw_subset

from sd_lightning.data.sources import LfwSource

from conftest import FAST, compose_train


def test_lfw_source_is_the_bundled_subset_upscaled_and_captioned():
    source = LfwSource(size=32)
    assert len(source) == 200 and len({item.id for item in source.items}) == 200
    captions = [item.caption for item in source.items]
    assert captions == ["a photo of a face"] * 100 + ["a photo of something else"] * 100
    image = source.load_image(7)
    assert image.size == (32, 32) and image.mode == "RGB"
    array = np.asarray(image, dtype=np.float64)
    assert np.array_equal(array[..., 0], array[..., 1])  # grayscale, replicated to RGB
    original = np.asarray(lfw_subset()[7], dtype=np.float64)
    original = original * 255.0 if original.max() <= 1.0 else original
    back = np.asarray(image.convert("L").resize((25, 25), Image.Resampling.BICUBIC), dtype=np.float64)
    assert np.abs(back - original).mean() < 12  # the same picture, only resized
    custom = LfwSource(size=16, face_caption="face", other_caption="not a face", limit=120)
    assert len(custom) == 120 and custom.items[99].caption == "face" and custom.items[100].caption == "not a face"
    assert {item.label for item in source.items} == {"face", "something else"}


def test_lfw_config_composes_and_splits(tmp_path):
    cfg = compose_train(tmp_path / "run", ["data=lfw", "data.source.face_caption=portrait"])
    assert list(cfg.data.sample_prompts) == ["portrait", "a photo of something else", ""]
    datamodule = instantiate(cfg.data)
    datamodule.setup()
    train, val = len(datamodule.train_dataset), len(datamodule.val_dataset)
    assert train + val == 200 and 5 <= val <= 40
    batch = next(iter(datamodule.train_dataloader()))
    assert tuple(batch["pixel_values"].shape) == (32, 3, 32, 32)
    assert set(batch["prompt"]) <= {"portrait", "a photo of something else"}
    by_class = instantiate(compose_train(tmp_path / "run", ["data=lfw", "data.conditioning=class"]).data)
    by_class.setup()
    assert {by_class.train_dataset[i]["prompt"] for i in range(len(by_class.train_dataset))} == {
        "a photo of face", "a photo of something else"}


@pytest.mark.slow
def test_tiny_training_run_on_lfw_has_finite_val_metrics(tmp_path, digits_vae_dir):
    from sd_lightning.cli.train import train

    cfg = compose_train(tmp_path / "run", [*FAST, "data=lfw", f"model.components.vae_path={digits_vae_dir}",
                                           "trainer.max_steps=12", "data.batch_size=16"])
    metric = train(cfg)
    assert metric is not None and math.isfinite(metric)
    with (tmp_path / "run" / "csv" / "metrics.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    values = [float(v) for row in rows for key, v in row.items() if key.startswith("val/") and v != ""]
    assert len(values) >= 10 and all(math.isfinite(v) for v in values)
    assert any(row.get("train/loss") for row in rows)
