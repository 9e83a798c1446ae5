"""StabilityCallback on real tiny runs: sample drift between validations, EMA gap, divergence, and resume."""

import math

import lightning as L
import pandas as pd
import pytest
import torch

from sd_lightning.callbacks.stability import StabilityCallback, divergence_reason, sample_change
from sd_lightning.cli.train import train

from conftest import FAST, compose_train

# Validation every 2 steps on a tiny model; the sample grid is off (the stability samples are separate).
TINY = [*FAST, "~callbacks.sample_grid", "data.source.limit=64", "data.batch_size=8",
        "model.components.denoiser.block_out_channels=[16,32]", "trainer.val_check_interval=2",
        "trainer.check_val_every_n_epoch=null"]


class BreakWeightsAtStep(L.Callback):
    """Fault injection, the two ways a run blows up: before training step ``jump_step`` the UNet output
    layer is scaled by ``scale`` (and training goes on from there); during the validation at ``nan_step``
    the layer holds NaN (put back afterwards, since NaN weights would stop training before validating)."""

    def __init__(self, jump_step: int, nan_step: int, scale: float = 30.0) -> None:
        self.jump_step, self.nan_step, self.scale = jump_step, nan_step, scale
        self._saved = None

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.jump_step and self._saved is None:
            with torch.no_grad():
                pl_module.denoiser.model.conv_out.weight.mul_(self.scale)

    def on_validation_start(self, trainer, pl_module) -> None:
        if trainer.global_step == self.nan_step:
            self._saved = pl_module.denoiser.model.conv_out.weight.detach().clone()
            with torch.no_grad():
                pl_module.denoiser.model.conv_out.weight.fill_(float("nan"))

    def on_validation_end(self, trainer, pl_module) -> None:
        if self._saved is not None:
            with torch.no_grad():
                pl_module.denoiser.model.conv_out.weight.copy_(self._saved)


def _stability_rows(run_dir):
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    return metrics.dropna(subset=["stability/diverged"]).set_index("step")


def test_divergence_reason_and_sample_change_units():
    assert divergence_reason({"val/mse": 0.2, "val/r2": 0.5}, "val/mse", 0.1, 3.0) is None
    assert "over 3x" in divergence_reason({"val/mse": 0.31}, "val/mse", 0.1, 3.0)
    assert "non-finite" in divergence_reason({"val/mse": 0.1, "val/mae": math.inf}, "val/mse", 0.1, 3.0)
    assert divergence_reason({"val/mse": 5.0}, "val/mse", None, 3.0) is None  # first validation: no best yet
    images = torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    same = sample_change(images, images)
    assert same["stability/sample_mse"] == 0.0 and same["stability/sample_ssim"] == pytest.approx(1.0)
    other = sample_change(images, torch.rand(4, 3, 32, 32, generator=torch.Generator().manual_seed(1)))
    assert other["stability/sample_mse"] > 0.1 and other["stability/sample_ssim"] < 0.2
    with pytest.raises(ValueError, match="divergence_factor"):
        StabilityCallback(divergence_factor=1.0)


@pytest.mark.slow
def test_stability_metrics_and_their_state_survive_a_resume(tmp_path):
    # 4 steps (validations after steps 2 and 4), then resumed to 6 (one more validation).
    run_dir = tmp_path / "run"
    train(compose_train(run_dir, [*TINY, "trainer.max_steps=4"]))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["stability"]
    assert state["previous"].shape == (4, 3, 32, 32) and state["validations"] == 2
    before = _stability_rows(run_dir)
    assert len(before) == 2
    assert math.isnan(before["stability/sample_mse"].iloc[0])  # nothing to compare the first samples with
    assert before["stability/sample_mse"].iloc[1] > 0 and -1 < before["stability/sample_ssim"].iloc[1] < 1
    assert (before["stability/ema_param_distance"] > 0).all() and (before["stability/diverged"] == 0).all()
    val_mse = pd.read_csv(run_dir / "csv" / "metrics.csv")["val/mse"].dropna().tolist()
    assert state["best"] == pytest.approx(min(val_mse))

    train(compose_train(run_dir, [*TINY, "trainer.max_steps=6", "resume=auto"]))
    rows = _stability_rows(run_dir)
    assert len(rows) == 3
    after = rows.iloc[-1]
    # A fresh callback would have nothing to compare with: these come from the checkpointed samples and best.
    assert after["stability/sample_mse"] > 0 and -1 < after["stability/sample_ssim"] < 1
    val_mse = pd.read_csv(run_dir / "csv" / "metrics.csv")["val/mse"].dropna().tolist()
    assert len(val_mse) == 3
    assert after["stability/monitor_over_best"] == pytest.approx(val_mse[-1] / min(val_mse[:2]), rel=1e-5)
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["stability"][
        "validations"] == 3


@pytest.mark.slow
def test_a_jump_and_nan_weights_are_flagged_as_divergence(tmp_path, caplog):
    run_dir = tmp_path / "run"
    overrides = [*TINY, "trainer.max_steps=6", "+callbacks.ema.validate_with_ema=false",
                 f"+callbacks.fault._target_={BreakWeightsAtStep.__module__}.BreakWeightsAtStep",
                 "+callbacks.fault.jump_step=3", "+callbacks.fault.nan_step=6"]
    with caplog.at_level("WARNING", logger="sd_lightning.callbacks.stability"):
        train(compose_train(run_dir, overrides))
    rows = _stability_rows(run_dir)
    assert rows["stability/diverged"].tolist() == [0.0, 1.0, 1.0]
    assert rows["stability/monitor_over_best"].iloc[1] > 3.0
    messages = [r.getMessage() for r in caplog.records if "diverged" in r.getMessage()]
    assert len(messages) == 2 and "over 3x its best" in messages[0] and "non-finite" in messages[1]
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["callbacks"]["stability"]
    assert state["divergences"] == 2
