"""Image-folder metadata and caption rules, in one place: the source trains by them, inspection reports by them.

Captions come, in this order, from ``metadata.jsonl``/``metadata.csv`` (``file_name`` + ``text``, the Hugging
Face imagefolder convention), a sidecar ``<image>.txt``, or the class sub-folder name through a template.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

METADATA_FILES = ("metadata.jsonl", "metadata.csv")


class MetadataError(ValueError):
    """A metadata file that cannot be read; the message names the file (and line)."""


def read_metadata(root: Path) -> tuple[Path | None, dict[str, Any]]:
    """(metadata file or None, file_name → raw ``text``); ``text`` stays raw (None when absent) so that missing
    and empty captions differ. ``metadata.jsonl`` wins over ``metadata.csv``."""
    jsonl, csv_path = root / METADATA_FILES[0], root / METADATA_FILES[1]
    if jsonl.exists():
        source = jsonl
        try:
            lines = jsonl.read_text(encoding="utf-8").splitlines()
        except UnicodeDecodeError as err:
            raise MetadataError(f"{jsonl} is not UTF-8 ({err})") from err
        rows = []
        for line_no, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise MetadataError(f"{jsonl}:{line_no}: not valid JSON ({err.msg})") from err
            if not isinstance(row, dict):
                raise MetadataError(f"{jsonl}:{line_no}: expected a JSON object with 'file_name' and 'text'")
            rows.append(row)
    elif csv_path.exists():
        source = csv_path
        try:
            with csv_path.open(encoding="utf-8", newline="") as handle:
                rows = list(csv.DictReader(handle))
        except UnicodeDecodeError as err:
            raise MetadataError(f"{csv_path} is not UTF-8 ({err})") from err
    else:
        return None, {}
    texts: dict[str, Any] = {}
    for number, row in enumerate(rows, start=1):
        if "file_name" not in row:
            raise MetadataError(f"{source}: row {number} has no 'file_name' field (columns: {sorted(row)})")
        texts[str(row["file_name"])] = row.get("text")
    return source, texts


@dataclass
class Caption:
    """An item's caption (None = unlabeled), where it came from, and why a source that was there gave none."""

    text: str | None
    source: str | None = None  # metadata | sidecar | class_folder
    why: str | None = None  # empty_caption | non_utf8_caption


def sidecar_caption(image: Path) -> Caption:
    sidecar = image.with_suffix(".txt")
    if not sidecar.is_file():
        return Caption(None)
    try:
        text = sidecar.read_text(encoding="utf-8").strip()
    except UnicodeDecodeError:
        return Caption(None, why="non_utf8_caption")
    return Caption(text, "sidecar") if text else Caption(None, why="empty_caption")


def class_name(relative: str) -> str | None:
    parent = Path(relative).parent
    return parent.name.replace("_", " ") if parent != Path(".") else None


def caption_of(image: Path, relative: str, metadata: Mapping[str, Any] | None, template: str | None) -> Caption:
    """The caption training uses for ``relative`` (its file is ``image``): metadata → sidecar → class folder."""
    why = None
    if metadata is not None:
        raw = metadata.get(relative)
        if raw is not None and str(raw).strip() != "":
            return Caption(str(raw), "metadata")
        if raw is not None:
            why = "empty_caption"
    sidecar = sidecar_caption(image)
    if sidecar.text is not None:
        return sidecar
    why = sidecar.why or why
    name = class_name(relative)
    if template and name is not None:
        return Caption(template.format(class_name=name), "class_folder", why)
    return Caption(None, None, why)


def token_counts(tokenizer: Any, captions: list[str]) -> list[int]:
    """Each caption's length in the text encoder's tokens, BOS/EOS included (what ``model_max_length`` bounds)."""
    return [len(ids) for ids in tokenizer(captions, truncation=False, verbose=False)["input_ids"]]
