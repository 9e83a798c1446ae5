"""Sample-quality and reconstruction metrics on image tensors, computed with torchmetrics.

Images everywhere here are float tensors ``[N, C, H, W]`` in ``[0, 1]``. FID and KID take any feature
module returning ``[N, d]`` (``features.py``: by default a small CNN trained on the data set itself), so
their values are comparable only between runs that use the same feature network — the JSON report records
its cache key. Class-conditional accuracy and diversity reuse ``class_conditional``'s definitions with
that network's classifier as the judge.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn
from torchmetrics.image import PeakSignalNoiseRatio, StructuralSimilarityIndexMeasure
from torchmetrics.image.fid import FrechetInceptionDistance  # not re-exported without torch-fidelity
from torchmetrics.image.kid import KernelInceptionDistance
from torchmetrics.regression import MeanSquaredError

from sd_lightning.evaluation.class_conditional import conditional_accuracy, relative_diversity


def _check_images(name: str, images: torch.Tensor, minimum: int = 2) -> torch.Tensor:
    if not isinstance(images, torch.Tensor) or images.ndim != 4:
        raise ValueError(f"{name}: expected a float tensor [N, C, H, W] in [0, 1], got {getattr(images, 'shape', images)}")
    if len(images) < minimum:
        raise ValueError(f"{name}: needs at least {minimum} images, got {len(images)}")
    if not torch.isfinite(images).all():
        raise ValueError(f"{name}: contains non-finite pixel values")
    return images.float()


@torch.no_grad()
def frechet_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, batch_size: int = 256) -> float:
    """FID (Heusel et al. 2017) between two image sets in ``feature``'s space: ‖μ_r−μ_f‖² + Tr(Σ_r+Σ_f−2(Σ_rΣ_f)^½)."""
    real, fake = _check_images("real images", real), _check_images("generated images", fake)
    metric = FrechetInceptionDistance(feature=feature, normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size], real=is_real)
    return float(metric.compute())


@torch.no_grad()
def kernel_distance(feature: nn.Module, real: torch.Tensor, fake: torch.Tensor, subsets: int = 50,
                    subset_size: int = 100, seed: int = 0, batch_size: int = 256) -> tuple[float, float]:
    """KID (Bińkowski et al. 2018): unbiased MMD² with a cubic polynomial kernel, mean and std over random
    subsets of ``min(subset_size, N_real, N_fake)`` images; 0 in expectation for equal distributions."""
    real, fake = _check_images("real images", real), _check_images("generated images", fake)
    size = min(subset_size, len(real), len(fake))
    metric = KernelInceptionDistance(feature=feature, subsets=subsets, subset_size=size, normalize=True)
    for images, is_real in ((real, True), (fake, False)):
        for start in range(0, len(images), batch_size):
            metric.update(images[start:start + batch_size], real=is_real)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # KID draws its subsets from the global generator
        mean, std = metric.compute()
    return float(mean), float(std)


class FeatureClassifierJudge:
    """A trained feature classifier behind the scikit-learn ``predict`` that ``conditional_accuracy`` calls
    (it passes flattened images; this restores their shape)."""

    def __init__(self, network: Any, image_shape: Sequence[int]) -> None:
        self.network, self.image_shape = network, tuple(image_shape)

    def predict(self, flat: np.ndarray) -> np.ndarray:
        images = torch.as_tensor(np.asarray(flat, dtype=np.float32)).reshape(-1, *self.image_shape)
        return self.network.predict_images(images)


