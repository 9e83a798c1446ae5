"""WebDataset shards: write an image source to ``.tar`` shards and stream them back for training.

For data sets larger than one disk folder. Layout written by :func:`write_shards` (``sdl-data shard``)::

    out/{prefix}-000000.tar   # N samples: <key>.<jpg|png|webp> (source bytes) + .txt caption + .json {"label"}
    out/{prefix}-index.json   # per-shard sample ids and counts

A sample's key is its source id, percent-encoded so it holds no ``.`` or ``/`` (webdataset splits member names
at the first dot). Shards made by other tools are read too (keys become ids): without an index the tar headers
are scanned once at setup.

Reading (:class:`ShardStream`): each epoch the shard order is shuffled with (seed, epoch); the training samples
form one virtual stream that is cut into equal contiguous ranges, one per (rank, dataloader worker) "slot", so
each sample is read exactly once per epoch across all ranks x workers and every rank yields the same number of
batches (DDP needs that). Up to ``slots x batch`` samples are left out per epoch (a different tail each epoch).
Fewer shards than slots still works: slots then share a shard and each skips the members outside its range, so
coverage stays exact but those shards are read by several workers. Each slot shuffles through a buffer seeded by
(seed, epoch, slot); the slot's position (epoch + samples consumed) is its state, which torchdata's
``StatefulDataLoader`` saves per worker in the checkpoint, and the epoch travels in the datamodule's state, so a
resumed run continues with the next samples of the interrupted epoch (skipping, without decoding, the ones seen).

Validation is a stable hash of each sample id (``data.val_fraction``/``data.split_salt``, see ``split.py``): the
same items as the image folder the shards were written from. Validation reads all shards, skipping training
members.

Only images (jpg/jpeg/png/webp, decoded by PIL restricted to those formats) and text (txt, json as UTF-8) are
decoded here; any other member (notably webdataset's pickled ``.pyd``/``.pickle``) is refused with an error.
"""

from __future__ import annotations

import io
import json
import logging
import os
import random
import shutil
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import quote, unquote

import torch
import webdataset as wds
from PIL import Image, UnidentifiedImageError
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from torchdata.stateful_dataloader import StatefulDataLoader
from webdataset.tariterators import base_plus_ext

from sd_lightning.data.datamodule import DiffusionDataModule, read_exclusions
from sd_lightning.data.sources import DataRootError, ImageSource, SourceItem, UnreadableImageError
from sd_lightning.data.split import stable_seed
from sd_lightning.data.transforms import CaptionTransform, ImageTransform

log = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
TEXT_EXTENSIONS = ("txt", "json")
PIL_FORMATS = ("JPEG", "PNG", "WEBP")
INDEX_FORMAT = "sd_lightning.shards/1"


class ShardFormatError(DataRootError):
    """A shard set that cannot be read safely or does not match its index."""


def encode_key(item_id: str) -> str:
    """A webdataset key for ``item_id``: reversible, without ``.`` or ``/`` (and not starting with ``_``)."""
    key = quote(item_id, safe="").replace(".", "%2E")
    return "%5F" + key[1:] if key.startswith("_") else key


def decode_key(key: str) -> str:
    return unquote(key)


def index_path(root: Path, prefix: str) -> Path:
    return root / f"{prefix}-index.json"


def check_member_extensions(sample: dict[str, Any], where: str) -> None:
    """Refuse anything but images and text before any decoding (pickled members are never touched)."""
    for extension in sample:
        if extension.startswith("__"):
            continue
        if extension not in IMAGE_EXTENSIONS and extension not in TEXT_EXTENSIONS:
            raise ShardFormatError(
                f"{where}: sample {sample.get('__key__')!r} has a member with extension .{extension}; only images "
                f"({', '.join(IMAGE_EXTENSIONS)}) and text ({', '.join(TEXT_EXTENSIONS)}) are read. Refusing this "
                "shard (pickled formats such as .pyd/.pickle are never decoded); rewrite it with `sdl-data shard`."
            )


