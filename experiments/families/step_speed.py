"""One training step per model family on this CPU, side by side: SD 1.x (`model=tiny`), SDXL (`model=sdxl_tiny`),
SD 3 (`model=sd3_tiny`, the `digits_sd3` transformer size) on 32×32 digits latents, batch 32.

Each repetition times a block of steps of every family in turn (alternating, so drift of the machine hits all
alike); the table reports the median ms/step and its ratio to SD 1.x's step.

    .venv/bin/python experiments/families/step_speed.py [--steps 20] [--repetitions 5] [--out step_speed.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate

from sd_lightning.cli.config import CONFIG_DIR

FAMILIES = {
    "SD 1.x (model=tiny)": ["model=tiny", "objective=v_prediction"],
    "SDXL (model=sdxl_tiny)": ["model=sdxl_tiny", "objective=v_prediction"],
    "SD 3 (experiment=digits_sd3)": ["experiment=digits_sd3", "model.components.vae_path=null",
                                     "model.components.vae.latent_channels=16"],
}


def build(overrides: list[str]):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=[*overrides, "data=digits"])
    torch.manual_seed(0)
    model = instantiate(cfg.model)
    channels, size = model.components.latent_shape
    batch = {"latents": torch.randn(32, channels, size, size), "latents_std": torch.zeros(32, channels, size, size),
             "micro_conditioning": torch.tensor([[32.0, 32, 0, 0, 32, 32]]).expand(32, 6),
             "prompt": [f"a handwritten digit {i % 10}" for i in range(32)], "id": [str(i) for i in range(32)]}
    optimizer = torch.optim.AdamW(model.trainable_parameters(), lr=1e-4, fused=True)
    return model, batch, optimizer


def step(model, batch, optimizer, index: int) -> None:
    generators = [torch.Generator().manual_seed(index * 100 + i) for i in range(32)]
    loss = model.diffusion_loss(batch, generators).mean()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repetitions", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("step_speed.json"))
    args = parser.parse_args()
    torch.set_num_threads(2)
    parts = {name: build(overrides) for name, overrides in FAMILIES.items()}
    for model, batch, optimizer in parts.values():
        model.train()
        for i in range(3):  # warm-up: allocator, prompt memo
            step(model, batch, optimizer, i)
    times: dict[str, list[float]] = {name: [] for name in parts}
    for repetition in range(args.repetitions):
        for name, (model, batch, optimizer) in parts.items():
            start = time.perf_counter()
            for i in range(args.steps):
                step(model, batch, optimizer, repetition * args.steps + i)
            times[name].append((time.perf_counter() - start) / args.steps * 1000)
    baseline = statistics.median(times[next(iter(parts))])
    rows = []
    print("| family | trained parameters | ms/step (median) | range | ratio to SD 1.x |")
    print("|---|---|---|---|---|")
    for name, (model, _, _) in parts.items():
        median = statistics.median(times[name])
        params = sum(p.numel() for p in model.trainable_parameters())
        rows.append({"family": name, "parameters": params, "ms_per_step": median, "all": times[name],
                     "ratio": median / baseline})
        print(f"| {name} | {params / 1e3:.0f} k | {median:.1f} | {min(times[name]):.1f}–{max(times[name]):.1f} "
              f"| {median / baseline:.2f}× |")
    hardware = {"cpu": "AMD EPYC", "cores": 2, "torch": torch.__version__, "threads": torch.get_num_threads()}
    args.out.write_text(json.dumps({"rows": rows, "hardware": hardware, "batch": 32, "steps": args.steps,
                                    "repetitions": args.repetitions}, indent=1))


if __name__ == "__main__":
    main()
