"""The CI quality test's recipe over several seeds: where its accuracy and diversity floors come from.

Usage: python experiments/digits_quality/ci_margin.py [--seeds 0 1 2] [--out results_ci_seeds.json]
Each seed trains both stages from random weights (the VAE as tests/conftest.py's fixture does, then the shortened
digits run of tests/experiments/test_digits_quality.py) and measures the last checkpoint the way the test does.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import tempfile
import time
from pathlib import Path

from hydra import compose, initialize_config_dir

from sd_lightning.cli.config import CONFIG_DIR
from sd_lightning.cli.train import train

QUIET = ["logger=csv", "trainer.enable_progress_bar=false", "~callbacks.progress"]
VAE = ["experiment=digits_autoencoder", "trainer.max_steps=400", "trainer.check_val_every_n_epoch=4"]
DIFFUSION = ["experiment=digits", "trainer.check_val_every_n_epoch=100", "trainer.log_every_n_steps=1",
             "sampling.steps=4", "callbacks.sample_grid.num_per_prompt=1", "trainer.max_steps=1200",
             "lr_scheduler.num_warmup_steps=50"]
MEASURE = {"per_class": 10, "steps": 20}


def _measure_module():
    spec = importlib.util.spec_from_file_location("digits_quality_measure", Path(__file__).with_name("measure.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _train(run_dir: Path, overrides: list[str]) -> None:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[f"paths.run_dir={run_dir}", f"paths.output_root={run_dir.parent}", *overrides])
    train(cfg)


def run_seed(seed: int, root: Path) -> dict[str, object]:
    started = time.perf_counter()
    _train(root / "vae", [*VAE, *QUIET, f"seed={seed}"])
    _train(root / "digits", [*DIFFUSION, *QUIET, f"seed={seed}", f"model.components.vae_path={root / 'vae' / 'vae'}"])
    result = _measure_module().measure(root / "digits" / "checkpoints" / "last.ckpt", **MEASURE)
    return {"seed": seed, "accuracy": result["accuracy"], "diversity": result["diversity"],
            "seconds": round(time.perf_counter() - started, 1), "hardware": result["hardware"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("results_ci_seeds.json"))
    args = parser.parse_args()
    rows = []
    for seed in args.seeds:
        with tempfile.TemporaryDirectory() as tmp:
            rows.append(run_seed(seed, Path(tmp)))
        print(json.dumps({k: v for k, v in rows[-1].items() if k != "hardware"}), flush=True)
    args.out.write_text(json.dumps({"recipe": {"vae": VAE, "diffusion": DIFFUSION, "measure": MEASURE}, "runs": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
