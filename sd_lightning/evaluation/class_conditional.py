"""Sample quality for class-conditional data: conditional accuracy and within-class diversity.

Accuracy alone rewards a model that draws one prototype per class; diversity (the spread of the samples of
a class relative to the spread of the real images of that class) catches that collapse. Both are measured
on the 8x8 scikit-learn digit grid, where a classifier is cheap, exact to reproduce and reliable.

Reference points (``tests/evaluation/test_class_conditional.py``): one prototype per class scores diversity
0.0; the 1,797 real digits passed through the training upscale (``upscale_digit(..., 32)``) and back down
score 0.80 diversity (the blur of the round trip) and 1.0 accuracy (0.996 for digits the classifier never
saw), which is the ceiling a perfect digits model can reach here.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

_CHANNEL_COUNTS = (1, 3, 4)


def _as_nhwc(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """A float64 [N, H, W, C] array in [0, 1] from [N,C,H,W], [N,H,W,C] or [N,H,W] input."""
    if isinstance(images, torch.Tensor):
        images = images.detach().cpu().numpy()
    array = np.asarray(images)
    # Integer images follow the 0..255 convention; floats must already be in [0, 1].
    array = array.astype(np.float64) / 255.0 if np.issubdtype(array.dtype, np.integer) else array.astype(np.float64)
    if array.ndim == 3:
        return array[..., None]
    if array.ndim != 4:
        raise ValueError(f"expected images shaped [N, C, H, W] or [N, H, W, C], got shape {array.shape}")
    if array.shape[-1] in _CHANNEL_COUNTS:
        return array
    if array.shape[1] in _CHANNEL_COUNTS:
        return array.transpose(0, 2, 3, 1)
    raise ValueError(f"cannot find a channel axis (1, 3 or 4 channels) in images shaped {array.shape}")


def images_to_digit_grid(images: Any, size: int = 8) -> np.ndarray:
    """Images → [N, size, size] float grids in the scikit-learn digits scale (0..16, ink high).

    Accepts a list of PIL images or a numpy/torch array [N,C,H,W] / [N,H,W,C] with values in [0, 1].
    Gray is the mean of the RGB channels (alpha ignored); downsampling averages areas (PIL BOX), which is
    how the 8x8 digits were made from 32x32 bitmaps, so real digits round-trip closely.
    """
    if isinstance(images, np.ndarray | torch.Tensor):
        array = _as_nhwc(images)
    else:
        array = np.stack([np.asarray(img.convert("RGB"), dtype=np.float64) / 255.0 for img in images])
    if len(array) == 0:
        raise ValueError("images_to_digit_grid got no images")
    if not np.isfinite(array).all():
        raise ValueError(f"{int((~np.isfinite(array)).sum())} non-finite pixel values (NaN/inf) in the images")
    if array.max() > 1.5:
        raise ValueError(f"float images must be in [0, 1]; got values up to {array.max():.1f} (0..255 scale?)")
    gray = array[..., :3].mean(axis=-1) if array.shape[-1] >= 3 else array[..., 0]
    grids = [
        np.asarray(Image.fromarray(g.astype(np.float32)).resize((size, size), Image.Resampling.BOX), dtype=np.float64)
        for g in gray
    ]
    return np.clip(np.stack(grids), 0.0, 1.0) * 16.0


def real_digits_by_class() -> dict[int, np.ndarray]:
    """The 1,797 real scikit-learn digits as {label: [N, 8, 8] in 0..16}, the reference for diversity."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return {label: digits.images[digits.target == label].astype(np.float64) for label in range(10)}


def fit_digits_classifier(seed: int = 0, exclude: Sequence[int] = ()) -> Any:
    """An RBF SVC (gamma=0.001, C=10) on the flattened 8x8 digits (0..16), the judge of conditional accuracy.

    Held-out accuracy 0.993 on a stratified 25% split (``train_test_split(..., random_state=0)``, fit on
    the other 75%; 0.984-0.993 over split seeds 0-2) and 0.972 with 5-fold unshuffled cross-validation
    (folds that separate writers). Nearby gamma/C settings are no better. By default it is fit on all 1,797
    digits; ``exclude`` leaves out those indices (for held-out checks). ``seed`` is SVC's ``random_state``,
    which only matters for probability estimates (not used here): the fit itself is deterministic.
    """
    from sklearn.datasets import load_digits
    from sklearn.svm import SVC

    digits = load_digits()
    keep = np.setdiff1d(np.arange(len(digits.target)), np.asarray(exclude, dtype=int))
    classifier = SVC(gamma=0.001, C=10.0, random_state=seed)
    classifier.fit(digits.images[keep].reshape(len(keep), -1), digits.target[keep])
    return classifier


