"""Faults during training and bad input: clear errors, nothing half-written, nothing executed."""

import errno
import io
import pickle
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import torch

from sd_lightning.callbacks.nonfinite import NonFiniteTrainingError
from sd_lightning.cli.config import run_entry, user_error
from sd_lightning.cli.train import train
from sd_lightning.models.checkpoint_io import CheckpointError, load_checkpoint

from conftest import compose_train

TINY = [
    "logger=csv",
    "trainer.enable_progress_bar=false",
    "~callbacks.progress",
    "~callbacks.sample_grid",
    "trainer.check_val_every_n_epoch=1",
    "data.source.limit=64",
    "data.batch_size=8",
    "model.components.denoiser.block_out_channels=[16,32]",
]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("faults") / "run"
    train(compose_train(run_dir, [*TINY, "trainer.max_steps=8"]))
    return run_dir


def test_nan_batches_are_skipped_then_training_stops_with_the_last_good_state(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, [*TINY, "trainer.max_steps=40", "+callbacks.fault._target_=faults.PoisonBatches",
                                  "+callbacks.fault.start=5", "callbacks.nonfinite.max_consecutive=3"])
    with pytest.raises(NonFiniteTrainingError, match=r"3 consecutive .* last good state is saved .*gradient_clip_val"):
        train(cfg)
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
    assert state["callbacks"]["nonfinite"]["skipped"] == 3
    # The weights are those after step 5: the three poisoned steps did not touch them.
    assert state["global_step"] == 8


def test_a_single_nan_step_is_skipped_and_training_goes_on(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run_dir = tmp_path / "run"
    train(compose_train(run_dir, [*TINY, "trainer.max_steps=10", "+callbacks.fault._target_=faults.PoisonBatches",
                                  "+callbacks.fault.start=4", "+callbacks.fault.count=1"]))
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)
    assert state["global_step"] == 10 and state["callbacks"]["nonfinite"]["skipped"] == 1
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())


def test_crash_while_saving_keeps_the_previous_checkpoint(tmp_path, finished_run, monkeypatch):
    last = finished_run / "checkpoints" / "last.ckpt"
    before = last.read_bytes()
    cfg = compose_train(tmp_path / "r", [*TINY, "trainer.max_steps=12", f"ckpt_path={last}"])
    cfg.callbacks.checkpoint.dirpath = str(finished_run / "checkpoints")
    real_save = torch.save

    def failing_save(obj, f, *args, **kwargs):
        if isinstance(f, io.BytesIO):
            real_save(obj, f, *args, **kwargs)
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", failing_save)
    with pytest.raises(OSError, match="No space left"):
        train(cfg)
    assert last.read_bytes() == before
    assert load_checkpoint(last)["global_step"] == 8
    leftovers = [p.name for p in last.parent.iterdir() if p.name not in {"last.ckpt", "last.prev.ckpt"} and not p.name.startswith("best")]
    assert leftovers == []


def test_malformed_checkpoints_are_refused_and_never_executed(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    evil = tmp_path / "evil.ckpt"
    with evil.open("wb") as handle:
        pickle.dump({"state_dict": {}, "x": Payload()}, handle)
    torch_evil = tmp_path / "evil_torch.ckpt"
    torch.save({"state_dict": {}, "x": Payload()}, torch_evil)
    assert not marker.exists()
    garbage = tmp_path / "random.ckpt"
    garbage.write_bytes(bytes(range(256)) * 64)
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(3)}, "global_step": 1}, good)
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:100])
    for path in (evil, torch_evil, garbage, truncated):
        with pytest.raises(CheckpointError, match="not a readable checkpoint"):
            load_checkpoint(path)
    assert not marker.exists()


def test_resuming_from_a_malicious_checkpoint_does_not_execute_it(tmp_path):
    marker = tmp_path / "pwned"
    evil = tmp_path / "last.ckpt"

    class Payload:
        def __reduce__(self):
            return (Path.touch, (marker,))

    torch.save({"state_dict": {}, "x": Payload()}, evil)
    with pytest.raises(CheckpointError, match="not a readable checkpoint"):
        train(compose_train(tmp_path / "r", [*TINY, f"ckpt_path={evil}"]))
    assert not marker.exists()


