"""The package as a user installs it: a built wheel, installed outside the checkout, run from an unrelated folder."""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
STEPS = ["logger=csv", "trainer.max_steps=2", "data.source.limit=32", "data.batch_size=8", "~callbacks.sample_grid",
         "~callbacks.stability", "~callbacks.progress", "trainer.enable_progress_bar=false"]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> Path:
    build = tmp_path_factory.mktemp("wheel")
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(build),
                    str(REPO)], check=True, capture_output=True, timeout=600)
    (wheel,) = build.glob("sd_lightning-*.whl")
    target = tmp_path_factory.mktemp("site")
    subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target), str(wheel)],
                   check=True, capture_output=True, timeout=600)
    return target


def _run(target: Path, cwd: Path, command: list[str]) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(target), "WANDB_MODE": "offline"}
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def test_the_installed_wheel_carries_its_configs_and_assets(installed, tmp_path):
    result = _run(installed, tmp_path, [sys.executable, "-c", "import sd_lightning, sd_lightning.cli.config as c; "
                                        "print(sd_lightning.__file__); print(c.CONFIG_DIR)"])
    module_file, config_dir = result.stdout.split()
    assert Path(module_file).is_relative_to(installed), module_file  # the editable checkout does not shadow it
    assert Path(config_dir).is_relative_to(installed) and (Path(config_dir) / "train.yaml").is_file()
    assert (installed / "sd_lightning" / "assets" / "tiny_tokenizer" / "tokenizer.json").is_file()


@pytest.mark.slow
def test_train_sample_export_from_an_unrelated_folder(installed, tmp_path):
    """Both entry forms: the console scripts (train, export) and ``python -m`` (sample)."""
    def command(name: str, form: str = "console_script") -> list[str]:
        if form == "module":
            return [sys.executable, "-m", f"sd_lightning.cli.{name}"]
        return [str(installed / "bin" / f"sdl-{name}")]

    work = tmp_path / "elsewhere"
    work.mkdir()
    run = work / "run"
    trained = _run(installed, work, [*command("train"), *STEPS, f"paths.run_dir={run}"])
    assert trained.returncode == 0, trained.stderr[-3000:]
    ckpt = run / "checkpoints" / "last.ckpt"
    sampled = _run(installed, work, [*command("sample", "module"), f"ckpt_path={ckpt}", "out_dir=samples", "num_images=1",
                                     "steps=2"])
    assert sampled.returncode == 0, sampled.stderr[-3000:]
    assert (work / "samples" / "00000.png").is_file()
    exported = _run(installed, work, [*command("export"), f"ckpt_path={ckpt}", "out_dir=pipe"])
    assert exported.returncode == 0, exported.stderr[-3000:]
    assert (work / "pipe" / "model_index.json").is_file()


@pytest.mark.slow
def test_a_users_project_folder_runs_against_the_installed_wheel(installed, tmp_path):
    project = tmp_path / "project"
    shutil.copytree(REPO / "examples" / "my_project", project)
    run = project / "run"
    result = _run(installed, project, [str(installed / "bin" / "sdl-train"), "--config-dir", "./conf",
                                       "objective=noisy_half_v", "weighting=soft_min_snr", *STEPS,
                                       f"paths.run_dir={run}"])
    assert result.returncode == 0, result.stderr[-3000:]
    assert (run / "checkpoints" / "last.ckpt").is_file()
