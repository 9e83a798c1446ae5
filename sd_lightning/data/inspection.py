"""Scan an image folder the way training will read it and name every problem with a reason code.

The scanner mirrors ``ImageFolderSource`` exactly (which files become items, their ids and where each
caption comes from), so the report describes what training sees and its ids are the ones ``data.exclude``
matches. Every image is fully decoded: a header-only check lets truncated files through. Files are only
read, paths that escape the root are never opened.
"""

from __future__ import annotations

import hashlib
import io
import os
import re
import statistics
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ProcessPoolExecutor
from contextlib import contextmanager
from dataclasses import asdict
from functools import partial
from pathlib import Path
from typing import Any

import imagehash
import numpy as np
from PIL import Image, UnidentifiedImageError

from sd_lightning.data.captions import MetadataError, caption_of, read_metadata, token_counts
from sd_lightning.data.report import (
    FileRecord,
    InspectionReport,
    InspectSettings,
    Problem,
    Reason,
    Severity,
)
from sd_lightning.data.sources import DataRootError, is_mask_file, resolve_inside

# Leading bytes of formats PIL reads: a file starting with one of these is a damaged image, not "not an image".
_MAGIC = (b"\x89PNG", b"\xff\xd8", b"GIF8", b"BM", b"II*\x00", b"MM\x00*", b"RIFF")


# What ``convert("RGB")`` (ImageFolderSource.load_image) does to modes other than RGB and L.
MODE_NOTES = {
    "CMYK": "CMYK converted to RGB without a color profile: colors may shift",
    "P": "palette image expanded to RGB",
    "PA": "palette image with alpha: the alpha channel is dropped",
    "RGBA": "alpha channel dropped: transparent pixels show their stored color (often black)",
    "RGBa": "alpha channel dropped",
    "LA": "grayscale with alpha: the alpha channel is dropped",
    "La": "grayscale with alpha: the alpha channel is dropped",
    "1": "1-bit black and white",
    "I;16": "16-bit: convert('RGB') clips values above 255 (most pixels turn white); rescale to 8-bit",
    "I;16B": "16-bit: convert('RGB') clips values above 255; rescale to 8-bit",
    "I;16L": "16-bit: convert('RGB') clips values above 255; rescale to 8-bit",
    "I": "32-bit integer: convert('RGB') clips values above 255; rescale to 8-bit",
    "F": "32-bit float: convert('RGB') clips values to 0..255; rescale to 8-bit",
}
PLAIN_MODES = frozenset({"RGB", "L"})
# Folders smaller than this are scanned in-process (a pool's start-up would cost more than it saves).
PARALLEL_MIN_FILES = 64
PARALLEL_CHUNK = 64
# Near-duplicate search: this many pairwise distances at once (32 MiB of uint64), whatever the folder's size.
NEAR_DUPLICATE_CELLS = 1 << 22


@contextmanager
def pixel_limit(max_pixels: int) -> Iterator[None]:
    """PIL's decompression-bomb limit set to ``max_pixels`` (its warning raised) only inside the block."""
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = max_pixels
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "Corrupt EXIF data": the pixels still decode
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode(data: bytes) -> tuple[Image.Image | None, Reason | None, str]:
    """Fully decode ``data`` (call inside ``pixel_limit``): ``(image, None, "")`` or ``(None, reason, detail)``."""
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return image, None, ""
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        pixels = re.search(r"\((\d+) pixels\)", str(err))
        count = f"{int(pixels.group(1)):,} pixels" if pixels else "more pixels"
        return None, Reason.DECOMPRESSION_BOMB, f"{count} > inspect.max_pixels={Image.MAX_IMAGE_PIXELS:,}: not decoded"
    except UnidentifiedImageError:
        if data.startswith(_MAGIC):
            return None, Reason.UNREADABLE, "starts like an image but PIL cannot parse its header"
        return None, Reason.NOT_AN_IMAGE, f"not an image format PIL reads (starts with {data[:8]!r})"
    except Exception as err:  # PIL raises many types on malformed data (OSError, SyntaxError, struct.error…)
        reason = Reason.TRUNCATED if "truncated" in str(err).lower() else Reason.UNREADABLE
        return None, reason, f"{type(err).__name__}: {err}"