def test_checkpoint_from_another_model_config_lists_the_differences(tmp_path, finished_run):
    cfg = compose_train(tmp_path / "r", [*TINY, "model.components.denoiser.block_out_channels=[16,48]",
                                         f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}"])
    with pytest.raises(CheckpointError, match=r"different model config .*differing weights.*\n  - .*denoiser\."):
        train(cfg)
    other_family = compose_train(tmp_path / "x", [*TINY, "model=sdxl_tiny",
                                                  f"ckpt_path={finished_run / 'checkpoints' / 'last.ckpt'}"])
    with pytest.raises(CheckpointError, match=r"another model family .*denoiser: unet in the checkpoint, sdxl_unet in "
                                              r"this config, conditioner: clip in the checkpoint, sdxl in this config"):
        train(other_family)


def half_written_files(folder: Path) -> list[str]:
    """Files under ``folder`` that a crash could have left half-written: temporary or partial names, and
    checkpoints that ``torch.load(weights_only=True)`` cannot read completely."""
    problems = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        name = path.name
        if ".tmp" in name or name.endswith((".partial", ".part")) or name.startswith("."):
            problems.append(f"{path.relative_to(folder)}: temporary file")
        elif name.endswith(".ckpt"):
            try:
                torch.load(path, weights_only=True)
            except Exception as err:
                problems.append(f"{path.relative_to(folder)}: unreadable ({type(err).__name__})")
    return problems


def test_out_of_memory_in_a_training_step_exits_with_an_actionable_message_and_saves_nothing(
        tmp_path, monkeypatch, capsys):
    """README: "Out of memory: a message listing what reduces memory …; nothing half-written is saved"."""
    monkeypatch.syspath_prepend(str(Path(__file__).parent))
    run_dir = tmp_path / "run"
    # last.ckpt is written after steps 2 and 4; the loss of step 5 (0-based global_step) runs out of memory.
    cfg = compose_train(run_dir, [*TINY, "trainer.max_steps=8", "trainer.log_every_n_steps=1",
                                  "callbacks.checkpoint.every_n_train_steps=2",
                                  "loss._target_=faults.OutOfMemoryLoss", "+loss.at_call=5"])
    with pytest.raises(SystemExit) as exited:
        run_entry("sdl-train", train, cfg)
    assert exited.value.code == 2
    stderr = capsys.readouterr().err
    (message,) = [line for line in stderr.splitlines() if line.startswith("sdl-train:")]  # one line
    assert message.startswith("sdl-train: out of memory") and "Tried to allocate 2.00 GiB (injected" in message
    for advice in ("data.batch_size=", "trainer.accumulate_grad_batches=", "gradient_checkpointing=true",
                   "Nothing was saved from this step"):
        assert advice in message, advice
    assert "Traceback" not in stderr

    checkpoints = run_dir / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["last.ckpt", "last.prev.ckpt"]
    assert half_written_files(run_dir) == []
    # The resume point is the last checkpoint before the failing step, not a state from inside it.
    state = torch.load(checkpoints / "last.ckpt", weights_only=True)
    assert state["global_step"] == 4
    logged = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["train/loss"])
    assert sorted(logged["step"]) == [0, 1, 2, 3, 4]  # the five steps before the failing one did train

    # Negative control: the same check flags a truncated checkpoint and a leftover temporary file.
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "last.ckpt").write_bytes((checkpoints / "last.ckpt").read_bytes()[:4096])
    (broken / "last.ckpt.tmp").write_bytes(b"")
    assert half_written_files(broken) == ["last.ckpt: unreadable (RuntimeError)", "last.ckpt.tmp: temporary file"]


def test_cli_reports_user_errors_without_a_traceback(tmp_path):
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(b"not a checkpoint")
    result = subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", f"paths.output_root={tmp_path}", *TINY, f"ckpt_path={bad}"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path,
    )
    assert result.returncode == 2
    assert "not a readable checkpoint" in result.stderr and "Traceback" not in result.stderr


def test_disk_full_message_is_actionable():
    wrapped = RuntimeError("checkpoint save failed")
    wrapped.__cause__ = OSError(errno.ENOSPC, "No space left on device")
    message = str(user_error(wrapped))
    assert "previous checkpoint is intact" in message and "save_top_k" in message


def test_a_corrupt_last_checkpoint_resumes_from_the_previous_one(tmp_path, caplog):
    """A disk fault after last.ckpt was written: resume=auto names the file and continues from last.prev.ckpt."""
    run_dir = tmp_path / "run"
    steps = [*TINY, "~callbacks.stability", "callbacks.checkpoint.every_n_train_steps=3", "trainer.log_every_n_steps=1",
             "trainer.check_val_every_n_epoch=null", f"hydra.run.dir={run_dir}"]
    train(compose_train(run_dir, [*steps, "trainer.max_steps=6"]))
    last, previous = run_dir / "checkpoints" / "last.ckpt", run_dir / "checkpoints" / "last.prev.ckpt"
    assert load_checkpoint(last)["global_step"] == 6 and load_checkpoint(previous)["global_step"] == 3
    last.write_bytes(last.read_bytes()[: last.stat().st_size // 2])  # truncated by the fault
    with caplog.at_level("WARNING"):
        train(compose_train(run_dir, [*steps, "trainer.max_steps=8", "resume=auto"]))
    assert f"{last} is unreadable" in caplog.text and str(previous) in caplog.text
    assert load_checkpoint(last)["global_step"] == 8
    history = pd.read_csv(run_dir / "csv" / "metrics.csv").dropna(subset=["train/loss"])
    assert sorted(set(history["step"].astype(int))) == list(range(8))  # steps 3-5 were trained again, 6-7 new
    # Nothing intact left: said so, naming both files, instead of silently starting over.
    for file in (last, previous):
        file.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="both .*last.ckpt and .*last.prev.ckpt are unreadable"):
        train(compose_train(run_dir, [*steps, "trainer.max_steps=10", "resume=auto"]))
    previous.unlink()
    with pytest.raises(CheckpointError, match="no earlier checkpoint"):
        train(compose_train(run_dir, [*steps, "trainer.max_steps=10", "resume=auto"]))
