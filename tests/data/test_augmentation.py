"""The augmentation group: presets switch with one override and are deterministic per (seed, epoch, sample)."""

import random

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from sd_lightning.data.transforms import ColorJitter, ImageTransform

from conftest import compose_train

PRESETS = {
    "none": (True, False, False),
    "flip": (True, True, False),
    "crop_flip": (False, True, False),
    "color_jitter": (False, True, True),
    "zoom_crop": (False, False, False),
}


def _datamodule(tmp_path, *overrides):
    cfg = compose_train(tmp_path / "run", ["data.source.limit=40", "data.resolution=16", "data.source.size=24",
                                           "data.batch_size=8", *overrides])
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    return datamodule


def _epoch(datamodule, epoch: int) -> torch.Tensor:
    datamodule.set_epoch(epoch)
    dataset = datamodule.train_dataset
    return torch.stack([dataset[i]["pixel_values"] for i in range(len(dataset))])


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_each_preset_is_one_override_and_sets_the_transform(tmp_path, preset):
    datamodule = _datamodule(tmp_path, f"augmentation={preset}")
    center_crop, random_flip, jitter = PRESETS[preset]
    transform = datamodule.transform
    assert (transform.center_crop, transform.random_flip, transform.color_jitter is not None) == (center_crop,
                                                                                                   random_flip, jitter)
    # Validation is never augmented.
    assert datamodule.eval_transform.center_crop and not datamodule.eval_transform.random_flip
    assert datamodule.eval_transform.color_jitter is None
    # Deterministic per (seed, epoch, sample): a fresh data module reproduces the epoch exactly.
    first = _epoch(datamodule, 2)
    assert torch.equal(first, _epoch(_datamodule(tmp_path, f"augmentation={preset}"), 2))
    if preset == "none":
        assert torch.equal(first, _epoch(datamodule, 3))
    else:
        assert not torch.equal(first, _epoch(datamodule, 3))  # a new draw each epoch
        assert not torch.equal(first, _epoch(_datamodule(tmp_path, f"augmentation={preset}", "seed=1"), 2))


def test_worker_count_does_not_change_the_augmentation(tmp_path):
    batches = []
    for workers in (0, 2):
        datamodule = _datamodule(tmp_path, "augmentation=color_jitter", f"data.num_workers={workers}")
        datamodule.set_epoch(1)
        batches.append(torch.cat([b["pixel_values"] for b in datamodule.train_dataloader()]))
    assert torch.equal(*batches)


def test_persistent_workers_serve_every_epoch_its_own_augmentation(tmp_path):
    """With loader workers, the same worker processes serve every epoch (no restart at epoch starts), and each
    epoch's flips equal those of a run without workers: the sampler hands the workers the epoch with each index."""
    def two_epochs(workers: int) -> tuple[list[torch.Tensor], list[list[int]]]:
        datamodule = _datamodule(tmp_path, "augmentation=flip", f"data.num_workers={workers}")
        loader = datamodule.train_dataloader()
        images, pids = [], []
        for epoch in range(2):
            loader.sampler.set_epoch(epoch)  # what Lightning's fit loop does at each epoch start
            datamodule.set_epoch(epoch)  # and DataEpochCallback
            images.append(torch.cat([b["pixel_values"] for b in loader]))
            pids.append(sorted(w.pid for w in loader._iterator._workers) if workers else [])
        return images, pids

    (serial, _), (parallel, pids) = two_epochs(0), two_epochs(2)
    assert not torch.equal(serial[0], serial[1])  # the flips differ by epoch
    assert torch.equal(serial[0], parallel[0]) and torch.equal(serial[1], parallel[1])
    assert len(pids[0]) == 2 and pids[0] == pids[1]  # the same two processes served both epochs


def test_color_jitter_is_small_and_follows_the_rng():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(40, 215, size=(16, 16, 3), dtype=np.uint8))
    plain = ImageTransform(16)(image)
    transform = ImageTransform(16, color_jitter=ColorJitter(0.1, 0.1, 0.1))
    outputs = [transform(image, random.Random(seed)) for seed in range(20)]
    assert torch.equal(outputs[0], transform(image, random.Random(0)))
    assert len({round(float(o.mean()), 4) for o in outputs}) > 10
    for output in outputs:
        change = (output - plain).abs().mean()
        assert 0 < change < 0.2, change  # at most ~10% of the [-1, 1] range on average
    brightness_only = ImageTransform(16, color_jitter=ColorJitter(0.1, 0.0, 0.0))
    ratios = [float((brightness_only(image, random.Random(s)) + 1).mean() / (plain + 1).mean()) for s in range(20)]
    assert min(ratios) > 0.88 and max(ratios) < 1.12 and max(ratios) - min(ratios) > 0.05
    with pytest.raises(ValueError, match="data.color_jitter.contrast=1.5"):
        ColorJitter(contrast=1.5)


def test_flip_mirrors_half_of_the_samples(tmp_path):
    plain = _epoch(_datamodule(tmp_path, "augmentation=none"), 0)
    flipped = _epoch(_datamodule(tmp_path, "augmentation=flip"), 0)
    mirrored = [torch.equal(f, p.flip(-1)) and not torch.equal(f, p) for f, p in zip(flipped, plain)]
    unchanged = [torch.equal(f, p) for f, p in zip(flipped, plain)]
    assert all(m or u for m, u in zip(mirrored, unchanged))
    assert 0.25 < np.mean(mirrored) < 0.75


def test_zoom_crop_shifts_and_scales_square_images_that_a_plain_random_crop_leaves_alone():
    image = Image.new("RGB", (16, 16))
    image.paste((255, 255, 255), (6, 6, 10, 10))  # a centered white square
    plain = ImageTransform(resolution=16, center_crop=False)
    zoom = ImageTransform(resolution=16, center_crop=False, max_zoom=1.5)
    reference = plain(image)
    assert all(torch.equal(plain(image, random.Random(s)), reference) for s in range(5))  # nothing to crop
    outputs = [zoom(image, random.Random(s)) for s in range(20)]
    assert all(o.shape == (3, 16, 16) for o in outputs)
    centers = {tuple(np.argwhere(o[0].numpy() > 0).mean(axis=0).round(1)) for o in outputs}
    areas = [int((o[0] > 0).sum()) for o in outputs]
    assert len(centers) > 5 and max(areas) > int((reference[0] > 0).sum())  # moved and enlarged
    assert torch.equal(outputs[3], zoom(image, random.Random(3)))
    with pytest.raises(ValueError, match="data.max_zoom=1.5 needs random crops"):
        ImageTransform(resolution=16, center_crop=True, max_zoom=1.5)
    with pytest.raises(ValueError, match=r"data.max_zoom=0.5 must be >= 1.0"):
        ImageTransform(resolution=16, center_crop=False, max_zoom=0.5)
