"""Feature networks for FID/KID: a small CNN trained on the evaluated data set itself, cached on disk.

Inception features (the usual FID) need weights that cannot be downloaded here and torch-fidelity, which
needs a torchvision that cannot be installed beside this torch; and they say little about 32x32 digits.
So the default feature network is a small CNN trained once on the data set's own training split:

- **labeled data** (2..``max_classes`` distinct captions, each on at least two images, as the digits'
  ten prompts or an image folder's class sub-folders): a classifier; its penultimate layer feeds FID/KID
  and its predictions judge conditional accuracy.
- **unlabeled data** (free-text or missing captions): the same encoder trained as an autoencoder with a
  linear decoder to a 16x16 thumbnail (``objective="auto"`` picks it; ``objective="classifier"`` refuses
  unlabeled data with a clear error instead).

A trained network is cached as ``<cache_dir>/feature-<key>.safetensors`` plus a JSON record; the key is a
hash of the images' pixels, captions and split, the architecture and the training settings, so a hit skips
training and any change trains a new network (old files are kept, never overwritten by another config).

Every feature module here takes float images ``[N, C, H, W]`` in ``[0, 1]`` and returns ``[N, d]``; that
is the contract for a custom module given by ``feature._target_=…`` too.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
THUMBNAIL_SIZE = 16


def default_cache_dir() -> Path:
    """``$SD_LIGHTNING_CACHE`` or ``~/.cache/sd_lightning``: feature networks are reused across runs."""
    return Path(os.environ.get("SD_LIGHTNING_CACHE", Path.home() / ".cache" / "sd_lightning")).expanduser()


def prepare_images(images: torch.Tensor, size: int) -> torch.Tensor:
    """Float [0, 1] images of any channel count (1, 3 or 4) and size → 3-channel ``size``² in [-1, 1]."""
    if images.ndim != 4:
        raise ValueError(f"feature networks take images shaped [N, C, H, W], got {tuple(images.shape)}")
    if images.dtype == torch.uint8:
        images = images.float() / 255.0
    images = images.float()
    channels = images.shape[1]
    if channels == 1:
        images = images.expand(-1, 3, -1, -1)
    elif channels == 4:
        images = images[:, :3]
    elif channels != 3:
        raise ValueError(f"feature networks take 1, 3 or 4 channels, got {channels}")
    if images.shape[-2:] != (size, size):
        images = F.interpolate(images, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return images * 2.0 - 1.0


class FeatureNetwork(nn.Module):
    """Three conv stages + global pooling + a linear layer: ``forward`` returns the ``num_features``-d
    penultimate features (what torchmetrics' FID/KID call), ``logits`` the classifier head's output, and
    ``reconstruct`` the autoencoder head's thumbnail. ``num_classes=0`` builds the autoencoder head."""

    def __init__(self, num_classes: int = 0, input_size: int = 16, width: int = 16, num_features: int = 64) -> None:
        super().__init__()
        self.input_size, self.num_classes, self.num_features = input_size, num_classes, num_features
        self.encoder = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 4 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * width, num_features), nn.ReLU(),
        )
        self.thumbnail = min(THUMBNAIL_SIZE, input_size)
        out = num_classes if num_classes > 0 else 3 * self.thumbnail**2
        self.head = nn.Linear(num_features, out)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encoder(prepare_images(images, self.input_size).to(self.head.weight))

    def logits(self, images: torch.Tensor) -> torch.Tensor:
        if self.num_classes == 0:
            raise ValueError("this feature network was trained as an autoencoder (unlabeled data): it has no classes")
        return self.head(self(images))

    def reconstruct(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self(images)).view(-1, 3, self.thumbnail, self.thumbnail)

    def target_thumbnail(self, images: torch.Tensor) -> torch.Tensor:
        return prepare_images(images, self.thumbnail).to(self.head.weight)

    @torch.no_grad()
    def predict_images(self, images: torch.Tensor, batch_size: int = 256) -> np.ndarray:
        self.eval()
        return torch.cat([self.logits(images[i:i + batch_size]).argmax(1) for i in range(0, len(images), batch_size)]).numpy()


