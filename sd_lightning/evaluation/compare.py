"""Compare finished runs: what differs between them, how each metric ended and peaked, and how stable a
result is across seeds. Reads only files a run folder already holds (no W&B), so it works offline.

A run folder is what ``sdl-train`` writes: ``config.yaml`` (resolved) or ``.hydra/config.yaml``,
``.hydra/overrides.yaml``, ``csv/metrics.csv`` (see ``callbacks/metric_history.py``), ``train.log``,
``checkpoints/`` and ``samples/step_*.png``. A folder that cannot be read is reported, never fatal.
"""

from __future__ import annotations

import contextlib
import math
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import pandas as pd
import yaml

from sd_lightning.evaluation.manifest import read_manifest

RUN_MARKERS = ("config.yaml", ".hydra", "csv", "checkpoints", "train.log", "manifest.json")
# Metrics where larger is better; every other metric is ranked lower-is-better.
HIGHER_IS_BETTER = ("r2", "ssim", "acc", "psnr")
# Overrides that only say where files go, not what was trained.
LOCATION_OVERRIDES = ("hydra.", "paths.", "ckpt_path", "resume", "trainer.default_root_dir")
_PER_TIMESTEP = re.compile(r"_t\d+$")
_LOG_STAMP = re.compile(r"^\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d)")


class RunLoadError(ValueError):
    """A run folder that cannot be compared (missing or garbled config or metrics)."""


@dataclass
class Run:
    """One run folder, read."""

    path: Path
    config: dict[str, Any]
    overrides: dict[str, str]
    metrics: pd.DataFrame
    steps: int | None
    wall_time_s: float | None
    latest_grid: Path | None
    label: str = ""
    swept: dict[str, str] = field(default_factory=dict)

    def metric_names(self) -> list[str]:
        return [c for c in self.metrics.columns if c.startswith(("val/", "stability/")) or c == "train/loss"]

    def series(self, metric: str) -> pd.Series:
        """The logged values of ``metric`` indexed by step (NaN rows dropped)."""
        if metric not in self.metrics:
            return pd.Series(dtype=float)
        rows = self.metrics[["step", metric]].dropna()
        return pd.Series(rows[metric].to_numpy(dtype=float), index=rows["step"].to_numpy())

    def final(self, metric: str) -> float:
        values = self.series(metric)
        return float(values.iloc[-1]) if len(values) else math.nan

    def best(self, metric: str) -> float:
        values = self.series(metric)
        if not len(values):
            return math.nan
        return float(values.max() if higher_is_better(metric) else values.min())


@dataclass
class Comparison:
    """Runs side by side: the keys that differ between them, one summary row per run, and seed groups."""

    runs: list[Run]
    skipped: list[tuple[Path, str]]
    swept: list[str]
    metric: str
    table: pd.DataFrame
    seed_groups: pd.DataFrame | None


def higher_is_better(metric: str) -> bool:
    return any(token in metric.rsplit("/", 1)[-1] for token in HIGHER_IS_BETTER)


def _natural_key(path: Path) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", path.name)]


def _looks_like_run(path: Path) -> bool:
    return any((path / marker).exists() for marker in RUN_MARKERS)


def find_run_dirs(paths: Iterable[str | Path]) -> list[Path]:
    """Run folders among ``paths``: each is a run folder, a multirun folder, or a folder of run folders
    (two levels deep, e.g. ``outputs/<name>/<timestamp>``). Symlinks such as ``latest`` are not followed."""
    found: list[Path] = []
    for given in paths:
        path = Path(given)
        if not path.is_dir():
            raise FileNotFoundError(f"{path} is not a directory (give a run folder or a folder of run folders)")
        if _looks_like_run(path):
            found.append(path)
            continue
        for child in sorted((p for p in path.iterdir() if p.is_dir() and not p.is_symlink()), key=_natural_key):
            if _looks_like_run(child):
                found.append(child)
            else:
                found.extend(sorted((p for p in child.iterdir() if p.is_dir() and not p.is_symlink()
                                     and _looks_like_run(p)), key=_natural_key))
    unique: dict[Path, Path] = {}
    for path in found:
        unique.setdefault(path.resolve(), path)
    return list(unique.values())


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """Nested dicts as dotted keys; lists become their YAML flow text so they compare as values."""
    if not isinstance(config, dict):
        return {prefix.rstrip("."): config}
    flat: dict[str, Any] = {}
    for key, value in config.items():
        if isinstance(value, dict) and value:
            flat.update(flatten(value, f"{prefix}{key}."))
        else:
            flat[f"{prefix}{key}"] = yaml.safe_dump(value, default_flow_style=True).strip() if isinstance(
                value, list) else value
    return flat


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as err:
        raise RunLoadError(f"{path.name} is unreadable ({str(err).splitlines()[0]})") from err


