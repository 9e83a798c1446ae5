"""Latent + text-embedding cache: encode a data module's images and prompts once, then train from the result.

The frozen VAE and text encoder are deterministic functions of the preprocessed pixels and the token ids, so
their outputs can be computed once (``sdl-data cache … data.cache=DIR``) and read back by every training run
(``data.cache=DIR``), which then never calls either model (the tiny digits step is ~25% encoding).

Layout of a cache folder (only safetensors and JSON; nothing is unpickled on load):

- ``latents-00000.safetensors`` … : per item, in source order, the VAE posterior's ``mean`` and ``std``
  (unscaled, fp32), plus ``mean_flipped``/``std_flipped`` of the horizontally flipped image when
  ``data.random_flip`` is on (a VAE is not flip-equivariant, so flipping the latent would be wrong).
- ``prompts.safetensors``: whatever the model's conditioner produces, one row per *unique* prompt (digits:
  11) and always the null prompt ``""`` that condition dropout trains: ``encoder_hidden_states`` [P, L, D],
  ``pooled_prompt_embeds`` [P, D], …
- ``index.json``: the fingerprint, the prompts, each shard's sha256, ids and prompt rows.

Posterior: training draws ``mean + std * eps`` with the step's seeded generator, exactly as
``LatentDiffusionModule.encode_images`` does on pixels (same draw order), and validation uses the mean
(the posterior mode), so cached and uncached runs give the same losses and validation metrics up to float
rounding of batched convolutions. Random flips are reproduced by drawing the flip from the same per-(seed,
id, epoch) ``random.Random`` that ``ImageTransform`` uses, picking the stored flipped or plain latent.
Random crops, color jitter, aspect-ratio buckets, tag shuffling and tag dropout change the pixels or prompts every epoch,
so a cache refuses them.

The fingerprint covers the VAE encoder weights (``encoder.*``, ``quant_conv.*``; the decoder and
``scaling_factor`` do not change the stored latents: the scale is applied at training time), all
text-encoder weights, the tokenizer's ids for the stored prompts, the preprocessing (resolution, crop,
flip, resampling, normalization) and the source type; items are matched by id and caption (image-folder
files also by size and mtime). Anything different makes the cache refused as stale, naming ``data.cache=``.
A build writes into a hidden temporary folder and renames it into place, so an interrupted build leaves no
folder that looks like a cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import shutil
import time
import uuid
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch.utils.data import DataLoader, Dataset

from sd_lightning.data.datasets import DiffusionDataset, collate_examples
from sd_lightning.data.samplers import unstamp
from sd_lightning.data.sources import DataRootError, ImageSource
from sd_lightning.data.split import stable_seed
from sd_lightning.data.transforms import flipped_micro_conditioning

log = logging.getLogger(__name__)

CACHE_VERSION = 3
INDEX_FILE = "index.json"
PROMPTS_FILE = "prompts.safetensors"
NULL_PROMPT = ""
# data.cache=auto: sdl-train builds (or reuses) the cache of its data and encoders itself, see ``resolve_auto_cache``.
AUTO = "auto"
REBUILD_HINT = ("rebuild it with `sdl-data cache <the training run's data=/model= overrides> data.cache=<new folder>` "
                "(or delete {path} and rerun that command), or train without it: data.cache=null")


class CacheError(DataRootError):
    """A latent cache that cannot be used (stale, corrupt, incompatible); the message says how to rebuild."""


class FrozenEncoders(Protocol):
    """What a cache build needs from a model: the frozen VAE and text encoders (LatentDiffusionModule fits)."""

    vae: torch.nn.Module
    text_encoders: Sequence[torch.nn.Module]
    tokenizers: Sequence[Any]
    conditioner_kind: str  # the conditioner's kind: how the stored states were computed from the encoders

    def encode_prompts(self, prompts: Sequence[str]) -> dict[str, torch.Tensor]: ...


# ------------------------------------------------------------------------------------------------ fingerprints
def tensors_digest(named: Iterable[tuple[str, torch.Tensor]]) -> str:
    """sha256 over (name, dtype, shape, bytes) of tensors, in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(named, key=lambda pair: pair[0]):
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokenize_for_cache(tokenizer: Any, prompts: Sequence[str]) -> torch.Tensor:
    """Token ids exactly as ``LatentDiffusionModule.tokenize`` pads and truncates them."""
    return tokenizer(list(prompts), padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                     return_tensors="pt").input_ids