@dataclass
class LabeledImages:
    """A data set's images as float [N, 3, H, W] in [0, 1] with captions, split as its data config splits it."""

    train: torch.Tensor
    val: torch.Tensor
    train_captions: list[str | None]
    val_captions: list[str | None]
    description: str = ""

    def fingerprint(self) -> str:
        """sha256 of the quantized pixels, captions and split: what a cached feature network depends on."""
        digest = hashlib.sha256()
        for name, images, captions in (("train", self.train, self.train_captions), ("val", self.val, self.val_captions)):
            digest.update(f"{name}:{tuple(images.shape)}".encode())
            digest.update((images.clamp(0, 1) * 255).round().to(torch.uint8).numpy().tobytes())
            digest.update(json.dumps(captions).encode())
        return digest.hexdigest()


def class_labels(captions: Sequence[str | None], max_classes: int = 100) -> list[str] | None:
    """The classes of a data set (sorted distinct captions) or None when it is not a labeled one.

    Labeled means: every item has a caption, there are 2..``max_classes`` distinct ones and each is shared
    by at least two images (free-text captions, one per image, are not classes).
    """
    if not captions or any(c is None or c == "" for c in captions):
        return None
    counts: dict[str, int] = {}
    for caption in captions:
        counts[caption] = counts.get(caption, 0) + 1
    if not 2 <= len(counts) <= max_classes or min(counts.values()) < 2:
        return None
    return sorted(counts)


def load_split_images(datamodule: Any, max_items: int | None = None) -> LabeledImages:
    """Both splits of a ``DiffusionDataModule`` without augmentation, as [0, 1] float tensors (in source order).

    ``max_items`` caps each split (first items in source order). Unreadable images are skipped, as in training.
    """
    from sd_lightning.data.datasets import DiffusionDataset, collate_examples

    datamodule.setup("validate")
    out: dict[str, tuple[torch.Tensor, list[str | None]]] = {}
    for name, dataset in (("train", datamodule.train_dataset), ("val", datamodule.val_dataset)):
        indices = dataset.indices[:max_items] if max_items else dataset.indices
        plain = DiffusionDataset(datamodule.source, indices, datamodule.eval_transform, augment=False)
        loader = torch.utils.data.DataLoader(plain, batch_size=256, shuffle=False, collate_fn=collate_examples)
        images, captions = [], []
        for batch in loader:
            if batch["pixel_values"].numel():
                images.append((batch["pixel_values"] + 1.0) / 2.0)
                captions.extend(p or None for p in batch["prompt"])
        resolution = datamodule.eval_transform.resolution
        out[name] = (torch.cat(images) if images else torch.empty(0, 3, resolution, resolution), captions)
    return LabeledImages(out["train"][0], out["val"][0], out["train"][1], out["val"][1], datamodule.source.describe())


@dataclass
class FeatureTraining:
    """How the default feature network is built and trained (all of it goes into the cache key)."""

    input_size: int = 16
    width: int = 16
    num_features: int = 64
    epochs: int = 10
    batch_size: int = 64
    lr: float = 4e-3
    weight_decay: float = 1e-4
    seed: int = 0


@dataclass
class TrainedFeatures:
    """A feature network and what is known about it: its classes, validation quality and cache files."""

    network: FeatureNetwork
    class_names: list[str] | None
    metrics: dict[str, float]
    key: str
    weights_path: Path
    from_cache: bool
    record: dict[str, Any] = field(default_factory=dict)

    @property
    def objective(self) -> str:
        return "classifier" if self.class_names else "autoencoder"


def _encode_labels(captions: Sequence[str | None], class_names: Sequence[str]) -> torch.Tensor:
    index = {name: i for i, name in enumerate(class_names)}
    unknown = sorted({c for c in captions if c not in index})
    if unknown:
        raise ValueError(f"validation captions {unknown[:3]} are not classes of the training split")
    return torch.tensor([index[c] for c in captions], dtype=torch.long)


