"""Summarize a digits multirun: per job, the swept overrides, final validation metrics and sample quality.

Usage: python experiments/sweeps/summarize.py multirun/digits/<stamp> [more sweep folders] [--out results.md]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

import pandas as pd
import yaml

MEASURE = Path(__file__).resolve().parents[1] / "digits_quality" / "measure.py"


def _measure():
    spec = importlib.util.spec_from_file_location("digits_quality_measure", MEASURE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.measure


def summarize(sweep_dir: Path, per_class: int = 20) -> list[dict]:
    measure = _measure()
    rows = []
    for job in sorted((p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit()), key=lambda p: int(p.name)):
        overrides = yaml.safe_load((job / ".hydra" / "overrides.yaml").read_text())
        metrics = pd.read_csv(job / "csv" / "metrics.csv")
        val = metrics.dropna(subset=["val/mse"]).iloc[-1]
        quality = measure(job / "checkpoints" / "last.ckpt", per_class=per_class)
        # Wall time of the job: from Hydra writing its config to the last metrics row.
        seconds = (job / "csv" / "metrics.csv").stat().st_mtime - (job / ".hydra" / "config.yaml").stat().st_mtime
        rows.append({
            "job": job.name,
            "overrides": " ".join(o for o in overrides if "=" in o and not o.startswith(("hydra", "paths"))),
            "val_mse": float(val["val/mse"]), "val_r2": float(val["val/r2"]),
            "accuracy": quality["accuracy"], "diversity": quality["diversity"],
            "minutes": round(seconds / 60, 1),
        })
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_dir", type=Path, nargs="+", help="one or more multirun folders")
    parser.add_argument("--out", type=Path, default=None)
    args = parser.parse_args()
    rows = [row for sweep_dir in args.sweep_dir for row in summarize(sweep_dir)]
    table = ["| overrides | val MSE | val R² | accuracy | diversity | minutes |", "|---|---|---|---|---|---|"]
    table += [f"| {r['overrides']} | {r['val_mse']:.4f} | {r['val_r2']:.3f} | {r['accuracy']:.3f} | "
              f"{r['diversity']:.3f} | {r['minutes']} |" for r in rows]
    print("\n".join(table))
    if args.out:
        args.out.write_text("\n".join(table) + "\n")
        args.out.with_suffix(".json").write_text(json.dumps(rows, indent=2))


if __name__ == "__main__":
    main()