def conditional_accuracy(classifier: Any, samples_by_class: Mapping[int, np.ndarray]) -> tuple[float, dict[int, float]]:
    """Share of the samples made for class k that the classifier labels k: overall, and per class."""
    per_class: dict[int, float] = {}
    correct = total = 0
    for label, grids in sorted(samples_by_class.items()):
        grids = np.asarray(grids, dtype=np.float64)
        if len(grids) == 0:
            raise ValueError(f"class {label} has no samples")
        predicted = classifier.predict(grids.reshape(len(grids), -1))
        hits = int((predicted == label).sum())
        per_class[int(label)] = hits / len(grids)
        correct += hits
        total += len(grids)
    if total == 0:
        raise ValueError("conditional_accuracy got no classes")
    return correct / total, per_class


def mean_pairwise_distance(x: np.ndarray) -> float:
    """Mean Euclidean distance over the distinct pairs i < j of the rows of ``x`` (each row flattened).

    Computed from explicit differences (not the Gram-matrix shortcut) so identical rows give exactly 0.
    """
    flat = np.asarray(x, dtype=np.float64).reshape(len(x), -1)
    n = len(flat)
    if n < 2:
        raise ValueError(f"mean_pairwise_distance needs at least 2 samples to form a pair, got {n}")
    total = sum(float(np.linalg.norm(flat[i + 1 :] - flat[i], axis=1).sum()) for i in range(n - 1))
    return total / (n * (n - 1) / 2)


def relative_diversity(
    samples_by_class: Mapping[int, np.ndarray], real_by_class: Mapping[int, np.ndarray]
) -> tuple[float, dict[int, float]]:
    """Per class, spread of the samples / spread of the real images of that class; and the mean over classes.

    Normalizing per class makes classes with naturally varied handwriting (e.g. 8) and tight ones (e.g. 0)
    count equally: 1.0 means as varied as real data, 0.0 means one image repeated.
    """
    per_class: dict[int, float] = {}
    for label, samples in sorted(samples_by_class.items()):
        if label not in real_by_class:
            raise KeyError(f"class {label} has samples but no real images to compare with")
        reference = mean_pairwise_distance(real_by_class[label])
        if reference == 0.0:
            raise ValueError(f"the real images of class {label} are all identical; diversity is undefined")
        per_class[int(label)] = mean_pairwise_distance(samples) / reference
    if not per_class:
        raise ValueError("relative_diversity got no classes")
    return float(np.mean(list(per_class.values()))), per_class


@dataclass
class ClassConditionalReport:
    """Both quality measures of one set of class-conditional samples (JSON-ready through ``to_dict``)."""

    accuracy: float
    per_class_accuracy: dict[int, float]
    diversity: float
    per_class_diversity: dict[int, float]
    num_samples: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def evaluate_digit_samples(samples_by_class: Mapping[int, Any], classifier: Any = None) -> ClassConditionalReport:
    """Accuracy and diversity of generated digits, {label: images} in any ``images_to_digit_grid`` format.

    Pass a fitted ``classifier`` to reuse it across calls; by default one is fit (about a second).
    """
    if classifier is None:
        classifier = fit_digits_classifier()
    grids = {int(label): images_to_digit_grid(images) for label, images in samples_by_class.items()}
    accuracy, per_class_accuracy = conditional_accuracy(classifier, grids)
    diversity, per_class_diversity = relative_diversity(grids, real_digits_by_class())
    return ClassConditionalReport(
        accuracy=accuracy,
        per_class_accuracy=per_class_accuracy,
        diversity=diversity,
        per_class_diversity=per_class_diversity,
        num_samples=sum(len(g) for g in grids.values()),
    )
