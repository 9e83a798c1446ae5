"""Does the sample follow every attribute of the prompt? The from-scratch recipe on the captioned shapes set.

Steps, each a whole command (timed), in a fresh folder (or --work, whose VAE and set are reused):
1. ``shapes.write_set``: --images images of the 42 training combinations of colour x shape x position (6 held out);
2. ``sdl-train experiment=scratch_autoencoder`` on them (once per work folder), then the VAE-reconstruction ceiling:
   the pixel measure on reconstructions of fresh images of every combination;
3. ``sdl-train experiment=scratch`` with the config's overrides (--diffusion), timed;
4. --per-prompt samples for every combination (trained and held out) from the EMA weights, read by the pixel measure
   (``shapes.attributes_of``): per attribute the share that matches the caption, trained and held out apart.

Usage: python experiments/conditioning/run.py --name frozen_clip [--diffusion trainer.max_steps=2000 ...]
       [--guidance 3.0] [--work /tmp/cond] [--out experiments/conditioning/results.jsonl]
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
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
BIN = Path(sys.executable).parent
sys.path.insert(0, str(HERE))

import shapes  # noqa: E402  (this folder's module)


def timed(command: list[str], log: Path) -> float:
    started = time.perf_counter()
    with log.open("w") as out:
        done = subprocess.run(command, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent,
                              env={**os.environ, "HF_HUB_OFFLINE": "1", "WANDB_MODE": "offline"})
    if done.returncode:
        raise SystemExit(f"{command[:2]} failed, see {log}")
    return time.perf_counter() - started


def vae_ceiling(vae_dir: Path, size: int, per_combination: int = 10) -> dict[str, float]:
    """The measure on VAE reconstructions of fresh images: what a perfect diffusion model could score here."""
    import torch
    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(vae_dir, local_files_only=True).eval()
    rng = np.random.default_rng(7)
    scores = []
    for combination in shapes.combinations(False) + shapes.combinations(True):
        images = np.stack([np.asarray(shapes.draw(*combination, size, rng)) for _ in range(per_combination)])
        with torch.no_grad():
            x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1
            back = vae.decode(vae.encode(x).latent_dist.mode()).sample
        pixels = ((back.clamp(-1, 1) + 1) * 127.5).round().byte().permute(0, 2, 3, 1).numpy()
        scores.append(shapes.faithfulness(pixels, combination))
    return {k: round(float(np.mean([s[k] for s in scores])), 3) for k in (*shapes.ATTRIBUTES, "all")}


def judge(ckpt: Path, per_prompt: int, guidance: float, steps: int) -> dict[str, dict[str, float]]:
    from sd_lightning.diffusion.sampling import generate
    from sd_lightning.models.pipelines import load_pipeline

    pipeline, _ = load_pipeline(ckpt)
    result = {}
    for split, held_out in (("trained", False), ("held_out", True)):
        scores = []
        for index, combination in enumerate(shapes.combinations(held_out)):
            images = generate(pipeline, [shapes.caption(*combination)] * per_prompt, seed=1000 * index, steps=steps,
                              guidance_scale=guidance, output_type="np")
            scores.append(shapes.faithfulness([(np.asarray(i) * 255).round().astype(np.uint8) for i in images],
                                              combination))
        result[split] = {k: round(float(np.mean([s[k] for s in scores])), 3) for k in (*shapes.ATTRIBUTES, "all")}
    return result


def _is_final(kept: Path, final: Path) -> bool:
    import torch

    def step(path: Path) -> int:
        return int(torch.load(path, map_location="cpu", weights_only=True, mmap=True)["global_step"])

    return step(kept) == step(final)


def _hardware() -> dict:
    spec = importlib.util.spec_from_file_location("digits_quality_measure",
                                                  ROOT / "experiments" / "digits_quality" / "measure.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.hardware()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--name", required=True)
    parser.add_argument("--diffusion", nargs="*", default=[], help="overrides of the diffusion stage")
    parser.add_argument("--vae", nargs="*", default=[], help="overrides of the VAE stage")
    parser.add_argument("--images", type=int, default=2000)
    parser.add_argument("--resolution", type=int, default=32)
    parser.add_argument("--guidance", type=float, nargs="+", default=[3.0])
    parser.add_argument("--steps", type=int, default=30, help="sampling steps")
    parser.add_argument("--per-prompt", type=int, default=10)
    parser.add_argument("--judge-every", type=int, default=None,
                        help="also keep a checkpoint every N steps and measure each (one training run, a curve)")
    parser.add_argument("--work", type=Path, default=None, help="reuse this folder's set and VAE (default: fresh)")
    parser.add_argument("--out", type=Path, default=HERE / "results.jsonl")
    args = parser.parse_args()

    work = args.work or Path(tempfile.mkdtemp(prefix="sdl-conditioning-"))
    work.mkdir(parents=True, exist_ok=True)
    data = work / "shapes"
    if not data.exists():
        shapes.write_set(data, args.images, args.resolution)
    common = [f"data.root={data}", f"data.resolution={args.resolution}", f"paths.output_root={work / 'outputs'}"]
    vae_dir = work / "outputs" / "cond_vae" / "latest" / "vae"
    seconds = {}
    if not vae_dir.exists():
        seconds["vae"] = timed([str(BIN / "sdl-train"), "experiment=scratch_autoencoder", *common, "name=cond_vae",
                                *args.vae], work / "vae.log")
    name = f"cond_{args.name}"
    keep = []
    if args.judge_every:
        keep = ["+callbacks.every_n._target_=lightning.pytorch.callbacks.ModelCheckpoint",
                f"+callbacks.every_n.dirpath={work / 'outputs' / name / 'steps'}", "+callbacks.every_n.save_top_k=-1",
                f"+callbacks.every_n.every_n_train_steps={args.judge_every}", "+callbacks.every_n.filename='step{step:05d}'",
                "+callbacks.every_n.auto_insert_metric_name=false"]
    seconds["diffusion"] = timed([str(BIN / "sdl-train"), "experiment=scratch", *common, "vae_run=cond_vae",
                                  f"name={name}", *args.diffusion, *keep], work / f"{name}.log")
    final = (work / "outputs" / name / "latest" / "checkpoints" / "last.ckpt").resolve()
    checkpoints = sorted((work / "outputs" / name / "steps").glob("step*.ckpt")) if args.judge_every else []
    ceiling = vae_ceiling(vae_dir, args.resolution)
    # last.ckpt is measured unless a kept checkpoint is of its step already (the run's final step).
    measured = checkpoints if checkpoints and _is_final(checkpoints[-1], final) else [*checkpoints, final]
    for ckpt in measured:
        step = int(ckpt.stem[4:]) if ckpt.stem.startswith("step") else None
        for guidance in args.guidance:
            record = {"name": args.name, "vae_overrides": args.vae, "diffusion_overrides": args.diffusion,
                      "images": args.images, "resolution": args.resolution, "step": step, "guidance": guidance,
                      "sampling_steps": args.steps, "per_prompt": args.per_prompt,
                      "seconds": {k: round(v, 1) for k, v in seconds.items()}, "vae_ceiling": ceiling,
                      **judge(ckpt, args.per_prompt, guidance, args.steps), "hardware": _hardware()}
            with args.out.open("a") as out:
                out.write(json.dumps(record) + "\n")
            print(json.dumps({k: record[k] for k in ("name", "step", "guidance", "seconds", "vae_ceiling", "trained",
                                                     "held_out")}), flush=True)


if __name__ == "__main__":
    main()
