"""README "Your own images": a captioned folder of the user's own, inspected, cleaned, trained from scratch in two
stages (the second finds the first's VAE by the run name the user gave), sampled and exported — the README's
commands, run in-process through the console scripts' entry (few steps)."""

from __future__ import annotations

import hashlib
import json
import logging
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml
from diffusers import StableDiffusionPipeline
from PIL import Image, ImageDraw

from sd_lightning.cli.scripts import run
from sd_lightning.data.sources import read_exclusions

COLOURS = {"red": (220, 30, 30), "green": (30, 200, 60), "blue": (40, 60, 230)}
QUICK_VAE = ["logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress", "trainer.log_every_n_steps=1",
             "trainer.max_steps=4", "trainer.val_check_interval=2"]
QUICK = [*QUICK_VAE, "sampling.steps=2", "callbacks.sample_grid.num_per_prompt=1"]


def shapes_folder(root: Path, count: int = 36, size: int = 32) -> Path:
    """Coloured squares and circles on grey, captioned in metadata.jsonl ("a red circle")."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(0)
    rows = []
    for index in range(count):
        colour, shape = list(COLOURS)[index % 3], ("square", "circle")[index // 3 % 2]
        image = Image.fromarray(rng.integers(100, 156, (size, size, 3), dtype=np.uint8))  # no two files alike
        x, y, side = *rng.integers(2, size // 2, 2), int(rng.integers(size // 4, size // 2))
        (ImageDraw.Draw(image).rectangle if shape == "square" else ImageDraw.Draw(image).ellipse)(
            [x, y, x + side, y + side], fill=COLOURS[colour])
        image.save(root / f"{index:03d}.png")
        rows.append({"file_name": f"{index:03d}.png", "text": f"a {colour} {shape}"})
    (root / "broken.png").write_bytes((root / "000.png").read_bytes()[:60])
    rows.append({"file_name": "broken.png", "text": "a red square"})
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _digest(root: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(root.iterdir())}


def _loggers() -> list[logging.Logger]:
    return [logging.getLogger(), *(x for x in logging.Logger.manager.loggerDict.values() if isinstance(x, logging.Logger))]


@pytest.fixture
def keep_logging():
    """Each in-process console script configures logging (Hydra's job logging, on this test's captured streams,
    which close with it): put every logger back as it was."""
    saved = {id(x): (x.handlers[:], x.level, x.propagate, x.disabled) for x in _loggers()}
    yield
    for logger in _loggers():
        handlers, level, propagate, disabled = saved.get(id(logger), ([], logging.NOTSET, True, False))
        logger.handlers[:] = handlers
        logger.setLevel(level)
        logger.propagate, logger.disabled = propagate, disabled


def _cli(monkeypatch, name: str, *args: str) -> None:
    monkeypatch.setattr(sys, "argv", [name, *args])
    run(name)


@pytest.mark.usefixtures("one_thread", "keep_logging")
def test_your_own_images_inspect_clean_train_both_stages_sample_export(tmp_path, monkeypatch, capsys):
    root = shapes_folder(tmp_path / "shapes")
    before = _digest(root)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    data = ["data=imagefolder", f"data.root={root}"]

    _cli(monkeypatch, "sdl-data", "inspect", *data)
    [report] = (work / "outputs" / "data" / "inspect").iterdir()
    problems = json.loads((report / "data_report.json").read_text())["problems"]
    assert ("broken.png", "truncated") in [(p["file"], p["reason"]) for p in problems]
    _cli(monkeypatch, "sdl-data", "clean", *data)
    [cleaned] = (work / "outputs" / "data" / "clean").iterdir()
    exclude = cleaned / "exclude.txt"
    assert read_exclusions(exclude) == ["broken.png"]

    # Stage 2 before stage 1: the missing VAE is named with the command that makes it, before any training.
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "sdl-train", "experiment=scratch", f"data.root={root}", "vae_run=my_vae", *QUICK)
    assert f"sdl-train experiment=scratch_autoencoder data.root={root} name=my_vae" in capsys.readouterr().err

    _cli(monkeypatch, "sdl-train", "experiment=scratch_autoencoder", f"data.root={root}", "name=my_vae",
         f"data.exclude={exclude}", *QUICK_VAE)
    vae = (work / "outputs" / "my_vae" / "latest" / "vae").resolve()
    assert (vae / "config.json").is_file()
    _cli(monkeypatch, "sdl-train", "experiment=scratch", f"data.root={root}", "vae_run=my_vae", "name=shapes",
         f"data.exclude={exclude}", "data.sample_prompts=[a red circle,a blue square]", *QUICK)
    run_dir = (work / "outputs" / "shapes" / "latest").resolve()
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert Path(config["model"]["components"]["vae_path"]).resolve() == vae  # found by the stage-1 run's name
    assert config["data"]["cache"] == "auto" and config["objective"]["_target_"].endswith("VPredictionObjective")
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    assert metrics.dropna(subset=["val/mse"])["step"].tolist() == [1, 3]  # every val_check_interval=2 steps
    assert sorted(p.name for p in (run_dir / "samples").rglob("*.png"))  # the grids of data.sample_prompts
    ckpt = run_dir / "checkpoints" / "last.ckpt"

    _cli(monkeypatch, "sdl-sample", f"ckpt_path={ckpt}", "out_dir=samples", "prompt=a red circle", "num_images=2",
         "steps=2")
    images = [np.asarray(Image.open(work / "samples" / f"{i:05d}.png")) for i in range(2)]
    assert all(image.shape == (32, 32, 3) for image in images)
    _cli(monkeypatch, "sdl-export", f"ckpt_path={ckpt}", "out_dir=export")
    pipe = StableDiffusionPipeline.from_pretrained(work / "export", local_files_only=True)
    assert pipe.vae.config.block_out_channels == json.loads((vae / "config.json").read_text())["block_out_channels"]
    assert type(pipe.text_encoder).__name__ == "BertModel"  # the recipe's all-MiniLM-L6-v2
    # The single file holds CLIP text encoders only (what A1111/ComfyUI load): refused by name, nothing written.
    with pytest.raises(SystemExit):
        _cli(monkeypatch, "sdl-export", f"ckpt_path={ckpt}", "out_dir=export_file", "format=single_file")
    assert "model's text_encoder is a BertModel (use format=pipeline)" in capsys.readouterr().err
    assert not (work / "export_file" / "model.safetensors").exists()
    assert _digest(root) == before  # the user's folder is never written
