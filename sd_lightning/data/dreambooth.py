"""DreamBooth with prior preservation (Ruiz et al. 2023): a subject's instance images under an instance prompt,
beside class images under a class prompt, so fine-tuning on a few images keeps what the class looks like.

Every training example is a pair — instance ``k mod n_instance`` and class ``k mod n_class``, as diffusers'
``train_dreambooth.py`` pairs them (repeated instance images get their own ids, so their own noise) — so a batch
of B pairs holds B instance and B class images, flagged by ``prior``; the module adds ``prior_loss_weight`` × the class images' loss to the instance images' (both logged).
The pairs go through the same resumable samplers as any data set. Class images come from ``class_root``, or are
generated once with the base model into a cache folder (``resolve_class_images``); user folders are only read.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.datasets import DiffusionDataset, collate_examples
from sd_lightning.data.samplers import unstamp
from sd_lightning.data.sources import ImageFolderSource, ImageSource, SourceItem
from sd_lightning.files import staged_folder

log = logging.getLogger(__name__)
CLASS_IMAGES_INDEX = "class_images.json"


class PromptedSource(ImageSource):
    """Another source's images, every one under ``prompt``, ids prefixed (instance and class files may share names)."""

    def __init__(self, source: ImageSource, prompt: str, prefix: str) -> None:
        self.source = source
        self.items = [SourceItem(id=prefix + item.id, caption=prompt, label=item.label, mask=item.mask)
                      for item in source.items]

    def load_image(self, index: int) -> Image.Image:
        return self.source.load_image(index)

    def image_size(self, index: int) -> tuple[int, int]:
        return self.source.image_size(index)

    def load_mask(self, index: int, mode: str) -> Image.Image | None:
        return self.source.load_mask(index, mode)

    def describe(self) -> str:
        return self.source.describe()


class PriorPairs(Dataset):
    """Position k: the instance example ``k mod n`` and the class example ``k mod m``; length max(n, m)."""

    def __init__(self, instances: DiffusionDataset, classes: DiffusionDataset) -> None:
        self.instances, self.classes = instances, classes
        self.epoch = 0

    # The instance images stand for the split (what the run manifest hashes and the VAE statistics read).
    @property
    def source(self) -> ImageSource:
        return self.instances.source

    @property
    def indices(self) -> list[int]:
        return self.instances.indices

    def __len__(self) -> int:
        return max(len(self.instances), len(self.classes))

    def __getitem__(self, position: Any) -> tuple[dict[str, Any] | None, dict[str, Any] | None]:
        position, epoch = unstamp(position, self.epoch)
        self.instances.epoch = self.classes.epoch = epoch
        return self.instances[position % len(self.instances)], self.classes[position % len(self.classes)]


def collate_pairs(pairs: Sequence[tuple[dict[str, Any] | None, dict[str, Any] | None]]) -> dict[str, Any]:
    """The instance examples, then the class examples of the same pairs; ``prior`` flags the class ones."""
    instances = [p[0] for p in pairs if p[0] is not None]
    classes = [p[1] for p in pairs if p[1] is not None]
    batch = collate_examples([*instances, *classes])
    batch["num_skipped"] = 2 * len(pairs) - len(instances) - len(classes)
    batch["prior"] = torch.tensor([False] * len(instances) + [True] * len(classes))
    return batch