def model_fingerprint(vae: torch.nn.Module, text_encoders: Sequence[torch.nn.Module], tokenizers: Sequence[Any],
                      prompts: Sequence[str], conditioner: str = "") -> dict[str, str]:
    """Hashes of what the stored latents and hidden states depend on (see the module docstring); the second and
    later encoders and tokenizers of a family (SDXL, SD 3) are hashed under their position."""
    encoder_part = [(k, v) for k, v in vae.state_dict().items() if k.startswith(("encoder.", "quant_conv."))]
    prefix = lambda i: f"{i}." if i else ""  # noqa: E731
    encoders = [(prefix(i) + k, v) for i, e in enumerate(text_encoders) for k, v in e.state_dict().items()]
    ids = [(prefix(i) + type(t).__name__, tokenize_for_cache(t, prompts)) for i, t in enumerate(tokenizers)]
    return {"vae": tensors_digest(encoder_part), "text_encoder": tensors_digest(encoders),
            "tokenizer": tensors_digest(ids), "conditioner": conditioner}


def preprocessing_fingerprint(datamodule: Any) -> dict[str, Any]:
    """The deterministic preprocessing the stored latents were computed with."""
    transform = datamodule.transform
    return {
        "resolution": int(transform.resolution),
        "center_crop": bool(transform.center_crop),
        "random_flip": bool(transform.random_flip),
        "resample": transform.resample.name,
        "normalization": "x / 127.5 - 1",
        "source": type(datamodule.source).__name__,
    }


def _item_stamp(source: ImageSource, index: int) -> str | None:
    """Size and mtime of an image file (sources with files); None for bundled data sets."""
    if not hasattr(source, "path"):
        return None
    try:
        stat = source.path(index).stat()
    except OSError:
        return None
    return f"{stat.st_size}:{stat.st_mtime_ns}"


def check_cacheable(datamodule: Any) -> None:
    """Refuse preprocessing that changes pixels or prompts every epoch (a cache would freeze one draw)."""
    problems = []
    if not datamodule.transform.center_crop:
        problems.append("random crops (data.center_crop=false): use data.center_crop=true")
    if datamodule.transform.color_jitter is not None:
        problems.append("color jitter (data.color_jitter): use data.color_jitter=null or augmentation=flip")
    if getattr(datamodule, "buckets", None) is not None:
        problems.append("aspect-ratio buckets (data.buckets): use data.buckets=null")
    if datamodule.captions.shuffle_tags:
        problems.append("tag shuffling (data.shuffle_tags=true): use data.shuffle_tags=false")
    if getattr(datamodule, "masks", "none") != "none":
        problems.append(f"loss masks (data.masks={datamodule.masks}): use data.masks=none")
    if datamodule.captions.tag_dropout > 0:
        problems.append(f"tag dropout (data.tag_dropout={datamodule.captions.tag_dropout}): use data.tag_dropout=0")
    if problems:
        raise CacheError("data.cache stores one deterministic encoding per image, which cannot represent "
                         + "; ".join(problems) + " — or train without the cache: data.cache=null")


