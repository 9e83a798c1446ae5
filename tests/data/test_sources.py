import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.datasets import DiffusionDataset, collate_examples
from sd_lightning.data.sources import (
    DataRootError,
    DigitsSource,
    ImageFolderSource,
    UnreadableImageError,
    digit_caption,
)
from sd_lightning.data.transforms import ImageTransform


def _image(path: Path, size=(40, 30), color=(200, 10, 10)) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, color).save(path)
    return path


def test_digits_source_is_the_bundled_data_with_exact_prompts():
    source = DigitsSource(size=32)
    assert len(source) == 1797
    assert {item.caption for item in source.items} == {f"a handwritten digit {n}" for n in
                                                       (["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"])}
    image = source.load_image(0)
    assert image.size == (32, 32) and image.mode == "RGB"
    assert source.items[0].caption == digit_caption(int(source.labels[0])) == "a handwritten digit zero"
    # Ink is bright on a dark background, as in the 0..16 source values.
    array = np.asarray(image)
    assert array.max() > 200 and array[0, 0].max() < 30


def test_imagefolder_caption_precedence(tmp_path):
    _image(tmp_path / "cats" / "a.png")
    _image(tmp_path / "cats" / "b.png")
    (tmp_path / "cats" / "b.txt").write_text("a sidecar caption\n", encoding="utf-8")
    _image(tmp_path / "loose.png")
    source = ImageFolderSource(tmp_path, caption_template="a photo of {class_name}")
    captions = {item.id: item.caption for item in source.items}
    assert captions == {"cats/a.png": "a photo of cats", "cats/b.png": "a sidecar caption", "loose.png": None}


def test_imagefolder_metadata_jsonl_and_csv(tmp_path):
    _image(tmp_path / "x.png")
    _image(tmp_path / "y.png")
    (tmp_path / "metadata.jsonl").write_text(
        json.dumps({"file_name": "x.png", "text": "first"}) + "\n" + json.dumps({"file_name": "y.png", "text": ""}) + "\n"
    )
    source = ImageFolderSource(tmp_path)
    assert [(i.id, i.caption) for i in source.items] == [("x.png", "first"), ("y.png", None)]
    (tmp_path / "metadata.jsonl").unlink()
    (tmp_path / "metadata.csv").write_text("file_name,text\nx.png,from csv\ny.png,second\n")
    assert [i.caption for i in ImageFolderSource(tmp_path).items] == ["from csv", "second"]


def test_metadata_paths_escaping_the_root_are_rejected(tmp_path):
    root = tmp_path / "data"
    _image(root / "ok.png")
    _image(tmp_path / "secret.png")
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "../secret.png", "text": "x"}) + "\n")
    with pytest.raises(DataRootError, match="escapes the data root"):
        ImageFolderSource(root)
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": str(tmp_path / "secret.png"), "text": "x"}) + "\n")
    with pytest.raises(DataRootError, match="escapes the data root"):
        ImageFolderSource(root)


def test_missing_folder_and_bad_metadata_name_the_problem(tmp_path):
    with pytest.raises(DataRootError, match=r"data.root=.*is not a folder"):
        ImageFolderSource(tmp_path / "nope")
    (tmp_path / "metadata.jsonl").write_text('{"text": "no file"}\n')
    with pytest.raises(DataRootError, match="file_name"):
        ImageFolderSource(tmp_path)


def test_unreadable_image_is_skipped_counted_and_named(tmp_path, caplog):
    _image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    source = ImageFolderSource(tmp_path)
    broken = next(i for i, item in enumerate(source.items) if item.id == "broken.png")
    with pytest.raises(UnreadableImageError, match="broken.png"):
        source.load_image(broken)
    dataset = DiffusionDataset(source, range(len(source)), ImageTransform(16))
    with caplog.at_level("WARNING"):
        batch = collate_examples([dataset[i] for i in range(len(dataset))])
    assert batch["num_skipped"] == 1 and batch["id"] == ["good.png"]
    assert batch["pixel_values"].shape == (1, 3, 16, 16)
    assert "broken.png" in caplog.text


def test_datamodule_batches_and_exclusions(tmp_path):
    for k in range(12):
        _image(tmp_path / "imgs" / f"{k:02d}.png", color=(k * 20, 0, 0))
    exclude = tmp_path / "exclude.txt"
    exclude.write_text("# from sdl-data clean\n03.png\n")
    dm = DiffusionDataModule(ImageFolderSource(tmp_path / "imgs"), resolution=16, val_fraction=0.25, batch_size=4,
                             exclude=str(exclude))
    dm.setup("fit")
    train_ids = {dm.source.items[i].id for i in dm.train_dataset.indices}
    val_ids = {dm.source.items[i].id for i in dm.val_dataset.indices}
    assert "03.png" not in train_ids | val_ids
    assert not train_ids & val_ids and len(train_ids | val_ids) == 11
    batch = next(iter(dm.train_dataloader()))
    assert batch["pixel_values"].shape == (4, 3, 16, 16)
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    assert batch["prompt"] == [""] * 4  # no captions: the null condition
    assert isinstance(batch["pixel_values"], torch.Tensor)
