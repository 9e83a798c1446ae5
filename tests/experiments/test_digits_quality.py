"""A shortened default recipe (1,200 instead of 2,000 steps) must clearly beat chance on conditional accuracy (the full run is measured
in experiments/digits_quality)."""

import importlib.util
from pathlib import Path

import pytest

from sd_lightning.cli.train import train

from conftest import FAST, compose_train

MEASURE = Path(__file__).resolve().parents[2] / "experiments" / "digits_quality" / "measure.py"


def _measure_module():
    spec = importlib.util.spec_from_file_location("digits_quality_measure", MEASURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_short_digits_run_beats_chance(tmp_path, digits_vae_dir):
    run_dir = tmp_path / "digits"
    cfg = compose_train(run_dir, ["experiment=digits", *FAST, f"model.components.vae_path={digits_vae_dir}",
                                  "trainer.max_steps=1200", "trainer.check_val_every_n_epoch=100",
                                  "lr_scheduler.num_warmup_steps=50"])
    train(cfg)
    result = _measure_module().measure(run_dir / "checkpoints" / "last.ckpt", per_class=10, steps=20)
    print(f"short run: accuracy={result['accuracy']:.3f} diversity={result['diversity']:.3f}")
    assert result["accuracy"] >= 0.5  # chance is 0.1
    assert result["num_samples"] == 100