def decode_image(sample: dict[str, Any]) -> Image.Image:
    """The sample's image as RGB, decoded by PIL restricted to JPEG/PNG/WebP."""
    extension = next((e for e in IMAGE_EXTENSIONS if e in sample), None)
    if extension is None:
        raise UnreadableImageError(f"sample {sample.get('__key__')!r} has no image ({', '.join(IMAGE_EXTENSIONS)})")
    try:
        with Image.open(io.BytesIO(sample[extension]), formats=PIL_FORMATS) as image:
            image.load()
            return image.convert("RGB")
    except (OSError, UnidentifiedImageError, Image.DecompressionBombError, ValueError) as err:
        raise UnreadableImageError(f"{sample.get('__url__')}: {sample.get('__key__')}.{extension}: {err}") from err


def decode_caption(sample: dict[str, Any]) -> str | None:
    """``.txt`` as UTF-8, else the ``caption``/``text`` field of ``.json``; None = unlabeled."""
    try:
        if "txt" in sample:
            text = sample["txt"].decode("utf-8").strip()
            return text or None
        if "json" in sample:
            meta = json.loads(sample["json"].decode("utf-8"))
            text = meta.get("caption", meta.get("text")) if isinstance(meta, dict) else None
            return text.strip() or None if isinstance(text, str) else None
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        log.warning("caption of %s in %s is not UTF-8 text/JSON (%s); treating it as unlabeled",
                    sample.get("__key__"), sample.get("__url__"), err)
    return None


def decode_label(sample: dict[str, Any]) -> str | None:
    """The class name in ``.json`` (``label``), for ``data.conditioning=class``."""
    try:
        meta = json.loads(sample["json"].decode("utf-8")) if "json" in sample else None
    except (UnicodeDecodeError, json.JSONDecodeError):
        return None
    label = meta.get("label") if isinstance(meta, dict) else None
    return label if isinstance(label, str) and label else None


@dataclass(frozen=True)
class ShardInfo:
    """One shard file and the ids of its samples, in tar order."""

    path: Path
    ids: tuple[str, ...]


def scan_shard(path: Path) -> tuple[str, ...]:
    """Sample ids of a shard from its tar headers (no member data is read or decoded)."""
    keys: list[str] = []
    try:
        with tarfile.open(path, "r:*") as tar:
            for member in tar:
                if not member.isreg():
                    continue
                key, extension = base_plus_ext(member.name)
                if key is None:
                    continue
                check_member_extensions({"__key__": key, extension.lower(): b""}, str(path))
                if not keys or keys[-1] != key:
                    keys.append(key)
    except tarfile.TarError as err:
        raise ShardFormatError(f"{path}: not a readable tar file ({err})") from err
    return tuple(decode_key(k) for k in keys)


class WebDatasetSource(ImageSource):
    """A set of shards in ``root``: ``{prefix}-index.json`` if present, else ``{prefix}-*.tar`` scanned.

    ``items`` hold the ids in shard order (captions and labels live in the shards and are read while
    streaming, so they are None here); there is no random access to images.
    """

    def __init__(self, root: str | Path, prefix: str = "data") -> None:
        self.root = Path(root).expanduser().resolve()
        if not self.root.is_dir():
            raise DataRootError(f"data.root={root!s} is not a folder (resolved to {self.root})")
        self.prefix = prefix
        index = index_path(self.root, prefix)
        if index.is_file():
            self.shards = self._from_index(index)
        else:
            files = sorted(self.root.glob(f"{prefix}-*.tar"))
            if not files:
                raise DataRootError(f"no shards in data.root={self.root}: expected {index.name} or {prefix}-*.tar "
                                    "(write them with `sdl-data shard`)")
            log.info("%s has no %s: scanning %d shard headers", self.root, index.name, len(files))
            self.shards = [ShardInfo(path, scan_shard(path)) for path in files]
        self.items = [SourceItem(id=item_id, caption=None) for shard in self.shards for item_id in shard.ids]

    def _from_index(self, index: Path) -> list[ShardInfo]:
        try:
            data = json.loads(index.read_text(encoding="utf-8"))
            shards = []
            for entry in data["shards"]:
                path = self.root / entry["file"]
                if Path(entry["file"]).name != entry["file"]:
                    raise ShardFormatError(f"{index}: shard file {entry['file']!r} must be a name inside {self.root}")
                if not path.is_file():
                    raise ShardFormatError(f"{index} lists {entry['file']}, which is missing from {self.root}")
                if len(entry["ids"]) != entry["count"]:
                    raise ShardFormatError(f"{index}: {entry['file']} lists {len(entry['ids'])} ids, count {entry['count']}")
                shards.append(ShardInfo(path, tuple(entry["ids"])))
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise ShardFormatError(f"{index}: not a shard index written by `sdl-data shard` ({err!r})") from err
        return shards

    @property
    def ids(self) -> list[str]:
        return [item.id for item in self.items]

    def load_image(self, index: int) -> Image.Image:
        raise DataRootError(f"data=shards ({self.root}) is streamed and has no random access to images; use the "
                            "image folder the shards were written from for this command")

    def image_size(self, index: int) -> tuple[int, int]:
        return self.load_image(index).size

    def describe(self) -> str:
        return f"WebDatasetSource({self.root}, {len(self.shards)} shards, {len(self)} samples)"


