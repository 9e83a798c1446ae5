"""Do denormal floats slow the training step on this CPU? The digits step with and without flush-to-zero.

Usage: .venv/bin/python experiments/benchmark/denormals.py [--rounds 2] [--steps 400]
Each measurement is a fresh process training the default digits model (``experiment=digits``, a random VAE: the same
compute) for --steps steps in a plain loop (``diffusion_loss``, backward, the configured AdamW; no Lightning, no
callbacks), with denormals flushed (``set_flush_denormal``, every thread) or kept; the two settings alternate --rounds times. Prints the mean
ms per step of each run and the ratio of the medians.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

STEP_LOOP = """
import json, sys, time
from pathlib import Path
import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from sd_lightning.callbacks.denormals import set_flush_denormal
from sd_lightning.cli.config import CONFIG_DIR

flush, steps = sys.argv[1] == "flush", int(sys.argv[2])
set_flush_denormal(flush)  # every torch thread, as sdl-train's callback does
with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
    cfg = compose("train", overrides=["experiment=digits", "model.components.vae_path=null", "data.cache=null",
                                      "paths.run_dir=/tmp/sdl-denormals", "paths.output_root=/tmp"])
torch.manual_seed(0)
model, data = instantiate(cfg.model), instantiate(cfg.data)
data.setup("fit")
optimizer = model.optimizer_factory(params=model.trainable_parameters())
model.train()
times, step = [], 0
while step < steps:
    for batch in data.train_dataloader():
        loss = model.diffusion_loss(batch, torch.Generator().manual_seed(step)).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        times.append(time.perf_counter())
        step += 1
        if step == steps:
            break
print(json.dumps({"ms_per_step": (times[-1] - times[0]) / (len(times) - 1) * 1000}))
"""


def run(setting: str, steps: int) -> float:
    out = subprocess.run([sys.executable, "-c", STEP_LOOP, setting, str(steps)], capture_output=True, text=True,
                         check=True).stdout
    return json.loads(out.strip().splitlines()[-1])["ms_per_step"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--steps", type=int, default=400)
    args = parser.parse_args()
    results: dict[str, list[float]] = {"keep": [], "flush": []}
    for _ in range(args.rounds):
        for setting in results:  # interleaved: this machine drifts between runs
            results[setting].append(run(setting, args.steps))
            print(f"{setting}: {results[setting][-1]:.1f} ms/step", flush=True)
    keep, flush = (statistics.median(results[s]) for s in ("keep", "flush"))
    print(f"median keep {keep:.1f} ms/step, flush {flush:.1f} ms/step: flush is {keep / flush:.2f}x faster")


if __name__ == "__main__":
    main()
