"""Exact resume: a run killed at any step (in its own process) and resumed in another ends bit-identical to an
uninterrupted run (weights, EMA, optimizer, LR schedule, step counters, CSV metric history).

The stopped run is a subprocess (kill -9 and signals need one); the resume and the uninterrupted reference run in
this test process, as the next command would, sharing nothing with the stopped process but the run folder."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest
import torch

from sd_lightning.cli.train import train

from conftest import compose_train, finish_command, start_command

HERE = Path(__file__).resolve().parent

COMMON = [
    "logger=csv",
    "+logger.csv.flush_logs_every_n_steps=1",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress",
    "~callbacks.sample_grid",
    "trainer.log_every_n_steps=1",
    "trainer.check_val_every_n_epoch=1",
    "trainer.deterministic=true",
    "trainer.max_steps=30",
    "data.source.limit=120",
    "data.batch_size=8",
    "data.val_batch_size=16",
    "callbacks.checkpoint.every_n_train_steps=4",
    "callbacks.ema.decay=0.9",
    "lr_scheduler.num_warmup_steps=5",
]
BASE = [*COMMON, "model.components.denoiser.block_out_channels=[16,32]"]
# The SD 3 family: MMDiT under CLIP-L + CLIP-G, flow matching (its transformer has no UNet channel list).
SD3 = ("model=sd3_tiny", "objective=flow_matching")


def _base(overrides) -> list[str]:
    return COMMON if any(o in overrides for o in (SD3[0], "model=transformer_tiny")) else BASE


def run_subprocess(run_dir: Path, overrides: list[str], expect_kill: bool = False) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    result = subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", f"hydra.run.dir={run_dir}",
         f"paths.output_root={run_dir.parent}", *_base(overrides), *overrides],
        capture_output=True, text=True, env=env, timeout=600,
    )
    if expect_kill:
        assert result.returncode == -9, result.stderr[-3000:]
    else:
        assert result.returncode == 0, result.stderr[-3000:]
    return result


def resume(run_dir: Path, overrides: list[str]) -> None:
    """Continue the stopped run of ``run_dir`` here (``ckpt_path=last`` or ``resume=auto`` in ``overrides``)."""
    train(compose_train(run_dir, [*_base(overrides), *overrides]))


def final_state(run_dir: Path) -> dict:
    return torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)


def assert_same_tensors(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for key in a:
            assert_same_tensors(a[key], b[key], f"{where}.{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def assert_same_run(resumed: Path, reference: Path) -> None:
    ours, theirs = final_state(resumed), final_state(reference)
    assert ours["global_step"] == theirs["global_step"] == 30
    assert ours["epoch"] == theirs["epoch"]
    assert_same_tensors(ours["state_dict"], theirs["state_dict"], "state_dict")
    assert_same_tensors(ours["callbacks"]["ema"], theirs["callbacks"]["ema"], "ema")
    assert_same_tensors(ours["optimizer_states"], theirs["optimizer_states"], "optimizer")
    assert_same_tensors(ours["lr_schedulers"], theirs["lr_schedulers"], "lr_scheduler")
    history = pd.read_csv(resumed / "csv" / "metrics.csv")
    reference_history = pd.read_csv(reference / "csv" / "metrics.csv")
    losses = history.dropna(subset=["train/loss"])[["step", "train/loss"]].reset_index(drop=True)
    expected = reference_history.dropna(subset=["train/loss"])[["step", "train/loss"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(losses, expected)  # no gaps, no repeats, same values
    val = history.dropna(subset=["val/mse"])[["step", "val/mse"]].reset_index(drop=True)
    pd.testing.assert_frame_equal(val, reference_history.dropna(subset=["val/mse"])[["step", "val/mse"]].reset_index(drop=True))


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """Uninterrupted runs, keyed by the extra overrides of a scenario."""
    cache = {}

    def get(*extra: str) -> Path:
        if extra not in cache:
            run_dir = tmp_path_factory.mktemp("reference") / "run"
            train(compose_train(run_dir, [*_base(extra), *extra]))
            cache[extra] = run_dir
        return cache[extra]

    return get


@pytest.mark.slow
@pytest.mark.parametrize(
    ("kill_step", "extra"),
    [
        (10, ()),  # mid-epoch (13 steps per epoch), last checkpoint at step 8
        (14, ()),  # just after an epoch boundary and its validation
        (9, ("trainer.accumulate_grad_batches=2", "data.num_workers=2", "data.random_flip=true")),
        (10, SD3),  # the SD 3 family: transformer, two CLIP encoders, flow matching
    ],
    ids=["mid-epoch", "after-epoch-boundary", "accumulation+2-workers", "sd3-family"],
)
def test_kill_9_then_resume_matches_uninterrupted(tmp_path, reference, kill_step, extra):
    run_dir = tmp_path / "run"
    run_subprocess(run_dir, [*extra, "+callbacks.fault._target_=faults.KillAtStep", f"+callbacks.fault.step={kill_step}"],
                   expect_kill=True)
    killed_at = final_state(run_dir)["global_step"]
    assert 0 < killed_at < kill_step
    resume(run_dir, [*extra, "ckpt_path=last"])
    assert_same_run(run_dir, reference(*extra))


@pytest.mark.slow
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGUSR1], ids=["SIGTERM", "SIGUSR1"])
def test_preemption_signal_saves_a_checkpoint_and_resume_matches(tmp_path, reference, signum):
    run_dir = tmp_path / "run"
    run_subprocess(run_dir, ["+callbacks.fault._target_=faults.SignalAtStep", "+callbacks.fault.step=11",
                             f"+callbacks.fault.signum={int(signum)}"])
    assert final_state(run_dir)["global_step"] in (11, 12)  # the batch in flight finishes first
    resume(run_dir, ["resume=auto"])
    assert_same_run(run_dir, reference())


@pytest.mark.slow
def test_negative_control_plain_dataloader_does_not_resume_exactly(tmp_path, reference):
    """The equivalence test can fail: a non-stateful loader replays the epoch from its start."""
    run_dir = tmp_path / "run"
    run_subprocess(run_dir, ["data.stateful=false", "+callbacks.fault._target_=faults.KillAtStep",
                             "+callbacks.fault.step=10"], expect_kill=True)
    resume(run_dir, ["data.stateful=false", "ckpt_path=last"])
    with pytest.raises(AssertionError):
        assert_same_run(run_dir, reference("data.stateful=false"))


def test_last_checkpoint_is_current_when_another_checkpoint_saved_the_final_step(tmp_path):
    """max_steps=12 ends on a validation (best checkpoint at 12) between every_n_train_steps=5 saves."""
    run_dir = tmp_path / "run"
    train(compose_train(run_dir, [*BASE, "trainer.max_steps=12", "callbacks.checkpoint.every_n_train_steps=5",
                                  "data.source.limit=64", "trainer.check_val_every_n_epoch=null",
                                  "trainer.val_check_interval=6"]))
    assert final_state(run_dir)["global_step"] == 12
    train(compose_train(run_dir, [*BASE, "trainer.max_steps=14", "callbacks.checkpoint.every_n_train_steps=5",
                                  "data.source.limit=64", "trainer.check_val_every_n_epoch=null",
                                  "trainer.val_check_interval=6", "ckpt_path=last"]))
    assert final_state(run_dir)["global_step"] == 14
    assert sorted(p.name for p in (run_dir / "checkpoints").glob("last*.ckpt")) == ["last.ckpt", "last.prev.ckpt"]


def test_a_finished_run_continued_with_more_steps_matches_one_run_of_that_length(tmp_path):
    """Finished at max_steps=6 (mid-epoch), continued to 10 (a schedule that does not depend on max_steps): the
    same batches and weights as one 10-step run. Saved at train end, the epoch counted finished and the continued
    run started the next epoch's order."""
    steps = [*BASE, "lr_scheduler=constant", "callbacks.checkpoint.every_n_train_steps=null",
             "trainer.check_val_every_n_epoch=null", "trainer.val_check_interval=100"]
    run_dir, reference_dir = tmp_path / "run", tmp_path / "reference"
    train(compose_train(run_dir, [*steps, "trainer.max_steps=6"]))
    finished = final_state(run_dir)
    assert finished["global_step"] == 6 and finished["epoch"] == 0
    train(compose_train(run_dir, [*steps, "trainer.max_steps=10", "ckpt_path=last"]))
    train(compose_train(reference_dir, [*steps, "trainer.max_steps=10"]))
    ours, theirs = final_state(run_dir), final_state(reference_dir)
    assert ours["global_step"] == theirs["global_step"] == 10 and ours["epoch"] == theirs["epoch"] == 0
    assert_same_tensors(ours["state_dict"], theirs["state_dict"], "state_dict")
    assert_same_tensors(ours["callbacks"]["ema"], theirs["callbacks"]["ema"], "ema")
    assert_same_tensors(ours["optimizer_states"], theirs["optimizer_states"], "optimizer")
    assert any(not torch.equal(ours["state_dict"][k], finished["state_dict"][k]) for k in finished["state_dict"])


