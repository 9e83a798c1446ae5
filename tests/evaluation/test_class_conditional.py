"""Conditional accuracy and diversity against hand-checkable cases."""

import math

import numpy as np
import pytest
import torch
from sklearn.datasets import load_digits

from sd_lightning.data.sources import upscale_digit
from sd_lightning.evaluation.class_conditional import (
    conditional_accuracy,
    evaluate_digit_samples,
    fit_digits_classifier,
    images_to_digit_grid,
    mean_pairwise_distance,
    real_digits_by_class,
    relative_diversity,
)


@pytest.fixture(scope="module")
def classifier():
    return fit_digits_classifier()


def test_mean_pairwise_distance_by_hand():
    points = np.array([[0.0, 0.0], [3.0, 4.0], [0.0, 4.0]])
    assert mean_pairwise_distance(points) == pytest.approx((5.0 + 4.0 + 3.0) / 3)
    with pytest.raises(ValueError, match="at least 2"):
        mean_pairwise_distance(points[:1])


def test_real_digits_against_themselves_and_a_collapsed_model():
    real = real_digits_by_class()
    assert relative_diversity(real, real)[0] == 1.0
    collapsed = {k: np.repeat(v[:1], 20, axis=0) for k, v in real.items()}
    assert relative_diversity(collapsed, real)[0] == 0.0


def test_real_digits_through_the_training_upscale(classifier):
    digits = load_digits()
    picks = {k: np.flatnonzero(digits.target == k)[:30] for k in range(10)}
    samples = {k: [upscale_digit(digits.images[i], 32) for i in idx] for k, idx in picks.items()}
    report = evaluate_digit_samples(samples, classifier)
    # Measured 0.81: a smooth upscale and back blurs strokes, so real digits score below 1.
    assert 0.6 < report.diversity < 0.95
    assert report.accuracy >= 0.9
    assert report.num_samples == 300


def test_accuracy_on_held_out_real_digits_equals_classifier_accuracy():
    digits = load_digits()
    held_out = np.arange(0, len(digits.target), 4)
    model = fit_digits_classifier(exclude=held_out)
    by_class = {k: digits.images[held_out][digits.target[held_out] == k] for k in range(10)}
    accuracy, per_class = conditional_accuracy(model, by_class)
    direct = (model.predict(digits.images[held_out].reshape(len(held_out), -1)) == digits.target[held_out]).mean()
    assert accuracy == pytest.approx(direct)
    assert accuracy > 0.95 and set(per_class) == set(range(10))


def test_grid_conversion_accepts_pil_nchw_and_nhwc():
    digits = load_digits()
    pil = [upscale_digit(digits.images[i], 32) for i in range(4)]
    nhwc = np.stack([np.asarray(p, dtype=np.float64) / 255 for p in pil])
    nchw = torch.from_numpy(nhwc).permute(0, 3, 1, 2)
    a, b, c = images_to_digit_grid(pil), images_to_digit_grid(nhwc), images_to_digit_grid(nchw)
    assert a.shape == (4, 8, 8) and np.allclose(a, b, atol=1e-4) and np.allclose(b, c, atol=1e-4)
    assert math.isclose(float(images_to_digit_grid(np.ones((1, 16, 16, 3))).max()), 16.0)


def test_noise_is_near_chance(classifier):
    rng = np.random.default_rng(0)
    noise = {k: rng.random((20, 32, 32, 3)) for k in range(10)}
    assert evaluate_digit_samples(noise, classifier).accuracy < 0.3
