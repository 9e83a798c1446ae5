"""Does `sdl-data inspect` use every core? Its scan against a plain process pool doing the same per-file work.

Usage: .venv/bin/python experiments/benchmark/inspect_vs_pool.py [--sizes 2000 8000] [--out inspect.json]
Writes N random 256 px JPEGs, then in fresh processes (one per measurement, so peak RSS is each one's own) times
(a) a plain ``ProcessPoolExecutor`` over all cores doing decode + sha256 + phash per file and (b)
``scan_folder`` with its default workers (every core), in --rounds interleaved pairs, and ``scan_folder`` with
``workers=1`` once; prints files/s (each side's fastest run), the median ratio of the pairs to the plain pool (goal
≥ 0.8) with its range, and the peak RSS at each size (goal: at 8k ≤ 1.2× at 2k).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
from PIL import Image

PLAIN = """
import hashlib, io, json, os, resource, sys, time
from concurrent.futures import ProcessPoolExecutor
import imagehash
from PIL import Image

def work(path):
    data = open(path, "rb").read()
    image = Image.open(io.BytesIO(data)); image.load()
    return hashlib.sha256(data).hexdigest(), str(imagehash.phash(image.convert("RGB")))

files = sorted(os.path.join(sys.argv[1], f) for f in os.listdir(sys.argv[1]))
start = time.perf_counter()
with ProcessPoolExecutor(len(os.sched_getaffinity(0))) as pool:
    results = list(pool.map(work, files, chunksize=16))
seconds = time.perf_counter() - start
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": seconds, "files": len(results), "peak_rss_mib": rss / 1024}))
"""

SCAN = """
import json, resource, sys, time
from sd_lightning.data.inspection import scan_folder
from sd_lightning.data.report import InspectSettings
from sd_lightning.models.tokenizer import load_tiny_tokenizer

tokenizer = load_tiny_tokenizer()
workers = None if sys.argv[2] == "all" else int(sys.argv[2])
start = time.perf_counter()
report = scan_folder(sys.argv[1], InspectSettings(resolution=32, caption_template=None), tokenizer, workers=workers)
seconds = time.perf_counter() - start
rss = max(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)
print(json.dumps({"seconds": seconds, "files": report.counts["decoded"], "peak_rss_mib": rss / 1024}))
"""


def write_jpegs(folder: Path, count: int) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    base = rng.integers(0, 255, (64, 64, 3), dtype=np.uint8)
    for i in range(count):
        pixels = np.clip(base.astype(int) + rng.integers(-20, 20, base.shape), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).resize((256, 256)).save(folder / f"{i:05d}.jpg", quality=90)


def timed(script: str, *args: str) -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, check=True).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=int, nargs="+", default=[2000, 8000])
    parser.add_argument("--out", type=Path, default=Path(__file__).with_name("inspect.json"))
    parser.add_argument("--rounds", type=int, default=5, help="interleaved (plain pool, inspect) pairs per size")
    args = parser.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="sdl-inspect-bench-") as tmp:
        for size in args.sizes:
            folder = Path(tmp) / str(size)
            write_jpegs(folder, size)
            # Interleaved pairs: this machine drifts by ±25 % between runs, so each ratio compares neighbours.
            pairs = [(timed(PLAIN, str(folder)), timed(SCAN, str(folder), "all")) for _ in range(args.rounds)]
            ratios = sorted(plain["seconds"] / parallel["seconds"] for plain, parallel in pairs)
            plain, parallel = (min(runs, key=lambda r: r["seconds"]) for runs in zip(*pairs))
            serial = timed(SCAN, str(folder), "1")
            row = {"files": size, "plain_pool_files_per_s": size / plain["seconds"],
                   "inspect_files_per_s": size / parallel["seconds"], "inspect_serial_files_per_s":
                   size / serial["seconds"], "ratio_to_plain_pool": ratios[len(ratios) // 2],
                   "ratio_range": [ratios[0], ratios[-1]],
                   "inspect_peak_rss_mib": parallel["peak_rss_mib"], "plain_peak_rss_mib": plain["peak_rss_mib"]}
            rows.append({k: round(v, 3) if isinstance(v, float) else [round(x, 3) for x in v] if isinstance(v, list)
                         else v for k, v in row.items()})
            print(json.dumps(rows[-1]), flush=True)
    if len(rows) > 1:
        print(f"peak RSS {rows[-1]['files']} / {rows[0]['files']} files: "
              f"{rows[-1]['inspect_peak_rss_mib'] / rows[0]['inspect_peak_rss_mib']:.2f}x")
    args.out.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
