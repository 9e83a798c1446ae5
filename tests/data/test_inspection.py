"""The data scanner on a deliberately messy folder: every reason code, no false positives, and the
exclusion list / filled captions as training reads them."""

from __future__ import annotations

import hashlib
import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from sd_lightning.data.cleaning import CleanedImageFolderSource, clean, read_caption_fills, training_overrides
from sd_lightning.data.datamodule import DiffusionDataModule, read_exclusions
from sd_lightning.data.inspection import scan_folder
from sd_lightning.data.report import (
    InspectionReport,
    InspectSettings,
    Reason,
    Severity,
    load_report,
    write_report,
)
from sd_lightning.data.sources import DataRootError, ImageFolderSource
from sd_lightning.models.tokenizer import load_tiny_tokenizer

from conftest import compose_train

SETTINGS = InspectSettings(resolution=32, max_pixels=1_000_000, max_aspect=4.0)
GOOD = ["cats/good_d.png", "good_a.png", "good_b.jpg", "good_c.png"]

# Paths opened while ``_OPENED_WATCH`` is on (an audit hook cannot be removed, so it is switched instead).
_OPENED: list[str] = []
_OPENED_WATCH = [False]


def _audit(event: str, args: tuple) -> None:
    if _OPENED_WATCH[0] and event == "open" and isinstance(args[0], (str, bytes, Path)):
        _OPENED.append(str(Path(args[0] if not isinstance(args[0], bytes) else args[0].decode()).resolve()))


sys.addaudithook(_audit)


def _field(seed: int, size: tuple[int, int]) -> np.ndarray:
    """A smooth random RGB picture: distinct seeds give unrelated perceptual hashes."""
    coarse = (np.random.default_rng(seed).random((6, 6, 3)) * 255).astype(np.uint8)
    return np.asarray(Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC))


def _save(path: Path, image: Image.Image, **kwargs) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)


