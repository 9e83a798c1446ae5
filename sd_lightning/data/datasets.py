"""Map-style datasets of preprocessed examples and their collate function (shared by training, cache and features)."""

from __future__ import annotations

import logging
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import Dataset

from sd_lightning.data.samplers import unstamp
from sd_lightning.data.sources import ImageSource, UnreadableImageError
from sd_lightning.data.split import stable_seed
from sd_lightning.data.transforms import CaptionTransform, ImageTransform

log = logging.getLogger(__name__)


class DiffusionDataset(Dataset):
    """Decoded, preprocessed examples ``{pixel_values, prompt, id}``; ``None`` for an unreadable image.

    ``sizes`` gives each position's (width, height) aspect-ratio bucket (None = square ``resolution``);
    ``captions`` decides the prompt (None = the source's caption); an unlabeled item gets the null prompt "".
    ``masks`` (``files`` / ``alpha``) adds each example's ``loss_mask`` [1, H, W] (ones for an image without one);
    ``none`` adds none.
    """

    def __init__(self, source: ImageSource, indices: Sequence[int], transform: ImageTransform, seed: int = 0,
                 augment: bool = True, captions: CaptionTransform | None = None,
                 sizes: Sequence[tuple[int, int]] | None = None, repeats: Sequence[int] | None = None,
                 masks: str = "none") -> None:
        self.source = source
        self.indices = list(indices)
        # (position, occurrence) per sample of an epoch when some items repeat (labeled oversampling).
        self.occurrences = None if repeats is None else [(position, k) for position, count in enumerate(repeats)
                                                         for k in range(count)]
        self.transform = transform
        self.seed = seed
        self.augment = augment
        self.captions = captions
        self.sizes = sizes
        self.masks = masks
        self.unreadable: set[str] = set()  # reported once each (per loader worker), not again every epoch
        self.epoch = 0

    def __len__(self) -> int:
        return len(self.indices) if self.occurrences is None else len(self.occurrences)

    def __getitem__(self, position: int | tuple[int, int]) -> dict[str, Any] | None:
        position, epoch = unstamp(position, self.epoch)
        occurrence = 0
        if self.occurrences is not None:
            position, occurrence = self.occurrences[position]
        index = self.indices[position]
        item = self.source.items[index]
        try:
            image = self.source.load_image(index)
            mask = self.source.load_mask(index, self.masks) if self.masks != "none" else None
        except UnreadableImageError as err:
            if item.id not in self.unreadable:
                self.unreadable.add(item.id)
                log.warning("skipping unreadable image %s (%s)", item.id, err)
            return None
        # A repeated item's later copies get their own id, so their noise, timesteps and augmentation differ.
        sample_id = item.id if occurrence == 0 else f"{item.id}#{occurrence}"
        rng = random.Random(stable_seed(self.seed, sample_id, epoch)) if self.augment else None
        size = self.sizes[position] if self.sizes is not None else None
        caption = item.caption
        if self.captions is not None:
            tag_rng = random.Random(stable_seed(self.seed, "tags", sample_id, epoch)) if self.augment else None
            caption = self.captions(item, tag_rng)
        pixels, micro, weights = self.transform.apply_masked(image, mask, rng, size)
        example = {"pixel_values": pixels, "micro_conditioning": micro, "prompt": caption or "", "id": sample_id}
        if self.masks != "none":
            example["loss_mask"] = weights if weights is not None else torch.ones(1, *pixels.shape[1:])
        return example


def collate_examples(examples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
    """Stack the readable examples; ``num_skipped`` counts the unreadable ones in this batch."""
    kept = [e for e in examples if e is not None]
    if not kept:
        return {"pixel_values": torch.empty(0), "micro_conditioning": torch.empty(0, 6), "prompt": [], "id": [],
                "num_skipped": len(examples)}
    batch = {
        "pixel_values": torch.stack([e["pixel_values"] for e in kept]),
        "micro_conditioning": torch.stack([e["micro_conditioning"] for e in kept]),
        "prompt": [e["prompt"] for e in kept],
        "id": [e["id"] for e in kept],
        "num_skipped": len(examples) - len(kept),
    }
    if "loss_mask" in kept[0]:
        batch["loss_mask"] = torch.stack([e["loss_mask"] for e in kept])
    return batch
