"""sdl-data: subcommand dispatch, clear errors, and inspect/clean writing only into their own output folder."""

from __future__ import annotations

import hashlib
import io
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from sd_lightning.cli import data as data_cli
from sd_lightning.data.datamodule import read_exclusions


def _picture(path: Path, seed: int, size=(48, 40)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    coarse = (np.random.default_rng(seed).random((5, 5, 3)) * 255).astype(np.uint8)
    Image.fromarray(coarse).resize(size, Image.Resampling.BICUBIC).save(path)


def _pets(base: Path) -> Path:
    """A folder without metadata: a class folder, a sidecar caption, an unlabeled image and broken files."""
    root = base / "pets"
    _picture(root / "cats" / "a.png", 1)
    _picture(root / "b.png", 2)
    (root / "b.txt").write_text("a dog on a sofa")
    _picture(root / "c.png", 3)
    jpeg = io.BytesIO()
    Image.open(root / "b.png").convert("RGB").save(jpeg, "JPEG")
    (root / "broken.jpg").write_bytes(jpeg.getvalue()[: len(jpeg.getvalue()) // 2])
    (root / "zero.png").write_bytes(b"")
    _picture(base / "secret.png", 4)
    (root / "link.png").symlink_to(base / "secret.png")
    return root


def _digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): (f"-> {p.readlink()}" if p.is_symlink()
                                             else hashlib.sha256(p.read_bytes()).hexdigest())
            for p in sorted(root.rglob("*")) if p.is_file() or p.is_symlink()}


def _run_main(monkeypatch, *argv: str) -> int:
    monkeypatch.setattr(sys, "argv", ["sdl-data", *argv])
    with pytest.raises(SystemExit) as exit_info:
        data_cli.main()
    return exit_info.value.code


@pytest.mark.parametrize("argv", [("cache-everything",), ()])
def test_unknown_or_missing_subcommand_lists_the_valid_ones(monkeypatch, capsys, argv):
    assert _run_main(monkeypatch, *argv) == 2
    err = capsys.readouterr().err
    assert "valid subcommands: inspect, clean, cache, shard" in err
    assert ("unknown subcommand 'cache-everything'" if argv else "no subcommand given") in err


def test_missing_data_root_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert _run_main(monkeypatch, "inspect", "data=imagefolder") == 2
    err = capsys.readouterr().err
    assert "sdl-data inspect: missing required values: data.root (set data.root=...)" in err
    assert "Traceback" not in err


def test_output_folder_inside_the_data_root_is_refused(monkeypatch, capsys, tmp_path):
    root = _pets(tmp_path)
    before = _digest(root)
    monkeypatch.chdir(root)
    assert _run_main(monkeypatch, "inspect", "data=imagefolder", f"data.root={root}") == 2
    assert "inside data.root" in capsys.readouterr().err
    assert _digest(root) == before and not (root / "outputs").exists()


@pytest.mark.slow
def test_inspect_then_clean_write_reports_into_their_own_folders(tmp_path, monkeypatch):
    root = _pets(tmp_path)
    before = _digest(root)
    work = tmp_path / "work"
    work.mkdir()
    script = Path(sys.executable).with_name("sdl-data")
    command = [str(script)] if script.is_file() else [sys.executable, "-m", "sd_lightning.cli.data"]

    def run(*args: str) -> subprocess.CompletedProcess:
        result = subprocess.run([*command, *args, "data=imagefolder", f"data.root={root}"], capture_output=True,
                                text=True, cwd=work, timeout=300)
        assert result.returncode == 0, result.stderr
        return result

    result = run("inspect")
    [out] = list((work / "outputs" / "data" / "inspect").iterdir())
    assert {"data_report.json", "data_report.md", "data_report_sizes.png"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "data_report.json").read_text())
    problems = {(p["file"], p["reason"]) for p in report["problems"]}
    assert problems == {("broken.jpg", "truncated"), ("zero.png", "zero_byte"), ("c.png", "missing_caption"),
                        ("link.png", "path_escapes_root")}
    assert report["training_ids"] == ["b.png", "broken.jpg", "c.png", "cats/a.png", "zero.png"]
    assert "truncated" in result.stdout and "data_report.md" in result.stdout

    # clean in-process (the console script was exercised above; this saves a second interpreter start).
    monkeypatch.chdir(work)
    monkeypatch.setattr(sys, "argv", ["sdl-data", "clean", "data=imagefolder", f"data.root={root}",
                                      "clean.fill_captions=class_name"])
    data_cli.main()
    [cleaned] = list((work / "outputs" / "data" / "clean").iterdir())
    assert read_exclusions(cleaned / "exclude.txt") == ["broken.jpg", "zero.png"]
    fills = [json.loads(line) for line in (cleaned / "captions_fill.jsonl").read_text().splitlines()]
    assert fills == [{"file_name": "c.png", "text": "pets"}]
    assert "truncated" in (cleaned / "clean_summary.md").read_text()

    # From the saved report, without scanning again: the same exclusions.
    monkeypatch.setattr(sys, "argv", ["sdl-data", "clean", f"clean.report={out / 'data_report.json'}",
                                      "hydra.run.dir=from_report", "data=imagefolder"])
    data_cli.main()
    assert read_exclusions(work / "from_report" / "exclude.txt") == ["broken.jpg", "zero.png"]
    assert not (work / "from_report" / "data_report.json").exists()
    assert _digest(root) == before


