import random

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lightning.data.transforms import ImageTransform, flipped_micro_conditioning, to_pil_images


def _gradient(width: int, height: int) -> Image.Image:
    x = np.tile(np.linspace(0, 255, width, dtype=np.float64), (height, 1))
    return Image.fromarray(np.stack([x, x, x], axis=-1).astype(np.uint8))


def test_resize_shorter_side_center_crop_and_range():
    tensor = ImageTransform(16)(_gradient(64, 32))
    assert tensor.shape == (3, 16, 16) and tensor.dtype == torch.float32
    assert tensor.min() >= -1 and tensor.max() <= 1
    # Center crop of a horizontal gradient keeps the middle: left edge brighter than the image's own left.
    assert tensor[0, :, 0].mean() > -0.6 and tensor[0, :, -1].mean() < 0.6


def test_normalization_is_exact_for_black_and_white():
    assert torch.all(ImageTransform(8)(Image.new("RGB", (8, 8), (0, 0, 0))) == -1)
    assert torch.all(ImageTransform(8)(Image.new("RGB", (8, 8), (255, 255, 255))) == 1)


def test_random_crop_and_flip_follow_the_rng():
    transform = ImageTransform(16, center_crop=False, random_flip=True)
    image = _gradient(48, 16)
    a = transform(image, random.Random(3))
    b = transform(image, random.Random(3))
    assert torch.equal(a, b)
    outputs = {tuple(transform(image, random.Random(s))[0, 0].tolist()) for s in range(20)}
    assert len(outputs) > 3


def test_round_trip_to_pil():
    tensor = ImageTransform(8)(_gradient(8, 8))
    back = np.asarray(to_pil_images(tensor[None])[0]).astype(int)
    assert np.abs(back - np.asarray(_gradient(8, 8)).astype(int)).max() <= 1


def test_too_small_resolution_is_rejected():
    with pytest.raises(ValueError, match="data.resolution"):
        ImageTransform(4)


def test_micro_conditioning_records_the_original_size_and_the_crop_sdxl_trains_with():
    """(original h, w, crop top, crop left, target h, w): the crop in the resized image, mirrored with a flip."""
    image = Image.new("RGB", (60, 30))  # width 60, height 30 → resized to 48x24, cropped to 24x24
    center = ImageTransform(resolution=24, center_crop=True).apply(image)[1]
    assert center.tolist() == [30, 60, 0, 12, 24, 24]
    crops = {}
    for seed in range(40):
        rng = random.Random(seed)
        pixels, ids = ImageTransform(resolution=24, center_crop=False, random_flip=True).apply(image, rng)
        crops.setdefault(int(ids[3]), pixels)
    assert len(crops) > 5 and min(crops) >= 0 and max(crops) <= 24  # random crops move the recorded left edge
    flipping = ImageTransform(resolution=24, center_crop=True, random_flip=True)
    seeds = {random.Random(s).random() < 0.5: s for s in range(10)}  # a seed that flips and one that does not
    flipped = flipping.apply(Image.new("RGB", (61, 30)), random.Random(seeds[True]))[1]
    plain = flipping.apply(Image.new("RGB", (61, 30)), random.Random(seeds[False]))[1]
    assert plain[3] != flipped[3] and torch.equal(flipped_micro_conditioning(plain), flipped)
