"""The console scripts. ``--version`` and ``--help`` answer from the config files alone, in well under two seconds;
torch, Lightning, diffusers and transformers are imported only when a command runs, after the known third-party
notices are filtered (so they are filtered before those libraries print them at import).
"""

from __future__ import annotations

import importlib
import sys
from dataclasses import dataclass
from pathlib import Path

from sd_lightning import __version__

HELP_FLAGS = ("-h", "--help")
# sdl-data's subcommands and their one-line help (cli/data.py maps each to its function).
DATA_SUBCOMMANDS = {
    "inspect": "scan the data and write a report of every problem",
    "clean": "write exclude.txt (and filled captions) from a scan or a report",
    "cache": "encode images and prompts once to a latent cache (data.cache=DIR; takes sdl-train's config)",
    "shard": "write the data to WebDataset .tar shards (shard.out=DIR)",
}


def _config_dir() -> str:
    """The configs: inside the installed package (a wheel carries them as sd_lightning/conf), else the checkout's."""
    package = Path(__file__).resolve().parents[1]
    installed = package / "conf"
    return str(installed if (installed / "train.yaml").is_file() else package.parent / "conf")


CONFIG_DIR = _config_dir()


@dataclass(frozen=True)
class Script:
    name: str
    module: str
    summary: str
    config_name: str | None = None


SCRIPTS = {script.name: script for script in (
    Script("sdl-train", "sd_lightning.cli.train", "train a latent diffusion model or its VAE (Lightning + Hydra)",
           "train"),
    Script("sdl-sample", "sd_lightning.cli.sample", "generate images from a checkpoint or an exported pipeline",
           "sample"),
    Script("sdl-export", "sd_lightning.cli.export", "write a checkpoint as a diffusers pipeline folder, LoRA or single file", "export"),
    Script("sdl-eval", "sd_lightning.cli.eval", "validation metrics and sample quality of a model", "eval"),
    Script("sdl-data", "sd_lightning.cli.data", "inspect, clean, cache and shard image data", "data_tool"),
    Script("sdl-compare", "sd_lightning.cli.compare", "compare run folders (final metrics, seeds, plots)"),
)}


def silence_known_noise() -> None:
    """Drop named third-party notices that never concern a user of this project, and nothing broader:
    transformers' torchvision fallback notices (printed while diffusers imports), deprecations inside
    Lightning/torchdata, Lightning's eval-mode and litlogger tips. Cheap: no library is imported here, since the
    filters sit on the loggers that emit the records. The project's own warnings and all others still show."""
    import logging
    import warnings

    for pattern in (r".*LeafSpec.*", r".*set_vital.*", r".*module\(s\) in eval mode.*"):
        warnings.filterwarnings("ignore", message=pattern)
    logging.getLogger("lightning.pytorch.utilities.rank_zero").addFilter(
        lambda record: "litlogger" not in record.getMessage())
    logging.getLogger("transformers.utils.import_utils").addFilter(
        lambda record: "requires torchvision" not in record.getMessage())
    # Said again, and better, by the pipeline's own "The following part of your input was truncated" warning.
    logging.getLogger("transformers.tokenization_utils_base").addFilter(
        lambda record: "Token indices sequence length is longer" not in record.getMessage())


def _config_dirs(argv: list[str]) -> list[Path]:
    """The built-in configs plus a user's ``--config-dir``/``-cd`` folder, whose groups extend the built-in ones."""
    dirs = [Path(CONFIG_DIR)]
    for index, arg in enumerate(argv):
        if arg in ("--config-dir", "-cd") and index + 1 < len(argv):
            dirs.append(Path(argv[index + 1]))
        elif arg.startswith("--config-dir="):
            dirs.append(Path(arg.split("=", 1)[1]))
    return dirs


def describe(path: Path) -> str:
    """An option's own words: the first comment line at the top of its YAML (after ``# @package``)."""
    for line in path.read_text(encoding="utf-8").splitlines():
        text = line.strip()
        if not text.startswith("#"):
            return ""
        if not text.startswith("# @package"):
            return text.lstrip("# ").rstrip()
    return ""


