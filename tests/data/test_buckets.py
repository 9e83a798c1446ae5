"""Aspect-ratio buckets: sizes, assignment, single-bucket batches across ranks, exact mid-epoch resume, training."""

import logging
import random
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image
from sklearn.datasets import load_digits
from torch.utils.data import BatchSampler
from torchdata.stateful_dataloader import StatefulDataLoader

from sd_lightning.cli.config import ConfigError, validate_train_config
from sd_lightning.cli.train import train
from sd_lightning.data.buckets import AspectRatioBuckets, BucketSampler
from sd_lightning.data.transforms import ImageTransform

from conftest import FAST, compose_train

# Three aspect ratios (wide, square, tall) with 4 / 8 / 12 images: 6 batches of 4, 3 per rank on 2 ranks.
SHAPES = {(48, 24): 4, (32, 32): 8, (24, 48): 12}


def test_bucket_sizes_have_equal_area_multiple_sides_and_bounded_aspect():
    buckets = AspectRatioBuckets(64, multiple=8, max_aspect=2.0)
    assert (64, 64) in buckets.sizes and len(buckets) > 3
    for width, height in buckets.sizes:
        assert width % 8 == 0 and height % 8 == 0
        assert max(width, height) / min(width, height) <= 2.0
        assert 0.8 * 64 * 64 <= width * height <= 64 * 64
    # Symmetric: every landscape bucket has its portrait twin; sorted from tall to wide.
    assert {(h, w) for w, h in buckets.sizes} == set(buckets.sizes)
    ratios = [w / h for w, h in buckets.sizes]
    assert ratios == sorted(ratios)
    assert AspectRatioBuckets(32, multiple=8, max_aspect=2.0).sizes == [(24, 40), (32, 32), (40, 24)]


def test_images_go_to_the_bucket_of_closest_aspect_ratio():
    buckets = AspectRatioBuckets(32, multiple=8, max_aspect=2.0)
    assert buckets.sizes[buckets.assign((100, 100))] == (32, 32)
    assert buckets.sizes[buckets.assign((300, 160))] == (40, 24)
    assert buckets.sizes[buckets.assign((160, 300))] == (24, 40)
    assert buckets.sizes[buckets.assign((1000, 100))] == (40, 24)  # beyond max_aspect: the widest bucket
    assert buckets.describe([0, 1, 1]) == "24x40: 1, 32x32: 2"
    with pytest.raises(ValueError, match="max_aspect"):
        AspectRatioBuckets(32, max_aspect=0.5)


def test_transform_covers_the_bucket_and_crops_to_it():
    # A wide image whose left half is black and right half white, cropped into a tall bucket: center crop
    # keeps the middle (both halves), so the mean stays near 0.
    image = Image.fromarray(np.concatenate([np.zeros((30, 60, 3)), np.full((30, 60, 3), 255)], axis=1).astype(np.uint8))
    tensor = ImageTransform(32)(image, size=(24, 40))
    assert tensor.shape == (3, 40, 24)
    assert abs(float(tensor.mean())) < 0.2
    crops = {float(ImageTransform(32, center_crop=False)(image, random.Random(s), size=(24, 40)).mean())
             for s in range(10)}
    assert len(crops) > 3


def _bucket_ids() -> list[int]:
    ids = [bucket for bucket, count in enumerate(SHAPES.values()) for _ in range(count)]
    random.Random(0).shuffle(ids)
    return ids


def _sampler(rank: int, world: int = 2, seed: int = 0) -> BucketSampler:
    ids = _bucket_ids()
    return BucketSampler(list(range(len(ids))), ids, batch_size=4, seed=seed, num_replicas=world, rank=rank)


def test_batches_are_single_bucket_distinct_across_ranks_and_cover_every_sample_once():
    ids = _bucket_ids()
    for epoch in range(3):
        seen = []
        per_rank = []
        for rank in range(2):
            sampler = _sampler(rank)
            sampler.set_epoch(epoch)
            expected = sampler.batches()
            batches = list(BatchSampler(sampler, batch_size=4, drop_last=True))
            assert batches == expected
            assert len(sampler) == 12
            per_rank.append(len(batches))
            for batch in batches:
                assert len({ids[i] for i in batch}) == 1, f"epoch {epoch}: batch {batch} mixes buckets"
                seen.extend(batch)
        assert per_rank == [3, 3]
        assert sorted(seen) == list(range(len(ids)))
    first, second = _sampler(0), _sampler(0)
    second.set_epoch(1)
    assert first.batches() != second.batches()  # a new order each epoch
    assert _sampler(0).batches() == _sampler(0).batches()  # fixed by (seed, epoch)
    assert _sampler(0, seed=1).batches() != _sampler(0).batches()