def build_messy_folder(base: Path) -> tuple[Path, dict[str, set[str]]]:
    """A data root with one case of each problem; returns it and the expected reason codes per id."""
    root = base / "flowers"
    outside = base / "outside.png"
    _save(outside, Image.fromarray(_field(99, (8, 8))))  # would be too_small if it were ever read
    _save(root / "good_a.png", Image.fromarray(_field(1, (64, 48))))
    _save(root / "good_b.jpg", Image.fromarray(_field(2, (48, 64))), quality=95)
    _save(root / "good_c.png", Image.fromarray(_field(3, (40, 40))))
    _save(root / "cats" / "good_d.png", Image.fromarray(_field(4, (96, 64))))
    (root / "good_a_copy.png").write_bytes((root / "good_a.png").read_bytes())
    near = np.asarray(Image.open(root / "good_b.jpg")).astype(np.int16) + 6
    _save(root / "good_b_near.png", Image.fromarray(np.clip(near, 0, 255).astype(np.uint8)))
    jpeg = io.BytesIO()
    Image.fromarray(_field(5, (64, 64))).save(jpeg, "JPEG")
    (root / "broken.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    corrupt = bytearray((root / "good_c.png").read_bytes())
    corrupt[len(corrupt) // 2 : len(corrupt) // 2 + 64] = bytes(64)  # damaged compressed data, full length
    (root / "corrupt.png").write_bytes(bytes(corrupt))
    (root / "empty.png").write_bytes(b"")
    (root / "notes.png").write_text("these are my notes, not a picture\n")
    _save(root / "tiny.png", Image.fromarray(_field(6, (16, 16))))
    _save(root / "wide.png", Image.fromarray(_field(7, (320, 32))))
    _save(root / "cmyk.jpg", Image.fromarray(_field(8, (48, 48))).convert("CMYK"))
    _save(root / "palette.png", Image.fromarray(_field(9, (48, 48))).convert("P", palette=Image.Palette.ADAPTIVE))
    _save(root / "deep.png", Image.fromarray(_field(10, (48, 48))[..., 0].astype(np.uint16) * 257))
    _save(root / "alpha.png", Image.fromarray(_field(11, (48, 48))).convert("RGBA"))
    _save(root / "bomb.png", Image.new("L", (3000, 1000)))  # 3 M pixels: PIL's error above 2x the limit
    _save(root / "bomb_mild.png", Image.new("L", (1200, 1000)))  # 1.2 M: PIL's warning, made an error
    for name, seed in (("no_caption.png", 12), ("blank_caption.png", 13), ("latin1.png", 14),
                       ("long_caption.png", 15), ("unlisted.png", 16)):
        _save(root / name, Image.fromarray(_field(seed, (48, 48))))
    (root / "latin1.txt").write_bytes("un café au lait".encode("latin-1"))
    (root / "link.png").symlink_to(outside)
    rows = [{"file_name": name, "text": f"a picture called {name}"} for name in [
        *GOOD, "good_a_copy.png", "good_b_near.png", "broken.jpg", "corrupt.png", "empty.png", "notes.png",
        "tiny.png", "wide.png", "cmyk.jpg", "palette.png", "deep.png", "alpha.png", "bomb.png", "bomb_mild.png", "gone.png",
        "../outside.png", str(outside), "link.png"]]
    rows += [{"file_name": "no_caption.png"}, {"file_name": "blank_caption.png", "text": ""},
             {"file_name": "latin1.png", "text": "  "},
             {"file_name": "long_caption.png", "text": " ".join(["flower petal"] * 100)}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    expected = {
        "good_a_copy.png": {"exact_duplicate"}, "good_b_near.png": {"near_duplicate"}, "broken.jpg": {"truncated"},
        "corrupt.png": {"unreadable"},
        "empty.png": {"zero_byte"}, "notes.png": {"not_an_image"}, "tiny.png": {"too_small"},
        "wide.png": {"extreme_aspect"}, "cmyk.jpg": {"unusual_mode"}, "palette.png": {"unusual_mode"},
        "deep.png": {"unusual_mode"}, "alpha.png": {"unusual_mode"}, "bomb.png": {"decompression_bomb"},
        "bomb_mild.png": {"decompression_bomb"}, "gone.png": {"metadata_missing_file"},
        "../outside.png": {"path_escapes_root"}, str(outside): {"path_escapes_root"}, "link.png": {"path_escapes_root"},
        "no_caption.png": {"missing_caption"}, "blank_caption.png": {"empty_caption"},
        "latin1.png": {"non_utf8_caption"}, "long_caption.png": {"caption_too_long"},
        "unlisted.png": {"no_metadata_row"},
    }
    return root, expected


def tree_digest(root: Path) -> dict[str, str]:
    """sha256 of every entry under root (symlinks by their target) — to prove nothing was modified."""
    return {p.relative_to(root).as_posix(): (f"-> {p.readlink()}" if p.is_symlink()
                                             else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


@pytest.fixture(scope="module")
def tokenizer():
    return load_tiny_tokenizer()


@pytest.fixture(scope="module")
def messy(tmp_path_factory, tokenizer) -> tuple[Path, dict[str, set[str]], InspectionReport, dict[str, str]]:
    root, expected = build_messy_folder(tmp_path_factory.mktemp("messy"))
    before = tree_digest(root)
    _OPENED.clear()
    _OPENED_WATCH[0] = True
    try:
        report = scan_folder(root, SETTINGS, tokenizer)
    finally:
        _OPENED_WATCH[0] = False
    return root, expected, report, before


def test_every_reason_code_is_found_for_its_file_and_nowhere_else(messy):
    _, expected, report, _ = messy
    found: dict[str, set[str]] = {}
    for problem in report.problems:
        found.setdefault(problem.file, set()).add(problem.reason.value)
    assert found == expected
    assert {code for codes in expected.values() for code in codes} == {reason.value for reason in Reason}
    assert not any(name in found for name in GOOD)
    details = {(p.file, p.reason): p.detail for p in report.problems}
    assert "good_a.png" in details["good_a_copy.png", Reason.EXACT_DUPLICATE]
    assert "good_b.jpg" in details["good_b_near.png", Reason.NEAR_DUPLICATE]
    assert "I;16" in details["deep.png", Reason.UNUSUAL_MODE] and "clips" in details["deep.png", Reason.UNUSUAL_MODE]
    assert "CMYK" in details["cmyk.jpg", Reason.UNUSUAL_MODE]
    assert "alpha" in details["alpha.png", Reason.UNUSUAL_MODE]
    # Captions as training reads them, token counts from the project's tokenizer.
    records = {r.id: r for r in report.files}
    assert records["cats/good_d.png"].caption == "a picture called cats/good_d.png"
    assert records["long_caption.png"].caption_tokens > report.token_limit == 77
    assert report.caption_tokens["over_limit"] == 1
    assert records["unlisted.png"].in_training is False and records["unlisted.png"].width == 48


def test_severity_and_exclusions(messy):
    _, expected, report, _ = messy
    severities = {p.reason: p.severity for p in report.problems}
    assert {r for r, s in severities.items() if s is Severity.WARNING} == {
        Reason.UNUSUAL_MODE, Reason.NEAR_DUPLICATE, Reason.MISSING_CAPTION, Reason.EMPTY_CAPTION,
        Reason.NON_UTF8_CAPTION, Reason.CAPTION_TOO_LONG, Reason.NO_METADATA_ROW}
    errors = {name for name, codes in expected.items() if any(severities[Reason(c)] is Severity.ERROR for c in codes)}
    assert set(report.excluded()) == errors
    assert len(errors) == 13


def test_escaping_paths_are_never_opened_and_nothing_is_modified(messy):
    root, _, report, before = messy
    outside = str((root.parent / "outside.png").resolve())
    assert _OPENED, "the audit hook saw no file opens"
    assert outside not in _OPENED
    assert all(r.id not in ("../outside.png", "link.png", outside) for r in report.files)
    assert tree_digest(root) == before


def test_decompression_limit_is_restored(messy, tokenizer):
    root, _, _, _ = messy
    limit = Image.MAX_IMAGE_PIXELS
    report = scan_folder(root, InspectSettings(resolution=32, max_pixels=10_000_000), tokenizer)
    assert limit == Image.MAX_IMAGE_PIXELS
    assert not any(p.reason is Reason.DECOMPRESSION_BOMB for p in report.problems)
    # With a higher severity setting a warning becomes an error (and is excluded).
    strict = scan_folder(root, InspectSettings(resolution=32, max_pixels=1_000_000,
                                               severity={"near_duplicate": "error"}), tokenizer)
    assert "good_b_near.png" in strict.excluded()


def test_clean_outputs_drive_training_on_the_rest(messy, tmp_path):
    root, expected, report, before = messy
    paths = write_report(report, tmp_path / "report")
    assert json.loads(paths["json"].read_text())["excluded"] == sorted(report.excluded())
    assert "| `broken.jpg` | truncated | error |" in paths["markdown"].read_text()
    assert paths["histograms"].stat().st_size > 1000
    result = clean(load_report(paths["json"]), tmp_path / "clean", fill_captions="template")
    excluded = read_exclusions(result.exclude_file)
    assert set(excluded) == set(report.excluded())
    fills = read_caption_fills(result.fills_file)
    assert fills == {name: "a photo of flowers" for name in ("no_caption.png", "blank_caption.png", "latin1.png")}
    kept = sorted(set(report.training_ids) - set(excluded))

    # The plain source refuses a metadata row escaping the root; with exclude.txt (which lists those rows) the
    # source drops them before any path check, whether it reads the file itself or gets the ids.
    with pytest.raises(DataRootError, match="escapes the data root"):
        ImageFolderSource(root)
    escaping = [name for name, codes in expected.items() if codes == {"path_escapes_root"}]
    for source, exclude in ((ImageFolderSource(root, exclude=escaping), str(result.exclude_file)),
                            (ImageFolderSource(root, exclude_file=result.exclude_file), str(result.exclude_file)),
                            (CleanedImageFolderSource(root, exclude_file=result.exclude_file,
                                                      caption_fills=result.fills_file), None)):
        datamodule = DiffusionDataModule(source, resolution=32, val_fraction=0.0, batch_size=len(kept),
                                         exclude=exclude)
        datamodule.setup("fit")
        ids = [source.items[i].id for i in datamodule.train_dataset.indices]
        assert sorted(ids) == kept
        batch = next(iter(datamodule.train_dataloader()))
        assert batch["num_skipped"] == 0 and tuple(batch["pixel_values"].shape) == (len(kept), 3, 32, 32)
    captions = {item.id: item.caption for item in source.items}
    assert captions["no_caption.png"] == "a photo of flowers" and captions["good_a.png"] == "a picture called good_a.png"
    assert tree_digest(root) == before


def test_training_config_takes_the_printed_overrides(messy, tmp_path):
    """The overrides `sdl-data clean` prints work as printed, with and without caption fills (the folder has
    metadata rows escaping the root, which data.exclude alone must make usable)."""
    _, _, report, _ = messy
    for fill, caption in (("class_name", "flowers"), ("none", None)):
        result = clean(report, tmp_path / f"clean_{fill}", fill_captions=fill)
        overrides = training_overrides(result, report)
        assert overrides[:2] == [f"data.root={report.root}", f"data.exclude={result.exclude_file.resolve()}"]
        cfg = compose_train(tmp_path / "run", ["data=imagefolder", "data.val_fraction=0.0", *overrides])
        datamodule = instantiate(cfg.data)
        datamodule.setup("fit")
        assert len(datamodule.train_dataset) == len(report.training_ids) - len(report.excluded())
        assert {item.id: item.caption for item in datamodule.source.items}["latin1.png"] == caption


def test_folder_mode_mirrors_the_source(tmp_path, tokenizer):
    """Without metadata: class folders caption, sidecars caption, symlinks are not items."""
    root = tmp_path / "pets"
    _save(root / "dogs" / "a.png", Image.fromarray(_field(20, (40, 40))))
    _save(root / "b.png", Image.fromarray(_field(21, (40, 40))))
    (root / "b.txt").write_text("a sidecar caption")
    _save(root / "c.png", Image.fromarray(_field(22, (40, 40))))
    (root / "d.png").symlink_to(root / "c.png")
    report = scan_folder(root, InspectSettings(caption_template="a photo of {class_name}"), tokenizer)
    source = ImageFolderSource(root, caption_template="a photo of {class_name}")
    assert report.training_ids == [item.id for item in source.items]
    assert {r.id: r.caption for r in report.files} == {item.id: item.caption for item in source.items}
    assert [(p.file, p.reason) for p in report.problems] == [("c.png", Reason.MISSING_CAPTION)]
    assert report.counts["symlinks"] == 1


def test_metadata_csv_rows_and_conditioning_without_captions(tmp_path, tokenizer):
    root = tmp_path / "csv"
    _save(root / "x.png", Image.fromarray(_field(30, (40, 40))))
    _save(root / "y.png", Image.fromarray(_field(31, (40, 40))))
    (root / "metadata.csv").write_text("file_name,text\nx.png,a red flower\ny.png,\nmissing.png,a ghost\n")
    report = scan_folder(root, SETTINGS, tokenizer)
    assert report.training_ids == [item.id for item in ImageFolderSource(root).items] == ["x.png", "y.png",
                                                                                          "missing.png"]
    assert {(p.file, p.reason) for p in report.problems} == {("y.png", Reason.EMPTY_CAPTION),
                                                              ("missing.png", Reason.METADATA_MISSING_FILE)}
    unconditional = scan_folder(root, InspectSettings(check_captions=False), tokenizer)
    assert {(p.file, p.reason) for p in unconditional.problems} == {("missing.png", Reason.METADATA_MISSING_FILE)}


def _png_bytes(seed: int) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(_field(seed, (24, 24))).save(buffer, format="PNG")
    return buffer.getvalue()


_FILE_BYTES = st.one_of(
    st.binary(max_size=300),  # random bytes
    st.builds(lambda seed, cut: _png_bytes(seed)[:cut], st.integers(0, 50), st.integers(0, 400)),  # truncated PNG
    st.builds(lambda seed, tail: _png_bytes(seed) + tail, st.integers(0, 50), st.binary(max_size=50)),  # junk appended
    st.builds(lambda head, seed: head + _png_bytes(seed)[len(head):], st.binary(max_size=16), st.integers(0, 50)),
)
_CAPTION = st.one_of(st.none(), st.text(max_size=120), st.binary(max_size=60))


@settings(max_examples=25, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(files=st.lists(st.tuples(st.sampled_from([".png", ".jpg", ".webp"]), _FILE_BYTES, _CAPTION), min_size=1,
                      max_size=6))
def test_fuzzed_image_bytes_and_captions_never_crash_inspection_or_training_data(tmp_path_factory, tokenizer, files):
    """Random bytes as images and random (even non-UTF-8) captions: the scan reports, the loader skips, no crash."""
    root = tmp_path_factory.mktemp("fuzz")
    for index, (extension, data, caption) in enumerate(files):
        (root / f"f{index}{extension}").write_bytes(data)
        if caption is not None:
            sidecar = root / f"f{index}.txt"
            sidecar.write_bytes(caption if isinstance(caption, bytes) else caption.encode("utf-8", "surrogatepass"))
    before = tree_digest(root)
    report = scan_folder(root, SETTINGS, tokenizer)
    assert sorted(report.training_ids) == sorted(f"f{i}{e}" for i, (e, _, _) in enumerate(files))
    write_report(report, tmp_path_factory.mktemp("fuzz_report"))
    datamodule = DiffusionDataModule(ImageFolderSource(root), resolution=16, val_fraction=0.0, batch_size=4)
    datamodule.setup("fit")
    seen = skipped = 0
    for batch in datamodule.train_dataloader():
        seen += batch["pixel_values"].shape[0]
        skipped += batch["num_skipped"]
        assert torch.isfinite(batch["pixel_values"]).all()
    batch_size = min(4, len(files))  # the loader shrinks the batch to a data set smaller than it
    assert seen + skipped == batch_size * (len(files) // batch_size)  # drop_last: full batches, each item used or skipped
    assert tree_digest(root) == before


def test_a_process_pool_writes_the_same_report_as_one_process(tmp_path, tokenizer, monkeypatch):
    import sd_lightning.data.inspection as inspection

    root, _ = build_messy_folder(tmp_path)
    for i in range(inspection.PARALLEL_MIN_FILES):  # enough files for the pool (unlisted: scanned, not trained)
        _save(root / "many" / f"{i:03d}.png", Image.fromarray(_field(100 + i // 2 * 2, (40, 40))))
    pools = []
    real_pool = inspection.ProcessPoolExecutor
    monkeypatch.setattr(inspection, "ProcessPoolExecutor", lambda **kw: pools.append(kw) or real_pool(**kw))
    serial = scan_folder(root, SETTINGS, tokenizer, workers=1).to_dict()
    assert not pools
    parallel = scan_folder(root, SETTINGS, tokenizer, workers=2).to_dict()
    assert [kw["max_workers"] for kw in pools] == [2]  # the pool really ran
    serial.pop("created"), parallel.pop("created")
    assert parallel == serial
    assert serial["problem_counts"]["no_metadata_row"]["count"] >= inspection.PARALLEL_MIN_FILES  # decoded too


@pytest.mark.parametrize("cells", [1 << 22, 7])  # one block; blocks of one row, crossing block edges
def test_near_duplicates_are_each_images_first_close_earlier_image(monkeypatch, cells):
    """The block-wise search finds what comparing each image with every earlier one finds."""
    from sd_lightning.data import inspection
    from sd_lightning.data.report import FileRecord

    monkeypatch.setattr(inspection, "NEAR_DUPLICATE_CELLS", cells)
    rng = np.random.default_rng(0)
    bases = rng.integers(0, 2**63, 40, dtype=np.uint64)
    hashes = [int(bases[i % 40]) ^ (1 << int(rng.integers(0, 64))) * int(rng.integers(0, 2)) for i in range(300)]
    records = [FileRecord(id=f"{i:04d}", in_training=True, bytes=1, sha256=str(i), phash=f"{h:016x}")
               for i, h in enumerate(hashes)]
    expected = []
    for j in range(1, len(hashes)):
        close = [(i, bin(hashes[i] ^ hashes[j]).count("1")) for i in range(j) if bin(hashes[i] ^ hashes[j]).count("1") <= 4]
        if close:
            expected.append((j, *close[0]))
    found = [(int(a.id), int(b.id), d) for a, b, d in inspection._near_duplicates(records, 4)]
    assert found == expected and len(found) > 200  # every repeat of a base is found, against its first copy
