"""experiments/conditioning in CI: its pixel measure reads every attribute of fresh images and nothing of wrong ones,
and the study's runner goes end to end on a few steps (the study itself: experiments/conditioning/README.md)."""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

STUDY = Path(__file__).resolve().parents[2] / "experiments" / "conditioning"


@pytest.fixture(scope="module")
def shapes():
    spec = importlib.util.spec_from_file_location("conditioning_shapes", STUDY / "shapes.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_measure_reads_fresh_images_right_and_wrong_captions_wrong(shapes):
    assert shapes.check_measures(per_combination=5) == {"colour": 1.0, "shape": 1.0, "position": 1.0, "all": 1.0}
    rng = np.random.default_rng(0)
    circles = [shapes.draw("red", "circle", "top left", 32, rng) for _ in range(20)]
    assert shapes.faithfulness(circles, ("blue", "square", "bottom right")) == {
        "colour": 0.0, "shape": 0.0, "position": 0.0, "all": 0.0}
    triangles = [shapes.draw("red", "triangle", "top left", 32, rng) for _ in range(20)]
    assert shapes.faithfulness(triangles, ("red", "circle", "top left"))["shape"] == 0.0
    blank = np.full((32, 32, 3), shapes.BACKGROUND, dtype=np.uint8)
    assert shapes.attributes_of(blank) == {"colour": None, "shape": None, "position": None}


def test_the_set_holds_out_its_combinations_and_keeps_every_attribute(shapes, tmp_path):
    counts = shapes.write_set(tmp_path / "set", 84)
    rows = [json.loads(line) for line in (tmp_path / "set" / "metadata.jsonl").read_text().splitlines()]
    captions = {row["text"] for row in rows}
    assert counts == {"images": 84, "combinations": 42, "held_out": 6} and len(captions) == 42
    assert not captions & {shapes.caption(*c) for c in shapes.HELD_OUT}
    for attribute in (shapes.COLOURS, shapes.SHAPES, shapes.POSITIONS):
        assert all(any(f" {value} " in f" {c} " for c in captions) for value in attribute)


@pytest.mark.slow
def test_the_study_runs_end_to_end_on_a_few_steps(tmp_path):
    out = tmp_path / "results.jsonl"
    done = subprocess.run(
        [sys.executable, str(STUDY / "run.py"), "--name", "ci", "--images", "84", "--per-prompt", "1", "--steps", "2",
         "--work", str(tmp_path / "work"), "--out", str(out), "--judge-every", "4",
         "--vae", "trainer.max_steps=4", "trainer.val_check_interval=4", "logger=csv",
         "--diffusion", "trainer.max_steps=8", "trainer.val_check_interval=8", "logger=csv",
         "model.components.denoiser.block_out_channels=[16,32]", "callbacks.sample_grid.num_per_prompt=1"],
        capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["step"] for r in records] == [4, 8]  # the kept checkpoints; last.ckpt is step 8's, not measured twice
    for record in records:
        assert set(record["trained"]) == set(record["held_out"]) == {"colour", "shape", "position", "all"}
        assert all(0.0 <= v <= 1.0 for split in ("trained", "held_out", "vae_ceiling") for v in record[split].values())
        assert record["seconds"]["vae"] > 0 and record["seconds"]["diffusion"] > 0
