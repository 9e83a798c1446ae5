"""A user's own objective and weighting, in their own module and config folder, trained by sdl-train."""

import shutil
import subprocess
import sys
from pathlib import Path

import torch

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "my_project"


def _run(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([str(Path(sys.executable).parent / args[0]), *args[1:]], cwd=cwd, capture_output=True,
                          text=True, timeout=600)


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
    refused = _run(project, "sdl-sample", f"ckpt_path={ckpt}", "out_dir=s1", "num_images=1", "steps=2")
    assert refused.returncode == 2 and "trusted_objectives=[my_pieces.NoisyHalfVPrediction]" in refused.stderr
    sampled = _run(project, "sdl-sample", f"ckpt_path={ckpt}", "out_dir=s2", "num_images=1", "steps=2",
                   "trusted_objectives=[my_pieces.NoisyHalfVPrediction]")
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (project / "s2" / "00000.png").is_file()
