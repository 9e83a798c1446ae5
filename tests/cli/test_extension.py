"""A user's own objective and weighting, in their own module and config folder, trained by sdl-train."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

from conftest import finish_command, start_command

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_project"


def _start(cwd: Path, *args: str) -> subprocess.Popen:
    return start_command([str(Path(sys.executable).parent / args[0]), *args[1:]], cwd=cwd)


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return finish_command(_start(cwd, *args))


def test_a_users_objective_and_weighting_train_and_sample_from_their_folder(tmp_path):
    project = tmp_path / "project"
    shutil.copytree(EXAMPLE, project)  # importable only from there: not on this process's path
    run = project / "outputs" / "run"
    result = _run(project, "sdl-train", "--config-dir", "./conf", "objective=noisy_half_v", "weighting=soft_min_snr",
                  "logger=csv", "trainer.max_steps=3", "data.source.limit=48", "data.batch_size=8",
                  "~callbacks.sample_grid", "~callbacks.stability", "~callbacks.progress",
                  "trainer.enable_progress_bar=false", f"paths.run_dir={run}")
    assert result.returncode == 0, result.stderr[-3000:]
    checkpoint = torch.load(run / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["sd_lightning"]["objective"]["name"] == "my_pieces.NoisyHalfVPrediction"
    assert checkpoint["hyper_parameters"]["weighting"] == "SoftMinSnr(gamma=5.0)"
    ckpt = str(run / "checkpoints" / "last.ckpt")
    # The refusal and the trusted run side by side (their start-up is most of their time).
    refusing = _start(project, "sdl-sample", f"ckpt_path={ckpt}", "out_dir=s1", "num_images=1", "steps=2")
    sampled = _run(project, "sdl-sample", f"ckpt_path={ckpt}", "out_dir=s2", "num_images=1", "steps=2",
                   "trusted_objectives=[my_pieces.NoisyHalfVPrediction]")
    refused = finish_command(refusing)
    assert refused.returncode == 2 and "trusted_objectives=[my_pieces.NoisyHalfVPrediction]" in refused.stderr
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (project / "s2" / "00000.png").is_file()