def class_conditional_metrics(judge: FeatureClassifierJudge, samples_by_class: Mapping[int, torch.Tensor],
                              real_by_class: Mapping[int, torch.Tensor]) -> dict[str, Any]:
    """Conditional accuracy (share of class-k samples the judge labels k) and relative diversity (pixel
    spread of the samples of a class / spread of its real images), per class and overall."""
    as_numpy = {k: v.float().numpy() for k, v in samples_by_class.items()}
    accuracy, per_class_accuracy = conditional_accuracy(judge, as_numpy)
    usable = {k: v for k, v in as_numpy.items() if len(v) >= 2 and len(real_by_class.get(k, ())) >= 2}
    diversity, per_class_diversity = (relative_diversity(usable, {k: real_by_class[k].float().numpy() for k in usable})
                                      if usable else (float("nan"), {}))
    return {"accuracy": accuracy, "per_class_accuracy": per_class_accuracy, "diversity": diversity,
            "per_class_diversity": per_class_diversity}


@torch.no_grad()
def reconstruction_metrics(vae: nn.Module, images: torch.Tensor, batch_size: int = 64) -> dict[str, float]:
    """How well an ``AutoencoderKL`` reproduces ``images`` (posterior mode, then decode), in its [-1, 1] pixel
    scale as ``AutoencoderModule`` validates: MSE, PSNR and SSIM (data range 2)."""
    images = _check_images("images", images, minimum=1)
    metrics = {"mse": MeanSquaredError(), "psnr": PeakSignalNoiseRatio(data_range=2.0),
               "ssim": StructuralSimilarityIndexMeasure(data_range=2.0)}
    metrics = {name: metric.set_dtype(torch.float64) for name, metric in metrics.items()}
    device = next(vae.parameters()).device
    for start in range(0, len(images), batch_size):
        target = (images[start:start + batch_size] * 2.0 - 1.0).to(device)
        reconstruction = vae.decode(vae.encode(target).latent_dist.mode()).sample.clamp(-1, 1)
        target, reconstruction = target.double().cpu(), reconstruction.double().cpu()
        metrics["mse"].update(reconstruction.flatten(), target.flatten())
        metrics["psnr"].update(reconstruction, target)
        metrics["ssim"].update(reconstruction, target)
    return {name: float(metric.compute()) for name, metric in metrics.items()}


class _TensorFeaturesCLIP(nn.Module):
    """transformers 5's ``get_*_features`` return an output object (projected embeddings in ``pooler_output``);
    torchmetrics 1.9's CLIPScore expects the tensor. This adapter hands it the tensor."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model, self.config = model, model.config

    def get_image_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model.get_image_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)

    def get_text_features(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.model.get_text_features(*args, **kwargs)
        return getattr(out, "pooler_output", out)


def local_clip_loader(path: str) -> Callable[[], tuple[Any, Any]]:
    """A loader torchmetrics' CLIPScore accepts for a local CLIP folder (it only takes hub names otherwise)."""

    def load() -> tuple[Any, Any]:
        from transformers import CLIPModel, CLIPProcessor

        model = CLIPModel.from_pretrained(path, local_files_only=True).eval()
        return _TensorFeaturesCLIP(model), CLIPProcessor.from_pretrained(path, local_files_only=True)

    return load


@torch.no_grad()
def clip_score(images: torch.Tensor, prompts: Sequence[str], clip_path: str | None,
               batch_size: int = 64) -> float | None:
    """CLIPScore (Hessel et al. 2021, 100·max(cos, 0)) of images against their prompts with a local CLIP
    folder; None when no folder is configured or no image has a prompt (unconditional samples)."""
    if not clip_path:
        return None
    from pathlib import Path

    from torchmetrics.multimodal.clip_score import CLIPScore

    if not (Path(clip_path).expanduser() / "config.json").is_file():
        raise FileNotFoundError(f"eval.clip_path={clip_path} is not a local CLIP folder (no config.json)")
    keep = [i for i, prompt in enumerate(prompts) if prompt]
    if not keep:
        return None
    metric = CLIPScore(model_name_or_path=local_clip_loader(str(Path(clip_path).expanduser())))
    uint8 = (images[keep].clamp(0, 1) * 255).round().to(torch.uint8)
    texts = [prompts[i] for i in keep]
    for start in range(0, len(keep), batch_size):
        metric.update(list(uint8[start:start + batch_size]), texts[start:start + batch_size])
    return float(metric.compute())
