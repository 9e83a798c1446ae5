"""sdl-data <subcommand> [Hydra overrides]: data tools sharing sdl-train's `data` config.

``sdl-data inspect data=imagefolder data.root=DIR`` scans and reports; ``sdl-data clean … [clean.fill_captions=
template|class_name]`` also writes ``exclude.txt`` (and filled captions). Outputs go to
``outputs/data/<subcommand>/<timestamp>/``, never inside the data root. New subcommands register in
``SUBCOMMANDS``.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig, OmegaConf

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, _check_number, missing_keys, run_entry
from sd_lightning.cli.scripts import DATA_SUBCOMMANDS
from sd_lightning.data.cleaning import FILL_MODES, CleanResult, clean, training_overrides
from sd_lightning.data.inspection import scan_folder
from sd_lightning.data.report import (
    InspectionReport,
    InspectSettings,
    Reason,
    Severity,
    load_report,
    write_report,
)


@dataclass(frozen=True)
class Subcommand:
    """One ``sdl-data`` subcommand: a function of the composed config and its one-line help."""

    run: Callable[[DictConfig], Any]
    help: str
    config_name: str = "data_tool"


def _data_root(cfg: DictConfig) -> Path:
    if "root" not in cfg.data:
        raise ConfigError("sdl-data works on image folders: use data=imagefolder data.root=DIR")
    return Path(str(cfg.data.root)).expanduser().resolve()


def _validate(cfg: DictConfig, need_root: bool = True) -> None:
    """Fail before scanning, naming each bad key."""
    missing = [key for key in missing_keys(cfg) if need_root or key != "data.root"]
    if missing:
        raise ConfigError("missing required values: " + ", ".join(f"{k} (set {k}=...)" for k in missing))
    problems: list[str] = []
    _check_number(problems, cfg, "data.resolution", int, 1)
    _check_number(problems, cfg, "inspect.max_pixels", int, 1)
    _check_number(problems, cfg, "inspect.max_aspect", float, 1.0)
    _check_number(problems, cfg, "inspect.near_duplicate_distance", int, 0, 64)
    codes = {reason.value for reason in Reason}
    for code, severity in (cfg.inspect.severity or {}).items():
        if code not in codes:
            problems.append(f"inspect.severity.{code} is not a reason code (codes: {', '.join(sorted(codes))})")
        elif severity not in {s.value for s in Severity}:
            problems.append(f"inspect.severity.{code}={severity!r} must be 'error' or 'warning'")
    if cfg.clean.fill_captions not in FILL_MODES:
        problems.append(f"clean.fill_captions={cfg.clean.fill_captions!r} must be one of {', '.join(FILL_MODES)}")
    if problems:
        raise ConfigError("invalid config:\n  - " + "\n  - ".join(problems))


def _settings(cfg: DictConfig) -> InspectSettings:
    source = cfg.data.get("source") or {}
    extras = {"extensions": list(source.extensions)} if source.get("extensions") else {}
    return InspectSettings(
        resolution=int(cfg.data.resolution), max_pixels=int(cfg.inspect.max_pixels),
        max_aspect=float(cfg.inspect.max_aspect), near_duplicate_distance=int(cfg.inspect.near_duplicate_distance),
        caption_template=source.get("caption_template"), severity=dict(cfg.inspect.severity or {}),
        check_captions=cfg.data.get("conditioning", "text") == "text", **extras,
    )


def _output_dir(cfg: DictConfig, root: Path | None) -> Path:
    out = Path(str(cfg.output_dir)).resolve()
    if root is not None and out.is_relative_to(root):
        raise ConfigError(f"the output folder {out} is inside data.root={root}; sdl-data never writes there. "
                          "Run it from another folder or set hydra.run.dir=<folder outside the data>.")
    return out


def _tokenizer(cfg: DictConfig) -> Any:
    if cfg.inspect.tokenizer:
        from transformers import AutoTokenizer

        folder = Path(str(cfg.inspect.tokenizer)).expanduser()
        if not folder.is_dir():
            raise ConfigError(f"inspect.tokenizer={folder} is not a tokenizer folder")
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    from sd_lightning.models.tokenizer import load_tiny_tokenizer

    return load_tiny_tokenizer()


def _scan(cfg: DictConfig, root: Path) -> InspectionReport:
    from rich.progress import Progress

    with Progress(transient=True) as progress:
        task = progress.add_task(f"scanning {root}", total=None)
        return scan_folder(root, _settings(cfg), _tokenizer(cfg), workers=cfg.inspect.get("workers"),
                           progress=lambda done, total: progress.update(task, completed=done, total=total))


def inspect(cfg: DictConfig) -> InspectionReport:
    """Scan data.root and write data_report.json/.md/_sizes.png into the output folder."""
    _validate(cfg)
    root = _data_root(cfg)
    out = _output_dir(cfg, root)
    report = _scan(cfg, root)
    paths = write_report(report, out)
    print_report(report)
    print(f"sdl-data inspect: wrote {', '.join(str(p) for p in paths.values())}")
    return report


def clean_data(cfg: DictConfig) -> CleanResult:
    """Scan (or read clean.report) and write exclude.txt, captions_fill.jsonl and clean_summary.md."""
    _validate(cfg, need_root=cfg.clean.report is None)
    root = None if OmegaConf.is_missing(cfg.data, "root") else _data_root(cfg)
    if cfg.clean.report is not None:
        report = load_report(cfg.clean.report)
        if root is not None and Path(report.root) != root:
            raise ConfigError(f"clean.report={cfg.clean.report} describes {report.root}, not data.root={root}")
        out = _output_dir(cfg, Path(report.root))
    else:
        out = _output_dir(cfg, root)
        report = _scan(cfg, root)
        write_report(report, out)
    result = clean(report, out, cfg.clean.fill_captions, cfg.clean.caption_template)
    print_clean(report, result)
    return result


def cache_latents(cfg: DictConfig) -> Path:
    """Encode images to VAE latents and prompts to text-encoder states once (``data.cache=DIR``)."""
    from sd_lightning.cli.config import validate_train_config
    from sd_lightning.data.cache import build_cache

    validate_train_config(cfg)
    path = build_cache(cfg)
    print(f"sdl-data cache: wrote {path}; train from it with data.cache={path}")
    return path


def shard_data(cfg: DictConfig) -> dict[str, Any]:
    """Write the data source to WebDataset .tar shards (``shard.out=DIR``) for sources too big for a folder."""
    from sd_lightning.data.shards import shard_main

    index = shard_main(cfg)
    print(f"sdl-data shard: wrote shards to {cfg.shard.out}; train from them with data=shards "
          f"data.root={cfg.shard.out}")
    return index


SUBCOMMANDS: dict[str, Subcommand] = {
    "inspect": Subcommand(inspect, DATA_SUBCOMMANDS["inspect"]),
    "clean": Subcommand(clean_data, DATA_SUBCOMMANDS["clean"]),
    # Takes sdl-train's config (data=, model=, data.cache=DIR): the cache is keyed by that model's encoders.
    "cache": Subcommand(cache_latents, DATA_SUBCOMMANDS["cache"], config_name="train"),
    "shard": Subcommand(shard_data, DATA_SUBCOMMANDS["shard"]),
}


def print_report(report: InspectionReport) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sdl-data inspect: {report.root}")
    table.add_column("reason")
    table.add_column("severity")
    table.add_column("files", justify="right")
    table.add_column("example")
    by_reason: dict[Reason, list[str]] = {}
    for problem in report.problems:
        by_reason.setdefault(problem.reason, []).append(problem.file)
    for reason in Reason:
        if reason in by_reason:
            severity = next(p.severity for p in report.problems if p.reason is reason)
            style = "red" if severity is Severity.ERROR else "yellow"
            table.add_row(reason.value, f"[{style}]{severity.value}[/]", str(len(by_reason[reason])),
                          by_reason[reason][0])
    counts = ", ".join(f"{key.replace('_', ' ')} {value}" for key, value in report.counts.items())
    console = Console()
    console.print(table if by_reason else "[green]no problems found[/]")
    console.print(counts)


def print_clean(report: InspectionReport, result: CleanResult) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"sdl-data clean: excluded {len(result.excluded)} of {len(report.training_ids)} items")
    table.add_column("file")
    table.add_column("reasons")
    for name, reasons in result.excluded.items():
        table.add_row(name, ", ".join(reasons))
    console = Console()
    console.print(table)
    if result.fills_file is not None:
        console.print(f"filled {len(result.fills)} captions ({len(result.not_filled)} left unlabeled): "
                      f"{result.fills_file}")
    for name in result.not_excludable:
        console.print(f"[red]cannot list {name!r} in exclude.txt ('#' or surrounding spaces): rename it[/]")
    console.print(f"wrote {result.exclude_file} and {result.summary_file}")
    console.print("train with: " + " ".join(training_overrides(result, report)), soft_wrap=True)


def _refuse_output_inside_root(config_name: str, overrides: list[str]) -> str | None:
    """Checked before Hydra starts, since Hydra creates the output folder before the task runs."""
    from hydra import compose, initialize_config_dir

    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose(config_name, overrides=[o for o in overrides if not o.startswith("-")],
                          return_hydra_config=True)
        if "root" not in cfg.data or OmegaConf.is_missing(cfg.data, "root"):
            return None
        multirun = "-m" in overrides or "--multirun" in overrides
        out = Path(str(cfg.hydra.sweep.dir if multirun else cfg.hydra.run.dir)).resolve()
        root = _data_root(cfg)
    except Exception:  # a bad override: Hydra itself reports it properly below
        return None
    if out.is_relative_to(root):
        return (f"the output folder {out} would be inside data.root={root}; sdl-data never writes there. "
                "Run it from another folder or set hydra.run.dir=<folder outside the data>.")
    return None


def main() -> None:
    """Pop the subcommand from ``sys.argv`` and run the Hydra app with the remaining overrides."""
    valid = ", ".join(SUBCOMMANDS)
    command = sys.argv[1] if len(sys.argv) > 1 else None
    if command in ("-h", "--help"):
        print("usage: sdl-data <subcommand> [overrides]\n"
              + "\n".join(f"  {name:10s} {entry.help}" for name, entry in SUBCOMMANDS.items()))
        return
    if command not in SUBCOMMANDS:
        given = "no subcommand given" if command is None else f"unknown subcommand {command!r}"
        print(f"sdl-data: {given}; valid subcommands: {valid}\n"
              "usage: sdl-data <subcommand> data=imagefolder data.root=DIR [overrides]", file=sys.stderr)
        sys.exit(2)
    subcommand = SUBCOMMANDS[command]
    overrides = [*sys.argv[2:]]
    if subcommand.config_name == "data_tool":
        overrides.append(f"command={command}")
    refused = _refuse_output_inside_root(subcommand.config_name, overrides)
    if refused:
        print(f"sdl-data {command}: {refused}", file=sys.stderr)
        sys.exit(2)
    sys.argv = [sys.argv[0], *overrides]

    @hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name=subcommand.config_name)
    def app(cfg: DictConfig) -> Any:
        return run_entry(f"sdl-data {command}", subcommand.run, cfg)

    app()


if __name__ == "__main__":
    from sd_lightning.cli.scripts import run

    run("sdl-data")
