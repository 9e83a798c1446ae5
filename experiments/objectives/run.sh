#!/usr/bin/env bash
# The objectives study: the digits recipe with only the objective changed, one sweep line, then sample quality.
# Usage: bash experiments/objectives/run.sh [ROOT]   (from the repository root; ~30 min on 2 CPU cores)
set -euo pipefail
ROOT=${1:-outputs/objectives_study}
BIN=.venv/bin
$BIN/sdl-train experiment=digits_autoencoder paths.output_root="$ROOT" logger=csv
$BIN/sdl-train -m experiment=digits objective=epsilon,v_prediction,sample,flow_matching \
    paths.output_root="$ROOT" logger=csv hydra.sweep.dir="$ROOT/sweep"
for job in "$ROOT"/sweep/*/; do
    $BIN/python experiments/digits_quality/measure.py --ckpt "$job/checkpoints/last.ckpt" --out "$job/quality.json"
    $BIN/sdl-eval ckpt_path="$job/checkpoints/last.ckpt" out_dir="$job/eval" > "$job/eval.log" 2>&1
done
$BIN/python experiments/objectives/summarize.py "$ROOT/sweep" > experiments/objectives/results.md
cat experiments/objectives/results.md
