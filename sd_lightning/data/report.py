"""What ``sdl-data inspect`` reports: reason codes, severities, the per-file records and the report files.

``sdl-data clean`` and ``data.exclude`` read the report back (``load_report``): plain JSON, nothing executed.
"""

from __future__ import annotations

import enum
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from sd_lightning.data.sources import IMAGE_EXTENSIONS, DataRootError

REPORT_VERSION = 1


class Reason(enum.StrEnum):
    """Why a file is reported; the value is the code in reports and exclusion comments."""

    UNREADABLE = "unreadable"
    TRUNCATED = "truncated"
    ZERO_BYTE = "zero_byte"
    NOT_AN_IMAGE = "not_an_image"
    DECOMPRESSION_BOMB = "decompression_bomb"
    TOO_SMALL = "too_small"
    EXTREME_ASPECT = "extreme_aspect"
    UNUSUAL_MODE = "unusual_mode"
    EXACT_DUPLICATE = "exact_duplicate"
    NEAR_DUPLICATE = "near_duplicate"
    MISSING_CAPTION = "missing_caption"
    EMPTY_CAPTION = "empty_caption"
    NON_UTF8_CAPTION = "non_utf8_caption"
    CAPTION_TOO_LONG = "caption_too_long"
    METADATA_MISSING_FILE = "metadata_missing_file"
    NO_METADATA_ROW = "no_metadata_row"
    PATH_ESCAPES_ROOT = "path_escapes_root"


class Severity(enum.StrEnum):
    """``error``: ``sdl-data clean`` excludes the file; ``warning``: kept, reported."""

    ERROR = "error"
    WARNING = "warning"


DEFAULT_SEVERITY: dict[Reason, Severity] = {
    **{reason: Severity.ERROR for reason in Reason},
    # Training copes with these: converted, unconditional, truncated with a warning, or simply not listed.
    Reason.UNUSUAL_MODE: Severity.WARNING,
    Reason.NEAR_DUPLICATE: Severity.WARNING,
    Reason.MISSING_CAPTION: Severity.WARNING,
    Reason.EMPTY_CAPTION: Severity.WARNING,
    Reason.NON_UTF8_CAPTION: Severity.WARNING,
    Reason.CAPTION_TOO_LONG: Severity.WARNING,
    Reason.NO_METADATA_ROW: Severity.WARNING,
}
CAPTION_REASONS = frozenset({Reason.MISSING_CAPTION, Reason.EMPTY_CAPTION, Reason.NON_UTF8_CAPTION})

@dataclass(frozen=True)
class InspectSettings:
    """Thresholds of the scan (``inspect.*`` and the ``data`` group in ``conf/data_tool.yaml``)."""

    resolution: int = 32
    max_pixels: int = 89_478_485  # PIL's default limit
    max_aspect: float = 4.0
    near_duplicate_distance: int = 6  # phash Hamming distance (of 64 bits)
    caption_template: str | None = "{class_name}"
    extensions: Sequence[str] = tuple(sorted(IMAGE_EXTENSIONS))
    severity: Mapping[str, str] = field(default_factory=dict)
    # False when training ignores captions (data.conditioning=class|none): no caption problems then.
    check_captions: bool = True

    def severity_of(self, reason: Reason) -> Severity:
        return Severity(self.severity.get(reason.value, DEFAULT_SEVERITY[reason]))


@dataclass(frozen=True)
class Problem:
    file: str
    reason: Reason
    severity: Severity
    detail: str

    def to_dict(self) -> dict[str, str]:
        return {"file": self.file, "reason": self.reason.value, "severity": self.severity.value, "detail": self.detail}


@dataclass
class FileRecord:
    """One scanned image (a training item or an image file on disk)."""

    id: str
    in_training: bool
    bytes: int | None = None
    sha256: str | None = None
    width: int | None = None
    height: int | None = None
    mode: str | None = None
    format: str | None = None
    phash: str | None = None
    caption: str | None = None
    caption_source: str | None = None  # metadata | sidecar | class_folder | None
    caption_tokens: int | None = None