def group_options(dirs: list[Path]) -> dict[str, dict[str, str]]:
    """``group -> {option: description}`` for every config group (files starting with ``_`` are partials)."""
    groups: dict[str, dict[str, str]] = {}
    for root in dirs:
        for path in sorted(root.rglob("*.yaml")):
            if path.parent == root or path.name.startswith("_"):
                continue
            group = path.parent.relative_to(root).as_posix()
            groups.setdefault(group, {})[path.stem] = describe(path)
    return groups


def defaults_of(config: Path) -> dict[str, str | None]:
    """The option each group of a top-level config starts from (its defaults list)."""
    import yaml

    chosen: dict[str, str | None] = {}
    for entry in (yaml.safe_load(config.read_text(encoding="utf-8")) or {}).get("defaults", []):
        if isinstance(entry, dict):
            for key, value in entry.items():
                chosen[key.removeprefix("override ").lstrip("/")] = value
    return chosen


def top_level_keys(config: Path) -> tuple[list[str], list[str]]:
    """A top-level config's leading comment (what the command does) and its own keys with their comments,
    without its defaults list and Hydra settings."""
    text = config.read_text(encoding="utf-8").splitlines()
    about = []
    while text and text[0].startswith("#"):
        about.append(text.pop(0).lstrip("# ").rstrip())
    lines, in_defaults = [], False
    for line in text:
        if line.startswith("defaults:"):
            in_defaults = True
            continue
        if in_defaults and (not line.strip() or line.startswith((" ", "-"))):
            continue
        in_defaults = False
        if line.startswith("hydra:"):
            in_defaults = True  # Hydra's own settings for this command: skipped like the defaults list
            continue
        if line.strip():
            lines.append(line)
    return about, lines


def help_text(script: Script, argv: list[str], width: int = 118) -> str:
    lines = [f"{script.name} {__version__}: {script.summary}", ""]
    if script.config_name is None:
        return "\n".join(lines)
    config = Path(CONFIG_DIR) / f"{script.config_name}.yaml"
    chosen = defaults_of(config)
    about, keys = top_level_keys(config)
    trains = script.name == "sdl-train"
    command = " <subcommand>" if script.name == "sdl-data" else (" [-m]" if trains else "")
    lines += [f"usage: {script.name}{command} [group=option ...] [key=value ...] [+new.key=value] [~key]",
              *(f"  {line}" for line in about), ""]
    if script.name == "sdl-data":
        lines += ["subcommands:", *(f"  {name:10s} {words}" for name, words in DATA_SUBCOMMANDS.items()), ""]
    groups = group_options(_config_dirs(argv))
    shown = [g for g in groups if (g in chosen and g != "hydra") or (trains and g.startswith("hydra/"))]
    if shown:
        lines.append("config groups (group=option; * marks the current choice):")
        for group in shown:
            unset = "" if chosen.get(group) else "  (none chosen by default)"
            lines.append(f"  {group}{unset}")
            for option, words in groups[group].items():
                mark = "*" if chosen.get(group) == option else " "
                line = f"    {mark} {option:22s} {words}".rstrip()
                lines.append(line if len(line) <= width else line[: width - 1] + "…")
        lines.append("")
    lines += [f"keys of {config.name} (set with key=value):", *(f"  {line}" for line in keys), "",
              "more:", "  --cfg job [overrides]   print the composed config the run would use",
              "  --hydra-help            Hydra's own flags"]
    if trains:
        lines.append("  -m key=a,b ...          sweep every combination (hydra/launcher=cpu_parallel|gpu_parallel|slurm "
                     "runs jobs at once)")
    lines.append("  README.md               the guide: every command with its options")
    return "\n".join(lines)


def run(name: str, argv: list[str] | None = None) -> None:
    script = SCRIPTS[name]
    args = sys.argv[1:] if argv is None else argv
    if "--version" in args:
        print(f"{name} {__version__}")
        return
    if script.config_name is not None and any(flag in args for flag in HELP_FLAGS):
        print(help_text(script, args))
        return
    silence_known_noise()
    main = importlib.import_module(script.module).main
    result = main()
    if name == "sdl-compare":
        sys.exit(result)


def train() -> None:
    run("sdl-train")


def sample() -> None:
    run("sdl-sample")


def export() -> None:
    run("sdl-export")


def evaluate() -> None:
    run("sdl-eval")


def data() -> None:
    run("sdl-data")


def compare() -> None:
    run("sdl-compare")
