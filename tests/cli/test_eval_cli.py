"""sdl-eval on a tiny trained run: its own data, another data config, an exported folder, unlabeled images."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from hydra import compose, initialize_config_dir
from PIL import Image

from sd_lightning.cli.config import CONFIG_DIR, ConfigError
from sd_lightning.cli.eval import evaluate
from sd_lightning.cli.export import export

# Few samples, two sampling steps, a short feature-network schedule: numbers are real, just noisy.
FAST_EVAL = ["eval.num_samples=20", "eval.steps=2", "eval.kid_subsets=5", "eval.kid_subset_size=10",
             "eval.batch_size=20", "feature.epochs=3"]


def _cfg(*overrides: str):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("eval", overrides=list(overrides))


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("feature-cache")


@pytest.mark.slow
def test_eval_checkpoint_on_its_training_data(trained_run, tmp_path, feature_cache):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = tmp_path / "eval"
    report = evaluate(_cfg(f"ckpt_path={ckpt}", f"out_dir={out}", f"feature.cache_dir={feature_cache}", *FAST_EVAL))

    assert json.loads((out / "eval.json").read_text()) == json.loads(json.dumps(report))
    assert "| samples/fid |" in (out / "eval.md").read_text()
    assert Image.open(out / "samples.png").size == (10 * 32, 2 * 32)
    # The data config stored in the checkpoint (400 digits) was used.
    assert report["data"] == "DigitsSource(400 items)"

    validation = report["validation"]
    assert {"val/mse", "val/rmse", "val/mae", "val/r2", "val/x0_mse"} <= set(validation)
    assert validation["val/rmse"] == pytest.approx(math.sqrt(validation["val/mse"]), rel=1e-5)
    # Every validation timestep sees the same images, so the overall MSE is the mean of the per-timestep ones.
    per_t = [v for k, v in validation.items() if k.startswith("val/mse_t")]
    assert len(per_t) == 5 and validation["val/mse"] == pytest.approx(np.mean(per_t), rel=1e-5)

    assert report["reconstruction"]["psnr"] > 10 and 0 < report["reconstruction"]["ssim"] <= 1
    feature = report["feature"]
    assert feature["objective"] == "classifier" and not feature["from_cache"] and 0 < feature["val_accuracy"] <= 1

    samples = report["samples"]
    assert samples["num_samples"] == 20 and samples["sampling"]["steps"] == 2
    assert len(samples["per_class_accuracy"]) == 10 and 0 <= samples["conditional_accuracy"] <= 1
    assert 0 <= samples["digits_svc"]["accuracy"] <= 1
    # A 60-step model with 2 sampling steps is far from the data; real train vs real val images are close.
    assert math.isfinite(samples["fid"]) and samples["fid"] > samples["fid_real_train_vs_val"] >= 0
    assert math.isfinite(samples["kid"]) and "clip_score" not in samples

    # A second evaluation reuses the cached feature network and reproduces the sample metrics exactly.
    again = evaluate(_cfg(f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'again'}", f"feature.cache_dir={feature_cache}",
                          "eval.validate=false", "eval.reconstruction=false", *FAST_EVAL))
    assert again["feature"]["from_cache"] and again["feature"]["key"] == feature["key"]
    assert again["samples"]["fid"] == samples["fid"] and again["samples"]["kid"] == samples["kid"]
    assert "validation" not in again


@pytest.mark.slow
def test_eval_exported_folder_needs_and_takes_a_data_config(trained_run, tmp_path, feature_cache):
    folder = export(_cfg_export(trained_run, tmp_path / "pipe"))
    with pytest.raises(ConfigError, match="carries no data config"):
        evaluate(_cfg(f"ckpt_path={folder}", f"out_dir={tmp_path / 'x'}", *FAST_EVAL))
    # The console script, on other data (200 digits) than the model was trained on.
    out = tmp_path / "eval"
    result = subprocess.run(
        [str(Path(sys.executable).with_name("sdl-eval")), f"ckpt_path={folder}", f"out_dir={out}", "data=digits",
         "data.source.limit=200", f"feature.cache_dir={feature_cache}", "eval.reconstruction=false", *FAST_EVAL],
        capture_output=True, text=True, env={**os.environ, "COLUMNS": "200"}, timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "samples/fid" in result.stdout and "val/mse" in result.stdout
    report = json.loads((out / "eval.json").read_text())
    assert report["data"] == "DigitsSource(200 items)" and report["samples"]["num_samples"] == 20


def _cfg_export(trained_run: Path, out_dir: Path):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("export", overrides=[f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
                                            f"out_dir={out_dir}"])


@pytest.mark.slow
def test_eval_on_unlabeled_image_folder_uses_autoencoder_features(trained_run, tmp_path, feature_cache):
    root = tmp_path / "photos"
    root.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):  # no captions anywhere: an unlabeled data set
        pixels = (rng.random((40, 40, 1)) * 80 + (i % 3) * 60).clip(0, 255).astype(np.uint8).repeat(3, axis=2)
        Image.fromarray(pixels).save(root / f"img{i:02d}.png")
    before = sorted((p.name, p.stat().st_mtime_ns) for p in root.iterdir())
    report = evaluate(_cfg(f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"out_dir={tmp_path / 'e'}",
                           "data=imagefolder", f"data.root={root}", "data.val_fraction=0.25",
                           f"feature.cache_dir={feature_cache}", *FAST_EVAL))
    assert report["feature"]["objective"] == "autoencoder" and "val_mse" in report["feature"]
    assert "conditional_accuracy" not in report["samples"] and "digits_svc" not in report["samples"]
    assert math.isfinite(report["samples"]["fid"]) and "val/mse" in report["validation"]
    assert sorted((p.name, p.stat().st_mtime_ns) for p in root.iterdir()) == before  # user files untouched
    with pytest.raises(ConfigError, match="feature.objective=classifier needs labeled data"):
        evaluate(_cfg(f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}", f"out_dir={tmp_path / 'f'}",
                      "data=imagefolder", f"data.root={root}", "feature.objective=classifier",
                      f"feature.cache_dir={feature_cache}", "eval.validate=false", *FAST_EVAL))


def test_bad_settings_fail_before_any_work_naming_the_keys(tmp_path):
    result = subprocess.run(
        [str(Path(sys.executable).with_name("sdl-eval")), f"ckpt_path={tmp_path / 'missing.ckpt'}",
         f"out_dir={tmp_path / 'out'}", "eval.reference=test", "eval.num_samples=1", "eval.scheduler=magic"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 2
    for text in ("missing.ckpt does not exist", "eval.reference='test' must be one of",
                 "eval.num_samples=1 must be an integer >= 2", "eval.scheduler='magic' must be one of"):
        assert text in result.stderr
    assert not (tmp_path / "out" / "eval.json").exists()
    with pytest.raises(ConfigError, match=r"feature._target_ \(set feature._target_=...\)"):
        evaluate(_cfg(f"ckpt_path={tmp_path}", f"out_dir={tmp_path / 'o'}", "feature=custom"))
