"""RunClock projects the whole run (steps and validations); estimate=true measures without training."""

from __future__ import annotations

import math
import time

import lightning as L
import pytest
import torch
from lightning.pytorch.demos.boring_classes import BoringModel

import sd_lightning.callbacks.progress as progress
from sd_lightning.callbacks.progress import (
    EtaProgressBar,
    PlainProgressBar,
    RunClock,
    format_duration,
    progress_bar,
)

from conftest import FAST, compose_train


class FakeTime:
    """A clock that only moves when the model says so, making timing assertions exact."""

    def __init__(self) -> None:
        self.now = 0.0

    def perf_counter(self) -> float:
        return self.now


class TimedModel(BoringModel):
    """Each training step 'takes' 2 s, each validation batch 0.5 s of fake time."""

    def __init__(self, clock: FakeTime) -> None:
        super().__init__()
        self.clock = clock

    def training_step(self, batch, batch_idx):
        self.clock.now += 2.0
        output = super().training_step(batch, batch_idx)
        self.log("train/loss", output["loss"], prog_bar=True)
        return output

    def validation_step(self, batch, batch_idx):
        self.clock.now += 0.5
        return super().validation_step(batch, batch_idx)


class Probe(L.Callback):
    """Records the clock's projection after every optimizer step."""

    def __init__(self, clock: RunClock) -> None:
        self.clock = clock
        self.projections: dict[int, float | None] = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.projections[trainer.global_step] = self.clock.remaining(trainer)


@pytest.fixture
def fake_time(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(progress.time, "perf_counter", fake.perf_counter)
    return fake


class LoopCosts(L.Callback):
    """Costs outside the training step that the real loop pays: work after each step (a logger, EMA) and at
    each epoch start (a new data iterator), in fake seconds."""

    def __init__(self, clock: FakeTime, per_step: float = 0.0, per_epoch: float = 0.0) -> None:
        self.clock, self.per_step, self.per_epoch = clock, per_step, per_epoch

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        self.clock.now += self.per_step

    def on_train_epoch_start(self, trainer, pl_module):
        self.clock.now += self.per_epoch


def _fit(fake_time: FakeTime, accumulate: int = 1, validate: bool = True, **costs: float):
    clock = RunClock(skip_steps=2)
    probe = Probe(clock)
    trainer = L.Trainer(max_steps=12, limit_train_batches=4 * accumulate, limit_val_batches=3 if validate else 0,
                        check_val_every_n_epoch=1, accumulate_grad_batches=accumulate,
                        callbacks=[clock, probe, LoopCosts(fake_time, **costs)], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                        num_sanity_val_steps=0, accelerator="cpu")
    trainer.fit(TimedModel(fake_time))
    return clock, probe, trainer


def test_run_clock_projects_steps_and_validations_exactly(fake_time):
    clock, probe, trainer = _fit(fake_time)
    assert trainer.global_step == 12
    assert clock.step_time == pytest.approx(2.0)
    assert len(clock.step_times) == 7  # 11 step-to-step intervals, less 2 of warm-up and 2 that held a validation
    assert clock.validation_times == [pytest.approx(1.5)] * 2  # after steps 4 and 8, settled at the next step
    assert progress.Schedule.of(trainer) == progress.Schedule(12, 4, 4)
    # After step 5 (one validation seen): 7 steps × 2 s + validations at 8 and 12 × 1.5 s.
    assert probe.projections[5] == pytest.approx(7 * 2.0 + 2 * 1.5)
    # Before any validation was timed only the steps are known.
    assert probe.projections[4] == pytest.approx(8 * 2.0)
    assert probe.projections[3] is None  # still warming up
    assert clock.remaining(trainer) == 0.0


def test_run_clock_counts_optimizer_steps_under_gradient_accumulation(fake_time):
    clock, probe, trainer = _fit(fake_time, accumulate=3)
    assert trainer.global_step == 12
    assert clock.step_time == pytest.approx(3 * 2.0)  # three micro-batches per optimizer step
    assert progress.Schedule.of(trainer).validation_every == 4
    assert probe.projections[6] == pytest.approx(6 * 6.0 + 2 * 1.5)


def test_run_clock_pays_what_the_loop_pays_outside_the_step(fake_time):
    clock, probe, _ = _fit(fake_time, validate=False, per_step=0.5, per_epoch=3.0)
    assert clock.step_time == pytest.approx(2.5)  # the work after each step counts
    assert clock.boundary_time == pytest.approx(3.0)  # and each epoch start, once per boundary
    # After step 6: 6 steps × 2.5 s + the boundaries before steps 9 (one left) × 3 s.
    assert probe.projections[6] == pytest.approx(6 * 2.5 + 1 * 3.0)
    assert progress.Schedule(12, 4, math.inf).boundaries(0) == 2  # steps 5 and 9 start new epochs
    assert progress.Schedule(12, 4, math.inf).boundaries(4) == 2 and progress.Schedule(12, 4, 4).boundaries(5) == 1


def test_progress_bar_shows_eta_and_total(fake_time):
    bar = EtaProgressBar(skip_steps=1)
    trainer = L.Trainer(max_steps=6, limit_train_batches=3, limit_val_batches=1, callbacks=[bar], logger=False,
                        enable_checkpointing=False, enable_model_summary=False, num_sanity_val_steps=0,
                        accelerator="cpu")
    trainer.fit(TimedModel(fake_time))
    items = bar.get_metrics(trainer, trainer.lightning_module)
    assert items["eta"] == "0s" and items["step"] == "6/6"
    assert items["total"] == format_duration(fake_time.now)


def _bar_trainer(bar, **kwargs) -> L.Trainer:
    return L.Trainer(callbacks=[bar], logger=False, enable_checkpointing=False, enable_model_summary=False,
                     num_sanity_val_steps=0, accelerator="cpu", **kwargs)


def test_a_step_budget_shows_the_epoch_without_a_bogus_total(fake_time, capsys):
    trainer = _bar_trainer(EtaProgressBar(skip_steps=1), max_steps=6, limit_train_batches=3, limit_val_batches=1)
    trainer.fit(TimedModel(fake_time))
    assert trainer.max_epochs == -1  # what made Lightning's bar say "Epoch 1/-2"
    shown = capsys.readouterr().out
    assert "epoch 1 " in shown and "/-" not in shown and "step: 6/6" in shown
    _bar_trainer(EtaProgressBar(), max_epochs=3, limit_train_batches=2, limit_val_batches=0).fit(TimedModel(fake_time))
    assert "epoch 2/2 " in capsys.readouterr().out  # an epoch budget keeps its total


def test_plain_lines_in_a_log_periodically_after_validation_and_at_the_end(fake_time, capsys):
    bar = PlainProgressBar(interval_seconds=5.0, skip_steps=1)
    trainer = _bar_trainer(bar, max_steps=12, limit_train_batches=4, limit_val_batches=1,
                           check_val_every_n_epoch=2)
    trainer.fit(TimedModel(fake_time))  # 2 s per step, 0.5 s per validation batch
    lines = capsys.readouterr().out.strip().splitlines()
    periodic = [line for line in lines if line.startswith("step ")]
    # The first line once the step time is known (step 3), then 5 s of fake time after the last line (a
    # validation's line counts).
    assert [line.split()[1] for line in periodic] == ["3/12", "6/12", "11/12"]
    assert [line.split()[2] for line in lines if line.startswith("validated:")] == ["8/12"]
    assert lines[-1].startswith("finished: step 12/12 epoch 3 train/loss ") and "eta 0s" in lines[-1]
    assert all("train/loss " in line for line in periodic)
    assert all("-2" not in line for line in lines)
    assert "eta 18s" in periodic[0]  # 9 steps left × 2 s, before any validation was timed


def test_the_bar_follows_the_output(monkeypatch):
    import rich.console

    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: False))
    assert isinstance(progress_bar(), PlainProgressBar)
    monkeypatch.setattr(rich.console.Console, "is_terminal", property(lambda self: True))
    assert isinstance(progress_bar(), EtaProgressBar)
    assert isinstance(progress_bar(interactive=False, interval_seconds=7), PlainProgressBar)