def test_uneven_buckets_give_every_rank_the_same_number_of_batches():
    ids = [0] * 10 + [1] * 7 + [2] * 3  # batches of 4: 2 + 1 + 0 = 3 in all, so 1 per rank on 2 ranks
    samplers = [BucketSampler(list(range(20)), ids, batch_size=4, num_replicas=2, rank=r) for r in range(2)]
    assert [len(s.batches()) for s in samplers] == [1, 1]
    assert set(samplers[0].batches()[0]).isdisjoint(samplers[1].batches()[0])
    with pytest.raises(ValueError, match="lower data.batch_size"):
        BucketSampler(list(range(20)), ids, batch_size=16, num_replicas=2, rank=0)


def _loader(sampler: BucketSampler) -> StatefulDataLoader:
    return StatefulDataLoader(list(range(len(_bucket_ids()))), batch_size=4, sampler=sampler, drop_last=True)


def test_resume_mid_epoch_continues_exactly():
    uninterrupted = []
    loader = _loader(_sampler(rank=1))
    for epoch in range(2):
        loader.sampler.set_epoch(epoch)
        uninterrupted.append([b.tolist() for b in loader])

    loader = _loader(_sampler(rank=1))
    iterator = iter(loader)
    head = [next(iterator).tolist() for _ in range(2)]
    state = loader.state_dict()

    resumed = _loader(_sampler(rank=1))
    resumed.load_state_dict(state)
    tail = [b.tolist() for b in resumed]
    assert head + tail == uninterrupted[0]
    resumed.sampler.set_epoch(1)
    assert [b.tolist() for b in resumed] == uninterrupted[1]


def make_mixed_aspect_folder(root: Path) -> Path:
    """Digits pasted on wide, square and tall canvases, in class sub-folders (captions from the folder name)."""
    digits = load_digits()
    names = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"]
    index = 0
    for (width, height), count in SHAPES.items():
        for _ in range(count * 2):
            digit = Image.fromarray((digits.images[index] / 16 * 255).astype(np.uint8)).resize((24, 24)).convert("RGB")
            canvas = Image.new("RGB", (width, height))
            canvas.paste(digit, ((width - 24) // 2, (height - 24) // 2))
            folder = root / names[digits.target[index]]
            folder.mkdir(parents=True, exist_ok=True)
            canvas.save(folder / f"{index:04d}.png")
            index += 1
    return root


def test_datamodule_assigns_buckets_and_logs_their_counts(tmp_path, caplog):
    root = make_mixed_aspect_folder(tmp_path / "images")
    cfg = compose_train(tmp_path / "run", ["data=imagefolder", f"data.root={root}", "data.batch_size=4",
                                           "data.val_fraction=0.0", "data.buckets={multiple: 8, max_aspect: 2.0}"])
    validate_train_config(cfg)
    datamodule = instantiate(cfg.data)
    with caplog.at_level(logging.INFO, logger="sd_lightning.data.datamodule"):
        datamodule.setup("fit")
    assert "aspect-ratio buckets (48 train images): 24x40: 24, 32x32: 16, 40x24: 8" in caplog.text
    shapes = set()
    for batch in datamodule.train_dataloader():
        shapes.add(tuple(batch["pixel_values"].shape))
    assert shapes == {(4, 3, 40, 24), (4, 3, 32, 32), (4, 3, 24, 40)}


def test_bucket_multiple_is_checked_against_the_model(tmp_path):
    cfg = compose_train(tmp_path / "run", ["data.buckets={multiple: 4}"])
    with pytest.raises(ConfigError, match=r"data.buckets.multiple=4 must be a multiple of 8"):
        validate_train_config(cfg)
    cfg = compose_train(tmp_path / "run", ["data.buckets=3"])
    with pytest.raises(ConfigError, match="data.buckets=3 must be null or a mapping"):
        validate_train_config(cfg)


@pytest.mark.slow
def test_training_on_buckets_runs_and_validates_square(tmp_path):
    """Non-square batches through the real training loop; the checkpoint holds the bucket sampler's position.

    A random VAE: this checks shapes and state, not quality (the trained digits VAE costs minutes on a busy CPU).
    """
    root = make_mixed_aspect_folder(tmp_path / "images")
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, [*FAST, "data=imagefolder", f"data.root={root}", "data.batch_size=8",
                                  "data.val_fraction=0.2", "data.buckets={multiple: 8, max_aspect: 2.0}",
                                  "trainer.max_steps=4", "~callbacks.sample_grid"])
    train(cfg)
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    losses = metrics["train/loss"].dropna()
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert np.isfinite(metrics["val/mse"].dropna()).all() and len(metrics["val/mse"].dropna()) >= 1
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    loader_state = state["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_sampler_iter_state"]
    sampler_state = loader_state["sampler_state"]
    assert sampler_state["position"] > 0 and sampler_state["position"] % 8 == 0  # whole single-bucket batches