def _read_config(run_dir: Path) -> dict[str, Any]:
    # The resolved copy sdl-train writes first; Hydra's own copy still holds ${...} interpolations.
    for path in (run_dir / "config.yaml", run_dir / ".hydra" / "config.yaml"):
        if path.is_file():
            config = _read_yaml(path)
            if not isinstance(config, dict):
                raise RunLoadError(f"{path.relative_to(run_dir)} is not a YAML mapping")
            return flatten(config)
    raise RunLoadError("no config.yaml or .hydra/config.yaml")


def _read_overrides(run_dir: Path) -> dict[str, str]:
    path = run_dir / ".hydra" / "overrides.yaml"
    if not path.is_file():
        return {}
    entries = _read_yaml(path) or []
    if not isinstance(entries, list):
        raise RunLoadError(".hydra/overrides.yaml is not a list of overrides")
    overrides: dict[str, str] = {}
    for entry in entries:
        key, sep, value = str(entry).partition("=")
        key = key.lstrip("+~")
        if sep and not key.startswith(LOCATION_OVERRIDES):
            overrides[key] = value
    return overrides


def _read_metrics(run_dir: Path) -> pd.DataFrame:
    path = run_dir / "csv" / "metrics.csv"
    if not path.is_file():
        raise RunLoadError("no csv/metrics.csv (unfinished run, or trained without logger=csv/wandb)")
    try:
        metrics = pd.read_csv(path)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, OSError) as err:
        raise RunLoadError(f"csv/metrics.csv is unreadable ({str(err).splitlines()[0]})") from err
    if "step" not in metrics.columns:
        raise RunLoadError("csv/metrics.csv has no 'step' column (not a metrics file sdl-train wrote)")
    metrics = metrics.apply(pd.to_numeric, errors="coerce").dropna(subset=["step"])
    if not any(c.startswith("val/") and metrics[c].notna().any() for c in metrics.columns):
        raise RunLoadError("csv/metrics.csv holds no validation metrics yet (unfinished run?)")
    return metrics.sort_values("step", kind="stable").reset_index(drop=True)


def _steps(run_dir: Path, metrics: pd.DataFrame) -> int | None:
    """Global step of last.ckpt (read lazily, tensors memory-mapped); else the last logged step + 1."""
    last = run_dir / "checkpoints" / "last.ckpt"
    if last.is_file():
        import pickle

        import torch

        # An unreadable checkpoint falls back to the CSV.
        with contextlib.suppress(OSError, RuntimeError, KeyError, ValueError, pickle.UnpicklingError):
            return int(torch.load(last, map_location="cpu", weights_only=True, mmap=True)["global_step"])
    return int(metrics["step"].max()) + 1 if len(metrics) else None


