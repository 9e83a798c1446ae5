"""Aspect-ratio buckets (as kohya sd-scripts and SDXL): train on non-square images without cropping them square.

Buckets have about the same pixel area (``resolution``²), sides that are multiples of ``multiple`` (the VAE's
downsampling times the UNet's 2^(levels-1), so every latent level has whole sizes) and aspect ratios up to
``max_aspect``. Each image goes to the bucket of closest aspect ratio, is resized to cover it and cropped to
it; every batch comes from one bucket, so the tensors of a batch share a shape.
"""

from __future__ import annotations

import logging
import math
from collections import Counter
from collections.abc import Sequence

import torch
from torch.utils.data import Dataset

from sd_lightning.data.samplers import ResumableShuffleSampler
from sd_lightning.data.split import stable_seed

log = logging.getLogger(__name__)


class AspectRatioBuckets:
    """The bucket sizes (width, height) for a resolution, and the assignment of images to them."""

    def __init__(self, resolution: int, multiple: int = 8, max_aspect: float = 2.0) -> None:
        if multiple < 1:
            raise ValueError(f"data.buckets.multiple={multiple} must be >= 1")
        if max_aspect < 1.0:
            raise ValueError(f"data.buckets.max_aspect={max_aspect} must be >= 1 (it is long side / short side)")
        if resolution < multiple:
            raise ValueError(f"data.resolution={resolution} is smaller than data.buckets.multiple={multiple}")
        self.resolution = resolution
        self.multiple = multiple
        self.max_aspect = max_aspect
        area = resolution * resolution
        sizes = set()
        for width in range(multiple, area // multiple + 1, multiple):
            height = area // width // multiple * multiple  # the largest height within the area
            if height >= multiple and max(width, height) / min(width, height) <= max_aspect:
                sizes.add((width, height))
        self.sizes: list[tuple[int, int]] = sorted(sizes, key=lambda s: s[0] / s[1])
        self._log_ratios = torch.tensor([math.log(w / h) for w, h in self.sizes])

    def __len__(self) -> int:
        return len(self.sizes)

    def assign(self, image_size: tuple[int, int]) -> int:
        """Index of the bucket whose aspect ratio is closest (in log ratio) to the image's."""
        width, height = image_size
        return int(torch.argmin((self._log_ratios - math.log(max(width, 1) / max(height, 1))).abs()))

    def describe(self, bucket_ids: Sequence[int]) -> str:
        """'24x40: 12, 32x32: 900, …' for the log (empty buckets left out)."""
        counts = Counter(bucket_ids)
        return ", ".join(f"{w}x{h}: {counts[i]}" for i, (w, h) in enumerate(self.sizes) if counts[i])

    def __repr__(self) -> str:
        return f"AspectRatioBuckets(resolution={self.resolution}, multiple={self.multiple}, max_aspect={self.max_aspect})"


class BucketSampler(ResumableShuffleSampler):
    """Indices in whole single-bucket batches: a ``BatchSampler`` of ``batch_size`` over it never mixes buckets.

    Each epoch, every bucket's members are shuffled and cut into full batches (a bucket's remainder waits for
    another epoch's draw), the batches are shuffled together by (seed, epoch), and rank r of W takes every
    W-th batch of the first ``W * (batches // W)``: distinct batches, the same count on every rank. Being a
    ``DistributedSampler`` with the (epoch, position) state of ``ResumableShuffleSampler``, Lightning keeps it
    under DDP and a ``StatefulDataLoader`` resumes it mid-epoch.
    """

    def __init__(self, dataset: Dataset, bucket_ids: Sequence[int], batch_size: int, seed: int = 0,
                 num_replicas: int | None = None, rank: int | None = None, stamp_epoch: bool = False) -> None:
        super().__init__(dataset, seed=seed, num_replicas=num_replicas, rank=rank, stamp_epoch=stamp_epoch)
        if len(bucket_ids) != self.size:
            raise ValueError(f"{len(bucket_ids)} bucket ids for {self.size} samples")
        if batch_size < 1:
            raise ValueError(f"data.batch_size must be >= 1, got {batch_size}")
        self.batch_size = batch_size
        self.members: dict[int, list[int]] = {}
        for position, bucket in enumerate(bucket_ids):
            self.members.setdefault(int(bucket), []).append(position)
        total_batches = sum(len(m) // batch_size for m in self.members.values())
        self.batches_per_rank = total_batches // self.num_replicas
        if self.batches_per_rank == 0:
            raise ValueError(
                f"no bucket holds data.batch_size={batch_size} images for each of {self.num_replicas} processes "
                f"(bucket sizes: {sorted(len(m) for m in self.members.values())}); lower data.batch_size"
            )

    def __len__(self) -> int:
        return self.batches_per_rank * self.batch_size

    def batches(self) -> list[list[int]]:
        """This rank's batches of the current epoch, in order."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "buckets", self.epoch))
        batches: list[list[int]] = []
        for bucket in sorted(self.members):
            members = torch.tensor(self.members[bucket])
            shuffled = members[torch.randperm(len(members), generator=generator)].tolist()
            full = len(shuffled) // self.batch_size * self.batch_size
            batches.extend(shuffled[i : i + self.batch_size] for i in range(0, full, self.batch_size))
        order = torch.randperm(len(batches), generator=generator).tolist()
        end = self.batches_per_rank * self.num_replicas
        return [batches[i] for i in order[self.rank : end : self.num_replicas]]

    def rank_order(self) -> list[int]:
        return [index for batch in self.batches() for index in batch]
