"""Folder writes that never leave a half-written result where a reader looks."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def staged_folder(out: Path) -> Iterator[Path]:
    """Yield an empty ``<out>.partial`` to write into; it replaces ``out`` only once the block has finished, so a
    failure leaves ``out`` as it was (the stale ``.partial`` is cleared by the next attempt)."""
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    yield tmp
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
