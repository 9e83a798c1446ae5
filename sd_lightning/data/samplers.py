"""Samplers: resumable seeded shuffling (also the DDP sampler) and exact validation sharding."""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch.utils.data import Dataset, DistributedSampler

from sd_lightning.data.split import stable_seed


class ResumableShuffleSampler(DistributedSampler):
    """Shuffles with a permutation seeded by (seed, epoch) and remembers its position in it.

    The state (epoch, position) is all a resumed run needs: unlike a sampler drawing from a chained
    generator, the next epochs' orders do not depend on how the current one was reached. Lightning
    calls ``set_epoch`` at each epoch start; across processes, each rank takes every world-th index of the
    same permutation (equal shares, remainder dropped), so it is also the DDP sampler.
    """

    def __init__(self, dataset: Dataset, seed: int = 0, num_replicas: int | None = None, rank: int | None = None,
                 stamp_epoch: bool = False) -> None:
        """``stamp_epoch``: yield ``(index, epoch)`` pairs, so that the epoch reaches datasets in loader workers that
        live across epochs (``persistent_workers``); the datasets of ``datasets.py`` and ``cache.py`` take both forms."""
        self.stamp_epoch = stamp_epoch
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        num_replicas = num_replicas or (torch.distributed.get_world_size() if distributed else 1)
        rank = rank if rank is not None else (torch.distributed.get_rank() if distributed else 0)
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.size = len(dataset)
        self.position = 0

    def __len__(self) -> int:
        return self.size // self.num_replicas

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.position = epoch, 0

    def rank_order(self) -> list[int]:
        """This rank's indices for the current epoch (subclasses change the order, not the resume logic)."""
        generator = torch.Generator().manual_seed(stable_seed(self.seed, "shuffle", self.epoch))
        return torch.randperm(self.size, generator=generator)[self.rank : len(self) * self.num_replicas : self.num_replicas].tolist()

    def __iter__(self) -> Iterator[int | tuple[int, int]]:
        epoch = self.epoch
        for index in self.rank_order()[self.position :]:
            self.position += 1
            yield (index, epoch) if self.stamp_epoch else index
        self.epoch, self.position = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "position": self.position}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.position = int(state_dict["epoch"]), int(state_dict["position"])


def unstamp(position: int | tuple[int, int], epoch: int) -> tuple[int, int]:
    """``(position, epoch)`` of a dataset index from a sampler with or without ``stamp_epoch``."""
    return position if isinstance(position, tuple) else (position, epoch)


class ShardedEvalSampler(DistributedSampler):
    """Every validation sample on exactly one process, none repeated (DistributedSampler pads)."""

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        self.indices_for_rank = list(range(rank, len(dataset), num_replicas))
        self.num_samples = len(self.indices_for_rank)

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices_for_rank)

    def __len__(self) -> int:
        return self.num_samples