class ShardStream(IterableDataset):
    """Preprocessed examples ``{pixel_values, prompt, id}`` streamed from the shards' members at ``indices``.

    ``indices`` index ``source.items`` (shard order), as ``DiffusionDataset``'s do. ``balanced`` (training)
    gives every slot the same count, a multiple of ``batch_size`` when ``drop_last``; otherwise (validation)
    the slots split the stream as evenly as possible and nothing is dropped. ``captions`` decides the prompt
    as in ``DiffusionDataset`` (None = the ``.txt`` caption).
    """

    def __init__(self, source: WebDatasetSource, indices: Sequence[int], transform: ImageTransform, seed: int = 0,
                 augment: bool = True, captions: CaptionTransform | None = None, shuffle: bool = True,
                 shuffle_buffer: int = 1000, balanced: bool = True, batch_size: int = 1, drop_last: bool = True) -> None:
        self.source = source
        self.indices = sorted(indices)
        self.shards = list(source.shards)
        self.selected: list[list[int]] = [[] for _ in self.shards]
        starts = [0]
        for shard in self.shards:
            starts.append(starts[-1] + len(shard.ids))
        shard = 0
        for index in self.indices:
            while index >= starts[shard + 1]:
                shard += 1
            self.selected[shard].append(index - starts[shard])
        self.captions = captions
        self.transform = transform
        self.seed = seed
        self.augment = augment
        self.shuffle = shuffle
        self.shuffle_buffer = shuffle_buffer
        self.balanced = balanced
        self.batch_size = batch_size
        self.drop_last = drop_last
        self.rank, self.world_size, self.num_workers = 0, 1, 0
        self.epoch, self.consumed = 0, 0

    @property
    def total(self) -> int:
        return sum(len(positions) for positions in self.selected)

    def configure(self, rank: int = 0, world_size: int = 1, num_workers: int = 0) -> ShardStream:
        """Set this process's rank and loader workers (slots = world_size x max(1, num_workers))."""
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} must be in [0, {world_size})")
        self.rank, self.world_size, self.num_workers = rank, world_size, num_workers
        return self

    @property
    def num_slots(self) -> int:
        return self.world_size * max(1, self.num_workers)

    def per_slot(self) -> int:
        """Samples each slot yields per epoch when balanced."""
        count = self.total // self.num_slots
        if self.drop_last and self.batch_size > 1:
            count -= count % min(self.batch_size, max(count, 1))
        return count

    def _slot_range(self, slot: int) -> tuple[int, int]:
        if self.balanced:
            return slot * self.per_slot(), (slot + 1) * self.per_slot()
        return slot * self.total // self.num_slots, (slot + 1) * self.total // self.num_slots

    def __len__(self) -> int:
        workers = max(1, self.num_workers)
        first = self.rank * workers
        return self._slot_range(first + workers - 1)[1] - self._slot_range(first)[0]

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.consumed = epoch, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "consumed": self.consumed}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        self.epoch, self.consumed = int(state_dict["epoch"]), int(state_dict["consumed"])

    def shard_order(self, epoch: int) -> list[int]:
        order = list(range(len(self.shards)))
        if self.shuffle:
            random.Random(stable_seed(self.seed, "shards", epoch)).shuffle(order)
        return order

    def slot_plan(self, epoch: int, slot: int) -> list[tuple[int, list[int]]]:
        """(shard, positions) this slot reads in ``epoch``: its contiguous range of the epoch's stream."""
        start, stop = self._slot_range(slot)
        plan, offset = [], 0
        for shard in self.shard_order(epoch):
            positions = self.selected[shard]
            low, high = max(start, offset), min(stop, offset + len(positions))
            if low < high:
                plan.append((shard, positions[low - offset : high - offset]))
            offset += len(positions)
        return plan

    def _read(self, shard: ShardInfo, positions: Sequence[int]) -> Iterator[dict[str, Any]]:
        """Raw samples (bytes) at ``positions`` of one shard, read with webdataset's tar iterator."""
        wanted, last = set(positions), positions[-1]
        samples = wds.tarfile_samples([{"url": str(shard.path)}])
        try:
            for position, sample in enumerate(samples):
                check_member_extensions(sample, str(shard.path))
                if position in wanted:
                    found = decode_key(sample["__key__"])
                    if position >= len(shard.ids) or found != shard.ids[position]:
                        raise ShardFormatError(f"{shard.path}: sample {position} is {found!r}, the index says "
                                               f"{shard.ids[position] if position < len(shard.ids) else 'nothing'!r}; "
                                               "the index is out of date (rewrite the shards)")
                    yield sample
                if position >= last:
                    return
        finally:
            samples.close()
        raise ShardFormatError(f"{shard.path} ends before sample {last}; the index is out of date (rewrite the shards)")

    def raw_samples(self, epoch: int, slot: int) -> Iterator[dict[str, Any]]:
        """This slot's raw samples for ``epoch``, in (buffer-)shuffled order."""
        stream: Iterable[dict[str, Any]] = (
            sample for shard, positions in self.slot_plan(epoch, slot) for sample in self._read(self.shards[shard], positions)
        )
        if self.shuffle and self.shuffle_buffer > 1:
            rng = random.Random(stable_seed(self.seed, "buffer", epoch, slot))
            stream = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(iter(stream))
        return iter(stream)

    def __iter__(self) -> Iterator[dict[str, Any] | None]:
        worker = get_worker_info()
        worker_id, workers = (0, 0) if worker is None else (worker.id, worker.num_workers)
        if workers != self.num_workers:
            raise RuntimeError(f"ShardStream was configured for {self.num_workers} workers but runs with {workers}; "
                               "call configure(rank, world_size, num_workers) with the loader's values")
        slot = self.rank * max(1, workers) + worker_id
        epoch, skip = self.epoch, self.consumed
        for position, sample in enumerate(self.raw_samples(epoch, slot)):
            if position < skip:
                continue
            self.consumed = position + 1
            yield self._example(sample, epoch)
        self.epoch, self.consumed = epoch + 1, 0

    def _example(self, sample: dict[str, Any], epoch: int) -> dict[str, Any] | None:
        item = SourceItem(id=decode_key(sample["__key__"]), caption=decode_caption(sample), label=decode_label(sample))
        try:
            image = decode_image(sample)
        except UnreadableImageError as err:
            log.warning("skipping unreadable image %s (%s)", item.id, err)
            return None
        rng = random.Random(stable_seed(self.seed, item.id, epoch)) if self.augment else None
        caption = item.caption
        if self.captions is not None:
            tag_rng = random.Random(stable_seed(self.seed, "tags", item.id, epoch)) if self.augment else None
            caption = self.captions(item, tag_rng)
        pixels, micro = self.transform.apply(image, rng)
        return {"pixel_values": pixels, "micro_conditioning": micro, "prompt": caption or "", "id": item.id}


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


