"""A captioned synthetic set with independent attributes, and a measure of each attribute that does not use a model.

Every image is one filled shape on a grey, lightly noisy background: colour x shape x position, captioned "a red
circle at the top left". ``attributes_of`` reads the three attributes back from pixels alone: colour from the mean
of the pixels far from the background, position from their centroid's quadrant, shape from the template (square,
circle, triangle drawn in their bounding box) that overlaps them best. ``check_measures`` reports how often the
measure reads the set's own images right: the ceiling any model's score is read against.
"""

from __future__ import annotations

import itertools
import json
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

COLOURS = {"red": (215, 35, 35), "green": (35, 185, 60), "blue": (40, 70, 225), "yellow": (230, 210, 40)}
SHAPES = ("square", "circle", "triangle")
POSITIONS = ("top left", "top right", "bottom left", "bottom right")
BACKGROUND = 128
ATTRIBUTES = ("colour", "shape", "position")
# Held out of training: every colour, shape and position still appears in the training set, in other combinations.
HELD_OUT = (("red", "circle", "top left"), ("green", "square", "bottom right"), ("blue", "triangle", "top right"),
            ("yellow", "circle", "bottom left"), ("red", "triangle", "bottom right"), ("green", "circle", "top right"))


def caption(colour: str, shape: str, position: str) -> str:
    return f"a {colour} {shape} at the {position}"


def combinations(held_out: bool) -> list[tuple[str, str, str]]:
    every = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    return [c for c in every if (c in HELD_OUT) == held_out]


def outline(shape: str, box: tuple[float, float, float, float], size: int) -> np.ndarray:
    """The boolean mask of ``shape`` filling ``box`` (x0, y0, x1, y1, inclusive) on a ``size`` x ``size`` grid: how
    ``draw`` paints it, and the template ``attributes_of`` compares a sample's pixels with."""
    image = Image.new("L", (size, size), 0)
    pen = ImageDraw.Draw(image)
    x0, y0, x1, y1 = box
    if shape == "square":
        pen.rectangle(box, fill=255)
    elif shape == "circle":
        pen.ellipse(box, fill=255)
    else:
        pen.polygon([(x0, y1), (x1, y1), ((x0 + x1) / 2, y0)], fill=255)
    return np.asarray(image) > 0


def draw(colour: str, shape: str, position: str, size: int, rng: np.random.Generator) -> Image.Image:
    """One image: the shape (a third to a half of the side) inside its quadrant, jittered."""
    pixels = rng.normal(BACKGROUND, 6, (size, size, 3)).clip(0, 255).astype(np.uint8)
    side = int(rng.integers(size // 3, size // 2 + 1))
    half = size // 2
    top, left = ("bottom" in position) * half, ("right" in position) * half
    x = left + int(rng.integers(0, max(1, half - side + 1)))
    y = top + int(rng.integers(0, max(1, half - side + 1)))
    mask = outline(shape, (x, y, x + side - 1, y + side - 1), size)
    pixels[mask] = COLOURS[colour]
    return Image.fromarray(pixels)


def write_set(root: Path, count: int, size: int = 32, seed: int = 0) -> dict[str, int]:
    """``count`` images of the training combinations (cycled, shuffled) with metadata.jsonl captions."""
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True, exist_ok=False)
    train = combinations(held_out=False)
    rows = []
    for index in range(count):
        colour, shape, position = train[index % len(train)]
        draw(colour, shape, position, size, rng).save(root / f"{index:05d}.png")
        rows.append({"file_name": f"{index:05d}.png", "text": caption(colour, shape, position)})
    order = rng.permutation(len(rows))
    (root / "metadata.jsonl").write_text("".join(json.dumps(rows[i]) + "\n" for i in order))
    return {"images": count, "combinations": len(train), "held_out": len(HELD_OUT)}


def attributes_of(image: np.ndarray | Image.Image) -> dict[str, str | None]:
    """(colour, shape, position) read from pixels; None where no shape stands out from the background."""
    pixels = np.asarray(image, dtype=np.float64)[..., :3]
    distance = np.abs(pixels - BACKGROUND).max(axis=-1)
    mask = distance > 45
    if mask.sum() < 4:
        return dict.fromkeys(ATTRIBUTES)
    mean = pixels[mask].mean(axis=0)
    colour = min(COLOURS, key=lambda c: float(np.sum((np.array(COLOURS[c]) - mean) ** 2)))
    ys, xs = np.nonzero(mask)
    size = pixels.shape[0]
    position = f"{'top' if ys.mean() < size / 2 else 'bottom'} {'left' if xs.mean() < size / 2 else 'right'}"
    box = (int(xs.min()), int(ys.min()), int(xs.max()), int(ys.max()))
    shape = max(SHAPES, key=lambda s: _overlap(mask, outline(s, box, size)))
    return {"colour": colour, "shape": shape, "position": position}


def _overlap(mask: np.ndarray, template: np.ndarray) -> float:
    """Intersection over union of two boolean masks."""
    return float((mask & template).sum() / max(1, (mask | template).sum()))


def faithfulness(images: Iterable[np.ndarray | Image.Image], intended: tuple[str, str, str]) -> dict[str, float]:
    """Share of images whose measured colour, shape, position (and all three) match the caption's."""
    reads = [attributes_of(image) for image in images]
    want = dict(zip(ATTRIBUTES, intended))
    scores = {a: float(np.mean([r[a] == want[a] for r in reads])) for a in ATTRIBUTES}
    scores["all"] = float(np.mean([all(r[a] == want[a] for a in ATTRIBUTES) for r in reads]))
    return scores


def check_measures(per_combination: int = 20, size: int = 32, seed: int = 1) -> dict[str, float]:
    """The measure on freshly drawn images of every combination: its ceiling (1.0 would be a perfect reader)."""
    rng = np.random.default_rng(seed)
    every = list(itertools.product(COLOURS, SHAPES, POSITIONS))
    scores = [faithfulness([draw(*c, size, rng) for _ in range(per_combination)], c) for c in every]
    return {key: float(np.mean([s[key] for s in scores])) for key in (*ATTRIBUTES, "all")}


if __name__ == "__main__":
    print(json.dumps(check_measures(), indent=2))
