"""sdl-compare on a real 2x2 multirun (loss x seed), plus config-diff columns and error handling."""

import math
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest
import yaml
from PIL import Image

from sd_lightning.cli.compare import main
from sd_lightning.evaluation.compare import compare_runs, find_run_dirs

TINY = ["logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress", "data.source.limit=64",
        "data.batch_size=8", "model.components.denoiser.block_out_channels=[16,32]", "trainer.max_steps=4",
        "trainer.val_check_interval=2", "trainer.check_val_every_n_epoch=null", "trainer.log_every_n_steps=1",
        "sampling.steps=2", "callbacks.sample_grid.num_per_prompt=1", "callbacks.stability.num_samples=2",
        "callbacks.stability.steps=2"]


@pytest.fixture(scope="module")
def sweep_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A real ``sdl-train -m loss=mse,l1 seed=0,1`` multirun (4 tiny jobs), plus two broken run folders."""
    root = tmp_path_factory.mktemp("compare")
    result = subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", "-m", "loss=mse,l1", "seed=0,1",
         f"hydra.sweep.dir={root / 'sweep'}", f"paths.output_root={root}", *TINY],
        capture_output=True, text=True, timeout=900, cwd=root, env={**os.environ, "WANDB_MODE": "offline"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    sweep = root / "sweep"
    garbled = sweep / "4"  # a run whose metrics file got overwritten by junk
    (garbled / "csv").mkdir(parents=True)
    (garbled / "config.yaml").write_text((sweep / "0" / "config.yaml").read_text())
    (garbled / "csv" / "metrics.csv").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00garbage\n")
    unfinished = sweep / "5"  # killed before its first validation: a config, no metrics yet
    (unfinished / ".hydra").mkdir(parents=True)
    (unfinished / ".hydra" / "config.yaml").write_text("seed: 0\nname: default\n")
    return sweep


@pytest.mark.slow
def test_sdl_compare_reports_a_2x2_multirun(sweep_dir, tmp_path, capsys):
    out = tmp_path / "report"
    assert main([str(sweep_dir), "--out", str(out)]) == 0
    printed = capsys.readouterr().out

    table = pd.read_csv(out / "comparison.csv")
    jobs = sorted(Path(p).name for p in table["run"])
    assert jobs == ["0", "1", "2", "3"]  # every run, none of the broken ones
    assert {"loss", "seed"} <= set(table.columns)
    assert not any(c.startswith(("paths.", "hydra.", "trainer.max_steps")) for c in table.columns)
    assert {frozenset(p) for p in table[["loss", "seed"]].astype(str).itertuples(index=False)} == {
        frozenset(p) for p in (("mse", "0"), ("mse", "1"), ("l1", "0"), ("l1", "1"))}
    for metric in ("val/mse", "val/rmse", "val/mae", "val/r2"):
        assert table[f"{metric} final"].notna().all() and table[f"{metric} best"].notna().all()
    assert (table["val/mse best"] <= table["val/mse final"] + 1e-12).all()
    assert (table["val/r2 best"] >= table["val/r2 final"] - 1e-12).all()
    assert table["val/mse final"].is_monotonic_increasing  # sorted by --metric
    assert (table["steps"] == 4).all() and (table["wall time (s)"] > 0).all()
    # Final values are the last logged validation of each job.
    for _, row in table.iterrows():
        logged = pd.read_csv(Path(row["run"]) / "csv" / "metrics.csv")["val/mse"].dropna()
        assert row["val/mse final"] == pytest.approx(logged.iloc[-1])

    # Seeds: loss=mse and loss=l1 each ran with seeds 0 and 1 -> mean ± std over the two.
    seeds = pd.read_csv(out / "comparison_seeds.csv")
    assert sorted(seeds["loss"]) == ["l1", "mse"] and (seeds["n"] == 2).all()
    for _, group in seeds.iterrows():
        finals = table[table["loss"] == group["loss"]]["val/mse final"]
        assert group["val/mse mean"] == pytest.approx(finals.mean())
        assert group["val/mse std"] == pytest.approx(finals.std(ddof=1))
    markdown = (out / "comparison.md").read_text()
    assert "Stability across seeds" in markdown and " ± " in markdown
    assert "Stability across seeds" in printed and "±" in printed

    # Broken folders are reported, not fatal.
    assert "## Skipped" in markdown
    assert f"{sweep_dir / '4'}`: csv/metrics.csv" in markdown and f"{sweep_dir / '5'}`: no csv/metrics.csv" in markdown
    assert "skipped" in printed

    for name in ("validation_curves.png", "final_vs_params.png", "samples.png"):
        path = out / name
        assert path.stat().st_size > 1000, name
        with Image.open(path) as image:
            assert image.format == "PNG" and image.width > 100 and image.height > 50
            assert len(set(image.convert("L").getdata())) > 10  # drawn, not blank


@pytest.mark.slow
def test_compare_single_run_folders_and_metric_errors(sweep_dir, tmp_path, capsys):
    # Several run folders given one by one: the same runs, sorted by another metric (higher is better).
    comparison = compare_runs([sweep_dir / "1", sweep_dir / "0", sweep_dir / "2"], metric="val/r2")
    assert [r.path.name for r in comparison.runs] == list(
        comparison.table.sort_values("val/r2 final", ascending=False)["run"].map(lambda p: Path(p).name))
    assert len(comparison.runs) == 3 and comparison.skipped == []
    assert main([str(sweep_dir), "--metric", "val/nope", "--out", str(tmp_path / "r")]) == 2
    assert "val/nope was not logged" in capsys.readouterr().err and not (tmp_path / "r").exists()


def _fake_run(root: Path, name: str, lr: float, seed: int, val_mse: list[float]) -> Path:
    """A run folder as sdl-train lays it out, for a run trained without Hydra overrides."""
    run = root / name
    (run / "csv").mkdir(parents=True)
    config = {"seed": seed, "optimizer": {"lr": lr}, "data": {"seed": seed, "batch_size": 8},
              "model": {"seed": seed}, "paths": {"run_dir": str(run)}, "trainer": {"default_root_dir": str(run)}}
    (run / "config.yaml").write_text(yaml.safe_dump(config))
    rows = [{"step": 2 * i + 1, "val/mse": v, "val/r2": 1 - v} for i, v in enumerate(val_mse)]
    pd.DataFrame(rows).to_csv(run / "csv" / "metrics.csv", index=False)
    return run


def test_without_overrides_columns_come_from_config_differences(tmp_path, capsys):
    _fake_run(tmp_path, "a", 1e-3, 0, [0.5, 0.3, 0.4])
    _fake_run(tmp_path, "b", 1e-3, 1, [0.6, 0.5])
    _fake_run(tmp_path, "c", 1e-2, 0, [0.2, 0.1])
    (tmp_path / "latest").symlink_to(tmp_path / "c")  # the stable pointer does not count twice
    assert [p.name for p in find_run_dirs([tmp_path])] == ["a", "b", "c"]
    comparison = compare_runs([tmp_path])
    # seed, data.seed and model.seed move together: one column; run folders are not settings.
    assert sorted(comparison.swept) == ["optimizer.lr", "seed"]
    assert comparison.table["run"].map(lambda p: Path(p).name).tolist() == ["c", "a", "b"]
    a = comparison.table.set_index(comparison.table["run"].map(lambda p: Path(p).name)).loc["a"]
    assert a["val/mse final"] == 0.4 and a["val/mse best"] == 0.3 and a["val/r2 best"] == pytest.approx(0.7)
    groups = comparison.seed_groups.set_index("optimizer.lr")
    assert groups.loc["0.001", "n"] == 2 and groups.loc["0.001", "val/mse mean"] == pytest.approx(0.45)
    assert groups.loc["0.01", "n"] == 1 and math.isnan(groups.loc["0.01", "val/mse std"])

    assert main([str(tmp_path / "missing")]) == 2
    assert "is not a directory" in capsys.readouterr().err
    empty = tmp_path / "empty"
    empty.mkdir()
    assert main([str(empty)]) == 2
    assert "no readable run folders" in capsys.readouterr().err
