"""How right is ``estimate=true``? Estimate, then really train, the same configs; report estimate ÷ actual.

Usage: .venv/bin/python experiments/benchmark/estimate_vs_actual.py [--repeats 2] [--out experiments/benchmark/estimate.json]
The VAE both configs encode with is trained first (untimed). "actual" is the real run's ``trainer.fit`` wall time
(``time/fit_seconds`` in its metrics.csv), which the estimate's ``total_seconds`` predicts; both run alone, one
after the other, in fresh processes.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pandas as pd

BIN = Path(sys.executable).parent
QUIET = ["callbacks.progress.interactive=false"]  # plain progress lines, as in any log
# --quick (the CI test of the benchmark): a short VAE and diffusion run, validation twice, same code paths.
QUICK_VAE = ["trainer.max_steps=30"]
QUICK_CONFIGS = {"digits, 100 steps, validation every epoch": ["experiment=digits", "trainer.max_steps=100",
                                                              "trainer.check_val_every_n_epoch=1"]}
CONFIGS = {
    # The default diffusion stage (`make train`'s second command), with its loggers and callbacks.
    "digits (default)": ["experiment=digits"],
    # Other non-step costs: a validation with 8-sample grids every epoch, smaller batches, more epoch boundaries.
    "digits, validation every epoch, 8 per prompt": ["experiment=digits", "trainer.max_steps=600",
                                                     "trainer.check_val_every_n_epoch=1", "data.batch_size=16",
                                                     "callbacks.sample_grid.num_per_prompt=8"],
}

PROBE = """
import json, sys
from hydra import compose, initialize_config_dir
from sd_lightning.cli.config import CONFIG_DIR
from sd_lightning.cli.estimate import estimate
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=sys.argv[2:])
print("RESULT " + json.dumps(estimate(cfg)))
"""


def _run(command: list[str], cwd: Path) -> str:
    result = subprocess.run(command, cwd=cwd, capture_output=True, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"})
    if result.returncode:
        raise SystemExit(f"{' '.join(command[:3])} failed:\n{result.stderr[-3000:]}")
    return result.stdout


def measure(name: str, overrides: list[str], work: Path, vae: Path) -> dict[str, object]:
    common = [*overrides, f"model.components.vae_path={vae}", f"paths.output_root={work}"]
    printed = _run([sys.executable, "-c", PROBE, "-", *common], work)
    estimated = json.loads(printed.split("RESULT ", 1)[1])
    run_dir = work / f"run{len(list(work.glob('run*')))}"
    started = time.perf_counter()
    _run([str(BIN / "sdl-train"), *common, *QUIET, f"paths.run_dir={run_dir}"], work)
    wall = time.perf_counter() - started
    fit = float(pd.read_csv(run_dir / "csv" / "metrics.csv")["time/fit_seconds"].dropna().iloc[-1])
    return {"config": name, "overrides": overrides, "estimate_seconds": round(estimated["total_seconds"], 1),
            "actual_fit_seconds": round(fit, 1), "process_seconds": round(wall, 1),
            "estimate_over_actual": round(estimated["total_seconds"] / fit, 3),
            "estimate": {k: estimated[k] for k in ("seconds_per_step", "seconds_per_validation", "validations",
                                                   "seconds_per_epoch_boundary", "epoch_boundaries",
                                                   "startup_seconds")}}


def run_configs(configs: dict[str, list[str]], vae: list[str]) -> list[dict[str, object]]:
    """Train the VAE the configs encode with (untimed), then estimate and really run each config."""
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdl-estimate-bench-") as tmp:
        work = Path(tmp)
        _run([str(BIN / "sdl-train"), "experiment=digits_autoencoder", *vae, *QUIET, f"paths.run_dir={work / 'vae_run'}"],
             work)
        for name, overrides in configs.items():
            rows.append(measure(name, overrides, work, work / "vae_run" / "vae"))
            print(json.dumps({k: v for k, v in rows[-1].items() if k != "estimate"}), flush=True)
    return rows


def benchmark_row(quick: bool) -> dict[str, object]:
    """The ``estimate`` row of experiments/benchmark.py."""
    runs = run_configs(QUICK_CONFIGS, QUICK_VAE) if quick else run_configs(CONFIGS, [])
    return {"question": "estimate=true's projected duration ÷ the real run's fit time", "unit": "run",
            "configs": [], "runs": runs}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("estimate.json"))
    parser.add_argument("--repeats", type=int, default=1, help="(estimate, run) pairs per config: the machine drifts")
    args = parser.parse_args()
    rows = []
    for repeat in range(args.repeats):  # every config once per repeat, so a slow hour hits each config alike
        rows += [{**row, "repeat": repeat} for row in run_configs(CONFIGS, [])]
    args.out.write_text(json.dumps({"machine": {"cpu": platform.processor() or platform.machine(),
                                                "python": platform.python_version()}, "rows": rows}, indent=2) + "\n")
    print(f"{'config':48s} {'estimate':>9s} {'actual':>9s} {'ratio':>6s}")
    for row in rows:
        print(f"{row['config']:48s} {row['estimate_seconds']:8.1f}s {row['actual_fit_seconds']:8.1f}s "
              f"{row['estimate_over_actual']:6.3f}")
    for name in CONFIGS:
        ratios = [row["estimate_over_actual"] for row in rows if row["config"] == name]
        print(f"{name}: estimate ÷ actual median {statistics.median(ratios):.3f} [{min(ratios):.3f}–{max(ratios):.3f}] "
              f"over {len(ratios)} pairs")


if __name__ == "__main__":
    main()
