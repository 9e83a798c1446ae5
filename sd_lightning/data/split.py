"""Deterministic train/validation split by a stable hash of each item's id.

Hashing ids (not shuffling indices) means adding or removing files never moves an existing item from
one split to the other, and the split is the same on every process and every run.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence


def split_fraction(item_id: str, salt: str = "") -> float:
    """A number in [0, 1) fixed by the id (and salt), uniformly spread."""
    digest = hashlib.sha256(f"{salt}:{item_id}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def is_validation(item_id: str, val_fraction: float, salt: str = "") -> bool:
    return split_fraction(item_id, salt) < val_fraction


def split_indices(ids: Sequence[str], val_fraction: float, salt: str = "") -> tuple[list[int], list[int]]:
    """Indices of the train and validation items, each in source order."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"data.val_fraction must be in [0, 1), got {val_fraction}")
    train, val = [], []
    for index, item_id in enumerate(ids):
        (val if is_validation(item_id, val_fraction, salt) else train).append(index)
    return train, val


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from arbitrary parts (e.g. seed, sample id), independent of PYTHONHASHSEED."""
    digest = hashlib.sha256("\x1f".join(map(str, parts)).encode()).digest()
    return int.from_bytes(digest[:8], "big") & (2**63 - 1)