def _metadata_rows(root: Path) -> tuple[Path | None, dict[str, Any]]:
    """The metadata rows exactly as ImageFolderSource reads them (``captions.read_metadata``)."""
    try:
        return read_metadata(root)
    except MetadataError as err:
        raise DataRootError(f"{err}; training cannot read it either") from err


def _walk(root: Path) -> tuple[list[str], list[str]]:
    """Relative posix paths of regular files and of symlinks (files or folders) under ``root``, sorted; symlinked
    folders are not entered (``os.walk(followlinks=False)``'s rule; ``scandir`` entries answer without a stat each)."""
    files, links = [], []
    pending = [(str(root), "")]
    while pending:
        folder, prefix = pending.pop()
        try:
            entries = list(os.scandir(folder))
        except OSError:  # unreadable folder: skipped, as os.walk does
            continue
        for entry in entries:
            relative = prefix + entry.name
            if entry.is_symlink():
                links.append(relative)
            elif entry.is_dir(follow_symlinks=False):
                pending.append((entry.path, relative + "/"))
            elif entry.is_file(follow_symlinks=False):
                files.append(relative)
    return sorted(files), sorted(links)


def _token_stats(counts: Sequence[int], limit: int) -> dict[str, float]:
    if not counts:
        return {"count": 0}
    ordered = sorted(counts)
    return {"count": len(ordered), "min": ordered[0], "max": ordered[-1], "mean": round(statistics.fmean(ordered), 2),
            "median": statistics.median(ordered), "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "over_limit": sum(c > limit for c in ordered)}


def _near_duplicates(records: Sequence[FileRecord], distance: int) -> list[tuple[FileRecord, FileRecord, int]]:
    """(later, first, distance) for each image within ``distance`` bits of an earlier one in sorted order."""
    if len(records) < 2:
        return []
    hashes = np.array([int(r.phash, 16) for r in records], dtype=np.uint64)
    found = []
    # Blocks of rows against every earlier column: the pairwise distances of a block in one array operation.
    block = max(1, NEAR_DUPLICATE_CELLS // len(records))
    for start in range(1, len(records), block):
        rows = np.arange(start, min(start + block, len(records)))
        distances = np.bitwise_count(hashes[rows, None] ^ hashes[None, : rows[-1]])
        close = (distances <= distance) & (np.arange(rows[-1]) < rows[:, None])  # earlier images only
        firsts = close.argmax(axis=1)
        for row in np.flatnonzero(close[np.arange(len(rows)), firsts]):
            first = int(firsts[row])
            found.append((records[int(rows[row])], records[first], int(distances[row, first])))
    return found


def scan_folder(root: str | Path, settings: InspectSettings, tokenizer: Callable[..., Any],
                progress: Callable[[int, int], None] | None = None, workers: int | None = None) -> InspectionReport:
    """Scan ``root`` as ``ImageFolderSource(root, settings.caption_template, settings.extensions)`` reads it.

    Images are decoded, hashed and phashed by ``workers`` processes (None: every core this process may use); the
    report is the same for any number of workers.

    ``tokenizer`` is the model's (a Hugging Face tokenizer: captions longer than its ``model_max_length``,
    BOS/EOS included, would be silently truncated).
    """
    root = Path(root).expanduser().resolve()
    if not root.is_dir():
        raise DataRootError(f"data.root={root} is not a folder")
    extensions = {e.lower() if e.startswith(".") else f".{e.lower()}" for e in settings.extensions}
    metadata_file, texts = _metadata_rows(root)
    files, links = _walk(root)
    masks = [f for f in files if is_mask_file(f)]  # loss masks beside images: not training items, not flagged
    files = [f for f in files if not is_mask_file(f)]
    problems: list[Problem] = []

    seen: set[tuple[str, Reason]] = set()

    def report(file: str, reason: Reason, detail: str) -> None:
        if (file, reason) not in seen:  # e.g. a symlink that is also named by a metadata row
            seen.add((file, reason))
            problems.append(Problem(file, reason, settings.severity_of(reason), detail))

    # Training items and the files they read, exactly as ImageFolderSource lists them.
    targets: dict[str, Path] = {}
    if metadata_file is not None:
        for name in texts:
            try:
                path = resolve_inside(root, name)
            except DataRootError:
                report(name, Reason.PATH_ESCAPES_ROOT,
                       f"metadata row {name!r} points outside the data root; never opened")
                continue
            if path.is_file():
                targets[name] = path
            else:
                report(name, Reason.METADATA_MISSING_FILE,
                       f"{metadata_file.name} names {name!r}, which does not exist (or is not a file)")
        training_ids = list(texts)
        listed = set(targets.values())
        unlisted = [f for f in files if Path(f).suffix.lower() in extensions and (root / f) not in listed]
        for name in unlisted:
            report(name, Reason.NO_METADATA_ROW, f"no row in {metadata_file.name}: training does not use this image")
    else:
        targets = {f: root / f for f in files if Path(f).suffix.lower() in extensions}
        training_ids, unlisted = list(targets), []
    for link in links:
        target = (root / link).resolve()
        if not target.is_relative_to(root):
            report(link, Reason.PATH_ESCAPES_ROOT, "symlink pointing outside the data root; never opened")

    records: list[FileRecord] = []
    scan = [(name, path, True) for name, path in targets.items()] + [(n, root / n, False) for n in unlisted]
    scan.sort(key=lambda entry: entry[0])
    for done, (record, found) in enumerate(_inspect_all(scan, settings, workers)):
        if progress is not None:
            progress(done, len(scan))
        for problem in found:
            report(*problem)
        records.append(record)

    token_counts = _captions(root, metadata_file, texts, records, settings, tokenizer, report)
    _duplicates([r for r in records if r.in_training], settings, report)

    order = {reason: index for index, reason in enumerate(Reason)}
    problems.sort(key=lambda p: (p.file, order[p.reason]))
    limit = int(tokenizer.model_max_length)
    counts = {
        "files": len(files) + len(masks) + len(links), "symlinks": len(links), "mask_files": len(masks),
        "image_files": sum(
            Path(f).suffix.lower() in extensions for f in files),
        "training_items": len(training_ids),
        "decoded": sum(r.width is not None for r in records),
        "captioned": sum(r.caption is not None for r in records if r.in_training),
        "files_with_errors": len({p.file for p in problems if p.severity is Severity.ERROR}),
        "files_with_warnings": len({p.file for p in problems if p.severity is Severity.WARNING}),
    }
    report_settings = {**asdict(settings), "extensions": sorted(extensions), "severity": {
        reason.value: settings.severity_of(reason).value for reason in Reason}}
    result = InspectionReport(root=str(root), settings=report_settings,
                              metadata_file=None if metadata_file is None else metadata_file.name, counts=counts,
                              files=records, problems=problems, caption_tokens=_token_stats(token_counts, limit),
                              token_limit=limit, training_ids=training_ids)
    result.counts["excluded"] = len(result.excluded())
    return result


def available_cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _inspect_entry(entry: tuple[str, Path, bool], settings: InspectSettings) -> tuple[FileRecord, list[tuple]]:
    """One file's record and problems; runs in a worker process, so it sets the pixel limit itself."""
    name, path, in_training = entry
    found: list[tuple] = []
    with pixel_limit(settings.max_pixels):
        record = _inspect_image(name, path, in_training, settings, lambda *problem: found.append(problem))
    return record, found


def _inspect_all(scan: Sequence[tuple[str, Path, bool]], settings: InspectSettings,
                 workers: int | None) -> Iterator[tuple[FileRecord, list[tuple]]]:
    """Every file's (record, problems) in ``scan`` order; a process pool for folders worth its start-up."""
    workers = available_cores() if workers is None else max(1, int(workers))
    if workers == 1 or len(scan) < PARALLEL_MIN_FILES:
        yield from (_inspect_entry(entry, settings) for entry in scan)
        return
    import scipy.fftpack  # noqa: F401  (imagehash.phash imports it on first use: once here, not in every worker)

    with ProcessPoolExecutor(max_workers=min(workers, len(scan))) as pool:
        yield from pool.map(partial(_inspect_entry, settings=settings), scan, chunksize=PARALLEL_CHUNK)


def _inspect_image(name: str, path: Path, in_training: bool, settings: InspectSettings,
                   report: Callable[[str, Reason, str], None]) -> FileRecord:
    data = path.read_bytes()
    record = FileRecord(id=name, in_training=in_training, bytes=len(data), sha256=hashlib.sha256(data).hexdigest())
    if not data:
        report(name, Reason.ZERO_BYTE, "empty file (0 bytes)")
        return record
    image, reason, detail = decode(data)
    if image is None:
        report(name, reason, detail)
        return record
    record.width, record.height = image.size
    record.mode, record.format = image.mode, image.format
    if image.mode not in PLAIN_MODES:
        note = MODE_NOTES.get(image.mode, "converted to RGB")
        if image.mode == "P" and "transparency" in image.info:
            note = "palette image with transparency: expanded to RGB, transparency dropped"
        report(name, Reason.UNUSUAL_MODE, f"mode {image.mode}: {note}")
    shorter, longer = min(image.size), max(image.size)
    if shorter < settings.resolution:
        report(name, Reason.TOO_SMALL, f"{image.width}x{image.height}: shorter side {shorter} < data.resolution="
                                       f"{settings.resolution} (would be upscaled)")
    if shorter > 0 and longer / shorter > settings.max_aspect:
        report(name, Reason.EXTREME_ASPECT, f"{image.width}x{image.height}: aspect {longer / shorter:.2f} > "
                                            f"inspect.max_aspect={settings.max_aspect} (a center crop keeps "
                                            f"{100 * shorter / longer:.0f}%)")
    record.phash = str(imagehash.phash(image.convert("RGB")))
    return record


def _captions(root: Path, metadata_file: Path | None, texts: Mapping[str, Any], records: Sequence[FileRecord],
              settings: InspectSettings, tokenizer: Callable[..., Any],
              report: Callable[[str, Reason, str], None]) -> list[int]:
    """Each training item's caption by ImageFolderSource's rules (metadata → sidecar → class folder).

    Caption problems are reported for decodable images only: the others are excluded for a worse reason.
    """
    for record in records:
        if not record.in_training:
            continue
        caption = caption_of(resolve_inside(root, record.id), record.id, texts if metadata_file else None,
                             settings.caption_template)
        record.caption, record.caption_source = caption.text, caption.source
        why = None if caption.why is None else Reason(caption.why)
        if record.caption is None and record.width is not None and settings.check_captions:
            # (undecodable files are excluded for a worse reason)
            if why is Reason.NON_UTF8_CAPTION:
                report(record.id, why, f"{Path(record.id).with_suffix('.txt').as_posix()} is not UTF-8: "
                                       "training treats the image as unlabeled")
            elif why is Reason.EMPTY_CAPTION:
                report(record.id, why, "the caption is empty: training uses the null (unconditional) prompt")
            else:
                report(record.id, Reason.MISSING_CAPTION, "no metadata text, sidecar .txt or class folder: "
                                                          "training uses the null (unconditional) prompt")
    captioned = [r for r in records if r.caption is not None]
    if not captioned:
        return []
    counts = token_counts(tokenizer, [r.caption for r in captioned])
    limit = int(tokenizer.model_max_length)
    for record, count in zip(captioned, counts, strict=True):
        record.caption_tokens = count
        if count > limit and record.width is not None and settings.check_captions:
            report(record.id, Reason.CAPTION_TOO_LONG, f"{count} tokens (with BOS/EOS) > the tokenizer's {limit}: "
                                                       "the end would be silently truncated")
    return [r.caption_tokens for r in captioned]


def _duplicates(records: Sequence[FileRecord], settings: InspectSettings,
                report: Callable[[str, Reason, str], None]) -> None:
    """Exact (sha256) and near (phash) duplicates among decodable training images; the first id is kept."""
    decoded = sorted((r for r in records if r.phash is not None), key=lambda r: r.id)
    first_by_hash: dict[str, str] = {}
    unique = []
    for record in decoded:
        first = first_by_hash.setdefault(record.sha256, record.id)
        if first != record.id:
            report(record.id, Reason.EXACT_DUPLICATE, f"same bytes (sha256) as {first}, which is kept")
        else:
            unique.append(record)
    for later, first, distance in _near_duplicates(unique, settings.near_duplicate_distance):
        report(later.id, Reason.NEAR_DUPLICATE, f"looks like {first} (phash distance {distance} <= "
                                                f"inspect.near_duplicate_distance={settings.near_duplicate_distance})")