class ShardDataModule(DiffusionDataModule):
    """DiffusionDataModule over WebDataset shards: same split, preprocessing and batches, streamed.

    ``shuffle_buffer`` samples (kept as bytes) are shuffled per slot on top of the per-epoch shard order.
    """

    def __init__(self, source: WebDatasetSource, shuffle_buffer: int = 1000, **kwargs: Any) -> None:
        """Arguments as ``DiffusionDataModule``'s; aspect-ratio buckets and latent caches need random access,
        which shards do not have."""
        for key in ("buckets", "cache"):
            if kwargs.get(key) is not None:
                raise ValueError(f"data.{key} is not supported with data=shards (streamed, no random access); "
                                 f"remove it or train from the image folder")
        if kwargs.get("masks") == "alpha":
            raise ValueError("data.masks=alpha is not supported with data=shards; set data.masks=none or train from "
                             "the image folder")
        if kwargs.get("labeled_oversample", 1) != 1:
            raise ValueError("data.labeled_oversample is not supported with data=shards (streamed); set it to 1 or "
                             "train from the image folder")
        super().__init__(source=source, **kwargs)
        if shuffle_buffer < 0:
            raise ValueError(f"data.shuffle_buffer must be >= 0, got {shuffle_buffer}")
        self.shuffle_buffer = shuffle_buffer
        self._epoch = 0

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        source: WebDatasetSource = self.source  # type: ignore[assignment]
        train, val = self.split(source.ids)
        self.train_dataset = ShardStream(source, train, self.transform, self.seed, augment=True, captions=self.captions,
                                         shuffle=True, shuffle_buffer=self.shuffle_buffer, balanced=True,
                                         batch_size=self.batch_size, drop_last=self.drop_last)
        self.train_dataset.set_epoch(self._epoch)
        self.val_dataset = ShardStream(source, val, self.eval_transform, self.seed, augment=False,
                                       captions=self.captions, shuffle=False, balanced=False)
        log.info("data: %s → %d train / %d validation (%d excluded)", source.describe(), len(train), len(val),
                 len(source.ids) - len(train) - len(val))

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch
        if self.train_dataset is not None:
            self.train_dataset.set_epoch(epoch)

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self._epoch}

    def _loader_kwargs(self, train: bool = False) -> dict[str, Any]:
        # The stream's epoch is set in this process (set_epoch) and reaches workers when they start: restart them.
        return {**super()._loader_kwargs(train), "persistent_workers": False}

    def train_dataloader(self, rank: int | None = None, world_size: int | None = None) -> StatefulDataLoader | DataLoader:
        """``rank``/``world_size`` default to torch.distributed's (tests pass them to simulate ranks)."""
        detected = _distributed()
        stream = self.train_dataset.configure(detected[0] if rank is None else rank,
                                              detected[1] if world_size is None else world_size, self.num_workers)
        if stream.num_slots > len(self.source.shards):  # type: ignore[attr-defined]
            log.warning("%d shards for %d ranks x workers: slots share shards (each sample is still read once per "
                        "epoch, but shards are opened by several workers); write more, smaller shards",
                        len(self.source.shards), stream.num_slots)  # type: ignore[attr-defined]
        per_slot = stream.per_slot()
        if per_slot == 0:
            raise ValueError(f"{stream.total} training samples cannot fill {stream.num_slots} ranks x workers; "
                             "lower data.num_workers or add data")
        loader = StatefulDataLoader if self.stateful else DataLoader
        return loader(stream, batch_size=min(self.batch_size, per_slot), drop_last=self.drop_last,
                      **self._loader_kwargs())

    def plain_train_dataloader(self) -> DataLoader:
        """Training samples in shard order without augmentation (for statistics such as latent scaling)."""
        train = self.train_dataset
        stream = ShardStream(self.source, train.indices, self.eval_transform, self.seed, augment=False,  # type: ignore[arg-type]
                             shuffle=False, balanced=False).configure(0, 1, self.num_workers)
        return DataLoader(stream, batch_size=self.val_batch_size, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        rank, world_size = _distributed()
        stream = self.val_dataset.configure(rank, world_size, self.num_workers)
        return DataLoader(stream, batch_size=self.val_batch_size, **self._loader_kwargs())


# --------------------------------------------------------------------------------------------------- writing


def _sample_bytes(source: ImageSource, index: int) -> tuple[str, bytes]:
    """(extension, bytes) of an item: the file as-is when it is jpg/png/webp, else a lossless PNG of it."""
    image = source.load_image(index)  # also proves the image decodes (raises UnreadableImageError)
    path_of = getattr(source, "path", None)
    if callable(path_of):
        path = Path(path_of(index))
        extension = path.suffix.lower().lstrip(".")
        if extension in IMAGE_EXTENSIONS:
            with Image.open(path) as probe:
                if probe.format in PIL_FORMATS:
                    return extension, path.read_bytes()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return "png", buffer.getvalue()


def write_shards(source: ImageSource, out_dir: str | Path, shard_size: int = 1000, prefix: str = "data",
                 exclude: Sequence[str] = ()) -> dict[str, Any]:
    """Write ``source`` as ``{prefix}-000000.tar``… of ``shard_size`` samples plus ``{prefix}-index.json``.

    Files go to a temporary folder inside ``out_dir`` and are renamed into place at the end (index last), so
    readers never see a partial set. Refuses to overwrite existing shards or to write inside the source
    folder; unreadable images are skipped and listed in the index. Returns the index.
    """
    if shard_size < 1:
        raise ValueError(f"shard.size must be >= 1, got {shard_size}")
    if not prefix or "/" in prefix or prefix.startswith("."):
        raise ValueError(f"shard.prefix={prefix!r} must be a plain file name prefix")
    out = Path(out_dir).expanduser().resolve()
    source_root = getattr(source, "root", None)
    if source_root is not None and out.is_relative_to(Path(source_root).resolve()):
        raise DataRootError(f"shard.out={out} is inside the source folder {source_root}; choose a folder outside it "
                            "(the source folder is never modified)")
    if out.exists() and not out.is_dir():
        raise DataRootError(f"shard.out={out} exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    existing = sorted(p.name for p in out.glob(f"{prefix}-*") if not p.name.startswith("."))
    if existing:
        raise DataRootError(f"shard.out={out} already holds {existing[0]} (prefix {prefix!r}); choose an empty "
                            "folder or another shard.prefix — existing files are never overwritten")
    excluded = set(exclude)
    staging = Path(tempfile.mkdtemp(prefix=f".{prefix}.partial-", dir=out))
    shards: list[dict[str, Any]] = []
    skipped: list[dict[str, str]] = []
    writer: wds.TarWriter | None = None
    try:
        for index, item in enumerate(source.items):
            if item.id in excluded:
                continue
            try:
                extension, data = _sample_bytes(source, index)
            except UnreadableImageError as err:
                log.warning("skipping unreadable image %s (%s)", item.id, err)
                skipped.append({"id": item.id, "error": str(err)})
                continue
            if writer is None or len(shards[-1]["ids"]) >= shard_size:
                if writer is not None:
                    writer.close()
                name = f"{prefix}-{len(shards):06d}.tar"
                shards.append({"file": name, "count": 0, "ids": []})
                writer = wds.TarWriter(str(staging / name), encoder=False, mtime=0.0, mode=0o644, format="PAX_FORMAT")
            sample = {"__key__": encode_key(item.id), extension: data}
            if item.caption is not None:
                sample["txt"] = item.caption.encode("utf-8")
            if item.label is not None:
                sample["json"] = json.dumps({"label": item.label}, ensure_ascii=False).encode("utf-8")
            writer.write(sample)
            shards[-1]["ids"].append(item.id)
            shards[-1]["count"] += 1
        if writer is not None:
            writer.close()
        if not shards:
            raise DataRootError(f"{source.describe()} has no readable, non-excluded images to write")
        index_data = {"format": INDEX_FORMAT, "prefix": prefix, "shard_size": shard_size,
                      "num_samples": sum(s["count"] for s in shards), "num_shards": len(shards),
                      "num_skipped": len(skipped), "skipped": skipped, "num_excluded": len(excluded),
                      "source": source.describe(), "shards": shards}
        staged_index = staging / index_path(out, prefix).name
        staged_index.write_text(json.dumps(index_data, indent=1, ensure_ascii=False), encoding="utf-8")
        for shard in shards:
            os.replace(staging / shard["file"], out / shard["file"])
        os.replace(staged_index, index_path(out, prefix))
    finally:
        if writer is not None:
            writer.close()
        shutil.rmtree(staging, ignore_errors=True)
    log.info("wrote %d samples in %d shards to %s (%d unreadable skipped)", index_data["num_samples"], len(shards),
             out, len(skipped))
    return index_data


def shard_main(cfg: Any) -> dict[str, Any]:
    """``sdl-data shard``: write ``cfg.data.source`` (minus ``cfg.data.exclude``) to ``cfg.shard.out``.

    Reads ``shard.out`` (required), ``shard.size`` (default 1000) and ``shard.prefix`` (default ``data``).
    """
    from hydra.utils import instantiate  # the CLI composes the config; only this glue needs Hydra

    shard = cfg.get("shard") or {}
    out = shard.get("out")
    if not out:
        raise DataRootError("shard.out is required (the folder to write shards to): add shard.out=DIR")
    source = instantiate(cfg.data.source)
    return write_shards(source, out, shard_size=int(shard.get("size", 1000)), prefix=str(shard.get("prefix", "data")),
                        exclude=read_exclusions(cfg.data.get("exclude")))