def _sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------------ build
def build_cache(cfg: Any, batch_size: int = 64, shard_size: int = 4096) -> Path:
    """Build ``cfg.data.cache`` from a composed *training* config (what ``sdl-data cache`` calls).

    The model is instantiated after ``seed_everything(cfg.seed)`` and the data module, exactly as ``sdl-train``
    does, so randomly initialised parts (the tiny configs' text encoder) get the weights the run will have.
    """
    import lightning as L
    from hydra.utils import instantiate  # only this entry-point helper needs Hydra

    target = cfg.data.get("cache")
    if not target:
        raise CacheError("data.cache is not set: pass the folder to write, e.g. data.cache=outputs/cache/digits32")
    L.seed_everything(cfg.seed, workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    return write_cache(target, datamodule, model, batch_size=batch_size, shard_size=shard_size,
                       workers=datamodule.cache_workers)


def cache_loader_workers(workers: int | None) -> int:
    """Loader workers that read and preprocess images while the VAE encodes: ``None`` = one per core."""
    from sd_lightning.data.inspection import available_cores

    if workers is None:
        return available_cores()
    if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
        raise CacheError(f"data.cache_workers={workers!r} must be an integer >= 0 (0 = read in the main process) or "
                         "null (one worker per core)")
    return workers


def write_cache(path: str | Path, datamodule: Any, encoders: FrozenEncoders, batch_size: int = 64,
                shard_size: int = 4096, workers: int | None = 0) -> Path:
    """Encode every readable item of ``datamodule.source`` (both splits) into a new cache folder at ``path``.

    An existing valid cache with the same fingerprint is reused; any other existing path is refused. ``workers``:
    loader processes decoding images (``None`` = one per core); the folder is the same for any number.
    """
    workers = cache_loader_workers(workers)
    check_cacheable(datamodule)
    if getattr(encoders, "train_text_encoder", False):
        raise CacheError("data.cache stores frozen text-encoder outputs, but this model trains the text encoder "
                         "(model.components.conditioner.train_text_encoder / adapter.text_encoder): train without a cache")
    path = Path(path).expanduser().resolve()
    source = datamodule.source
    captions = [datamodule.captions(item, None) or NULL_PROMPT for item in source.items]
    prompts = list(dict.fromkeys([*captions, NULL_PROMPT]))
    fingerprint = {**model_fingerprint(encoders.vae, encoders.text_encoders, encoders.tokenizers, prompts,
                                       encoders.conditioner_kind),
                   "preprocessing": preprocessing_fingerprint(datamodule)}
    if path.exists():
        if (path / INDEX_FILE).is_file():
            existing = LatentCache(path)
            existing.check(datamodule, encoders)
            log.info("data.cache=%s is already up to date (%d items)", path, len(existing.rows))
            return path
        raise CacheError(f"data.cache={path} exists and is not a latent cache; choose another folder")
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.parent / f".{path.name}.tmp-{uuid.uuid4().hex[:8]}"
    tmp.mkdir()
    try:
        _write_contents(tmp, datamodule, encoders, captions, prompts, fingerprint, batch_size, shard_size, workers)
        try:
            os.rename(tmp, path)
        except OSError:
            if not (path / INDEX_FILE).is_file():
                raise
            # Another process (a data-parallel rank with data.cache=auto) finished the same cache first.
            shutil.rmtree(tmp, ignore_errors=True)
            LatentCache(path).check(datamodule, encoders)
            return path
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # our own temporary folder, never a user's
        raise
    log.info("wrote latent cache %s", path)
    return path


def _write_contents(folder: Path, datamodule: Any, encoders: FrozenEncoders, captions: list[str],
                    prompts: list[str], fingerprint: dict[str, Any], batch_size: int, shard_size: int,
                    workers: int) -> None:
    source = datamodule.source
    prompt_row = {p: i for i, p in enumerate(prompts)}
    flipped = bool(datamodule.transform.random_flip)
    device = next(encoders.vae.parameters()).device
    with torch.no_grad():
        chunks = [encoders.encode_prompts(prompts[i : i + 256]) for i in range(0, len(prompts), 256)]
    states = {key: torch.cat([c[key] for c in chunks]).float().cpu().contiguous() for key in chunks[0]}
    save_file(states, str(folder / PROMPTS_FILE))

    dataset = DiffusionDataset(source, range(len(source.items)), datamodule.eval_transform, augment=False)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, num_workers=workers, collate_fn=collate_examples)
    shards: list[dict[str, Any]] = []
    buffer: dict[str, list[torch.Tensor]] = {}
    ids: list[str] = []
    read: set[str] = set()
    position = {item.id: i for i, item in enumerate(source.items)}

    def flush() -> None:
        name = f"latents-{len(shards):05d}.safetensors"
        tensors = {key: torch.cat(parts).contiguous() for key, parts in buffer.items()}
        save_file(tensors, str(folder / name))
        shards.append({"file": name, "sha256": _sha256_file(folder / name), "ids": list(ids),
                       "prompts": [prompt_row[captions[position[i]]] for i in ids],
                       "stamps": [_item_stamp(source, position[i]) for i in ids]})
        buffer.clear()
        ids.clear()

    vae = encoders.vae
    with torch.no_grad():
        for batch in loader:
            if not batch["id"]:
                continue
            pixels = batch["pixel_values"].to(device)
            micro = batch["micro_conditioning"]
            variants = {"": (pixels, micro)}
            if flipped:
                variants["_flipped"] = (pixels.flip(-1), flipped_micro_conditioning(micro))
            for suffix, (images, micro_ids) in variants.items():
                posterior = vae.encode(images).latent_dist
                buffer.setdefault(f"mean{suffix}", []).append(posterior.mean.float().cpu())
                buffer.setdefault(f"std{suffix}", []).append(posterior.std.float().cpu())
                buffer.setdefault(f"micro{suffix}", []).append(micro_ids.float())
            ids.extend(batch["id"])
            read.update(batch["id"])
            if len(ids) >= shard_size:
                flush()
    if ids:
        flush()
    if not shards:
        raise CacheError(f"no readable image in {source.describe()}: nothing to cache")
    skipped = [item.id for item in source.items if item.id not in read]
    index = {
        "version": CACHE_VERSION,
        "fingerprint": fingerprint,
        "flipped": flipped,
        "prompts": prompts,
        "prompts_sha256": _sha256_file(folder / PROMPTS_FILE),
        "shards": shards,
        "skipped": skipped,
    }
    (folder / INDEX_FILE).write_text(json.dumps(index, indent=1, ensure_ascii=False), encoding="utf-8")
    if skipped:
        log.warning("latent cache: %d unreadable images skipped (first: %s)", len(skipped), skipped[0])


