"""Why does ``data.num_workers=2`` not speed up training on an image folder here? Loader alone, then training.

Usage: .venv/bin/python experiments/benchmark/loader_workers.py [--size 64] [--steps 60] [--out loader_workers.json]

On a 64x64 PNG image folder (digits written as class folders, as the benchmark's ``cache_imagefolder64`` row), each
configuration runs in its own process, one after the other:
- ``loader``: images/s of the training loader alone (decode, resize, augmentation, collate) for 0, 1, 2 workers;
- ``train``: images/s of training steps (Lightning, the tiny model, no validation/logging), timed after a warm-up,
  for 0 and 2 workers, with the main process's torch threads at the default (one per core) and at 1;
- the share of training time the main process waits for batches between steps (``loader_wait_share``), and of
  that, at epoch starts (``epoch_start_wait_share``: a new loader iterator, whose workers start again).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

CONFIGS = [
    {"kind": "loader", "workers": 0}, {"kind": "loader", "workers": 1}, {"kind": "loader", "workers": 2},
    {"kind": "train", "workers": 0}, {"kind": "train", "workers": 2},
    {"kind": "train", "workers": 0, "threads": 1}, {"kind": "train", "workers": 2, "threads": 1},
]


def run_one(config: dict, folder: Path, size: int, steps: int) -> dict:
    import lightning as L
    import torch
    from hydra.utils import instantiate
    from workers import compose_config

    if config.get("threads"):
        torch.set_num_threads(int(config["threads"]))
    with tempfile.TemporaryDirectory() as scratch:
        cfg = compose_config(["data=imagefolder", f"data.root={folder}", f"data.resolution={size}",
                              f"data.num_workers={config['workers']}", "data.batch_size=32"], Path(scratch) / "run")
        L.seed_everything(0)
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        if config["kind"] == "loader":
            loader = datamodule.train_dataloader()
            count, started = 0, None
            for number, batch in enumerate(loader):
                if number == 2:
                    started, count = time.perf_counter(), 0
                count += batch["pixel_values"].shape[0]
                if number == steps + 2:
                    break
            return {"images_per_second": count / (time.perf_counter() - started)}
        model = instantiate(cfg.model)

        class Clock(L.Callback):
            def __init__(self) -> None:
                self.started, self.batch_end, self.wait, self.epoch_start_wait = None, None, 0.0, 0.0

            def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
                now = time.perf_counter()
                if trainer.global_step == 5:
                    self.started, self.wait = now, 0.0
                elif self.batch_end is not None and self.started is not None:
                    self.wait += now - self.batch_end
                    if batch_idx == 0:  # the first batch of an epoch: new loader iterator (and workers)
                        self.epoch_start_wait += now - self.batch_end

            def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
                self.batch_end = time.perf_counter()

        clock = Clock()
        trainer = instantiate(cfg.trainer, max_steps=5 + steps, callbacks=[clock], logger=False, limit_val_batches=0,
                              num_sanity_val_steps=0, enable_checkpointing=False, enable_progress_bar=False,
                              enable_model_summary=False)
        trainer.fit(model, datamodule=datamodule)
        seconds = clock.batch_end - clock.started
        return {"images_per_second": 32 * steps / seconds, "loader_wait_share": clock.wait / seconds,
                "epoch_start_wait_share": clock.epoch_start_wait / seconds, "epochs": trainer.current_epoch,
                "torch_threads": torch.get_num_threads()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--out", type=Path, default=HERE / "loader_workers.json")
    parser.add_argument("--one", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        config, folder = json.loads(args.one), Path(os.environ["SDL_BENCH_FOLDER"])
        print("RESULT " + json.dumps(run_one(config, folder, args.size, args.steps)))
        return
    from workers import write_image_folder

    rows = []
    with tempfile.TemporaryDirectory(prefix="sdl-loader-") as tmp:
        folder = write_image_folder(Path(tmp) / "images", args.size, count=1200)
        for config in CONFIGS:
            out = subprocess.run([sys.executable, __file__, "--size", str(args.size), "--steps", str(args.steps),
                                  "--one", json.dumps(config)], capture_output=True, text=True,
                                 env={**os.environ, "SDL_BENCH_FOLDER": str(folder), "WANDB_MODE": "disabled"})
            if out.returncode:
                raise SystemExit(out.stderr[-2000:])
            rows.append({**config, **json.loads(out.stdout.split("RESULT ", 1)[1])})
            print(json.dumps(rows[-1]), flush=True)
    args.out.write_text(json.dumps({"size": args.size, "steps": args.steps, "cores": os.cpu_count(), "rows": rows},
                                   indent=2) + "\n")


if __name__ == "__main__":
    main()