def _loss(network: FeatureNetwork, prepared: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy on class ids (long targets) or thumbnail MSE, on images already at the input size."""
    output = network.head(network.encoder(prepared))
    if targets.dtype == torch.long:
        return F.cross_entropy(output, targets)
    return F.mse_loss(output, targets.flatten(1))


@torch.no_grad()
def _evaluate(network: FeatureNetwork, images: torch.Tensor, labels: torch.Tensor | None) -> dict[str, float]:
    network.eval()
    if len(images) == 0:
        return {}
    if labels is not None:
        return {"val_accuracy": float((torch.from_numpy(network.predict_images(images)) == labels).float().mean())}
    errors = [F.mse_loss(network.reconstruct(images[i:i + 256]), network.target_thumbnail(images[i:i + 256]),
                         reduction="sum") for i in range(0, len(images), 256)]
    return {"val_mse": float(sum(errors)) / (len(images) * 3 * network.thumbnail**2)}


def train_feature_network(data: LabeledImages, training: FeatureTraining, class_names: Sequence[str] | None
                          ) -> tuple[FeatureNetwork, dict[str, float]]:
    """Train on ``data.train`` (cross-entropy on classes, or thumbnail MSE without), report on ``data.val``."""
    generator = torch.Generator().manual_seed(training.seed)
    with torch.random.fork_rng():
        torch.manual_seed(training.seed)
        network = FeatureNetwork(len(class_names or []), training.input_size, training.width, training.num_features)
    train_labels = _encode_labels(data.train_captions, class_names) if class_names else None
    val_labels = _encode_labels(data.val_captions, class_names) if class_names else None
    optimizer = torch.optim.AdamW(network.parameters(), lr=training.lr, weight_decay=training.weight_decay)
    steps_per_epoch = max(1, -(-len(data.train) // training.batch_size))
    scheduler = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=training.lr,
                                                    total_steps=training.epochs * steps_per_epoch)
    # Resize once up front: per-step antialiased resizing would cost more than the tiny network itself.
    prepared = prepare_images(data.train, training.input_size)
    targets = train_labels if train_labels is not None else network.target_thumbnail(data.train)
    network.train()
    for _ in range(training.epochs):
        order = torch.randperm(len(data.train), generator=generator)
        for start in range(0, len(order), training.batch_size):
            batch = order[start:start + training.batch_size]
            loss = _loss(network, prepared[batch], targets[batch])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            scheduler.step()
    metrics = _evaluate(network, data.val, val_labels)
    network.eval().requires_grad_(False)
    return network, metrics


def cache_key(fingerprint: str, training: FeatureTraining, objective: str) -> str:
    payload = json.dumps({"format": CACHE_FORMAT, "data": fingerprint, "training": asdict(training),
                          "objective": objective}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:20]


def _write_atomic(path: Path, write: Any) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def _load_cached(weights: Path, record_file: Path, key: str, training: FeatureTraining) -> TrainedFeatures | None:
    """The cached network if its record matches ``key`` and its weights load; None means retrain."""
    if not (weights.is_file() and record_file.is_file()):
        return None
    try:
        record = json.loads(record_file.read_text())
        if record.get("key") != key:
            return None
        network = FeatureNetwork(record["num_classes"], training.input_size, training.width, training.num_features)
        network.load_state_dict(load_file(weights))
    except (OSError, ValueError, KeyError, RuntimeError) as err:
        log.warning("feature cache %s is unusable (%s); retraining", weights, err)
        return None
    network.eval().requires_grad_(False)
    return TrainedFeatures(network, record["class_names"], record["metrics"], key, weights, True, record)


def trained_feature_network(
    data: LabeledImages,
    cache_dir: str | Path | None = None,
    objective: str = "auto",
    max_classes: int = 100,
    min_val_accuracy: float | None = None,
    **training: Any,
) -> TrainedFeatures:
    """The default feature network for ``data``: loaded from the cache, or trained and cached.

    ``objective``: ``auto`` (classifier when the captions are classes, else autoencoder), ``classifier``
    (refuses unlabeled data) or ``autoencoder``. ``min_val_accuracy`` fails loudly on a weak classifier,
    whose features would make FID meaningless.
    """
    if objective not in ("auto", "classifier", "autoencoder"):
        raise ValueError(f"feature.objective={objective!r} must be 'auto', 'classifier' or 'autoencoder'")
    settings = FeatureTraining(**training)
    if len(data.train) < 2:
        raise ValueError(f"the training split of {data.description} has {len(data.train)} images: too few to "
                         "train a feature network")
    class_names = class_labels(data.train_captions, max_classes) if objective != "autoencoder" else None
    if objective == "classifier" and class_names is None:
        raise ValueError(
            f"feature.objective=classifier needs labeled data, but the captions of {data.description} are not "
            f"classes (need 2..{max_classes} distinct captions, each on >= 2 images, none missing). Use "
            "feature.objective=auto (autoencoder features) or a class sub-folder layout (data.source.caption_template)."
        )
    resolved = "classifier" if class_names else "autoencoder"
    fingerprint = data.fingerprint()
    key = cache_key(fingerprint, settings, resolved)
    folder = Path(cache_dir).expanduser() if cache_dir else default_cache_dir()
    weights, record_file = folder / f"feature-{key}.safetensors", folder / f"feature-{key}.json"
    cached = _load_cached(weights, record_file, key, settings)
    if cached is not None:
        log.info("feature network: cache hit %s", weights)
        result = cached
    else:
        started = time.perf_counter()
        network, metrics = train_feature_network(data, settings, class_names)
        seconds = time.perf_counter() - started
        record = {"key": key, "format": CACHE_FORMAT, "objective": resolved, "num_classes": len(class_names or []),
                  "class_names": class_names, "metrics": metrics, "training": asdict(settings),
                  "data": {"description": data.description, "fingerprint": fingerprint,
                           "train_items": len(data.train), "val_items": len(data.val)},
                  "train_seconds": round(seconds, 2)}
        folder.mkdir(parents=True, exist_ok=True)
        _write_atomic(weights, lambda p: save_file({k: v.contiguous() for k, v in network.state_dict().items()}, p))
        _write_atomic(record_file, lambda p: p.write_text(json.dumps(record, indent=2)))
        log.info("feature network: trained a %s in %.1f s (%s), cached at %s", resolved, seconds, metrics, weights)
        result = TrainedFeatures(network, class_names, metrics, key, weights, False, record)
    accuracy = result.metrics.get("val_accuracy")
    if min_val_accuracy is not None and accuracy is not None and accuracy < min_val_accuracy:
        raise ValueError(f"the feature classifier reached val accuracy {accuracy:.3f} < feature.min_val_accuracy="
                         f"{min_val_accuracy}: raise feature.epochs or use more data")
    return result


class InceptionFeatures(nn.Module):
    """Inception-v3 pool features (the standard FID network) through torch-fidelity, for real photographs.

    Needs ``pip install torch-fidelity`` (the ``[inception]`` extra) and a torchvision matching torch, and
    its weights file (``weights_path``, offline) — none of which the CPU development stack can install.
    """

    def __init__(self, weights_path: str | None = None, feature: str = "2048") -> None:
        super().__init__()
        from torchmetrics.utilities.imports import _TORCH_FIDELITY_AVAILABLE

        if not _TORCH_FIDELITY_AVAILABLE:
            raise ImportError("feature=inception needs torch-fidelity and a torchvision matching torch: "
                              "pip install 'sd_lightning[inception]' (not possible on the CPU development stack); "
                              "the default feature=trained needs neither")
        from torchmetrics.image.fid import NoTrainInceptionV3  # pragma: no cover - optional packages

        self.inception = NoTrainInceptionV3(name="inception-v3-compat", features_list=[feature],
                                            feature_extractor_weights_path=weights_path)
        self.num_features = int(feature)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        uint8 = (prepare_images(images, images.shape[-1]) * 127.5 + 127.5).round().clamp(0, 255).to(torch.uint8)
        return self.inception(uint8).reshape(len(images), -1)
