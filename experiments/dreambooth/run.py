"""DreamBooth on the digits: one digit is the subject, the other digits are the class images.

Steps, each a whole command (timed), in a fresh folder:
1. the base model: `sdl-train experiment=digits_autoencoder`, `sdl-train experiment=digits objective=v_prediction`
   (a DDPM objective, so it exports as a StableDiffusionPipeline folder), `sdl-export` → `<root>/base`;
2. `<root>/subject`: the first 5 images of the subject digit; `<root>/classes`: 100 images of the other digits;
3. `sdl-train experiment=dreambooth_sd` on them with the instance prompt "a handwritten digit sks" and the class prompt
   "a handwritten digit", once with prior preservation (prior_loss_weight=1) and once without (0: the control);
4. each model (and the base) samples 100 images per prompt; the project's digit classifier labels them.

Usage: python experiments/dreambooth/run.py [--subject 3] [--steps 300] [--out experiments/dreambooth/results.json]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
INSTANCE, CLASS = "a handwritten digit sks", "a handwritten digit"


def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=ROOT,
                              env={**os.environ, "HF_HUB_OFFLINE": "1"})
    if done.returncode:
        raise SystemExit(f"{command[:2]} failed, see {log}")
    return time.perf_counter() - started


def write_folders(root: Path, subject: int) -> None:
    from sd_lightning.data.sources import DIGIT_NAMES, DigitsSource

    source = DigitsSource(32)
    for name in ("subject", "classes"):
        (root / name).mkdir()
    subject_items = [i for i, item in enumerate(source.items) if item.label == DIGIT_NAMES[subject]][:5]
    others = [i for i, item in enumerate(source.items) if item.label != DIGIT_NAMES[subject]][:100]
    for k, index in enumerate(subject_items):
        source.load_image(index).save(root / "subject" / f"{k:02d}.png")
    for k, index in enumerate(others):
        source.load_image(index).save(root / "classes" / f"{k:03d}.png")


def judge(pipeline, prompt: str, count: int, guidance: float, steps: int, seed: int) -> dict:
    from sd_lightning.diffusion.sampling import generate
    from sd_lightning.evaluation.class_conditional import (
        fit_digits_classifier,
        images_to_digit_grid,
        mean_pairwise_distance,
        real_digits_by_class,
    )

    images = generate(pipeline, [prompt] * count, seed=seed, steps=steps, guidance_scale=guidance, output_type="np")
    grids = images_to_digit_grid(images)
    labels = fit_digits_classifier().predict(grids.reshape(len(grids), -1))
    real = np.concatenate(list(real_digits_by_class().values()))
    return {"prompt": prompt, "histogram": {int(k): int(v) for k, v in sorted(Counter(labels.tolist()).items())},
            # spread of the samples / spread of all real digits (1: as varied as the real data set)
            "diversity": mean_pairwise_distance(grids) / mean_pairwise_distance(real[::4])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--subject", type=int, default=3)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--lr", type=float, default=1e-4)
    parser.add_argument("--guidance", type=float, default=2.0)
    parser.add_argument("--samples", type=int, default=100)
    parser.add_argument("--out", type=Path, default=HERE / "results.json")
    args = parser.parse_args()
    from sd_lightning.data.sources import digit_caption
    from sd_lightning.models.pipelines import load_pipeline

    root = Path(tempfile.mkdtemp(prefix="sdl-dreambooth-"))
    common = [f"paths.output_root={root}"]
    seconds = {"vae": timed([str(BIN / "sdl-train"), "experiment=digits_autoencoder", *common], root / "vae.log")}
    seconds["base"] = timed([str(BIN / "sdl-train"), "experiment=digits", "objective=v_prediction", *common],
                            root / "base.log")
    base_ckpt = (root / "digits" / "latest" / "checkpoints" / "last.ckpt").resolve()
    timed([str(BIN / "sdl-export"), f"ckpt_path={base_ckpt}", f"out_dir={root / 'base'}"], root / "export.log")
    write_folders(root, args.subject)
    prompts = {"instance": INSTANCE, "class": CLASS, "other": digit_caption((args.subject + 4) % 10)}
    runs = {"base": base_ckpt}
    for name, weight in (("prior", 1.0), ("no_prior", 0.0)):
        seconds[name] = timed([str(BIN / "sdl-train"), "experiment=dreambooth_sd", *common, f"name=dreambooth_{name}",
                               f"model.path={root / 'base'}", f"data.root={root / 'subject'}",
                               f"data.class_root={root / 'classes'}", f"data.instance_prompt='{INSTANCE}'",
                               f"data.class_prompt='{CLASS}'", f"model.prior_loss_weight={weight}",
                               f"trainer.max_steps={args.steps}", f"optimizer.lr={args.lr}",
                               "model.components.gradient_checkpointing=false", "callbacks.ema.decay=0.99",
                               f"sampling.guidance_scale={args.guidance}"], root / f"{name}.log")
        runs[name] = (root / f"dreambooth_{name}" / "latest" / "checkpoints" / "last.ckpt").resolve()
    results = {}
    for name, ckpt in runs.items():
        pipeline, sampling = load_pipeline(ckpt)
        results[name] = {key: judge(pipeline, prompt, args.samples, args.guidance, int(sampling["steps"]), 20_000)
                         for key, prompt in prompts.items()}
        results[name]["subject_share"] = results[name]["instance"]["histogram"].get(args.subject, 0) / args.samples
    record = {"subject": args.subject, "steps": args.steps, "lr": args.lr, "guidance": args.guidance,
              "samples": args.samples, "seconds": {k: round(v, 1) for k, v in seconds.items()}, "results": results,
              "hardware": _digits_quality().hardware()}
    args.out.write_text(json.dumps(record, indent=2) + "\n")
    print(json.dumps({k: {"subject_share": v["subject_share"], "class_histogram": v["class"]["histogram"],
                          "class_diversity": round(v["class"]["diversity"], 3),
                          "other": v["other"]["histogram"]} for k, v in results.items()}, indent=1))


def _digits_quality():
    """experiments/digits_quality/measure.py (its hardware record), loaded by path as the other studies do."""
    spec = importlib.util.spec_from_file_location("digits_quality_measure",
                                                  ROOT / "experiments" / "digits_quality" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


if __name__ == "__main__":
    main()