def resolve_auto_cache(datamodule: Any, encoders: FrozenEncoders, root: str | Path) -> str | None:
    """``data.cache=auto``: the cache of this data, preprocessing and these encoders under ``root``, built on first use
    and reused after (a folder per key, so other data or weights get their own); ``None`` — encode in every step —
    when the preprocessing changes every epoch or the text encoder trains, which a cache cannot represent."""
    try:
        check_cacheable(datamodule)
        if getattr(encoders, "train_text_encoder", False):
            raise CacheError("the text encoder trains")
    except CacheError as err:
        log.info("data.cache=auto: encoding images and prompts in every step (%s)", str(err).split(" — ")[0])
        return None
    source = datamodule.source
    captions = [datamodule.captions(item, None) or NULL_PROMPT for item in source.items]
    key = {**model_fingerprint(encoders.vae, encoders.text_encoders, encoders.tokenizers, sorted(set(captions)),
                             encoders.conditioner_kind),
           "preprocessing": preprocessing_fingerprint(datamodule), "source": source.describe(),
           "items": tensors_digest([("ids", torch.tensor([stable_seed(item.id, c) for item, c in zip(source.items, captions)]))])}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]
    path = Path(root).expanduser() / f"{type(source).__name__.lower()}-{digest}"
    started = time.perf_counter()
    write_cache(path, datamodule, encoders, workers=datamodule.cache_workers)
    log.info("data.cache=auto: %s (%.1f s)", path, time.perf_counter() - started)
    return str(path)


