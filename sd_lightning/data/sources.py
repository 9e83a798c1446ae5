"""Image sources: where images and their captions come from.

A source lists items cheaply (id + caption) and decodes an image only when asked, so a data module
can split, filter and report on a data set without reading every pixel.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from sd_lightning.data.captions import MetadataError, caption_of, class_name, read_metadata

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
DIGIT_NAMES = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
DIGIT_CAPTION_TEMPLATE = "a handwritten digit {name}"
# A loss mask beside an image (``cat.jpg`` → ``cat.mask.png``): white trains, black is ignored. Never a training item.
MASK_SUFFIX = ".mask.png"


def is_mask_file(name: str) -> bool:
    return name.lower().endswith(MASK_SUFFIX)


def mask_file_of(relative: str) -> str:
    path = Path(relative)
    return path.with_name(path.stem + MASK_SUFFIX).as_posix()


class UnreadableImageError(RuntimeError):
    """An image file that cannot be decoded; the data pipeline skips it and names it."""


class DataRootError(ValueError):
    """A path that escapes the data root or a data folder that cannot be used."""


@dataclass(frozen=True)
class SourceItem:
    """One training example before decoding: a stable id, its caption (None = unlabeled) and class name, if any,
    and its loss mask file (relative to the root), if one lies beside it."""

    id: str
    caption: str | None
    label: str | None = None
    mask: str | None = None


class ImageSource:
    """Base class: a sequence of items whose images are decoded lazily."""

    items: list[SourceItem]

    def __len__(self) -> int:
        return len(self.items)

    def load_image(self, index: int) -> Image.Image:
        raise NotImplementedError

    def image_size(self, index: int) -> tuple[int, int]:
        """(width, height) of an item, for aspect-ratio buckets; sources override it with something cheaper."""
        return self.load_image(index).size

    def load_mask(self, index: int, mode: str) -> Image.Image | None:
        """The item's loss mask (mode ``L``), or None: this source has no masks."""
        return None

    def describe(self) -> str:
        return f"{type(self).__name__}({len(self)} items)"


def digit_caption(label: int) -> str:
    """The public prompt of the default model: 'a handwritten digit zero' … 'a handwritten digit nine'."""
    return DIGIT_CAPTION_TEMPLATE.format(name=DIGIT_NAMES[label])


def upscale_digit(digit: np.ndarray, size: int) -> Image.Image:
    """An 8x8 scikit-learn digit (values 0..16, ink high) as a smooth RGB image of ``size`` pixels."""
    gray = Image.fromarray(np.clip(np.asarray(digit, dtype=np.float64) / 16.0 * 255.0, 0, 255).astype(np.uint8))
    return gray.resize((size, size), Image.Resampling.BICUBIC).convert("RGB")


class DigitsSource(ImageSource):
    """scikit-learn's bundled 8x8 digits (1,797 labeled images, no download), upscaled."""

    def __init__(self, size: int = 32, limit: int | None = None) -> None:
        from sklearn.datasets import load_digits

        digits = load_digits()
        self.size = size
        self.images = digits.images
        self.labels = digits.target.astype(int)
        count = len(self.labels) if limit is None else min(limit, len(self.labels))
        self.items = [SourceItem(id=f"digits/{i:04d}", caption=digit_caption(int(self.labels[i])),
                                 label=DIGIT_NAMES[int(self.labels[i])]) for i in range(count)]

    def load_image(self, index: int) -> Image.Image:
        return upscale_digit(self.images[index], self.size)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.size, self.size


def resolve_inside(root: Path, relative: str) -> Path:
    """``root / relative``, refusing absolute paths and ``..`` that would leave the data root."""
    base = os.path.realpath(root)  # strings, not Path.resolve: called once per item (half the time)
    candidate = os.path.realpath(os.path.join(base, relative))
    inside = candidate == base or candidate.startswith(base if base.endswith(os.sep) else base + os.sep)
    if os.path.isabs(relative) or not inside:
        raise DataRootError(f"path {relative!r} escapes the data root {base}; refusing to open it")
    return Path(candidate)


def read_exclusions(path: str | Path | None) -> list[str]:
    """Item ids listed one per line (``#`` comments allowed), as ``sdl-data clean`` writes them."""
    if not path:
        return []
    file = Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.exclude={file} does not exist")
    lines = (line.split("#", 1)[0].strip() for line in file.read_text(encoding="utf-8").splitlines())
    return [line for line in lines if line]


