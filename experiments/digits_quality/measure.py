"""Sample quality of a digits model: conditional accuracy and within-class diversity.

Usage: python experiments/digits_quality/measure.py [--ckpt outputs/digits/latest/checkpoints/last.ckpt]
       [--per-class 20] [--scheduler ddim --steps 30 --guidance 1.5] [--out results.json]
Without sampling flags it uses the defaults stored with the model (what sdl-sample uses).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time
from pathlib import Path

import torch

from sd_lightning.data.sources import digit_caption
from sd_lightning.diffusion.sampling import generate
from sd_lightning.evaluation.class_conditional import evaluate_digit_samples
from sd_lightning.models.pipelines import load_pipeline


def hardware() -> dict[str, object]:
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [line.split(":", 1)[1].strip() for line in cpuinfo.read_text().splitlines() if line.startswith("model name")]
        cpu = names[0] if names else cpu
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None}


def measure(ckpt: Path, per_class: int = 20, scheduler: str | None = None, steps: int | None = None,
            guidance: float | None = None, seed: int = 10_000) -> dict[str, object]:
    pipeline, defaults = load_pipeline(ckpt, scheduler=scheduler)
    settings = {
        "scheduler": scheduler or defaults["scheduler"],
        "steps": steps or defaults["steps"],
        "guidance_scale": defaults["guidance_scale"] if guidance is None else guidance,
    }
    started = time.perf_counter()
    samples_by_class = {}
    for label in range(10):
        images = generate(pipeline, [digit_caption(label)] * per_class, seed=seed + 1000 * label,
                          steps=settings["steps"], guidance_scale=settings["guidance_scale"], output_type="np")
        samples_by_class[label] = images
    seconds = time.perf_counter() - started
    report = evaluate_digit_samples(samples_by_class)
    return {"checkpoint": str(ckpt), "sampling": settings, "samples_per_class": per_class,
            "sampling_seconds": round(seconds, 2), **report.to_dict(), "hardware": hardware()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--ckpt", type=Path, default=Path("outputs/digits/latest/checkpoints/last.ckpt"))
    parser.add_argument("--per-class", type=int, default=20)
    parser.add_argument("--scheduler", default=None)
    parser.add_argument("--steps", type=int, default=None)
    parser.add_argument("--guidance", type=float, nargs="*", default=None,
                        help="one or more guidance scales to compare (default: the stored one)")
    parser.add_argument("--out", type=Path, default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not args.ckpt.is_file():
        raise SystemExit(f"no checkpoint at {args.ckpt}: run `make train` (or pass --ckpt)")
    results = [measure(args.ckpt, args.per_class, args.scheduler, args.steps, g) for g in (args.guidance or [None])]
    for result in results:
        s = result["sampling"]
        print(f"{s['scheduler']} steps={s['steps']} guidance={s['guidance_scale']}: "
              f"accuracy={result['accuracy']:.3f} diversity={result['diversity']:.3f} "
              f"({result['num_samples']} samples in {result['sampling_seconds']} s)")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(results if len(results) > 1 else results[0], indent=2))


if __name__ == "__main__":
    main()
