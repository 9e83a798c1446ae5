"""The CI quality test: the default digits recipe shortened to 1,200 of its 2,000 steps (`experiment=digits` on the
session's VAE, which is `experiment=digits_autoencoder` as `make train` runs it) reaches what
experiments/time_to_quality measured for that length over seeds, with a diversity floor so that a mode-collapsed
model fails.

Floors from `experiments/time_to_quality/results.jsonl` (recipe `tiny_fast_1200`: both stages from random weights,
seeds 0, 1, 2; AMD EPYC, 2 cores; guidance 1.25): accuracy 0.975 / 0.97 / 0.965, diversity 0.739 / 0.731 / 0.726.
With 200 samples the accuracy's sampling error is about ±0.025, so the floors sit below the worst seed by more than
that: far above chance (0.1), the previous recipe's worst seed at this length (0.885) and a one-prototype-per-class
model (diversity 0).
"""

import importlib.util
from pathlib import Path

import pytest

from sd_lightning.cli.train import train

from conftest import compose_train

STUDY = Path(__file__).resolve().parents[2] / "experiments" / "digits_quality"
QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress",
         "trainer.check_val_every_n_epoch=100", "callbacks.sample_grid.num_per_prompt=1"]
SHORTENED = ["trainer.max_steps=1200"]
ACCURACY_FLOOR = 0.92
DIVERSITY_FLOOR = 0.69


def _measure():
    spec = importlib.util.spec_from_file_location("digits_quality_measure", STUDY / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure


@pytest.mark.slow
def test_shortened_default_digits_recipe_reaches_its_measured_quality(tmp_path, digits_vae_dir):
    run_dir = tmp_path / "digits"
    train(compose_train(run_dir, ["experiment=digits", *SHORTENED, *QUIET, f"model.components.vae_path={digits_vae_dir}"]))
    # The study's measure (20 per class, the stored sampler) at the guidance the floors were measured with.
    result = _measure()(run_dir / "checkpoints" / "last.ckpt", guidance=1.25)
    print(f"shortened default recipe: accuracy={result['accuracy']:.3f} diversity={result['diversity']:.3f}")
    assert result["num_samples"] == 200
    assert result["sampling"] == {"scheduler": "flow_euler", "steps": 30, "guidance_scale": 1.25}  # as measured
    assert result["accuracy"] >= ACCURACY_FLOOR
    assert result["diversity"] >= DIVERSITY_FLOOR