# ------------------------------------------------------------------------------------------------------- load
class LatentCache:
    """An opened, integrity-checked cache folder; ``check`` compares it with a data module and model."""

    def __init__(self, path: str | Path, verify: bool = True) -> None:
        """``verify`` re-hashes every file against the index (a flipped byte anywhere is caught)."""
        self.path = Path(path).expanduser().resolve()
        index_file = self.path / INDEX_FILE
        if not index_file.is_file():
            raise CacheError(f"data.cache={self.path} is not a latent cache (no {INDEX_FILE}); "
                             + REBUILD_HINT.format(path=self.path))
        try:
            self.index = json.loads(index_file.read_text(encoding="utf-8"))
            version, shards = self.index["version"], self.index["shards"]
            self.prompts: list[str] = list(self.index["prompts"])
        except (ValueError, KeyError, TypeError) as err:
            raise CacheError(f"data.cache={self.path}: {INDEX_FILE} is corrupt ({err}); "
                             + REBUILD_HINT.format(path=self.path)) from err
        if version != CACHE_VERSION:
            raise CacheError(f"data.cache={self.path} has format version {version}, this code reads "
                             f"{CACHE_VERSION}; " + REBUILD_HINT.format(path=self.path))
        files = [(PROMPTS_FILE, self.index["prompts_sha256"])] + [(s["file"], s["sha256"]) for s in shards]
        for name, expected in files:
            file = self.path / name
            if not file.is_file():
                raise CacheError(f"data.cache={self.path}: shard {name} is missing; " + REBUILD_HINT.format(path=self.path))
            if verify and _sha256_file(file) != expected:
                raise CacheError(f"data.cache={self.path}: shard {name} is corrupt (sha256 differs from {INDEX_FILE}); "
                                 + REBUILD_HINT.format(path=self.path))
        try:
            with safe_open(str(self.path / PROMPTS_FILE), framework="pt") as handle:
                self.condition_keys = sorted(handle.keys())
                null_row = self.prompts.index(NULL_PROMPT)
                self.null_conditioning = {k: handle.get_slice(k)[null_row] for k in self.condition_keys}
                rows = {handle.get_slice(k).get_shape()[0] for k in self.condition_keys}
            if rows != {len(self.prompts)}:
                raise ValueError(f"{sorted(rows)} rows for {len(self.prompts)} prompts")
        except (SafetensorError, OSError, ValueError) as err:
            raise CacheError(f"data.cache={self.path}: {PROMPTS_FILE} is unreadable ({err}); "
                             + REBUILD_HINT.format(path=self.path)) from err
        self.flipped = bool(self.index["flipped"])
        self.shard_files = [str(self.path / s["file"]) for s in shards]
        self.prompt_file = str(self.path / PROMPTS_FILE)
        # id → (shard, row, prompt row, stamp)
        self.rows: dict[str, tuple[int, int, int, str | None]] = {}
        for number, shard in enumerate(shards):
            for row, (item_id, prompt, stamp) in enumerate(zip(shard["ids"], shard["prompts"], shard["stamps"])):
                self.rows[item_id] = (number, row, prompt, stamp)
        self.skipped = set(self.index.get("skipped", []))
        self._checked_models: set[int] = set()

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.index["fingerprint"]

    def stale(self, reasons: list[str]) -> CacheError:
        return CacheError(f"data.cache={self.path} is stale: " + "; ".join(reasons) + ". "
                          + REBUILD_HINT.format(path=self.path))

    def check(self, datamodule: Any, encoders: FrozenEncoders | None = None, indices: Sequence[int] | None = None) -> None:
        """Refuse the cache when preprocessing, items, captions or (given ``encoders``) the models differ."""
        self.check_data(datamodule, indices)
        if encoders is not None:
            self.check_model(encoders)

    def check_model(self, encoders: Any) -> None:
        """Refuse a model whose VAE encoder, text encoder or tokenizer differ from the build's (memoized per model)."""
        if id(encoders) in self._checked_models:
            return
        if not all(hasattr(encoders, a) for a in ("vae", "text_encoders", "tokenizers", "conditioner_kind")):
            raise CacheError(f"data.cache holds latents for latent diffusion training; {type(encoders).__name__} "
                             "cannot train from it: set data.cache=null")
        if getattr(encoders, "train_text_encoder", False):
            raise CacheError("data.cache holds frozen text-encoder outputs, but this model trains the text encoder "
                             "(model.components.conditioner.train_text_encoder / adapter.text_encoder): set data.cache=null")
        current = model_fingerprint(encoders.vae, encoders.text_encoders, encoders.tokenizers, self.prompts,
                                    encoders.conditioner_kind)
        names = {"vae": "VAE encoder weights", "text_encoder": "text-encoder weights", "tokenizer": "tokenizer",
                 "conditioner": "conditioner (its kind and settings)"}
        reasons = [f"the model's {label} differ from the ones it was built with" for key, label in names.items()
                   if self.fingerprint.get(key) != current[key]]
        if reasons:
            raise self.stale(reasons)
        self._checked_models.add(id(encoders))

    def check_data(self, datamodule: Any, indices: Sequence[int] | None = None) -> None:
        """Refuse the cache when the preprocessing differs or an item is missing or changed (by caption/file)."""
        check_cacheable(datamodule)
        reasons = []
        built = self.fingerprint["preprocessing"]
        for key, value in preprocessing_fingerprint(datamodule).items():
            if built.get(key) != value:
                reasons.append(f"built with {key}={built.get(key)!r}, the data config has {key}={value!r}")
        source = datamodule.source
        wanted = range(len(source.items)) if indices is None else indices
        missing, changed = [], []
        for index in wanted:
            item = source.items[index]
            entry = self.rows.get(item.id)
            if entry is None:
                if item.id not in self.skipped:
                    missing.append(item.id)
                continue
            caption = datamodule.captions(item, None) or NULL_PROMPT
            if self.prompts[entry[2]] != caption:
                changed.append(f"{item.id} prompt {self.prompts[entry[2]]!r} is now {caption!r}")
            elif entry[3] != _item_stamp(source, index):
                changed.append(f"{item.id} file changed since the build")
        if missing:
            reasons.append(f"{len(missing)} items of {source.describe()} are not in it (first: {missing[0]})")
        if changed:
            reasons.append(f"{len(changed)} items changed (first: {changed[0]})")
        if reasons:
            raise self.stale(reasons)

    def dataset(self, source: ImageSource, indices: Sequence[int], seed: int = 0, augment: bool = False) -> CachedLatentDataset:
        return CachedLatentDataset(self, source, indices, seed, augment)


