"""Measured framework overhead and speed knobs of sd_lightning on this machine (CPU, fp32).

Every configuration runs in its own worker subprocess (so its peak RSS is its own: a process's peak never
goes down). The parent starts the workers a comparison needs, lets each warm up, then asks them in turn
for blocks of steady-state steps, A B A B …, so slow drifts of a shared, busy machine hit both sides
alike. Each figure is a ratio of two configurations measured this way in one run: median and min–max over
the repetitions.

    .venv/bin/python experiments/benchmark.py --quick            # ~2 minutes, tiny sizes
    .venv/bin/python experiments/benchmark.py                    # full: a few minutes
    .venv/bin/python experiments/benchmark.py --only overhead,sampling

Writes experiments/results/benchmark_<quick|full>.json (or --output) and prints a rich table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "experiments" / "results"
sys.path.insert(0, str(ROOT / "experiments" / "benchmark"))  # the workers, the floor and the estimate row

from workers import PROTOCOL, worker_main  # noqa: E402


# ============================================================================================ settings
@dataclass(frozen=True)
class Mode:
    """Sizes of one benchmark mode: batch, steps per block, repetitions (blocks per configuration)."""

    name: str
    batch_size: int
    warmup: int
    block: int
    reps: int
    sample_batch: int
    sample_steps: int
    matmul_n: int
    compile_backend: str
    # The overhead rows compare small differences: longer blocks (epoch boundaries and logging steps fall inside
    # them as often as in a run) and more repetitions than the knob rows.
    overhead_block: int
    overhead_reps: int


QUICK = Mode("quick", batch_size=8, warmup=3, block=3, reps=3, sample_batch=4, sample_steps=5, matmul_n=1024,
             compile_backend="eager", overhead_block=3, overhead_reps=3)
FULL = Mode("full", batch_size=32, warmup=5, block=5, reps=4, sample_batch=16, sample_steps=20, matmul_n=2048,
            compile_backend="inductor", overhead_block=50, overhead_reps=8)


def spec(kind: str, *overrides: str, **options: Any) -> dict[str, Any]:
    """A worker configuration: its kind (lightning, plain, sample_sdl, sample_diffusers, matmul) and settings."""
    return {"kind": kind, "overrides": list(overrides), **options}


@dataclass
class Row:
    """One comparison: configurations (baseline first) that take turns running blocks of ``block`` units."""

    name: str
    question: str
    configs: list[tuple[str, dict[str, Any]]]
    block: int
    reps: int
    unit: str = "step"
    samples_per_unit: list[int] = field(default_factory=list)


def build_rows(mode: Mode) -> list[Row]:
    batch = f"data.batch_size={mode.batch_size}"
    lightning = spec("lightning", batch)
    plain = spec("plain", batch)
    b, k, r = mode.batch_size, mode.block, mode.reps
    rows = [
        Row("overhead", "Lightning Trainer step vs a plain PyTorch loop doing the same step math (goal: within 3%)",
            [("plain PyTorch loop", plain), ("sd_lightning (L.Trainer)", lightning)], mode.overhead_block,
            mode.overhead_reps),
        Row("overhead_sdl_train", "the real sdl-train loop (build_run: every default callback and logger, W&B offline + "
                                  "CSV, EMA, checkpoints, progress, guards; validation excluded) vs the plain PyTorch "
                                  "loop (goal: within 5%)",
            [("plain PyTorch loop", plain), ("sdl-train loop", spec("sdl_train", batch))], mode.overhead_block,
            mode.overhead_reps),
        Row("adamw_fused", "AdamW fused=True vs the for-loop implementation (fused=False on CPU)",
            [("AdamW fused", lightning), ("AdamW for-loop", spec("lightning", batch, "optimizer.fused=false"))], k, r),
        # bf16 autocast is emulated on CPUs without bf16 instructions: few, small steps.
        Row("bf16", "fp32 vs bf16-mixed autocast (batch 2, few steps)",
            [("fp32", spec("lightning", "data.batch_size=2", warmup=1)),
             ("bf16-mixed", spec("lightning", "data.batch_size=2", "trainer.precision=bf16-mixed", warmup=1))],
            1, 2 if mode.name == "quick" else 3),
        Row("channels_last", "UNet in channels_last memory format vs contiguous",
            [("contiguous", lightning), ("channels_last", spec("lightning", batch, unet="channels_last"))], k, r),
        Row("compile", f"torch.compile of the UNet (backend={mode.compile_backend}) vs eager",
            [("eager", lightning), (f"compiled ({mode.compile_backend})",
                                    spec("lightning", batch, unet=f"compile:{mode.compile_backend}"))], k, r),
        Row("grad_checkpointing", "gradient checkpointing: peak memory saved vs time lost",
            [("off", lightning), ("on", spec("lightning", batch, "model.components.gradient_checkpointing=true"))], k, r),
        Row("tiny_fast", "model=tiny_fast (the digits recipe's UNet: no mid block, the prompt added to the time "
                         "embedding) vs model=tiny",
            [("model=tiny", lightning), ("model=tiny_fast", spec("lightning", batch, "model=tiny_fast"))], k, r),
        Row("attention", "SDPA vs classic attention processor (model.attention)",
            [("sdpa", lightning), ("classic", spec("lightning", batch, "model.components.attention=classic"))], k, r),
        Row("dataloader_workers", "data.num_workers 0 / 1 / 2",
            [("0 workers", lightning), ("1 worker", spec("lightning", batch, "data.num_workers=1")),
             ("2 workers", spec("lightning", batch, "data.num_workers=2"))], k, r),
        Row("cache", "data.cache (sd_lightning.data.cache: VAE posteriors + text-encoder states built once by "
                     "build_cache, untimed) vs encoding images and prompts in every step",
            [("encode each step", lightning), ("data.cache", spec("lightning", batch, cache=True))], k, r),
        Row("cache_imagefolder64", "the same on a 64x64 image folder (data=imagefolder, digits written as PNGs into "
                                   "class folders; 4x16x16 latents): data.cache vs encoding in every step",
            [("encode each step", spec("lightning", batch, image_folder=64)),
             ("data.cache", spec("lightning", batch, image_folder=64, cache=True))], k, r),
        Row("sampling", f"images/s: sd_lightning generate() vs plain diffusers StableDiffusionPipeline "
                        f"(DDIM, {mode.sample_steps} steps, batch {mode.sample_batch}, same weights; goal: no slower)",
            [("diffusers pipeline", spec("sample_diffusers", steps=mode.sample_steps, batch=mode.sample_batch)),
             ("sd_lightning generate", spec("sample_sdl", steps=mode.sample_steps, batch=mode.sample_batch))],
            1 if mode.name == "quick" else 2, r, unit="call", samples_per_unit=[mode.sample_batch] * 2),
        Row("mfu", f"model FLOPs utilization: training-step FLOPs/s over a {mode.matmul_n}² fp32 matmul's FLOP/s",
            [("plain training step", plain), ("fp32 matmul", spec("matmul", n=mode.matmul_n))], k, r, unit="step",
            samples_per_unit=[b, 0]),
        Row("ddp", "trainer.strategy=ddp trainer.devices=2 (gloo, 1 thread each) vs 1 process (2 threads), "
                   "same per-process batch",
            [("1 process", lightning),
             ("ddp x2", spec("lightning", batch, "trainer.strategy=ddp", "trainer.devices=2",
                             "trainer.accelerator=cpu"))], k, r, samples_per_unit=[b, 2 * b]),
        # Not A/B blocks: whole sdl-train runs (estimate=true, then the real run), see benchmark/estimate_vs_actual.py.
        Row("estimate", "estimate=true's projected duration ÷ the real sdl-train run's fit time (goal: within ±15%)",
            [], 0, 1, unit="run"),
    ]
    for row in rows:
        if not row.samples_per_unit:
            row.samples_per_unit = [int(_override(c, "data.batch_size", b)) for _, c in row.configs]
    return rows


def _override(config: dict[str, Any], key: str, default: Any) -> Any:
    for item in config["overrides"]:
        if item.startswith(f"{key}="):
            return item.split("=", 1)[1]
    return default


# ============================================================================================== parent
class Worker:
    """A configuration's subprocess; ``run`` asks it for a block and returns the block's seconds."""

    def __init__(self, config: dict[str, Any], log_dir: Path, index: int) -> None:
        self.config = config
        self.log_path = log_dir / f"worker{index}_{config['kind']}.log"
        self.log = self.log_path.open("w")
        # The sdl-train loop logs as sdl-train does (W&B offline); the other kinds have no W&B logger.
        wandb_mode = "offline" if config["kind"] == "sdl_train" else "disabled"
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "WANDB_MODE": wandb_mode, "HF_HUB_OFFLINE": "1"}
        self.process = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(config)],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True,
                                        env=env, cwd=ROOT)
        self.info: dict[str, Any] = {}
        self.error: str | None = None

    def receive(self) -> dict[str, Any]:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            if line.startswith(PROTOCOL):
                return json.loads(line[len(PROTOCOL):])
        self.process.wait()
        self.log.flush()
        tail = self.log_path.read_text(errors="replace").strip().splitlines()[-6:]
        raise RuntimeError(f"worker exited with code {self.process.returncode}: " + " | ".join(tail))

    def command(self, message: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(json.dumps(message) + "\n")
        self.process.stdin.flush()

    def wait_ready(self) -> None:
        try:
            self.info = self.receive()
        except RuntimeError as err:
            self.error = str(err)

    def run(self, units: int) -> float:
        self.command({"cmd": "run", "units": units})
        return float(self.receive()["seconds"])

    def finish(self) -> dict[str, Any]:
        if self.error is None:
            try:
                self.command({"cmd": "finish"})
                self.info.update(self.receive())
            except (RuntimeError, BrokenPipeError) as err:
                self.error = str(err)
        try:
            self.process.wait(timeout=120)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        return self.info


def _key(config: dict[str, Any]) -> str:
    return json.dumps(config, sort_keys=True)


def summarize(values: list[float]) -> dict[str, float]:
    return {"median": statistics.median(values), "min": min(values), "max": max(values), "n": len(values)}


def run_row(row: Row, workers: dict[str, Worker]) -> dict[str, Any]:
    """A B A B …: each repetition runs one block of every configuration, in turn."""
    active = [(label, workers[_key(c)]) for label, c in row.configs]
    seconds: dict[str, list[float]] = {label: [] for label, _ in active}
    failed = {label: w.error for label, w in active if w.error}
    for _ in range(row.reps):
        for label, worker in active:
            if label in failed:
                continue
            try:
                seconds[label].append(worker.run(row.block) / row.block)
            except (RuntimeError, BrokenPipeError) as err:
                failed[label] = worker.error = str(err)
    configs = []
    base_label = row.configs[0][0]
    for (label, config), samples in zip(row.configs, row.samples_per_unit):
        worker = workers[_key(config)]
        entry: dict[str, Any] = {"label": label, "config": config, "status": "ok" if label not in failed else
                                 f"failed: {failed[label]}"}
        if seconds[label] and label not in failed:
            entry["seconds_per_unit"] = summarize(seconds[label])
            entry["units_per_second"] = 1 / entry["seconds_per_unit"]["median"]
            if samples:
                entry["samples_per_second"] = samples / entry["seconds_per_unit"]["median"]
            if label != base_label and seconds[base_label] and row.name != "mfu":
                ratios = [t / b for t, b in zip(seconds[label], seconds[base_label])]
                entry["time_ratio_vs_baseline"] = summarize(ratios)
        entry["worker"] = worker.info
        configs.append(entry)
    result = {"question": row.question, "unit": row.unit, "block_units": row.block, "reps": row.reps,
              "baseline": base_label, "configs": configs, "raw_seconds_per_unit": seconds}
    if row.name == "mfu" and all(seconds.values()) and not failed:
        flops = workers[_key(row.configs[0][1])].info["flops_per_step"]
        per_matmul = workers[_key(row.configs[1][1])].info["flops_per_unit"]
        mfu = [(flops / t) / (per_matmul / m) for t, m in zip(*seconds.values())]
        result["mfu"] = {**summarize(mfu), "flops_per_step": flops,
                         "step_gflops_per_second": flops / statistics.median(seconds[row.configs[0][0]]) / 1e9,
                         "matmul_peak_gflops_per_second": per_matmul / statistics.median(seconds["fp32 matmul"]) / 1e9}
    return result


def machine_info() -> dict[str, Any]:
    import diffusers
    import lightning
    import torch

    model = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                  if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").exists() else ""
    flags = next((line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags")), "")
    return {"cpu_model": model, "cores": os.cpu_count(), "torch": torch.__version__, "lightning": lightning.__version__,
            "diffusers": diffusers.__version__, "python": platform.python_version(), "torch_threads": torch.get_num_threads(),
            "avx512_bf16": "avx512_bf16" in flags or "amx_bf16" in flags, "load_average_start": os.getloadavg()}


def run_benchmark(mode: Mode, only: list[str] | None, threads: int | None = None,
                  progress: Callable[[str], None] = print) -> dict[str, Any]:
    rows = build_rows(mode)
    unknown = sorted(set(only or []) - {r.name for r in rows})
    if unknown:
        raise SystemExit(f"--only: unknown row(s) {', '.join(unknown)}; choose from {', '.join(r.name for r in rows)}")
    rows = [r for r in rows if not only or r.name in only]
    # Each configuration's step budget over all rows (Lightning needs max_steps up front); shared configs
    # (the default Lightning step is the baseline of several rows) run in one worker.
    budgets: dict[str, int] = {}
    last_row: dict[str, int] = {}
    for index, row in enumerate(rows):
        for _, config in row.configs:
            budgets[_key(config)] = budgets.get(_key(config), 0) + row.block * row.reps
            last_row[_key(config)] = index
    started = time.perf_counter()
    info = machine_info()
    workers: dict[str, Worker] = {}
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="sdl-bench-logs-") as logs:
        for index, row in enumerate(rows):
            new = [c for _, c in row.configs if _key(c) not in workers]
            for config in new:
                full = {**config, "warmup": config.get("warmup", mode.warmup), "budget": budgets[_key(config)],
                        "threads": threads}
                workers[_key(config)] = Worker(full, Path(logs), len(workers))
            for config in new:
                workers[_key(config)].wait_ready()
            if row.name == "estimate":
                from estimate_vs_actual import benchmark_row

                progress(f"[{time.perf_counter() - started:5.0f}s] estimate: estimate=true, then the real run")
                results[row.name] = benchmark_row(quick=mode.name == "quick")
                continue
            progress(f"[{time.perf_counter() - started:5.0f}s] {row.name}: {len(row.configs)} configurations, "
                     f"{row.reps} x {row.block} {row.unit}s each")
            results[row.name] = run_row(row, workers)
            for key in [k for k, last in last_row.items() if last == index and k in workers]:
                workers[key].finish()
            for entry, (_, config) in zip(results[row.name]["configs"], row.configs):
                entry["worker"] = workers[_key(config)].info
                if workers[_key(config)].error and entry["status"] == "ok":
                    entry["status"] = f"failed: {workers[_key(config)].error}"
    info["load_average_end"] = os.getloadavg()
    overhead = results.get("overhead", {}).get("configs", [{}, {}])[1].get("time_ratio_vs_baseline")
    loop = results.get("overhead_sdl_train", {}).get("configs", [{}, {}])[1].get("time_ratio_vs_baseline")
    return {"sdl_train_loop_overhead": None if loop is None else {k: (v - 1) if k != "n" else v for k, v in loop.items()},
            "mode": mode.name, "settings": {**mode.__dict__, "threads": threads}, "machine": info, "seconds_total": time.perf_counter() - started,
            "framework_overhead": None if overhead is None else {k: (v - 1) if k != "n" else v for k, v in overhead.items()},
            "rows": results}


# ============================================================================================== report
def _fmt_ratio(summary: dict[str, float] | None) -> str:
    if not summary:
        return "-"
    return f"{summary['median']:.3f} \\[{summary['min']:.3f}–{summary['max']:.3f}]"


def print_report(result: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    machine = result["machine"]
    table = Table(title=f"sd_lightning benchmark ({result['mode']}) — {machine['cpu_model']}, {machine['cores']} cores, "
                        f"torch {machine['torch']}, load {machine['load_average_start'][0]:.1f}")
    for column in ("row", "configuration", r"ms / unit (median \[min–max])", "samples/s", "time ratio vs baseline",
                   "peak RSS MiB (+ in training)", "note"):
        table.add_column(column)
    for name, row in result["rows"].items():
        for run in row.get("runs", []):  # the estimate row: whole runs
            table.add_row(name, run["config"], f"{run['actual_fit_seconds']:.1f} s fit (estimate {run['estimate_seconds']:.1f} s)",
                          "-", f"estimate ÷ actual {run['estimate_over_actual']:.3f}", "-", "")
        for entry in row["configs"]:
            timing = entry.get("seconds_per_unit")
            ms = (f"{timing['median'] * 1e3:.1f} \\[{timing['min'] * 1e3:.1f}–{timing['max'] * 1e3:.1f}] / {row['unit']}"
                  if timing else "-")
            note = "" if entry["status"] == "ok" else entry["status"][:80]
            if name == "mfu" and entry is row["configs"][0] and "mfu" in row:
                note = f"{row['mfu']['flops_per_step'] / 1e9:.2f} GFLOP/step"
            if name == "mfu" and entry is row["configs"][1] and "mfu" in row:
                note = f"{row['mfu']['matmul_peak_gflops_per_second']:.1f} GFLOP/s"
            rss, before = entry["worker"].get("peak_rss_mib"), entry["worker"].get("rss_before_fit_mib")
            table.add_row(name, entry["label"], ms,
                          f"{entry['samples_per_second']:.1f}" if "samples_per_second" in entry else "-",
                          _fmt_ratio(entry.get("time_ratio_vs_baseline")), f"{rss:.0f}" + (f" (+{rss - before:.0f})" if before else "") if rss else "-", note)
        if "mfu" in row:
            table.add_row(name, "MFU (step FLOP/s ÷ matmul FLOP/s)", "-", "-", _fmt_ratio(row["mfu"]), "-", "")
    console = Console(width=200)
    console.print(table)
    overhead = result.get("framework_overhead")
    if overhead:
        console.print(f"framework overhead (sd_lightning L.Trainer step vs plain PyTorch loop): "
                      f"{overhead['median'] * 100:+.1f}% \\[{overhead['min'] * 100:+.1f}% … {overhead['max'] * 100:+.1f}%] "
                      f"over {overhead['n']} A/B repetitions (goal: within 3%)")
    loop = result.get("sdl_train_loop_overhead")
    if loop:
        console.print(f"sdl-train loop overhead (every default callback and logger, validation excluded) vs the plain "
                      f"PyTorch loop: {loop['median'] * 100:+.1f}% \\[{loop['min'] * 100:+.1f}% … {loop['max'] * 100:+.1f}%] "
                      f"over {loop['n']} A/B repetitions (goal: within 5%)")
    console.print(f"total {result['seconds_total']:.0f} s; load average {machine['load_average_start'][0]:.1f} → "
                  f"{machine['load_average_end'][0]:.1f} (other processes compete for the {machine['cores']} cores)")


def markdown_table(result: dict[str, Any]) -> str:
    """The rows as the markdown table of experiments/benchmark/README.md."""
    lines = ["| row | configuration | ms / unit, median [min–max] | samples/s | time ratio vs baseline, median [min–max] "
             "| peak RSS MiB (+ in training) |", "|---|---|---|---|---|---|"]
    for name, row in result["rows"].items():
        for run in row.get("runs", []):
            lines.append(f"| {name} | {run['config']} | {run['actual_fit_seconds']:.1f} s fit, estimate "
                         f"{run['estimate_seconds']:.1f} s | - | estimate ÷ actual {run['estimate_over_actual']:.3f} | - |")
        for entry in row["configs"]:
            timing, ratio = entry.get("seconds_per_unit"), entry.get("time_ratio_vs_baseline")
            ms = f"{timing['median'] * 1e3:.1f} [{timing['min'] * 1e3:.1f}–{timing['max'] * 1e3:.1f}] / {row['unit']}" if timing else "-"
            rss, before = entry["worker"].get("peak_rss_mib"), entry["worker"].get("rss_before_fit_mib")
            label = entry["label"] + (" (baseline)" if entry is row["configs"][0] else "")
            lines.append(f"| {name} | {label} | {ms} | {entry.get('samples_per_second', 0):.1f} | "
                         + (f"{ratio['median']:.3f} [{ratio['min']:.3f}–{ratio['max']:.3f}]" if ratio else "-") + " | "
                         + (f"{rss:.0f}" + (f" (+{rss - before:.0f})" if before else "") if rss else "-") + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="tiny sizes and few steps (about 2 minutes)")
    parser.add_argument("--only", default="", help="comma-separated rows, e.g. overhead,sampling")
    parser.add_argument("--output", type=Path, default=None,
                        help="JSON file (default experiments/results/benchmark_<quick|full>.json)")
    parser.add_argument("--threads", type=int, default=None,
                        help="torch threads per worker (default: torch's, one per core; ddp sets its own)")
    parser.add_argument("--markdown", type=Path, default=None, help="print the markdown table of a results JSON and exit")
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.markdown:
        print(markdown_table(json.loads(args.markdown.read_text())))
        return
    if args.worker:
        worker_main(json.loads(args.worker))
        return
    mode = QUICK if args.quick else FULL
    result = run_benchmark(mode, [n.strip() for n in args.only.split(",") if n.strip()] or None, args.threads)
    output = args.output or RESULTS / f"benchmark_{mode.name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    output.write_text(json.dumps(result, indent=2))
    print_report(result)
    print(f"results: {output}")


if __name__ == "__main__":
    main()
