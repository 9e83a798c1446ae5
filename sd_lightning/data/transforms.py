"""Image preprocessing with PIL + numpy + torch (torchvision cannot be installed beside this torch)."""

from __future__ import annotations

import random
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageEnhance

from sd_lightning.data.checks import data_problems, require
from sd_lightning.data.sources import SourceItem
from sd_lightning.data.split import split_fraction

# What training does with items outside data.labeled_fraction.


class ColorJitter:
    """Small brightness/contrast/saturation changes (PIL ImageEnhance), each factor uniform in [1-a, 1+a].

    The factors come from the caller's ``rng``, so a sample's jitter is fixed by (seed, epoch, sample).
    """

    def __init__(self, brightness: float = 0.1, contrast: float = 0.1, saturation: float = 0.1) -> None:
        for name, amount in (("brightness", brightness), ("contrast", contrast), ("saturation", saturation)):
            if not 0.0 <= amount < 1.0:
                raise ValueError(f"data.color_jitter.{name}={amount} must be in [0, 1)")
        self.brightness, self.contrast, self.saturation = brightness, contrast, saturation
        self.amounts = ((ImageEnhance.Brightness, brightness), (ImageEnhance.Contrast, contrast),
                        (ImageEnhance.Color, saturation))

    def __call__(self, image: Image.Image, rng: random.Random) -> Image.Image:
        for enhancer, amount in self.amounts:
            factor = rng.uniform(1.0 - amount, 1.0 + amount)
            if amount > 0:
                image = enhancer(image).enhance(factor)
        return image

    def __repr__(self) -> str:
        return f"ColorJitter(brightness={self.brightness}, contrast={self.contrast}, saturation={self.saturation})"


def flipped_micro_conditioning(ids: torch.Tensor) -> torch.Tensor:
    """The micro-conditioning ids [..., 6] of the same crop after a horizontal flip: the crop's left edge mirrored in
    the resized image (whose width follows from the original and target sizes as ``ImageTransform`` resizes)."""
    height, width, top, left, target_h, target_w = ids.unbind(-1)
    scale = torch.maximum(target_w / width, target_h / height)
    resized_w = torch.maximum(target_w, torch.round(width * scale))
    return torch.stack([height, width, top, resized_w - left - target_w, target_h, target_w], dim=-1)