def _wall_time(run_dir: Path) -> float | None:
    """From the manifest's creation (or the first train.log line) to the newest metrics/checkpoint write."""
    starts: list[float] = []
    manifest = read_manifest(run_dir)
    if manifest and manifest.get("created_at"):
        with contextlib.suppress(ValueError):
            starts.append(datetime.fromisoformat(manifest["created_at"]).timestamp())
    log = run_dir / "train.log"
    if log.is_file():
        with log.open(encoding="utf-8", errors="replace") as handle:
            match = _LOG_STAMP.match(handle.readline())
        if match:
            starts.append(datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").astimezone().timestamp())
    ends = [p.stat().st_mtime for p in [run_dir / "csv" / "metrics.csv", *run_dir.glob("checkpoints/*.ckpt")]
            if p.is_file()]
    if not starts or not ends:
        return None
    return max(0.0, max(ends) - min(starts))


def load_run(run_dir: str | Path) -> Run:
    """Read one run folder; raises ``RunLoadError`` saying what is missing or garbled."""
    path = Path(run_dir)
    metrics = _read_metrics(path)
    grids = sorted((path / "samples").glob("step_*.png"))
    return Run(path=path, config=_read_config(path), overrides=_read_overrides(path), metrics=metrics,
               steps=_steps(path, metrics), wall_time_s=_wall_time(path), latest_grid=grids[-1] if grids else None)


def _differing(values: list[dict[str, Any]], keys: Iterable[str]) -> list[str]:
    return [k for k in keys if len({repr(v.get(k)) for v in values}) > 1]


def _is_location(key: str) -> bool:
    leaf = key.rsplit(".", 1)[-1]
    return key.startswith(LOCATION_OVERRIDES) or leaf in ("dirpath", "save_dir", "run_dir", "output_root", "latest",
                                                           "default_root_dir", "id", "group", "name", "tags")


def swept_keys(runs: Sequence[Run]) -> list[str]:
    """The keys whose values differ between runs: from the command-line overrides when the runs have
    them, else from the configs (without output locations); keys that always move together (``seed`` and
    its copies ``data.seed``, ``model.seed``) collapse to the shortest name."""
    keys = _differing([r.overrides for r in runs], sorted({k for r in runs for k in r.overrides}))
    source = "overrides"
    if not keys:
        source = "config"
        keys = [k for k in _differing([r.config for r in runs], sorted({k for r in runs for k in r.config}))
                if not _is_location(k)]
    patterns: dict[tuple[str, ...], str] = {}
    for key in sorted(keys, key=lambda k: (k.count("."), len(k), k)):
        pattern = tuple(repr((r.overrides if source == "overrides" else r.config).get(key)) for r in runs)
        patterns.setdefault(pattern, key)
    chosen = set(patterns.values())
    for run in runs:
        values = run.overrides if source == "overrides" else run.config
        run.swept = {k: _format_value(values.get(k)) for k in keys if k in chosen}
    return [k for k in keys if k in chosen]


def _format_value(value: Any) -> str:
    return "—" if value is None else str(value)


def summary_metrics(runs: Sequence[Run], metric: str) -> list[str]:
    """The metrics shown: ``metric`` first, then the other epoch-level val/* metrics, then train/loss."""
    names = {m for r in runs for m in r.metric_names() if not _PER_TIMESTEP.search(m)}
    val = sorted(m for m in names if m.startswith("val/") and m != metric)
    rest = sorted(m for m in names if m.startswith("stability/"))
    return [m for m in [metric, *val, *rest, "train/loss"] if m in names]


def _label(run: Run) -> str:
    return " ".join(f"{k}={v}" for k, v in run.swept.items()) or run.path.name


def compare_runs(paths: Iterable[str | Path], metric: str = "val/mse") -> Comparison:
    """Load every run under ``paths`` and build the comparison table, sorted by ``metric`` (final value)."""
    run_dirs = find_run_dirs(paths)
    runs: list[Run] = []
    skipped: list[tuple[Path, str]] = []
    for run_dir in run_dirs:
        try:
            runs.append(load_run(run_dir))
        except RunLoadError as err:
            skipped.append((run_dir, str(err)))
    swept = swept_keys(runs) if runs else []
    for run in runs:
        run.label = _label(run)
    metrics = summary_metrics(runs, metric)
    rows = []
    for run in runs:
        row: dict[str, Any] = {"run": str(run.path), **run.swept}
        for name in metrics:
            row[f"{name} final"] = run.final(name)
            row[f"{name} best"] = run.best(name)
        row["steps"] = run.steps
        row["wall time (s)"] = None if run.wall_time_s is None else round(run.wall_time_s, 1)
        rows.append(row)
    table = pd.DataFrame(rows, columns=["run", *swept, *[f"{m} {k}" for m in metrics for k in ("final", "best")],
                                        "steps", "wall time (s)"])
    if f"{metric} final" in table:
        order = table[f"{metric} final"].sort_values(ascending=not higher_is_better(metric), na_position="last",
                                                     kind="stable").index
        table = table.loc[order].reset_index(drop=True)
        runs = [runs[i] for i in order]
    return Comparison(runs=runs, skipped=skipped, swept=swept, metric=metric, table=table,
                      seed_groups=seed_groups(runs, swept, metrics))


def seed_groups(runs: Sequence[Run], swept: Sequence[str], metrics: Sequence[str]) -> pd.DataFrame | None:
    """Runs that differ only by ``seed`` grouped: n, the seeds, and mean ± std (sample std) of each final
    metric. None unless some setting was run with two or more seeds."""
    if "seed" not in swept:
        return None
    others = [k for k in swept if k != "seed"]
    groups: dict[tuple[str, ...], list[Run]] = {}
    for run in runs:
        groups.setdefault(tuple(run.swept.get(k, "—") for k in others), []).append(run)
    if max(len(members) for members in groups.values()) < 2:
        return None
    rows = []
    for key, members in groups.items():
        row: dict[str, Any] = dict(zip(others, key))
        row["n"] = len(members)
        row["seeds"] = ",".join(sorted((m.swept.get("seed", "—") for m in members), key=_natural_text))
        for name in metrics:
            values = pd.Series([m.final(name) for m in members], dtype=float).dropna()
            row[f"{name} mean"] = float(values.mean()) if len(values) else math.nan
            row[f"{name} std"] = float(values.std(ddof=1)) if len(values) > 1 else math.nan
        rows.append(row)
    return pd.DataFrame(rows)


def _natural_text(text: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", text)]


def format_number(value: Any) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "—"
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def mean_std(mean: float, std: float) -> str:
    if math.isnan(mean):
        return "—"
    return f"{mean:.4g} ± {std:.2g}" if not math.isnan(std) else f"{mean:.4g}"


def display_rows(comparison: Comparison, metrics: Sequence[str] | None = None) -> tuple[list[str], list[list[str]]]:
    """Header and text cells of the main table (run label, swept keys, final/best metrics, steps, time)."""
    metrics = list(metrics or [m for m in summary_metrics(comparison.runs, comparison.metric)
                               if m.startswith("val/") or m == "train/loss"])
    header = ["run", *comparison.swept, *[f"{m} {k}" for m in metrics for k in ("final", "best")], "steps",
              "wall time (s)"]
    rows = []
    for run, (_, row) in zip(comparison.runs, comparison.table.iterrows()):
        cells = [run.path.name, *[run.swept.get(k, "—") for k in comparison.swept]]
        cells += [format_number(row.get(column)) for column in header[len(comparison.swept) + 1:]]
        rows.append(cells)
    return header, rows


def seed_rows(comparison: Comparison) -> tuple[list[str], list[list[str]]]:
    """Header and cells of the across-seeds table (mean ± std per final metric)."""
    groups = comparison.seed_groups
    if groups is None:
        return [], []
    others = [k for k in comparison.swept if k != "seed"]
    metrics = [m for m in summary_metrics(comparison.runs, comparison.metric) if m.startswith("val/")]
    header = [*others, "n", "seeds", *metrics]
    rows = [[str(row[k]) for k in others] + [str(row["n"]), row["seeds"]]
            + [mean_std(row[f"{m} mean"], row[f"{m} std"]) for m in metrics] for _, row in groups.iterrows()]
    return header, rows


def _markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    escape = lambda text: str(text).replace("|", "\\|")  # noqa: E731
    lines = ["| " + " | ".join(escape(h) for h in header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(escape(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def write_report(comparison: Comparison, out_dir: str | Path) -> dict[str, Path]:
    """Write comparison.md, comparison.csv and the PNG plots into ``out_dir``; returns what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = {"csv": out / "comparison.csv"}
    comparison.table.to_csv(written["csv"], index=False)
    if comparison.seed_groups is not None:
        written["seeds_csv"] = out / "comparison_seeds.csv"
        comparison.seed_groups.to_csv(written["seeds_csv"], index=False)
    if comparison.runs:
        written.update(write_plots(comparison, out))
    lines = [f"# Run comparison ({len(comparison.runs)} runs, sorted by final {comparison.metric})", ""]
    if comparison.runs:
        lines += [f"Swept keys: {', '.join(comparison.swept) or '(none differ)'}", "",
                  _markdown_table(*display_rows(comparison)), ""]
    header, rows = seed_rows(comparison)
    if rows:
        lines += ["## Stability across seeds (final values, mean ± sample std)", "", _markdown_table(header, rows), ""]
    plots = [(k, p) for k, p in written.items() if p.suffix == ".png"]
    if plots:
        lines += ["## Plots", ""] + [f"![{key}]({path.name})" for key, path in plots] + [""]
    if comparison.skipped:
        lines += ["## Skipped", ""] + [f"- `{path}`: {reason}" for path, reason in comparison.skipped] + [""]
    written["markdown"] = out / "comparison.md"
    written["markdown"].write_text("\n".join(lines), encoding="utf-8")
    return written


# ------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float) -> Any:
    """A matplotlib Figure on the Agg canvas (no pyplot, no display, no global backend switch)."""
    from matplotlib.figure import Figure

    return Figure(figsize=(width, height), dpi=100, layout="constrained")


def plot_curves(comparison: Comparison, path: Path, metrics: Sequence[str] | None = None) -> Path:
    """Validation curves of every run on one chart per metric."""
    metrics = list(metrics or [m for m in ("val/mse", "val/r2") if any(m in r.metrics for r in comparison.runs)])
    metrics = [comparison.metric, *[m for m in metrics if m != comparison.metric]]
    figure = _figure(6 * len(metrics), 4)
    for axes, metric in zip(figure.subplots(1, len(metrics), squeeze=False)[0], metrics):
        for index, run in enumerate(comparison.runs):
            series = run.series(metric)
            if len(series):
                axes.plot(series.index, series.to_numpy(), marker="o", markersize=3, label=run.label,
                          color=f"C{index % 10}")
        axes.set_xlabel("step")
        axes.set_ylabel(metric)
        axes.set_title(f"{metric} during training")
        axes.grid(alpha=0.3)
    figure.axes[0].legend(fontsize=7)
    figure.savefig(path)
    return path


def plot_final_vs_params(comparison: Comparison, path: Path) -> Path:
    """Final ``metric`` against each swept key (one panel per key; each dot is a run)."""
    keys = comparison.swept or ["run"]
    figure = _figure(4.5 * len(keys), 3.8)
    for axes, key in zip(figure.subplots(1, len(keys), squeeze=False)[0], keys):
        labels = sorted({r.swept.get(key, r.path.name) for r in comparison.runs}, key=_natural_text)
        for index, run in enumerate(comparison.runs):  # colour i = run i, as on the curves chart
            x = labels.index(run.swept.get(key, run.path.name))
            axes.scatter([x], [run.final(comparison.metric)], s=30, color=f"C{index % 10}")
        axes.set_xticks(range(len(labels)), labels, rotation=30, ha="right", fontsize=8)
        axes.set_xlim(-0.5, len(labels) - 0.5)
        axes.set_xlabel(key)
        axes.set_ylabel(f"final {comparison.metric}")
        axes.grid(alpha=0.3)
    figure.savefig(path)
    return path


def sample_grids_side_by_side(comparison: Comparison, path: Path, max_width: int = 256) -> Path | None:
    """The latest sample grid of each run next to each other, labelled; None when no run has a grid."""
    from PIL import Image, ImageDraw

    grids = [(run.label, Image.open(run.latest_grid).convert("RGB")) for run in comparison.runs
             if run.latest_grid is not None]
    if not grids:
        return None
    scaled = []
    for label, grid in grids:
        factor = min(1.0, max_width / grid.width) if grid.width > max_width else max(1, max_width // grid.width)
        scaled.append((label, grid.resize((int(grid.width * factor), int(grid.height * factor)),
                                          Image.Resampling.NEAREST)))
    caption = 14
    canvas = Image.new("RGB", (sum(g.width for _, g in scaled) + 4 * (len(scaled) - 1),
                               max(g.height for _, g in scaled) + caption), "white")
    draw = ImageDraw.Draw(canvas)
    x = 0
    for label, grid in scaled:
        canvas.paste(grid, (x, caption))
        draw.text((x + 2, 1), label[: max(4, grid.width // 6)], fill="black")
        x += grid.width + 4
    canvas.save(path)
    return path


def write_plots(comparison: Comparison, out: Path) -> dict[str, Path]:
    """validation_curves.png, final_vs_params.png and, when runs saved grids, samples.png."""
    written = {"curves": plot_curves(comparison, out / "validation_curves.png"),
               "final_vs_params": plot_final_vs_params(comparison, out / "final_vs_params.png")}
    samples = sample_grids_side_by_side(comparison, out / "samples.png")
    if samples is not None:
        written["samples"] = samples
    return written
