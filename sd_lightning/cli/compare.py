"""sdl-compare: compare the runs of a multirun (or any run folders) offline, and write a report.

    sdl-compare multirun/default/2026-11-25_09-00-00
    sdl-compare outputs/default/run_a outputs/default/run_b --metric val/r2 --out reports/ab

Shows one row per run (the keys that differ between runs as columns, final and best of each validation
metric, steps, wall time) sorted by the final ``--metric``; runs that differ only by ``seed`` are grouped
with mean ± std. Writes comparison.md, comparison.csv and PNG plots into ``--out``
(default: ``<first DIR>/comparison``). Unreadable run folders are listed as skipped.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

from sd_lightning.evaluation.compare import Comparison, compare_runs, display_rows, seed_rows, write_report


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sdl-compare", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                        help="a multirun folder, a folder of run folders, or run folders")
    parser.add_argument("--metric", default="val/mse", help="sort by the final value of this metric (default val/mse)")
    parser.add_argument("--out", type=Path, default=None, help="report folder (default <first DIR>/comparison)")
    return parser


def _rich_table(title: str, header: Sequence[str], rows: Sequence[Sequence[str]]) -> Table:
    table = Table(title=title)
    for name in header:
        table.add_column(name, overflow="fold")
    for row in rows:
        table.add_row(*row)
    return table


def print_comparison(comparison: Comparison, console: Console) -> None:
    if comparison.runs:
        console.print(_rich_table(f"{len(comparison.runs)} runs, sorted by final {comparison.metric}",
                                  *display_rows(comparison)))
    header, rows = seed_rows(comparison)
    if rows:
        console.print(_rich_table("Stability across seeds (final values, mean ± std)", header, rows))
    for path, reason in comparison.skipped:
        console.print(f"[yellow]skipped[/yellow] {path}: {reason}")


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console()
    try:
        comparison = compare_runs(args.dirs, metric=args.metric)
    except FileNotFoundError as err:
        print(f"sdl-compare: {err}", file=sys.stderr)
        return 2
    if not comparison.runs:
        print_comparison(comparison, console)
        print(f"sdl-compare: no readable run folders under {', '.join(map(str, args.dirs))} (a run folder holds "
              "config.yaml and csv/metrics.csv, as sdl-train writes them)", file=sys.stderr)
        return 2
    if f"{args.metric} final" not in comparison.table:
        known = sorted({m for r in comparison.runs for m in r.metric_names()})
        print(f"sdl-compare: --metric {args.metric} was not logged by these runs; known: {', '.join(known)}",
              file=sys.stderr)
        return 2
    print_comparison(comparison, console)
    written = write_report(comparison, args.out or args.dirs[0] / "comparison")
    console.print(f"report: {written['markdown']}  table: {written['csv']}  plots: "
                  + ", ".join(str(p.name) for p in written.values() if p.suffix == ".png"))
    return 0


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-compare")