@dataclass
class InspectionReport:
    root: str
    settings: dict[str, Any]
    metadata_file: str | None
    counts: dict[str, int]
    files: list[FileRecord]
    problems: list[Problem]
    caption_tokens: dict[str, float]
    token_limit: int
    training_ids: list[str]  # the items ImageFolderSource lists, in its order
    created: str = field(default_factory=lambda: datetime.now(UTC).isoformat(timespec="seconds"))

    def excluded(self) -> dict[str, list[Problem]]:
        """Error problems of the items training would read, by id (what ``exclude.txt`` lists)."""
        training = set(self.training_ids)
        found: dict[str, list[Problem]] = {}
        for problem in self.problems:
            if problem.severity is Severity.ERROR and problem.file in training:
                found.setdefault(problem.file, []).append(problem)
        return found

    def to_dict(self) -> dict[str, Any]:
        by_reason: dict[str, dict[str, Any]] = {}
        for problem in self.problems:
            entry = by_reason.setdefault(problem.reason.value, {"severity": problem.severity.value, "count": 0})
            entry["count"] += 1
        return {
            "version": REPORT_VERSION, "created": self.created, "root": self.root, "settings": self.settings,
            "metadata_file": self.metadata_file, "counts": self.counts, "problem_counts": by_reason,
            "caption_tokens": self.caption_tokens, "token_limit": self.token_limit,
            "training_ids": self.training_ids, "excluded": sorted(self.excluded()),
            "problems": [p.to_dict() for p in self.problems],
            "files": [asdict(record) for record in self.files],
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> InspectionReport:
        return cls(
            root=data["root"], settings=data["settings"], metadata_file=data["metadata_file"], counts=data["counts"],
            files=[FileRecord(**record) for record in data["files"]],
            problems=[Problem(p["file"], Reason(p["reason"]), Severity(p["severity"]), p["detail"])
                      for p in data["problems"]],
            caption_tokens=data["caption_tokens"], token_limit=data["token_limit"],
            training_ids=list(data["training_ids"]), created=data["created"],
        )


def load_report(path: str | Path) -> InspectionReport:
    """A ``data_report.json`` written by ``sdl-data inspect`` (plain JSON, nothing executed)."""
    file = Path(path).expanduser()
    if not file.is_file():
        raise DataRootError(f"clean.report={path} does not exist")
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
        if data.get("version") != REPORT_VERSION:
            raise ValueError(f"version {data.get('version')!r}, expected {REPORT_VERSION}")
        return InspectionReport.from_dict(data)
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise DataRootError(f"clean.report={path} is not a data_report.json of sdl-data inspect ({err})") from err


def write_histograms(report: InspectionReport, path: Path) -> Path:
    """Shorter-side and aspect-ratio histograms of the decodable images (matplotlib, Agg backend)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    sized = [r for r in report.files if r.width]
    shorter = [min(r.width, r.height) for r in sized]
    aspects = [r.width / r.height for r in sized]
    figure, (left, right) = plt.subplots(1, 2, figsize=(10, 3.5))
    left.hist(shorter or [0], bins=30, color="tab:blue")
    left.axvline(report.settings["resolution"], color="tab:red", linestyle="--", label="data.resolution")
    left.set(title="shorter side (px)", xlabel="pixels", ylabel="images")
    left.legend()
    right.hist(aspects or [1], bins=np.geomspace(min(aspects or [1]) / 1.1, max(aspects or [1]) * 1.1, 30),
               color="tab:green")
    right.set_xscale("log")
    for bound in (report.settings["max_aspect"], 1 / report.settings["max_aspect"]):
        right.axvline(bound, color="tab:red", linestyle="--")
    right.set(title="aspect ratio (width / height)", xlabel="ratio (log)", ylabel="images")
    figure.tight_layout()
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def _markdown(report: InspectionReport, histogram_name: str) -> str:
    lines = [f"# Data report: `{report.root}`", "", f"Created {report.created}. Metadata file: "
             f"{report.metadata_file or 'none (sidecar .txt / class folders)'}."
             + ("" if report.settings.get("check_captions", True) else
                " Caption problems not checked: training ignores captions (data.conditioning)."), "", "## Counts", "",
             "| what | count |", "|---|---|"]
    lines += [f"| {key.replace('_', ' ')} | {value} |" for key, value in report.counts.items()]
    stats = report.caption_tokens
    lines += ["", f"## Caption length (tokens incl. BOS/EOS, limit {report.token_limit})", ""]
    if stats.get("count"):
        lines += ["| count | min | median | mean | p95 | max | over limit |", "|---|---|---|---|---|---|---|",
                  f"| {stats['count']} | {stats['min']} | {stats['median']} | {stats['mean']} | {stats['p95']} | "
                  f"{stats['max']} | {stats['over_limit']} |"]
    else:
        lines.append("No captions.")
    lines += ["", "## Image sizes", "", f"![size and aspect histograms]({histogram_name})", "", "## Problems", ""]
    counts: dict[tuple[str, str], int] = {}
    for problem in report.problems:
        key = (problem.reason.value, problem.severity.value)
        counts[key] = counts.get(key, 0) + 1
    if not report.problems:
        lines.append("None found.")
    else:
        lines += ["| reason | severity | files |", "|---|---|---|"]
        lines += [f"| {reason} | {severity} | {count} |" for (reason, severity), count in sorted(counts.items())]
        lines += ["", "| file | reason | severity | detail |", "|---|---|---|---|"]
        lines += [f"| `{p.file}` | {p.reason.value} | {p.severity.value} | {p.detail.replace('|', '/')} |"
                  for p in report.problems]
    excluded = report.excluded()
    lines += ["", f"## Excluded by `sdl-data clean` ({len(excluded)} of {len(report.training_ids)} items)", ""]
    lines += [f"- `{name}`: {', '.join(p.reason.value for p in found)}" for name, found in excluded.items()]
    return "\n".join(lines) + "\n"


def write_report(report: InspectionReport, out_dir: str | Path) -> dict[str, Path]:
    """``data_report.json``, ``data_report.md`` and ``data_report_sizes.png`` in ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "data_report.json", "markdown": out / "data_report.md",
             "histograms": out / "data_report_sizes.png"}
    paths["json"].write_text(json.dumps(report.to_dict(), indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    write_histograms(report, paths["histograms"])
    paths["markdown"].write_text(_markdown(report, paths["histograms"].name), encoding="utf-8")
    return paths
