"""Time to quality: both `sdl-train` stages of a digits recipe from random weights, timed, then measured.

Usage:
    python experiments/time_to_quality/run.py --name default --seeds 0 1 2
    python experiments/time_to_quality/run.py --name fm1200 --vae trainer.max_steps=300 \\
        --diffusion objective=flow_matching trainer.max_steps=1200 --guidance 1.0 1.25 1.5

Each seed runs, in a fresh folder (no weights or caches from earlier runs): `sdl-train experiment=digits_autoencoder`
then `sdl-train experiment=digits` as `make train` does (default loggers and callbacks), each timed as a whole
command (start-up included) and by its own `time/fit_seconds`; then the quality study's measure
(`experiments/digits_quality/measure.py`: accuracy, diversity over 200 samples) at each guidance scale and
`sdl-eval`'s FID at the model's stored guidance. One JSON line per (seed, guidance) is appended to results.jsonl.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent


def _measure_module():
    spec = importlib.util.spec_from_file_location("digits_quality_measure", ROOT / "experiments" / "digits_quality" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        completed = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                                   env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if completed.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed; see {log}")
    return time.perf_counter() - started


def fit_seconds(run_dir: Path) -> float | None:
    metrics = run_dir / "csv" / "metrics.csv"
    if not metrics.exists():
        return None
    with metrics.open() as handle:
        values = [row["time/fit_seconds"] for row in csv.DictReader(handle) if row.get("time/fit_seconds")]
    return float(values[-1]) if values else None


def run_seed(seed: int, vae: list[str], diffusion: list[str], guidance: list[float | None], root: Path,
             stages: tuple[str, str] = ("digits_autoencoder", "digits")) -> list[dict]:
    """``stages``: the two experiments (each run's name is its experiment's ``name``, as the configs set it)."""
    common = [f"paths.output_root={root}", f"seed={seed}"]
    vae_stage, diffusion_stage = stages
    vae_seconds = timed([str(BIN / "sdl-train"), f"experiment={vae_stage}", *common, *vae], root / "vae.log")
    diffusion_seconds = timed([str(BIN / "sdl-train"), f"experiment={diffusion_stage}", *common, *diffusion],
                              root / "digits.log")
    run_dir = (root / diffusion_stage / "latest").resolve()
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    eval_dir = root / "eval"
    subprocess.run([str(BIN / "sdl-eval"), f"ckpt_path={ckpt}", f"out_dir={eval_dir}", "eval.validate=false",
                    "eval.reconstruction=false"], cwd=ROOT, check=True, capture_output=True)
    fid = json.loads((eval_dir / "eval.json").read_text())["samples"]["fid"]
    measure = _measure_module().measure
    rows = []
    for scale in guidance:
        result = measure(ckpt, guidance=scale)
        rows.append({"seed": seed, "vae_seconds": round(vae_seconds, 1), "diffusion_seconds": round(diffusion_seconds, 1),
                     "training_seconds": round(vae_seconds + diffusion_seconds, 1),
                     "vae_fit_seconds": fit_seconds((root / vae_stage / "latest").resolve()),
                     "diffusion_fit_seconds": fit_seconds(run_dir), "guidance_scale": result["sampling"]["guidance_scale"],
                     "accuracy": result["accuracy"], "diversity": result["diversity"],
                     "fid_at_stored_guidance": fid, "hardware": result["hardware"]})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True, help="the recipe's name in the results table")
    parser.add_argument("--vae", nargs="*", default=[], help="overrides of the VAE stage")
    parser.add_argument("--diffusion", nargs="*", default=[], help="overrides of the diffusion stage")
    parser.add_argument("--guidance", type=float, nargs="*", default=[None], help="default: the model's stored scale")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    parser.add_argument("--keep", type=Path, default=None, help="train in <keep>/seed<k> and keep it (default: a temp folder)")
    parser.add_argument("--stages", nargs=2, default=["digits_autoencoder", "digits"], metavar=("VAE", "DIFFUSION"),
                        help="the two experiments (e.g. digits_sd3_autoencoder digits_sd3)")
    args = parser.parse_args()
    for seed in args.seeds:
        with tempfile.TemporaryDirectory(prefix="sdl-ttq-") as tmp:
            root = Path(tmp) if args.keep is None else args.keep / f"seed{seed}"
            root.mkdir(parents=True, exist_ok=args.keep is None)  # a kept folder must be new
            for row in run_seed(seed, args.vae, args.diffusion, args.guidance, root, tuple(args.stages)):
                row = {"recipe": args.name, "stages": args.stages, "vae_overrides": args.vae,
                       "diffusion_overrides": args.diffusion, **row}
                print(json.dumps(row), flush=True)
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
