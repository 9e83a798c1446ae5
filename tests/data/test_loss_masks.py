"""Loss masks (data.masks): `<stem>.mask.png` files or the alpha channel follow the pixels through resize, crop and
flip, weight the training loss at latent resolution normalized by the masked area, and are neither training items
nor flagged by the inspection; the latent cache refuses them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from PIL import Image

from sd_lightning.data.cache import CacheError, check_cacheable
from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.inspection import InspectSettings, scan_folder
from sd_lightning.data.sources import ImageFolderSource
from sd_lightning.models.builders import TINY_TOKENIZER, load_tokenizer

from conftest import compose_train

RED, BLUE = (255, 0, 0), (0, 0, 255)


def _two_tone(width: int, height: int, split: int) -> Image.Image:
    """Red left of column ``split``, blue right of it."""
    array = np.zeros((height, width, 3), np.uint8)
    array[:, :split], array[:, split:] = RED, BLUE
    return Image.fromarray(array)


@pytest.fixture
def masked_folder(tmp_path: Path) -> Path:
    """Four wide images (48x32, red | blue): two with a mask file marking the blue part, one RGBA image whose alpha
    marks it, one without any mask."""
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("a", "b", "c"):
        _two_tone(48, 32, 20).save(root / f"{name}.png")
        (root / f"{name}.txt").write_text(f"a photo of {name}")
    for name in ("a", "b"):
        mask = np.zeros((32, 48), np.uint8)
        mask[:, 20:] = 255
        Image.fromarray(mask).save(root / f"{name}.mask.png")
    rgba = _two_tone(48, 32, 20).convert("RGBA")
    alpha = np.zeros((32, 48), np.uint8)
    alpha[:, 20:] = 255
    rgba.putalpha(Image.fromarray(alpha))
    rgba.save(root / "d.png")
    (root / "d.txt").write_text("a photo of d")
    return root


def _blue(pixels: torch.Tensor) -> torch.Tensor:
    return (pixels[2] > 0.5) & (pixels[0] < -0.5)


def test_masks_follow_the_pixels_and_are_not_items_or_problems(masked_folder: Path) -> None:
    source = ImageFolderSource(masked_folder)
    assert [i.id for i in source.items] == ["a.png", "b.png", "c.png", "d.png"]  # no mask file is an item
    assert [i.mask for i in source.items] == ["a.mask.png", "b.mask.png", None, None]
    report = scan_folder(masked_folder, InspectSettings(), load_tokenizer(TINY_TOKENIZER), workers=1)
    assert report.counts["training_items"] == 4 and report.counts["mask_files"] == 2
    assert not [p for p in report.problems if "mask" in p.file], report.problems

    for mode, masked in (("files", {"a.png", "b.png"}), ("alpha", {"d.png"})):
        datamodule = DiffusionDataModule(ImageFolderSource(masked_folder), resolution=32, center_crop=False,
                                         random_flip=True, val_fraction=0.0, masks=mode)
        datamodule.setup("fit")
        dataset, flips = datamodule.train_dataset, set()
        for epoch in range(6):  # random crops and flips: the mask moves with the pixels
            dataset.epoch = epoch
            for position in range(len(dataset)):
                example = dataset[position]
                mask, blue = example["loss_mask"][0], _blue(example["pixel_values"])
                if example["id"] in masked:
                    assert torch.equal(mask > 0.5, blue), (mode, example["id"], epoch)
                    flips.add(bool(blue[:, 0].all()))  # blue on the left: flipped
                else:
                    assert torch.equal(mask, torch.ones_like(mask))  # no mask: every pixel trains
        assert flips == {True, False}
    plain = DiffusionDataModule(ImageFolderSource(masked_folder), resolution=32, val_fraction=0.0, masks="none")
    plain.setup("fit")
    assert "loss_mask" not in plain.train_dataset[0] and plain.masks == "none"
    with pytest.raises(CacheError, match=r"loss masks \(data.masks=files\): use data.masks=none"):
        check_cacheable(DiffusionDataModule(ImageFolderSource(masked_folder), resolution=32, val_fraction=0.0))
    with pytest.raises(ValueError, match="data.masks='depth' must be 'files', 'alpha', 'none'"):
        DiffusionDataModule(ImageFolderSource(masked_folder), masks="depth")


@pytest.mark.parametrize("family", [[], ["model=sdxl_tiny"], ["model=sd3_tiny", "objective=flow_matching"]],
                         ids=["sd", "sdxl", "sd3"])
def test_masked_latents_get_exactly_zero_gradient_and_the_area_normalizes(tmp_path: Path, family) -> None:
    """Half of each image masked out: the loss gradient with respect to the denoiser output is exactly zero over
    the masked latent columns and not elsewhere (without the mask it is nonzero there: the negative control)."""
    cfg = compose_train(tmp_path / "run", ["data.source.limit=8", "data.batch_size=4", *family])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    datamodule = instantiate(cfg.data)
    datamodule.setup("fit")
    batch = next(iter(datamodule.train_dataloader()))
    outputs = []
    forward = model.denoiser.forward

    def keep_output(*args, **kwargs):
        out = forward(*args, **kwargs)
        if out.requires_grad:
            out.retain_grad()
        outputs.append(out)
        return out

    model.denoiser.forward = keep_output

    def output_gradient(mask: torch.Tensor | None) -> torch.Tensor:
        outputs.clear()
        masked = batch if mask is None else {**batch, "loss_mask": mask}
        model.zero_grad()
        model.diffusion_loss(masked, torch.Generator().manual_seed(0)).sum().backward()
        return outputs[0].grad

    half = torch.ones(4, 1, 32, 32)
    half[..., :16] = 0  # 32 px over an 8-wide latent: the left 4 latent columns
    grad = output_gradient(half)
    assert torch.count_nonzero(grad[..., :4]) == 0
    assert torch.count_nonzero(grad[..., 4:]) == grad[..., 4:].numel()
    assert torch.count_nonzero(output_gradient(None)[..., :4]) > 0

    def loss(mask: torch.Tensor | None) -> torch.Tensor:
        with torch.no_grad():
            masked = batch if mask is None else {**batch, "loss_mask": mask}
            return model.diffusion_loss(masked, torch.Generator().manual_seed(0))

    torch.testing.assert_close(loss(torch.ones(4, 1, 32, 32)), loss(None))  # an image without a mask trains as today
    torch.testing.assert_close(loss(torch.full((4, 1, 32, 32), 0.25)), loss(None))  # normalized by the masked area
    assert not torch.allclose(loss(half), loss(None))