@pytest.mark.slow
def test_a_killed_ddp_worker_ends_the_run_within_the_timeout_and_resume_matches(tmp_path):
    """kill -9 of rank 1 of 2: rank 0 exits (not hangs) with a message, and resume=auto reaches the same weights."""
    ddp = ["trainer=ddp", "trainer.devices=2", "trainer.accelerator=cpu", "trainer.strategy.timeout_seconds=30",
           "trainer.max_steps=10", "data.batch_size=4", "~callbacks.stability"]
    env = {**os.environ, "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}

    def start(run_dir: Path, *extra: str) -> tuple[subprocess.Popen, float]:
        return start_command([sys.executable, "-m", "sd_lightning.cli.train", f"hydra.run.dir={run_dir}",
                              f"paths.output_root={run_dir.parent}", *BASE, *ddp, *extra], env=env), time.monotonic()

    def finish(process: subprocess.Popen, started: float) -> tuple[subprocess.CompletedProcess, float]:
        return finish_command(process, timeout=300), time.monotonic() - started

    def launch(run_dir: Path, *extra: str) -> tuple[subprocess.CompletedProcess, float]:
        return finish(*start(run_dir, *extra))

    # The reference runs beside the killed run, whose surviving rank mostly waits out the timeout.
    referencing = start(tmp_path / "reference")
    run_dir = tmp_path / "run"
    killed, seconds = launch(run_dir, "+callbacks.fault._target_=faults.KillAtStep", "+callbacks.fault.step=6",
                             "+callbacks.fault.rank=1")
    reference, _ = finish(*referencing)
    assert reference.returncode == 0, reference.stderr[-3000:]
    assert killed.returncode != 0 and seconds < 60 + 30, (killed.returncode, seconds)  # 60 s beyond start-up
    assert "a data-parallel process stopped" in killed.stderr and "resume=auto" in killed.stderr, killed.stderr[-3000:]
    assert final_state(run_dir)["global_step"] == 4  # the checkpoint before the kill
    resumed, _ = launch(run_dir, "resume=auto")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    expected, got = final_state(tmp_path / "reference"), final_state(run_dir)
    assert got["global_step"] == expected["global_step"] == 10
    assert_same_tensors(got["state_dict"], expected["state_dict"], "state_dict")
