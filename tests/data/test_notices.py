"""Data that trains, but not as the user may expect, is said once before training: no captions at all, captions
longer than the tokenizer reads, images smaller than data.resolution."""

from __future__ import annotations

import json
import logging
import re

import pytest
from PIL import Image

from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.notices import length_notice
from sd_lightning.data.sources import ImageFolderSource
from sd_lightning.models.tokenizer import load_tiny_tokenizer

LOGGER = "sd_lightning.data.notices"


def _folder(root, count=12, size=32, captions=None):
    root.mkdir()
    for index in range(count):
        Image.new("RGB", (size, size + index % 3), (10 * index, 80, 160)).save(root / f"{index:02d}.png")
    if captions is not None:
        (root / "metadata.jsonl").write_text("".join(
            json.dumps({"file_name": f"{i:02d}.png", "text": captions(i)}) + "\n" for i in range(count)))
    return root


def _setup(root, caplog, **options):
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger=LOGGER):
        DiffusionDataModule(ImageFolderSource(root), **{"val_fraction": 0.2, **options}).setup()
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_a_folder_without_any_caption_says_it_trains_unconditionally_once(tmp_path, caplog):
    bare = _folder(tmp_path / "bare")
    [message] = _setup(bare, caplog)
    assert "none of the" in message and "has a caption" in message and "training unconditionally" in message
    assert "data.conditioning=none" in message
    assert _setup(bare, caplog, conditioning="none") == []  # the user said so
    captioned = _folder(tmp_path / "captioned", captions=lambda i: f"a picture {i}")
    assert _setup(captioned, caplog) == []
    one = _folder(tmp_path / "one", captions=lambda i: "a picture" if i == 0 else "")
    assert _setup(one, caplog, val_fraction=0.0) == []  # one caption: semi-supervised, not unconditional


def test_images_smaller_than_the_resolution_are_said_to_be_upscaled(tmp_path, caplog):
    small = _folder(tmp_path / "small", size=24, captions=lambda i: "x")
    [message] = _setup(small, caplog, resolution=32)
    assert "shorter side below data.resolution=32" in message and "smallest 24x24" in message
    counts = re.match(r"(\d+) of (\d+) training images", message)
    assert counts and counts[1] == counts[2] and 6 <= int(counts[2]) < 12  # every training image, none of validation
    assert _setup(small, caplog, resolution=24) == []


@pytest.mark.parametrize("long_share", [0, 3])
def test_captions_longer_than_the_tokenizer_are_counted_with_the_limit(tmp_path, long_share):
    folder = _folder(tmp_path / "f", captions=lambda i: " ".join(["word"] * (90 if i < long_share else 5)))
    tokenizer = load_tiny_tokenizer()
    notice = length_notice(ImageFolderSource(folder), tokenizer)
    if not long_share:
        assert notice is None
        return
    assert notice.startswith("3 of 12 captions") and f"limit of {tokenizer.model_max_length} tokens" in notice
    longest = len(tokenizer(" ".join(["word"] * 90))["input_ids"])  # with BOS and EOS
    assert longest > tokenizer.model_max_length and f"longest {longest})" in notice
