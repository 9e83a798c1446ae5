"""Turn an inspection report into training inputs: an exclusion list and captions for unlabeled images.

Nothing here touches the data root: ``exclude.txt`` is read by ``data.exclude`` (or by
``CleanedImageFolderSource``), and filled captions live in ``captions_fill.jsonl`` beside it, which
``CleanedImageFolderSource`` applies at load time.
"""

from __future__ import annotations

import json
import logging
import string
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from sd_lightning.data.report import CAPTION_REASONS, InspectionReport
from sd_lightning.data.sources import IMAGE_EXTENSIONS, DataRootError, ImageFolderSource

log = logging.getLogger(__name__)

FILL_MODES = ("none", "template", "class_name")


@dataclass
class CleanResult:
    """What ``clean`` wrote and decided."""

    exclude_file: Path
    excluded: dict[str, list[str]]  # id → reason codes
    fills_file: Path | None = None
    fills: dict[str, str] = field(default_factory=dict)
    not_filled: dict[str, str] = field(default_factory=dict)  # id → why no caption could be made
    not_excludable: list[str] = field(default_factory=list)  # ids that exclude.txt cannot express
    summary_file: Path | None = None


def _excludable(item_id: str) -> bool:
    """``read_exclusions`` strips whitespace and cuts at ``#``: such ids cannot be listed."""
    return "#" not in item_id and item_id == item_id.strip() and "\n" not in item_id and "\r" not in item_id


def write_exclusions(report: InspectionReport, path: Path) -> tuple[dict[str, list[str]], list[str]]:
    """``exclude.txt``: one id per line with its reasons as a comment, the format ``data.exclude`` reads."""
    excluded = {name: [p.reason.value for p in found] for name, found in report.excluded().items()}
    lines = [f"# sdl-data clean: error-severity items of {report.root} (report {report.created})",
             "# use with data.exclude=<this file> (see clean_summary.md)",
             "# one id per line; '#' starts a comment"]
    bad = [name for name in excluded if not _excludable(name)]
    lines += [f"{name}  # {', '.join(reasons)}" for name, reasons in excluded.items() if _excludable(name)]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return excluded, bad


def fill_caption(item_id: str, root_name: str, mode: str, template: str) -> str | None:
    """A caption for an unlabeled item: its class folder name (the data root's name for top-level files)."""
    parent = Path(item_id).parent
    class_name = (parent.name if parent != Path(".") else root_name).replace("_", " ").strip()
    stem = Path(item_id).stem.replace("_", " ").replace("-", " ").strip()
    if mode == "class_name":
        return class_name or None
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    if "class_name" in fields and not class_name:
        return None
    return template.format(class_name=class_name, stem=stem).strip() or None


def caption_fills(report: InspectionReport, mode: str, template: str = "a photo of {class_name}",
                  skip: Sequence[str] = ()) -> tuple[dict[str, str], dict[str, str]]:
    """Captions for kept items whose caption is missing, empty or unreadable; and the ones left unfilled."""
    if mode not in FILL_MODES:
        raise ValueError(f"clean.fill_captions={mode!r} must be one of {list(FILL_MODES)}")
    if mode == "none":
        return {}, {}
    skipped = set(skip)
    root_name = Path(report.root).name
    fills: dict[str, str] = {}
    not_filled: dict[str, str] = {}
    for problem in report.problems:
        if problem.reason not in CAPTION_REASONS or problem.file in skipped or problem.file in fills:
            continue
        caption = fill_caption(problem.file, root_name, mode, template)
        if caption is None:
            not_filled[problem.file] = f"clean.fill_captions={mode} has no class name for it"
        else:
            fills[problem.file] = caption
    return fills, not_filled


def write_caption_fills(fills: dict[str, str], path: Path) -> Path:
    """``captions_fill.jsonl`` in the metadata.jsonl convention (``file_name`` + ``text``)."""
    with path.open("w", encoding="utf-8") as handle:
        for name, text in fills.items():
            handle.write(json.dumps({"file_name": name, "text": text}, ensure_ascii=False) + "\n")
    return path