def test_format_duration():
    assert format_duration(41.4) == "41s"
    assert format_duration(723) == "12m03s"
    assert format_duration(3 * 3600 + 5 * 60 + 59) == "3h05m"
    assert format_duration(None) == "?" and format_duration(math.inf) == "?"


class SleepEveryStep(L.Callback):
    """Costs ``seconds`` of wall time after every training batch: a slow logger or callback."""

    def __init__(self, seconds: float = 0.05) -> None:
        self.seconds = seconds

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        time.sleep(self.seconds)


ESTIMATE = [*FAST, "estimate=true", "estimate_steps=12", "data.source.limit=96", "data.batch_size=8",
            "trainer.max_steps=100", "trainer.check_val_every_n_epoch=2", "model.components.vae_path=null",
            "model.components.denoiser.block_out_channels=[16,32]"]


def test_estimate_runs_the_real_loop_and_writes_nothing(tmp_path, capsys):
    from sd_lightning.cli.train import train

    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, ESTIMATE)
    assert train(cfg) is None
    assert not run_dir.exists()
    out = capsys.readouterr().out
    assert "projected total" in out and "peak memory" in out and "epoch boundaries" in out

    from sd_lightning.cli.estimate import estimate

    result = estimate(cfg)
    assert not run_dir.exists()
    per_epoch = math.ceil(86 / 8)  # 96 items, 10 held out for validation (data.val_fraction=0.1)
    assert result["validations"] == 100 // (2 * per_epoch) > 0
    assert result["epoch_boundaries"] == math.ceil(100 / per_epoch) - 1
    assert result["measured_steps"] >= 8
    assert result["seconds_per_validation"] > 0 and result["seconds_per_step"] > 0
    assert result["total_seconds"] == pytest.approx(
        result["startup_seconds"] + result["seconds_per_step"] * 100 + result["validations"]
        * result["seconds_per_validation"] + result["epoch_boundaries"] * result["seconds_per_epoch_boundary"])
    assert result["peak_rss_mib"] > 100
    assert torch.isfinite(torch.tensor(result["samples_per_second"]))


def test_a_callback_sleeping_50ms_per_step_raises_the_estimate_by_that_much(tmp_path):
    from sd_lightning.cli.estimate import estimate

    plain = estimate(compose_train(tmp_path / "a", ESTIMATE))
    slowed = estimate(compose_train(tmp_path / "b", [*ESTIMATE, f"+callbacks.sleep._target_={__name__}.SleepEveryStep"]))
    added = slowed["seconds_per_step"] - plain["seconds_per_step"]
    assert 0.04 <= added <= 0.065, added  # the 50 ms, give or take the step's own noise
    assert slowed["total_seconds"] - plain["total_seconds"] == pytest.approx(100 * added, rel=0.35, abs=1.0)