class CachedLatentDataset(Dataset):
    """Cached items ``{latents, latents_std, <conditioning keys>, prompt, id}`` at positions of ``indices``.

    ``latents``/``latents_std`` are the unscaled posterior mean/std; with ``augment`` and a flip cache, the
    flipped pair is chosen by the same per-(seed, id, epoch) draw as ``ImageTransform``'s flip. Items
    unreadable at build time are ``None`` (skipped and counted, as the image dataset does). Shards and the
    prompt table are memory-mapped per process, lazily (the dataset pickles to dataloader workers), and read
    per item, so neither latents nor embeddings need to fit in memory.
    """

    def __init__(self, cache: LatentCache, source: ImageSource, indices: Sequence[int], seed: int = 0,
                 augment: bool = False) -> None:
        self.cache = cache
        self.source = source
        self.indices = list(indices)
        self.seed = seed
        self.augment = augment
        self.epoch = 0
        self._handles: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}

    def __len__(self) -> int:
        return len(self.indices)

    def _handle(self, file: str) -> Any:
        if file not in self._handles:
            self._handles[file] = safe_open(file, framework="pt")
        return self._handles[file]

    def __getitem__(self, position: int | tuple[int, int]) -> dict[str, Any] | None:
        position, epoch = unstamp(position, self.epoch)
        item = self.source.items[self.indices[position]]
        entry = self.cache.rows.get(item.id)
        if entry is None:
            return None
        shard, row, prompt, _ = entry
        suffix = ""
        if self.augment and self.cache.flipped:
            # ImageTransform with a center crop draws nothing before its flip: rng.random() < 0.5.
            rng = random.Random(stable_seed(self.seed, item.id, epoch))
            suffix = "_flipped" if rng.random() < 0.5 else ""
        handle = self._handle(self.cache.shard_files[shard])
        prompts = self._handle(self.cache.prompt_file)
        return {
            "latents": handle.get_slice(f"mean{suffix}")[row],
            "latents_std": handle.get_slice(f"std{suffix}")[row],
            "micro_conditioning": handle.get_slice(f"micro{suffix}")[row],
            **{key: prompts.get_slice(key)[prompt] for key in self.cache.condition_keys},
            "prompt": self.cache.prompts[prompt],
            "id": item.id,
        }


class CachedCollate:
    """Stacks cached items; adds the null prompt's conditioning (``null_<key>``) for condition dropout in the step."""

    def __init__(self, null_conditioning: dict[str, torch.Tensor]) -> None:
        self.null_conditioning = null_conditioning

    def __call__(self, examples: Sequence[dict[str, Any] | None]) -> dict[str, Any]:
        kept = [e for e in examples if e is not None]
        batch: dict[str, Any] = {"prompt": [e["prompt"] for e in kept], "id": [e["id"] for e in kept],
                                 "num_skipped": len(examples) - len(kept),
                                 **{f"null_{k}": v for k, v in self.null_conditioning.items()}}
        for key in ("latents", "latents_std", "micro_conditioning", *self.null_conditioning):
            batch[key] = torch.stack([e[key] for e in kept]) if kept else torch.empty(0)
        return batch


def open_cached_datasets(datamodule: Any, train: Sequence[int],
                         val: Sequence[int]) -> tuple[CachedLatentDataset, CachedLatentDataset, CachedCollate]:
    """The data module's train/validation datasets read from ``datamodule.cache``, checked against its config.

    The model side is checked by ``LatentCache.check_model`` once a trainer asks for the loaders (``setup`` may
    run before a model is attached, e.g. for the run manifest).
    """
    cache = LatentCache(datamodule.cache)
    cache.check_data(datamodule, [*train, *val])
    return (cache.dataset(datamodule.source, train, datamodule.seed, augment=True),
            cache.dataset(datamodule.source, val, datamodule.seed, augment=False),
            CachedCollate(cache.null_conditioning))
