"""The results table of the time-to-quality study: one line per (recipe, guidance), medians over the seeds run.

Usage: python experiments/time_to_quality/summarize.py [results.jsonl]
"""

from __future__ import annotations

import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path

HERE = Path(__file__).resolve().parent


def table(rows: list[dict]) -> str:
    groups: dict[tuple[str, float], list[dict]] = defaultdict(list)
    for row in rows:
        groups[(row["recipe"], row["guidance_scale"])].append(row)
    lines = ["| recipe | guidance | seeds | training s (VAE + diffusion, commands) | fit s | accuracy | diversity | FID |",
             "|---|---|---|---|---|---|---|---|"]
    for (recipe, guidance), runs in groups.items():
        def median(key: str, runs: list[dict] = runs) -> float:
            return statistics.median(r[key] for r in runs)

        seeds = ",".join(str(r["seed"]) for r in runs)
        per_seed = " / ".join(f"{r['training_seconds']:.0f}" for r in runs)
        fit = median("vae_fit_seconds") + median("diffusion_fit_seconds")
        lines.append(f"| {recipe} | {guidance} | {seeds} | {median('training_seconds'):.0f} ({per_seed}) | {fit:.0f} | "
                     f"{median('accuracy'):.3f} | {median('diversity'):.3f} | {median('fid_at_stored_guidance'):.2f} |")
    return "\n".join(lines)


def main() -> None:
    path = Path(sys.argv[1]) if len(sys.argv) > 1 else HERE / "results.jsonl"
    print(table([json.loads(line) for line in path.read_text().splitlines() if line.strip()]))


if __name__ == "__main__":
    main()
