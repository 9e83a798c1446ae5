"""DiffusionDataModule: source → exclusions → deterministic split → preprocessing → batches."""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch.utils.data import DataLoader
from torchdata.stateful_dataloader import StatefulDataLoader

from sd_lightning.data.buckets import AspectRatioBuckets, BucketSampler
from sd_lightning.data.cache import AUTO, open_cached_datasets
from sd_lightning.data.checks import NUMBERS, data_problems, require
from sd_lightning.data.datasets import DiffusionDataset, collate_examples
from sd_lightning.data.notices import caption_notice, say, size_notice
from sd_lightning.data.samplers import ResumableShuffleSampler, ShardedEvalSampler
from sd_lightning.data.sources import MASK_SUFFIX, ImageSource, read_exclusions
from sd_lightning.data.split import split_fraction, split_indices, stable_seed
from sd_lightning.data.transforms import CaptionTransform, ColorJitter, ImageTransform

log = logging.getLogger(__name__)


class DiffusionDataModule(L.LightningDataModule):
    """Owns the source, exclusions, the train/validation split and preprocessing.

    The split is by a stable hash of each item's id (see ``split.py``), computed in ``setup`` on every
    process. Training batches come from a ``StatefulDataLoader`` whose position Lightning saves in the
    checkpoint, so a resumed run continues mid-epoch with the same batches.

    Augmentation (``center_crop``, ``random_flip``, ``color_jitter``, ``max_zoom``; presets in ``conf/augmentation``) is
    drawn per (seed, epoch, sample). ``buckets`` (e.g. ``{multiple: 8, max_aspect: 2.0}``, see ``buckets.py``)
    trains on aspect-ratio buckets; validation stays square center-cropped, so validation numbers compare
    across bucket settings. ``conditioning``, ``caption_template``, ``labeled_fraction``, ``shuffle_tags``,
    ``keep_tokens``, ``tag_dropout`` and ``trigger_word`` choose the prompts (see ``CaptionTransform``).
    """

    def __init__(
        self,
        source: ImageSource,
        resolution: int = 32,
        center_crop: bool = True,
        random_flip: bool = False,
        val_fraction: float = 0.1,
        split_salt: str = "",
        batch_size: int = 32,
        val_batch_size: int | None = None,
        num_workers: int = 0,
        seed: int = 0,
        exclude: str | None = None,
        drop_last: bool = True,
        sample_prompts: Sequence[str] = (),
        stateful: bool = True,
        color_jitter: ColorJitter | None = None,
        buckets: dict[str, Any] | None = None,
        conditioning: str = "text",
        caption_template: str = "{class_name}",
        labeled_fraction: float = 1.0,
        shuffle_tags: bool = False,
        keep_tokens: int = 0,
        tag_dropout: float = 0.0,
        trigger_word: str | None = None,
        root: str | None = None,
        cache: str | None = None,
        train_fraction: float = 1.0,
        unlabeled: str = "null_prompt",
        max_zoom: float = 1.0,
        labeled_oversample: int = 1,
        cache_workers: int | None = None,
        masks: str = "files",
    ) -> None:
        """``stateful=False`` uses a plain DataLoader, whose position a checkpoint cannot hold (a resumed
        run then sees other batches); it exists to demonstrate that, not for real runs. ``root`` is the
        ``data.root`` of folder configs, which their source reads; accepted here so that key can live at the top.
        ``cache``: a folder written by ``sdl-data cache`` (see ``cache.py``); both splits then yield cached VAE
        latents and text-encoder states instead of pixels, checked against this config and the attached model.
        ``train_fraction`` keeps a stable share of the training split (by id hash; validation unchanged), for
        few-image studies. ``unlabeled``: ``null_prompt`` trains items outside ``labeled_fraction`` on the null
        prompt (semi-supervised); ``drop`` leaves them out of training (the labeled-only baseline).
        ``labeled_oversample`` = k puts each labeled training item k times into every epoch (each copy with its own
        noise and augmentation), so that a few labels are seen often enough for the condition to be learned.
        ``cache_workers``: loader workers of a cache build (``sdl-data cache``, ``data.cache=auto``), not of training.
        ``masks``: loss masks for training — ``files`` (``<stem>.mask.png`` beside an image, when any exists),
        ``alpha`` (the images' alpha channels) or ``none``; validation metrics stay unmasked."""
        super().__init__()
        require(data_problems({k: v for k, v in locals().items() if k in NUMBERS or k in (
            "conditioning", "unlabeled", "caption_template", "buckets", "cache", "center_crop", "masks")}))
        self.source = source
        self.transform = ImageTransform(resolution=resolution, center_crop=center_crop, random_flip=random_flip,
                                        color_jitter=color_jitter, max_zoom=max_zoom)
        self.captions = CaptionTransform(conditioning, caption_template, labeled_fraction, shuffle_tags, keep_tokens,
                                         tag_dropout, trigger_word)

        items = getattr(source, "items", ())
        # What training reads: "none" unless asked for alpha, or mask files lie beside some images.
        self.masks = masks if masks == "alpha" or (masks == "files" and any(i.mask for i in items)) else "none"
        if self.masks == "files":
            log.info("loss masks: %d of %d images have a %s file", sum(bool(i.mask) for i in items), len(items),
                     MASK_SUFFIX)
        self.buckets = None if buckets is None else AspectRatioBuckets(resolution, **buckets)
        self.train_bucket_ids: list[int] | None = None
        self.eval_transform = ImageTransform(resolution=resolution, center_crop=True, random_flip=False)
        self.val_fraction = val_fraction
        self.split_salt = split_salt
        self.batch_size = batch_size
        self.val_batch_size = val_batch_size or batch_size
        self.num_workers = num_workers
        self.seed = seed
        self.exclude = exclude
        self.drop_last = drop_last
        self.sample_prompts = list(sample_prompts)
        self.stateful = stateful
        self.cache = cache
        self.cache_workers = cache_workers
        self.train_fraction = train_fraction
        self.unlabeled = unlabeled
        self.labeled_oversample = labeled_oversample
        self.collate_fn: Callable[[Sequence[dict[str, Any] | None]], dict[str, Any]] = collate_examples
        self.train_collate_fn: Callable[[Sequence[Any]], dict[str, Any]] | None = None  # None: collate_fn
        self.train_dataset: DiffusionDataset | None = None
        self.val_dataset: DiffusionDataset | None = None

    def split(self, ids: Sequence[str]) -> tuple[list[int], list[int]]:
        """Train and validation positions of ``ids``: the stable-hash split minus ``data.exclude``, then the
        training share (``train_fraction``) and, with ``unlabeled=drop``, only labeled training items."""
        excluded = set(read_exclusions(self.exclude))
        if excluded:
            unknown = excluded.difference(ids)
            if unknown:
                log.warning("%d excluded ids are not in the source (first: %s)", len(unknown), sorted(unknown)[0])
        train, val = split_indices(ids, self.val_fraction, self.split_salt)
        train = [i for i in train if ids[i] not in excluded]
        val = [i for i in val if ids[i] not in excluded]
        if self.train_fraction < 1.0:
            train = [i for i in train if split_fraction(ids[i], "train_fraction") < self.train_fraction]
        if self.unlabeled == "drop":
            train = [i for i in train if self.captions.is_labeled(ids[i])]
        if not train:
            raise ValueError(f"the training split of {self.source.describe()} is empty (data.train_fraction="
                             f"{self.train_fraction}, data.labeled_fraction={self.captions.labeled_fraction}, "
                             f"data.unlabeled={self.unlabeled})")
        if self.val_fraction > 0 and not val:
            raise ValueError(f"data.val_fraction={self.val_fraction} left no validation items; raise it")
        return train, val

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        excluded = set(read_exclusions(self.exclude))
        ids = [item.id for item in self.source.items]
        train, val = self.split(ids)
        if self.captions.conditioning == "class" and not any(self.source.items[i].label for i in train):
            raise ValueError(f"data.conditioning=class: {self.source.describe()} has no class labels (an image "
                             "folder takes them from class sub-folders); use data.conditioning=text or none")
        say(caption_notice(self.source, train, self.captions.conditioning),
            size_notice(self.source, train, self.transform.resolution))
        sizes = None
        if self.buckets is not None:
            self.train_bucket_ids = [self.buckets.assign(self.source.image_size(i)) for i in train]
            sizes = [self.buckets.sizes[b] for b in self.train_bucket_ids]
            log.info("aspect-ratio buckets (%d train images): %s", len(train), self.buckets.describe(self.train_bucket_ids))
        repeats = None
        if self.labeled_oversample > 1:
            repeats = [self.labeled_oversample if self.captions.is_labeled(ids[i]) else 1 for i in train]
            log.info("labeled oversampling: %d labeled items x %d, %d samples per epoch",
                     sum(r > 1 for r in repeats), self.labeled_oversample, sum(repeats))
        self.train_dataset = DiffusionDataset(self.source, train, self.transform, self.seed, augment=True,
                                              captions=self.captions, sizes=sizes, repeats=repeats, masks=self.masks)
        self.val_dataset = DiffusionDataset(self.source, val, self.eval_transform, self.seed, augment=False,
                                            captions=self.captions)
        if self.cache == AUTO:
            raise ValueError("data.cache=auto is resolved by sdl-train (cli/train.py build_run), which builds the cache "
                             "with the model's encoders; here pass a folder written by sdl-data cache, or null")
        if self.cache:
            # cache.py builds on this module's dataset
            self.train_dataset, self.val_dataset, self.collate_fn = open_cached_datasets(self, train, val)
        log.info("data: %s → %d train / %d validation (%d excluded)", self.source.describe(), len(train), len(val),
                 len(excluded))

    def set_epoch(self, epoch: int) -> None:
        """Vary augmentation by epoch while keeping it reproducible. Loader workers live across epochs: the training
        samplers hand them the epoch with every index (``stamp_epoch``); this sets it for in-process use."""
        if self.train_dataset is not None:
            self.train_dataset.epoch = epoch

    def _check_cache_model(self) -> None:
        """A cache must come from the attached model's VAE and text encoder (checked once a trainer asks)."""
        if self.cache and self.trainer is not None and self.trainer.lightning_module is not None:
            self.train_dataset.cache.check_model(self.trainer.lightning_module)

    def _loader_kwargs(self, train: bool = False) -> dict[str, Any]:
        # Persistent: restarting the workers every epoch cost 1.2 % of a 64 px image-folder run on 2 cores
        # (experiments/benchmark/loader_workers.py); the epoch reaches them through the samplers instead.
        collate = (self.train_collate_fn if train else None) or self.collate_fn
        return {"num_workers": self.num_workers, "collate_fn": collate,
                "persistent_workers": self.num_workers > 0, "pin_memory": torch.cuda.is_available()}

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.train_dataset.epoch if self.train_dataset is not None else 0}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.set_epoch(int(state_dict.get("epoch", 0)))

    def train_dataloader(self) -> StatefulDataLoader | DataLoader:
        self._check_cache_model()
        effective = min(self.batch_size, len(self.train_dataset))
        if self.train_bucket_ids is not None:
            sampler = BucketSampler(self.train_dataset, self.train_bucket_ids, effective, seed=self.seed, stamp_epoch=True)
            loader = StatefulDataLoader if self.stateful else DataLoader
            return loader(self.train_dataset, batch_size=effective, sampler=sampler, drop_last=True,
                          **self._loader_kwargs(train=True))
        if not self.stateful:
            # torch's own shuffling cannot carry the epoch: workers restart every epoch, as set_epoch needs.
            return DataLoader(self.train_dataset, batch_size=effective, shuffle=True, drop_last=self.drop_last,
                              generator=torch.Generator().manual_seed(stable_seed(self.seed, "shuffle")),
                              **{**self._loader_kwargs(train=True), "persistent_workers": False})
        return StatefulDataLoader(
            self.train_dataset,
            batch_size=effective,
            sampler=ResumableShuffleSampler(self.train_dataset, seed=self.seed, stamp_epoch=True),
            drop_last=self.drop_last,
            **self._loader_kwargs(train=True),
        )

    def plain_train_dataloader(self) -> DataLoader:
        """Training items in source order without augmentation (for statistics such as latent scaling)."""
        dataset = DiffusionDataset(self.source, self.train_dataset.indices, self.eval_transform, self.seed, augment=False)
        return DataLoader(dataset, batch_size=self.val_batch_size, shuffle=False, **self._loader_kwargs())

    def val_dataloader(self) -> DataLoader:
        self._check_cache_model()
        sampler = None
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            sampler = ShardedEvalSampler(
                self.val_dataset, torch.distributed.get_world_size(), torch.distributed.get_rank()
            )
        return DataLoader(self.val_dataset, batch_size=self.val_batch_size, shuffle=False, sampler=sampler,
                          **self._loader_kwargs())
