"""What a user sees: each console script's warnings held to an allow-list, the project's own warnings still shown,
plain progress lines in a log, and --help/--version answering without the training stack."""

import os
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import finish_command, start_command

BIN = Path(sys.executable).parent
# A warning line: Python's warnings, logged WARNINGs, and the libraries' own prefixed notices.
WARNING = re.compile(r"warn|deprecat|^\[transformers\]|^wandb:|^💡", re.IGNORECASE)
# Every warning a user may see from these runs, each one that concerns them.
ALLOWED = [
    r"\[sd_lightning\.[\w.]+\]\[WARNING\]",  # the project's own (logged with its module name)
    r"The number of training batches \(\d+\) is smaller than the logging interval",  # a tiny data set: true
    r"The following part of your input was truncated because CLIP can only handle",  # the user's long prompt
    r"│ caption_too_long │ warning",  # the inspection report's own table
    r"files with warnings \d+",
]


def _start(cwd: Path, *command: str) -> subprocess.Popen:
    return start_command([str(BIN / command[0]), *command[1:]], cwd=cwd, env={**os.environ, "WANDB_MODE": "offline"})


def _finish(process: subprocess.Popen) -> str:
    result = finish_command(process)
    assert result.returncode == 0, result.stderr[-3000:]
    return result.stdout + result.stderr


def _run(cwd: Path, *command: str) -> str:
    return _finish(_start(cwd, *command))


def _unexpected(output: str) -> list[str]:
    return [line for line in output.splitlines()
            if WARNING.search(line) and not any(re.search(pattern, line) for pattern in ALLOWED)]


@pytest.fixture(scope="module")
def folder(tmp_path_factory) -> Path:
    """24 captioned images, one with an over-long caption, and one file that is not an image."""
    root = tmp_path_factory.mktemp("terminal")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(images / f"{i:02d}.png")
        (images / f"{i:02d}.txt").write_text("a red circle" if i else " ".join(["a very long caption"] * 40))
    (images / "bad.png").write_bytes(b"not an image at all")
    return root


@pytest.mark.slow
def test_every_console_script_shows_only_warnings_that_concern_the_user(folder):
    data = ["data=imagefolder", f"data.root={folder / 'images'}", "data.resolution=32"]
    # Independent commands run side by side (their start-up is most of their time).
    inspecting = _start(folder, "sdl-data", "inspect", *data)
    trained = _run(folder, "sdl-train", *data, "trainer.max_steps=3", "data.batch_size=8", "paths.run_dir=run",
                   "sampling.steps=2", "callbacks.sample_grid.num_per_prompt=1", "callbacks.stability.steps=2",
                   "trainer.log_every_n_steps=1", "trainer.check_val_every_n_epoch=1")
    inspected = _finish(inspecting)
    assert "caption_too_long" in inspected
    # The project's own warnings still appear, once each.
    assert trained.count("skipping unreadable image bad.png") == 1
    assert "model.components.vae_path is not set" in trained
    assert trained.count("1 of 24 captions of ImageFolderSource(25 items) are longer than the tokenizer's limit of 77") == 1
    # Not a terminal: plain progress lines, the step out of max_steps, no "Epoch 0/-2".
    assert re.search(r"^finished: step 3/3 epoch \d+ .*eta 0s", trained, re.MULTILINE), trained[-2000:]
    assert "/-2" not in trained
    long_prompt = " ".join(["a very long prompt"] * 40)
    sampling = _start(folder, "sdl-sample", "ckpt_path=run/checkpoints/last.ckpt", "out_dir=samples", "num_images=1",
                      "steps=2", f"prompt='{long_prompt}'")
    exporting = _start(folder, "sdl-export", "ckpt_path=run/checkpoints/last.ckpt", "out_dir=pipe")
    compared = _run(folder, "sdl-compare", "run")
    sampled, exported = _finish(sampling), _finish(exporting)
    assert "truncated" in sampled  # the user's prompt was cut: said once, by the pipeline
    for name, output in [("sdl-data", inspected), ("sdl-train", trained), ("sdl-sample", sampled),
                         ("sdl-export", exported), ("sdl-compare", compared)]:
        assert not _unexpected(output), f"{name} printed warnings outside the allow-list:\n" + "\n".join(
            _unexpected(output))


def test_the_allow_list_catches_the_notices_it_replaced():
    for notice in ["[transformers] `CLIPImageProcessor` requires torchvision (not installed); falling back",
                   "[transformers] Token indices sequence length is longer than the specified maximum sequence length",
                   "💡 Tip: For seamless cloud logging and experiment tracking, try installing [litlogger]",
                   "wandb: WARNING The anonymous setting has no effect and will be removed in a future version.",
                   "UserWarning: 'set_vital' is deprecated, please do not call"]:
        assert _unexpected(notice) == [notice]


@pytest.mark.parametrize("name", ["sdl-train", "sdl-sample", "sdl-export", "sdl-eval", "sdl-data", "sdl-compare"])
def test_version_and_help_answer_without_the_training_stack(name, tmp_path):
    version = _run(tmp_path, name, "--version")
    assert version.strip().startswith(f"{name} ") and re.search(r"\d+\.\d+", version)
    probe = (f"import sys; sys.argv = [{name!r}, '--help']; from sd_lightning.cli.scripts import run\n"
             f"try:\n    run({name!r})\nexcept SystemExit:\n    pass\n"  # argparse (sdl-compare) exits after help
             "print('HEAVY', [m for m in ('torch', 'lightning', 'diffusers', 'transformers') if m in sys.modules])")
    output = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True,
                            timeout=60, check=True).stdout
    assert "HEAVY []" in output
    assert "usage:" in output


def test_train_help_lists_every_group_with_its_options_and_the_current_choice(tmp_path):
    shown = _run(tmp_path, "sdl-train", "--help")
    for group, choice in [("objective", "v_prediction"), ("model", "tiny"), ("optimizer", "adamw"),
                          ("timesteps", "uniform"), ("data", "digits")]:
        assert re.search(rf"^  {group}\b", shown, re.MULTILINE)
        assert re.search(rf"^    \* {choice} ", shown, re.MULTILINE), (group, choice)
    assert re.search(r"^      flow_matching +Rectified flow", shown, re.MULTILINE)  # each option's own words
    assert re.search(r"^      gpu_parallel ", shown, re.MULTILINE)  # hydra/launcher options too
    assert "_latent_diffusion" not in shown  # partials are not options
    assert "estimate: false" in shown  # the top-level keys with their comments


def test_help_includes_a_users_own_config_groups(tmp_path):
    conf = tmp_path / "conf" / "objective"
    conf.mkdir(parents=True)
    (conf / "mine.yaml").write_text("# My own objective.\n_target_: my.Objective\n")
    shown = _run(tmp_path, "sdl-train", "--config-dir", str(tmp_path / "conf"), "--help")
    assert re.search(r"^      mine +My own objective\.", shown, re.MULTILINE)
