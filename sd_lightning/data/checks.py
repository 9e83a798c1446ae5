"""The rules for data.* settings, in one place: the data module and its transforms check their arguments with
them, and ``sdl-train`` checks the composed config with them before any heavy work (naming every bad key)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

CONDITIONING_MODES = ("text", "class", "none")
UNLABELED_POLICIES = ("null_prompt", "drop")
MASK_MODES = ("files", "alpha", "none")


def check_value(problems: list[str], key: str, value: Any, kind: type, low: float | None = None,
                high: float | None = None, low_open: bool = False, optional: bool = False) -> None:
    """Append a message naming ``key`` when ``value`` is not a ``kind`` in [low, high] (``low_open``: > low)."""
    if value is None:
        if not optional:
            problems.append(f"{key} is required")
        return
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        problems.append(f"{key}={value!r} must be {'a number' if kind is float else 'an integer'}")
        return
    if low is not None and (value <= low if low_open else value < low):
        problems.append(f"{key}={value} must be {'>' if low_open else '>='} {low}")
    if high is not None and value > high:
        problems.append(f"{key}={value} must be <= {high}")


NUMBERS: dict[str, tuple[type, float | None, float | None, bool]] = {
    # key: (kind, low, high, low_open)
    "batch_size": (int, 1, None, False),
    "num_workers": (int, 0, None, False),
    "resolution": (int, 8, None, False),
    "val_fraction": (float, 0.0, 0.99, False),
    "train_fraction": (float, 0.0, 1.0, True),
    "labeled_fraction": (float, 0.0, 1.0, False),
    "labeled_oversample": (int, 1, None, False),
    "keep_tokens": (int, 0, None, False),
    "tag_dropout": (float, 0.0, 0.99, False),
    "max_zoom": (float, 1.0, 4.0, False),
}


def data_problems(values: Mapping[str, Any]) -> list[str]:
    """Every broken rule among the data settings present in ``values`` (data.<name> → value)."""
    problems: list[str] = []
    for name, (kind, low, high, low_open) in NUMBERS.items():
        value = values.get(name)
        if name in values and not isinstance(value, Mapping):  # a mapping is a node built later (e.g. resolution)
            check_value(problems, f"data.{name}", value, kind, low, high, low_open, optional=name == "val_batch_size")
    if "conditioning" in values and values["conditioning"] not in CONDITIONING_MODES:
        problems.append(f"data.conditioning={values['conditioning']!r} must be "
                        + ", ".join(repr(m) for m in CONDITIONING_MODES[:-1]) + f" or {CONDITIONING_MODES[-1]!r}")
    if "unlabeled" in values and values["unlabeled"] not in UNLABELED_POLICIES:
        problems.append(f"data.unlabeled={values['unlabeled']!r} must be " + " or ".join(map(repr, UNLABELED_POLICIES)))
    if "masks" in values and values["masks"] not in MASK_MODES:
        problems.append(f"data.masks={values['masks']!r} must be " + ", ".join(map(repr, MASK_MODES)))
    template = values.get("caption_template")
    if template is not None and "{class_name}" not in str(template):
        problems.append(f"data.caption_template={template!r} must contain '{{class_name}}'")
    zoom = values.get("max_zoom")
    if isinstance(zoom, (int, float)) and zoom > 1.0 and values.get("center_crop", False):
        problems.append(f"data.max_zoom={zoom} needs random crops (data.center_crop=false), or it would only cut the "
                        "borders away")
    buckets = values.get("buckets")
    if buckets is not None:
        if not isinstance(buckets, Mapping):
            problems.append(f"data.buckets={buckets!r} must be null or a mapping such as {{multiple: 8, max_aspect: 2.0}}")
        elif set(buckets) - {"multiple", "max_aspect"}:
            problems.append(f"data.buckets has unknown keys {sorted(set(buckets) - {'multiple', 'max_aspect'})}; it "
                            "takes multiple and max_aspect")
    oversample = values.get("labeled_oversample")
    if isinstance(oversample, int) and oversample > 1 and (buckets is not None or values.get("cache")):
        problems.append("data.labeled_oversample > 1 works with square crops from images only; set data.buckets=null "
                        "and data.cache=null, or data.labeled_oversample=1")
    return problems


def require(problems: list[str]) -> None:
    """Raise the problems as one ValueError (what a constructor does with ``data_problems``)."""
    if problems:
        raise ValueError("; ".join(problems))