def _compose(*overrides: str):
    from hydra import compose, initialize_config_dir

    from sd_lightning.cli.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("data_tool", overrides=["command=inspect", "data=imagefolder", "data.root=/some/folder",
                                               *overrides])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("inspect.severity.near_duplicate=fatal", "inspect.severity.near_duplicate='fatal' must be 'error' or 'warning'"),
        ("+inspect.severity.blurry=error", "inspect.severity.blurry is not a reason code"),
        ("clean.fill_captions=guess", "clean.fill_captions='guess' must be one of none, template, class_name"),
        ("inspect.max_aspect=0.5", "inspect.max_aspect=0.5 must be >= 1.0"),
        ("inspect.near_duplicate_distance=65", "inspect.near_duplicate_distance=65 must be <= 64"),
    ],
)
def test_bad_settings_are_named(override, message):
    with pytest.raises(data_cli.ConfigError) as err:
        data_cli._validate(_compose(override))
    assert message in str(err.value)


def test_settings_follow_the_data_config(tmp_path):
    from sd_lightning.models.tokenizer import TINY_TOKENIZER_DIR

    cfg = _compose("data.resolution=64", "data.caption_template='a photo of {class_name}'", "data.conditioning=none",
                   f"inspect.tokenizer={TINY_TOKENIZER_DIR}")
    data_cli._validate(cfg)
    settings = data_cli._settings(cfg)
    assert (settings.resolution, settings.caption_template, settings.check_captions) == (64, "a photo of {class_name}",
                                                                                         False)
    assert data_cli._tokenizer(cfg).model_max_length == 77
    with pytest.raises(data_cli.ConfigError, match="inspect.tokenizer=.* is not a tokenizer folder"):
        data_cli._tokenizer(_compose(f"inspect.tokenizer={tmp_path / 'nope'}"))


def test_shard_and_cache_subcommands_write_what_training_reads(tmp_path, monkeypatch):
    """`sdl-data shard` writes tar shards a data=shards source reads back; `sdl-data cache` a valid latent cache."""
    from sd_lightning.data.cache import LatentCache
    from sd_lightning.data.shards import WebDatasetSource

    root = _pets(tmp_path)
    before = _digest(root)
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "argv", ["sdl-data", "shard", "data=imagefolder", f"data.root={root}",
                                      f"shard.out={tmp_path / 'shards'}", "shard.size=2"])
    data_cli.main()
    shards = WebDatasetSource(tmp_path / "shards", prefix="data")
    assert {item.id for item in shards.items} == {"cats/a.png", "b.png", "c.png"}  # unreadable files skipped
    assert _digest(root) == before

    cache = tmp_path / "cache"
    monkeypatch.setattr(sys, "argv", ["sdl-data", "cache", "data=digits", "data.source.limit=24",
                                      f"data.cache={cache}", "model.components.vae_path=null", "logger=csv",
                                      f"paths.run_dir={tmp_path / 'run'}"])
    data_cli.main()
    assert (cache / "index.json").is_file()
    assert len(LatentCache(cache).rows) == 24