def read_caption_fills(path: str | Path | None) -> dict[str, str]:
    """Captions by id from a ``captions_fill.jsonl``; errors name the file and line."""
    if not path:
        return {}
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataRootError(f"caption_fills={file} does not exist")
    fills: dict[str, str] = {}
    for line_no, line in enumerate(file.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            fills[str(row["file_name"])] = str(row["text"])
        except (json.JSONDecodeError, KeyError, TypeError) as err:
            raise DataRootError(f"{file}:{line_no}: expected {{\"file_name\": …, \"text\": …}} ({err})") from err
    return fills


class CleanedImageFolderSource(ImageFolderSource):
    """``ImageFolderSource`` with ``sdl-data clean``'s outputs applied, without touching the folder.

    ``exclude_file`` drops ids before any path check (so a metadata row escaping the root, which would
    make the plain source refuse the folder, can be excluded); ``caption_fills`` supplies captions for
    items that have none (real captions always win).
    """

    def __init__(
        self,
        root: str | Path,
        caption_template: str | None = "{class_name}",
        extensions: Sequence[str] = tuple(sorted(IMAGE_EXTENSIONS)),
        exclude: Sequence[str] = (),
        exclude_file: str | Path | None = None,
        caption_fills: str | Path | None = None,
    ) -> None:
        super().__init__(root, caption_template=caption_template, extensions=extensions, exclude=exclude,
                         exclude_file=exclude_file)
        fills = read_caption_fills(caption_fills)
        unknown = set(fills).difference(item.id for item in self.items)
        if unknown:
            log.warning("%d filled captions name items not in the source (first: %s)", len(unknown), sorted(unknown)[0])
        self.items = [item if item.caption is not None or item.id not in fills else replace(item, caption=fills[item.id])
                      for item in self.items]


def clean(report: InspectionReport, out_dir: str | Path, fill_captions: str = "none",
          caption_template: str = "a photo of {class_name}") -> CleanResult:
    """Write ``exclude.txt``, optional ``captions_fill.jsonl`` and ``clean_summary.md`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    excluded, bad = write_exclusions(report, out / "exclude.txt")
    result = CleanResult(exclude_file=out / "exclude.txt", excluded=excluded, not_excludable=bad)
    fills, not_filled = caption_fills(report, fill_captions, caption_template, skip=list(excluded))
    if fill_captions != "none":
        result.fills_file = write_caption_fills(fills, out / "captions_fill.jsonl")
        result.fills, result.not_filled = fills, not_filled
    result.summary_file = out / "clean_summary.md"
    result.summary_file.write_text(_summary(report, result), encoding="utf-8")
    return result


def training_overrides(result: CleanResult, report: InspectionReport) -> list[str]:
    """The ``sdl-train`` overrides that apply this result."""
    overrides = [f"data.root={report.root}", f"data.exclude={result.exclude_file.resolve()}"]
    if result.fills_file is not None:
        overrides += ["data.source._target_=sd_lightning.data.cleaning.CleanedImageFolderSource",
                      f"+data.source.caption_fills={result.fills_file.resolve()}"]
    return overrides


def _summary(report: InspectionReport, result: CleanResult) -> str:
    counts: dict[str, int] = {}
    for reasons in result.excluded.values():
        for reason in reasons:
            counts[reason] = counts.get(reason, 0) + 1
    kept = len(report.training_ids) - len(result.excluded)
    lines = [f"# sdl-data clean: `{report.root}`", "",
             f"Excluded {len(result.excluded)} of {len(report.training_ids)} training items; {kept} remain. "
             f"Report created {report.created}. No file under the data root was changed.", "",
             "| reason | excluded items |", "|---|---|", *[f"| {r} | {n} |" for r, n in sorted(counts.items())], "",
             "## Excluded items", "", *[f"- `{name}`: {', '.join(reasons)}" for name, reasons in result.excluded.items()]]
    if result.not_excludable:
        lines += ["", "## Not expressible in exclude.txt (rename these files: '#' or surrounding spaces)", "",
                  *[f"- `{name}`" for name in result.not_excludable]]
    if result.fills_file is not None:
        lines += ["", f"## Filled captions ({len(result.fills)})", "",
                  *[f"- `{name}`: {text}" for name, text in result.fills.items()],
                  *[f"- `{name}`: not filled, {why}" for name, why in result.not_filled.items()]]
    lines += ["", "## Train with", "", "```", " ".join(training_overrides(result, report)), "```"]
    return "\n".join(lines) + "\n"
