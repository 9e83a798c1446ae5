"""Bad overrides and missing inputs fail before training, naming the key and the fix."""

import subprocess
import sys

import pytest

from sd_lightning.cli.config import ConfigError
from sd_lightning.cli.train import train

from conftest import compose_train


def _run_train(tmp_path, *overrides):
    return subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", f"paths.output_root={tmp_path}", "logger=csv", *overrides],
        capture_output=True, text=True, cwd=tmp_path, timeout=300,
    )


def test_unknown_key_is_named(tmp_path):
    result = _run_train(tmp_path, "trainer.max_stepz=3")
    assert result.returncode != 0
    assert "max_stepz" in result.stderr


def test_missing_required_value_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"data.root \(set data.root=...\)"):
        train(compose_train(tmp_path / "r", ["data=imagefolder"]))


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("data.val_fraction=1.5", "data.val_fraction"),
        ("data.batch_size=0", "data.batch_size"),
        ("trainer.max_steps=-1", "trainer.max_steps"),
        ("sampling.scheduler=heun", "sampling.scheduler"),
        ("model.components.conditioner.drop_prob=2", "model.components.conditioner.drop_prob"),
        ("data.resolution=36", "data.resolution"),
        ("ckpt_path=/no/such.ckpt", "ckpt_path"),
        ("optimizer.lr=abc", "optimizer.lr"),
    ],
)
def test_bad_values_are_named_before_training(tmp_path, override, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        train(compose_train(tmp_path / "r", [override]))
    assert not (tmp_path / "r" / "checkpoints").exists()


def test_missing_vae_names_the_command_to_run(tmp_path):
    result = _run_train(tmp_path, "experiment=digits")
    assert result.returncode == 2
    assert "experiment=digits_autoencoder" in result.stderr
    assert "Traceback" not in result.stderr
