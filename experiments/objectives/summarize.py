"""Tabulate the objectives study: validation metrics in the common ε space, sample quality and FID per job.

Usage: python experiments/objectives/summarize.py <sweep folder or job folder> [...]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pandas as pd
from omegaconf import OmegaConf


def row(job: Path) -> dict[str, object]:
    config = OmegaConf.to_container(OmegaConf.load(job / "config.yaml"))
    metrics = pd.read_csv(job / "csv" / "metrics.csv")
    val = metrics.dropna(subset=["val/mse"]).iloc[-1]
    quality = json.loads((job / "quality.json").read_text())
    evaluation = json.loads((job / "eval" / "eval.json").read_text()) if (job / "eval" / "eval.json").is_file() else {}
    fid = (evaluation.get("samples") or {}).get("fid")
    target = config["model"]["objective"]["_target_"].rsplit(".", 1)[-1]
    return {"objective": target, "steps": int(val["step"]), "val/mse (ε)": round(float(val["val/mse"]), 4),
            "val/x0_mse": round(float(val["val/x0_mse"]), 4), "val/r2": round(float(val["val/r2"]), 4),
            "sampler": quality["sampling"]["scheduler"], "accuracy": quality["accuracy"],
            "diversity": round(quality["diversity"], 3), "FID (trained features)": None if fid is None else round(fid, 3)}


def main() -> None:
    jobs = []
    for folder in map(Path, sys.argv[1:]):
        jobs += [folder] if (folder / "config.yaml").is_file() else sorted(
            p for p in folder.iterdir() if (p / "config.yaml").is_file())
    rows = [row(job) for job in jobs]
    columns = list(rows[0])
    print("| " + " | ".join(columns) + " |")
    print("|" + "---|" * len(columns))
    for values in rows:
        print("| " + " | ".join(str(values[c]) for c in columns) + " |")


if __name__ == "__main__":
    main()
