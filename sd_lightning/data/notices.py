"""What a user should hear once, before training, about data that trains but not as they may expect: no captions at
all, captions longer than the text encoder reads, images smaller than ``data.resolution``."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from lightning.pytorch.utilities import rank_zero_only

from sd_lightning.data.captions import token_counts

log = logging.getLogger(__name__)

# Image headers read for the size check and captions tokenized for the length check, evenly spaced over the data.
SIZE_SAMPLE = 512
CAPTION_SAMPLE = 10_000


def say(*notices: str | None) -> None:
    """Log each notice once per run: by the first process only."""
    if rank_zero_only.rank == 0:
        for notice in notices:
            if notice:
                log.warning(notice)


def caption_notice(source: Any, indices: Sequence[int], conditioning: str) -> str | None:
    """Text conditioning on a source none of whose training items has a caption: it trains unconditionally."""
    if conditioning != "text" or not indices or any(source.items[i].caption for i in indices):
        return None
    return (f"none of the {len(indices)} training images of {source.describe()} has a caption (no metadata.jsonl/.csv "
            "text, no <image>.txt, no class sub-folders): training unconditionally, every prompt is the null prompt "
            "\"\" (set data.conditioning=none to say so, or add captions)")


def length_notice(source: Any, tokenizer: Any, sample: int = CAPTION_SAMPLE) -> str | None:
    """Captions the text encoder truncates: counted with the model's tokenizer (BOS/EOS included)."""
    captions = [item.caption for item in getattr(source, "items", ()) if item.caption]  # streamed shards: no list
    limit = getattr(tokenizer, "model_max_length", None)
    if not captions or not isinstance(limit, int) or limit > 100_000:
        return None
    captions = captions[::max(1, len(captions) // sample)]
    lengths = token_counts(tokenizer, captions)
    long = sum(n > limit for n in lengths)
    if not long:
        return None
    return (f"{long} of {len(captions)} captions of {source.describe()} are longer than the tokenizer's limit of {limit} "
            f"tokens (longest {max(lengths)}): the text encoder reads only the first {limit}, so put what matters first "
            "or shorten them (sdl-data inspect lists them as caption_too_long)")


def size_notice(source: Any, indices: Sequence[int], resolution: int, sample: int = SIZE_SAMPLE) -> str | None:
    """Images whose shorter side is below ``resolution``: the resize upscales (blurs) them."""
    if not indices or not hasattr(source, "root"):  # generated sources (digits) are rendered at the resolution
        return None
    step = max(1, len(indices) // sample)
    checked = [source.image_size(i) for i in indices[::step]]
    small = [size for size in checked if min(size) < resolution and size != (1, 1)]  # (1, 1): unreadable, skipped later
    if not small:
        return None
    smallest = min(small, key=min)
    share = f"{len(small)} of {len(checked)}" + (" checked" if step > 1 else "")
    return (f"{share} training images of {source.describe()} have a shorter side below data.resolution={resolution} "
            f"(smallest {smallest[0]}x{smallest[1]}): they will be upscaled, which blurs them; lower data.resolution or "
            "use larger images")