class ImageTransform:
    """Resize to cover the target, crop (center or random), optionally flip and jitter colors, normalize to [-1, 1].

    The target is ``resolution`` square, or the ``size`` (width, height) of an aspect-ratio bucket.
    ``max_zoom`` > 1 (random crops only) first resizes to cover the target times a factor uniform in
    [1, max_zoom], so the random crop also shifts and zooms images that already have the target's shape.
    ``rng`` decides random crops, flips and jitter, so a caller that seeds it per sample gets reproducible
    augmentation that does not depend on worker count.
    """

    def __init__(
        self,
        resolution: int = 32,
        center_crop: bool = True,
        random_flip: bool = False,
        resample: str = "bicubic",
        color_jitter: ColorJitter | None = None,
        max_zoom: float = 1.0,
    ) -> None:
        require(data_problems({"resolution": resolution, "max_zoom": max_zoom, "center_crop": center_crop}))
        self.max_zoom = max_zoom
        self.resolution = resolution
        self.center_crop = center_crop
        self.random_flip = random_flip
        self.resample = Image.Resampling[resample.upper()]
        self.color_jitter = color_jitter

    def __call__(self, image: Image.Image, rng: random.Random | None = None,
                 size: tuple[int, int] | None = None) -> torch.Tensor:
        return self.apply(image, rng, size)[0]

    def apply(self, image: Image.Image, rng: random.Random | None = None,
              size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The pixels and the crop's micro-conditioning ids as SDXL trains with them: (original height, width,
        crop top, crop left — in the resized image, mirrored with a flip — target height, width)."""
        pixels, ids, _ = self.apply_masked(image, None, rng, size)
        return pixels, ids

    def apply_masked(self, image: Image.Image, mask: Image.Image | None, rng: random.Random | None = None,
                     size: tuple[int, int] | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """``apply`` with a loss mask (mode ``L``; fitted to the image's size first) resized, cropped and flipped
        exactly as the pixels (separately: resizing them together as RGBA would premultiply the colors by the mask);
        returned as [1, H, W] in [0, 1], or None without a mask."""
        rng = rng or random.Random(0)
        image = image.convert("RGB")
        if mask is not None and mask.size != image.size:
            mask = mask.resize(image.size, Image.Resampling.BILINEAR)
        target_w, target_h = size or (self.resolution, self.resolution)
        width, height = image.size
        original = (height, width)
        scale = max(target_w / width, target_h / height)
        if self.max_zoom > 1.0:
            scale *= rng.uniform(1.0, self.max_zoom)
        new_size = (max(target_w, round(width * scale)), max(target_h, round(height * scale)))
        layers = [image] if mask is None else [image, mask]
        if new_size != image.size:
            layers = [layer.resize(new_size, self.resample if k == 0 else Image.Resampling.BILINEAR)
                      for k, layer in enumerate(layers)]
        width, height = layers[0].size
        if self.center_crop:
            left, top = (width - target_w) // 2, (height - target_h) // 2
        else:
            left, top = rng.randint(0, width - target_w), rng.randint(0, height - target_h)
        crop_left = left
        layers = [layer.crop((left, top, left + target_w, top + target_h)) for layer in layers]
        if self.random_flip and rng.random() < 0.5:
            layers = [layer.transpose(Image.Transpose.FLIP_LEFT_RIGHT) for layer in layers]
            crop_left = width - left - target_w
        image = layers[0]
        if self.color_jitter is not None:
            image = self.color_jitter(image, rng)
        array = np.asarray(image, dtype=np.float32) / 127.5 - 1.0
        ids = torch.tensor([*original, top, crop_left, target_h, target_w], dtype=torch.float32)
        weights = None if mask is None else torch.from_numpy(np.asarray(layers[1], dtype=np.float32) / 255.0)[None]
        return torch.from_numpy(array).permute(2, 0, 1).contiguous(), ids, weights


class CaptionTransform:
    """The prompt a sample trains with: its text, its class through a template, or the null prompt.

    ``conditioning``: ``text`` (the source's caption), ``class`` (``caption_template`` filled with the item's
    class name) or ``none`` (always the null prompt, unconditional). ``labeled_fraction`` keeps a condition
    for a stable share of items, chosen by a hash of the id (independent of the train/validation split);
    the rest return ``None``, which the dataset turns into the null prompt ``""`` — the same empty prompt
    that condition dropout trains for classifier-free guidance. Tag handling, as kohya sd-scripts does it, with the
    caller's per-sample ``rng`` (training only; validation and the latent cache pass none): ``tag_dropout`` drops
    each comma-separated tag after the first ``keep_tokens`` with that probability, ``shuffle_tags`` shuffles
    them. ``trigger_word`` leads every labeled caption (never dropped or shuffled; alone for an item without a
    caption), so a fine-tune ties what it learns to that word.
    """

    def __init__(self, conditioning: str = "text", caption_template: str = "{class_name}",
                 labeled_fraction: float = 1.0, shuffle_tags: bool = False, keep_tokens: int = 0,
                 tag_dropout: float = 0.0, trigger_word: str | None = None) -> None:
        require(data_problems({"conditioning": conditioning, "caption_template": caption_template,
                               "labeled_fraction": labeled_fraction, "keep_tokens": keep_tokens,
                               "tag_dropout": tag_dropout}))
        self.conditioning = conditioning
        self.caption_template = caption_template
        self.labeled_fraction = labeled_fraction
        self.shuffle_tags = shuffle_tags
        self.keep_tokens = keep_tokens
        self.tag_dropout = tag_dropout
        self.trigger_word = trigger_word.strip() if trigger_word and trigger_word.strip() else None

    @property
    def varies(self) -> bool:
        """Whether the prompt of an item changes from epoch to epoch (then a latent cache cannot hold it)."""
        return self.shuffle_tags or self.tag_dropout > 0

    def is_labeled(self, item_id: str) -> bool:
        """Stable per id: the salt differs from the split's, so labeled items are spread over both splits."""
        return self.labeled_fraction >= 1.0 or split_fraction(item_id, "labeled") < self.labeled_fraction

    def __call__(self, item: SourceItem, rng: random.Random | None = None) -> str | None:
        if self.conditioning == "none" or not self.is_labeled(item.id):
            return None
        if self.conditioning == "class":
            caption = None if item.label is None else self.caption_template.format(class_name=item.label)
        else:
            caption = item.caption
        if caption is not None and self.varies and rng is not None:
            caption = edit_tags(caption, rng, self.keep_tokens, self.tag_dropout, self.shuffle_tags)
        if self.trigger_word is not None:
            caption = self.trigger_word if not caption else f"{self.trigger_word}, {caption}"
        return caption


def edit_tags(caption: str, rng: random.Random, keep_tokens: int = 0, dropout: float = 0.0,
              shuffle: bool = True) -> str:
    """Drop each comma-separated tag of ``caption`` after the first ``keep_tokens`` with probability ``dropout``,
    then shuffle the rest (``shuffle``); the kept ones stay in front, in order."""
    tags: Sequence[str] = [t.strip() for t in caption.split(",") if t.strip()]
    kept, rest = list(tags[:keep_tokens]), list(tags[keep_tokens:])
    if dropout > 0:
        rest = [tag for tag in rest if rng.random() >= dropout]
    if shuffle:
        rng.shuffle(rest)
    return ", ".join(kept + rest)


def to_pil_images(pixel_values: torch.Tensor) -> list[Image.Image]:
    """[-1, 1] tensors [N, C, H, W] back to PIL images."""
    array = ((pixel_values.detach().float().clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    return [Image.fromarray(a.permute(1, 2, 0).cpu().numpy()) for a in array]