class ImageFolderSource(ImageSource):
    """A user's folder of images.

    Captions come, in this order, from ``metadata.jsonl``/``metadata.csv`` (``file_name`` + ``text``),
    a sidecar ``<image>.txt``, or the class sub-folder name through ``caption_template``.
    Files are never modified; paths named by metadata must stay inside ``root``. ``exclude`` and the ids in
    ``exclude_file`` (``data.exclude``, as ``sdl-data clean`` writes it) are dropped before any path check, so
    excluding a metadata row that escapes the root makes the folder usable.
    """

    def __init__(
        self,
        root: str | Path,
        caption_template: str | None = "{class_name}",
        extensions: Sequence[str] = tuple(sorted(IMAGE_EXTENSIONS)),
        exclude: Sequence[str] = (),
        exclude_file: str | Path | None = None,
    ) -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataRootError(f"data.root={root!s} is not a folder (resolved to {self.root})")
        self.caption_template = caption_template
        extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in extensions}
        excluded = {*exclude, *read_exclusions(exclude_file)}
        try:
            metadata_file, texts = read_metadata(self.root)
        except MetadataError as err:
            raise DataRootError(str(err)) from err
        metadata = texts if metadata_file is not None else None
        if metadata is not None:
            relative_paths = [name for name in metadata if name not in excluded]
            for name in relative_paths:
                resolve_inside(self.root, name)
        else:
            relative_paths = sorted(
                p.relative_to(self.root).as_posix()
                for p in self.root.rglob("*")
                if p.is_file() and p.suffix.lower() in extensions and not p.is_symlink() and not is_mask_file(p.name)
            )
            relative_paths = [p for p in relative_paths if p not in excluded]
        if not relative_paths:
            raise DataRootError(f"no images found under data.root={self.root} (extensions: {sorted(extensions)})")
        self.items = [SourceItem(id=rel, caption=self._caption(rel, metadata), label=self._label(rel),
                                 mask=self._mask(rel)) for rel in relative_paths]

    def _mask(self, relative: str) -> str | None:
        name = mask_file_of(relative)
        path = resolve_inside(self.root, name)
        return name if path.is_file() and not path.is_symlink() else None

    @staticmethod
    def _label(relative: str) -> str | None:
        return class_name(relative)

    def _caption(self, relative: str, metadata: dict[str, Any] | None) -> str | None:
        caption = caption_of(resolve_inside(self.root, relative), relative, metadata, self.caption_template)
        if caption.why == "non_utf8_caption" and caption.text is None:
            log.warning("caption file %s is not UTF-8; treating the image as unlabeled",
                        Path(relative).with_suffix(".txt"))
        return caption.text

    def path(self, index: int) -> Path:
        return resolve_inside(self.root, self.items[index].id)

    def image_size(self, index: int) -> tuple[int, int]:
        """Read from the file header only; an unreadable file gets the square size (it is skipped later)."""
        try:
            with Image.open(self.path(index)) as image:
                return image.size
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError):
            return 1, 1

    def load_image(self, index: int) -> Image.Image:
        path = self.path(index)
        try:
            with Image.open(path) as image:
                image.load()
                return image.convert("RGB")
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as err:
            raise UnreadableImageError(f"{path}: {type(err).__name__}: {err}") from err

    def load_mask(self, index: int, mode: str) -> Image.Image | None:
        """``files``: the ``<stem>.mask.png`` beside the image; ``alpha``: the image's alpha channel (None for an
        image without one). An unreadable mask skips the sample; the transform fits its size to the image's."""
        item = self.items[index]
        path = resolve_inside(self.root, item.mask) if mode == "files" and item.mask else None
        if mode == "alpha":
            path = self.path(index)
        if path is None:
            return None
        try:
            with Image.open(path) as image:
                if mode == "files":
                    mask = image.convert("L")
                elif "A" in image.getbands() or "transparency" in image.info:
                    mask = image.convert("RGBA").getchannel("A")
                else:
                    return None
        except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as err:
            raise UnreadableImageError(f"{path} (loss mask): {type(err).__name__}: {err}") from err
        return mask


LFW_FACE_CAPTION = "a photo of a face"
LFW_OTHER_CAPTION = "a photo of something else"


class LfwSource(ImageSource):
    """scikit-image's bundled LFW subset (no download): 200 25x25 grayscale crops, the first 100 faces and
    the last 100 background patches, upscaled to ``size`` RGB like the digits."""

    def __init__(self, size: int = 32, face_caption: str = LFW_FACE_CAPTION,
                 other_caption: str = LFW_OTHER_CAPTION, limit: int | None = None) -> None:
        from skimage.data import lfw_subset

        images = np.asarray(lfw_subset(), dtype=np.float64)
        # Documented as uint8, returned as floats in [0, 1] by scikit-image 0.26: accept both.
        self.images = images / 255.0 if images.max() > 1.0 else images
        self.size = size
        count = len(self.images) if limit is None else min(limit, len(self.images))
        self.items = [SourceItem(id=f"lfw/{i:03d}", caption=face_caption if i < 100 else other_caption,
                                 label="face" if i < 100 else "something else") for i in range(count)]

    def load_image(self, index: int) -> Image.Image:
        gray = Image.fromarray(np.clip(self.images[index] * 255.0, 0, 255).round().astype(np.uint8))
        return gray.resize((self.size, self.size), Image.Resampling.BICUBIC).convert("RGB")

    def image_size(self, index: int) -> tuple[int, int]:
        return self.size, self.size