class DreamBoothDataModule(DiffusionDataModule):
    """``source`` (data.root: the subject) under ``instance_prompt``; ``class_root`` under ``class_prompt``.

    Validation is the instance images' validation split (``data.val_fraction``), under the instance prompt.
    """

    def __init__(self, source: ImageSource, instance_prompt: str, class_prompt: str, class_root: str | None = None,
                 num_class_images: int = 100, **kwargs: Any) -> None:
        if not str(instance_prompt).strip() or not str(class_prompt).strip():
            raise ValueError("data.instance_prompt and data.class_prompt must be set (e.g. 'a photo of sks dog' and "
                             "'a photo of a dog')")
        if num_class_images < 1:
            raise ValueError(f"data.num_class_images={num_class_images} must be >= 1")
        if kwargs.get("cache") is not None or kwargs.get("buckets") is not None:
            raise ValueError("data=dreambooth does not take data.cache or data.buckets yet: set them to null")
        super().__init__(source=PromptedSource(source, instance_prompt, ""), **{**kwargs, "conditioning": "text"})
        self.instance_prompt, self.class_prompt = instance_prompt, class_prompt
        self.class_root = class_root
        self.num_class_images = num_class_images
        self.class_source: ImageSource | None = None

    def setup(self, stage: str | None = None) -> None:
        if self.train_dataset is not None:
            return
        if self.class_root is None:
            raise ValueError("data.class_root is not set: sdl-train generates the class images with the base model "
                             "(cli/train.py build_run); here pass a folder of class images")
        self.class_source = PromptedSource(ImageFolderSource(self.class_root, caption_template=None),
                                           self.class_prompt, "class/")
        if len(self.class_source.items) < self.num_class_images:
            log.warning("data.class_root=%s has %d class images (data.num_class_images=%d): training with those",
                        self.class_root, len(self.class_source.items), self.num_class_images)
        # More class than instance images: each instance image repeats within an epoch, every copy with its own id
        # (so its own noise and augmentation), as labeled oversampling does.
        self.labeled_oversample = max(1, -(-len(self.class_source.items) // len(self.source.items)))
        super().setup(stage)
        classes = DiffusionDataset(self.class_source, range(len(self.class_source.items)), self.transform, self.seed,
                                   augment=True, captions=None, masks="none")
        self.train_dataset = PriorPairs(self.train_dataset, classes)
        self.train_collate_fn = collate_pairs
        log.info("dreambooth: %d instance images (%r) paired with %d class images (%r)",
                 len(self.train_dataset.instances), self.instance_prompt, len(classes), self.class_prompt)


def class_images_key(model: Any, prompt: str, count: int, resolution: int, sampling: dict[str, Any]) -> str:
    """What the generated class images depend on: the base folder's files (name, size, time), prompt, count, size and
    sampler."""
    root = Path(model.path)
    files = sorted((p.relative_to(root).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
                   for p in root.rglob("*") if p.is_file())
    record = {"model": str(root.resolve()), "files": files, "prompt": prompt, "count": count, "resolution": resolution,
              "sampling": {k: sampling.get(k) for k in ("scheduler", "steps", "guidance_scale")}}
    return hashlib.sha256(json.dumps(record, sort_keys=True).encode()).hexdigest()[:16]


def resolve_class_images(datamodule: DreamBoothDataModule, model: Any, cache_root: Path) -> str:
    """The class images folder: ``data.class_root``, or ``num_class_images`` generated once by the base model
    (before any training step) under ``cache_root``, reused by every later run of the same model and prompt."""
    if datamodule.class_root is not None:
        return datamodule.class_root
    if not model.path:
        raise ValueError("data=dreambooth without data.class_root generates the class images with the base model, "
                         "which needs a pretrained folder (model.path=…); or give data.class_root=<folder of images>")
    from sd_lightning.diffusion.sampling import generate
    from sd_lightning.models.pipelines import build_pipeline

    resolution = datamodule.transform.resolution
    sampling = dict(model.sampling)
    folder = cache_root / class_images_key(model, datamodule.class_prompt, datamodule.num_class_images, resolution,
                                           sampling)
    if (folder / CLASS_IMAGES_INDEX).is_file():
        log.info("dreambooth: reusing %d class images in %s", datamodule.num_class_images, folder)
        return str(folder)
    log.info("dreambooth: generating %d class images of %r with the base model into %s",
             datamodule.num_class_images, datamodule.class_prompt, folder)
    pipeline = build_pipeline(model.components, model.objective, sampling["scheduler"])
    was_training = model.training
    model.eval()
    try:
        images = generate(pipeline, [datamodule.class_prompt] * datamodule.num_class_images, seed=0,
                          steps=int(sampling["steps"]), guidance_scale=float(sampling["guidance_scale"]),
                          height=resolution, width=resolution, pipeline_kwargs=sampling.get("pipeline_kwargs"))
    finally:
        model.train(was_training)
    with staged_folder(folder) as tmp:
        for index, image in enumerate(images):
            image.save(tmp / f"{index:05d}.png")
        (tmp / CLASS_IMAGES_INDEX).write_text(json.dumps({"prompt": datamodule.class_prompt,
                                                          "count": datamodule.num_class_images}) + "\n")
    return str(folder)
