"""The default logger: W&B offline (no account, no network), contained in the run folder, id kept on resume;
a sweep's offline runs decoded record by record (group, config columns, metrics, sample grids)."""

import json
import math
import os
import subprocess
import sys
import zlib
from pathlib import Path

import pytest
import torch
import wandb_records as wr
from omegaconf import OmegaConf
from PIL import Image
from wandb.proto.wandb_internal_pb2 import ConfigItem, ConfigRecord, Record

from sd_lightning.cli.train import train

from conftest import compose_train


@pytest.mark.slow
def test_wandb_offline_run_is_local_and_resume_keeps_its_id(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    common = ["logger=wandb", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.sample_grid",
              "data.source.limit=48", "data.batch_size=8", "model.components.denoiser.block_out_channels=[16,32]",
              "trainer.log_every_n_steps=1"]
    train(compose_train(run_dir, [*common, "trainer.max_steps=3"]))
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    offline = list((run_dir / "wandb").glob("offline-run-*"))
    assert len(offline) == 1 and offline[0].name.endswith(run_id)
    assert (run_dir / "csv" / "metrics.csv").is_file()
    train(compose_train(run_dir, [*common, "trainer.max_steps=5", "resume=auto"]))
    offline = sorted((run_dir / "wandb").glob("offline-run-*"))
    assert offline and all(p.name.endswith(run_id) for p in offline)  # same id (a same-second rerun shares a folder)
    assert (run_dir / "wandb" / "run_id").read_text().strip() == run_id
    assert torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=True)["global_step"] == 5
    assert os.environ.get("WANDB_DIR", "").startswith(str(run_dir))


@pytest.mark.slow
def test_wandb_gets_sample_grids_and_a_table_of_fixed_prompt_samples(tmp_path, offline_wandb):
    run_dir = tmp_path / "run"
    train(compose_train(run_dir, ["logger=wandb", "trainer.enable_progress_bar=false", "~callbacks.progress",
                                  "~callbacks.stability", "data.source.limit=48", "data.batch_size=8",
                                  "model.components.vae_path=null", "trainer.max_steps=5",
                                  "trainer.check_val_every_n_epoch=1", "sampling.steps=2",
                                  "callbacks.sample_grid.num_per_prompt=1"]))
    run_id = (run_dir / "wandb" / "run_id").read_text().strip()
    (run_folder,) = (run_dir / "wandb").glob(f"offline-run-*-{run_id}")
    record = (run_folder / f"run-{run_id}.wandb").read_bytes()
    assert b"val/sample_table" in record and b"val/samples" in record
    tables = list((run_folder / "files" / "media" / "table" / "val").glob("sample_table_*.table.json"))
    assert tables
    table = json.loads(tables[-1].read_text())
    assert table["columns"] == ["step", "prompt", "seed_index", "image"]
    assert len(table["data"]) == 11  # ten digit prompts and the unconditional one, one sample each
    assert {row[1] for row in table["data"]} >= {"a handwritten digit seven", "(unconditional)"}


def _write_log(payloads: list[bytes]) -> bytes:
    """The writer side of wandb_records' format, to check the reader on records that span blocks."""
    out = bytearray(wr.FILE_HEADER.pack(wr.IDENT, wr.MAGIC, wr.VERSION))
    for payload in payloads:
        first = True
        while first or payload:
            left = wr.BLOCK_SIZE - len(out) % wr.BLOCK_SIZE
            if left < wr.CHUNK_HEADER.size:
                out += bytes(left)
                continue
            chunk, payload = payload[:left - wr.CHUNK_HEADER.size], payload[left - wr.CHUNK_HEADER.size:]
            kind = (wr.FIRST if payload else wr.FULL) if first else (wr.MIDDLE if payload else wr.LAST)
            crc = zlib.crc32(chunk, zlib.crc32(bytes([kind])))
            out += wr.CHUNK_HEADER.pack(crc, len(chunk), kind) + chunk
            first = False
    return bytes(out)


def test_record_reader_reassembles_blocks_and_rejects_damage(tmp_path):
    big = Record(config=ConfigRecord(update=[ConfigItem(key="prompt", value_json=json.dumps("x" * 70_000))]))
    # 32751 bytes end 3 bytes before the first block's end, so the next record starts after a zero trailer.
    records = [Record(uuid="a" * 32746), big, Record(), Record(num=4)]
    payloads = [record.SerializeToString() for record in records]
    assert len(payloads[0]) == 32751
    path = tmp_path / "run.wandb"
    path.write_bytes(_write_log(payloads))
    assert wr.read_payloads(path) == payloads
    assert wr.read_records(path) == records

    data = bytearray(path.read_bytes())
    data[40_000] ^= 1  # one bit of the big record (its FIRST chunk, in the second block)
    path.write_bytes(data)
    with pytest.raises(wr.WandbFileError, match="checksum mismatch"):
        wr.read_payloads(path)
    path.write_bytes(b":W&B\xe1\xbe\x01" + bytes(data[7:]))  # version 1
    with pytest.raises(wr.WandbFileError, match="bad file header"):
        wr.read_payloads(path)
    path.write_bytes(_write_log(payloads)[:-2])
    with pytest.raises(wr.WandbFileError, match="overruns"):
        wr.read_payloads(path)


WANDB_FOLDERS = ("WANDB_DIR", "WANDB_CACHE_DIR", "WANDB_CONFIG_DIR", "WANDB_DATA_DIR")
SWEEP_TINY = ["logger=wandb", "trainer.enable_progress_bar=false", "~callbacks.progress", "~callbacks.stability",
              "data.source.limit=48", "data.batch_size=8", "model.components.denoiser.block_out_channels=[16,32]",
              "trainer.max_steps=3", "trainer.val_check_interval=3", "trainer.check_val_every_n_epoch=null",
              "trainer.log_every_n_steps=1", "sampling.steps=2", "callbacks.sample_grid.num_per_prompt=1"]
WEIGHTING_CLASSES = {"uniform": "UniformWeighting", "min_snr": "MinSnrWeighting"}


def _slot(tree: dict, item) -> tuple[dict, str]:
    """The dict and key that ``item``'s key, or its nested key (a path: ["val/samples", "_type"]), names."""
    *parents, leaf = [item.key] if item.key else list(item.nested_key)
    for parent in parents:
        tree = tree.setdefault(parent, {})
    return tree, leaf


def _effective_config(records: list) -> dict:
    """The run config as W&B ends up with it: the run record's config, then every config update in order."""
    config: dict = {}
    updates = [r.run.config for r in records if r.WhichOneof("record_type") == "run"]
    updates += [r.config for r in records if r.WhichOneof("record_type") == "config"]
    for update in updates:
        for item in update.update:
            node, key = _slot(config, item)
            node[key] = json.loads(item.value_json)
        for item in update.remove:
            node, key = _slot(config, item)
            node.pop(key, None)
    return config


def _history(records: list) -> list[dict]:
    """One dict per history record (a logged step): key -> value, nested values as dicts."""
    rows = []
    for record in records:
        if record.WhichOneof("record_type") == "history":
            row: dict = {}
            for item in record.history.item:
                node, key = _slot(row, item)
                node[key] = json.loads(item.value_json)
            rows.append(row)
    return rows


@pytest.mark.slow
def test_a_2x2_sweep_logs_offline_runs_grouped_with_swept_config_metrics_and_grids(tmp_path):
    """Decodes each job's .wandb file: what `wandb sync` would upload, not whether a file exists."""
    env = {k: v for k, v in os.environ.items() if k not in WANDB_FOLDERS} | {"WANDB_MODE": "offline"}
    result = subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.train", "-m", f"paths.output_root={tmp_path}", *SWEEP_TINY,
         "optimizer.lr=1e-3,2e-3", "weighting=uniform,min_snr"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    (sweep_dir,) = (tmp_path / "multirun" / "default").iterdir()  # the default hydra.sweep.dir
    jobs = sorted(p for p in sweep_dir.iterdir() if p.is_dir() and p.name.isdigit())
    assert len(jobs) == 4

    groups, names, grid = set(), set(), set()
    for job in jobs:
        overrides = OmegaConf.load(job / ".hydra" / "overrides.yaml")  # what this job ran
        swept = dict(o.split("=", 1) for o in overrides if o.startswith(("optimizer.lr=", "weighting=")))
        lr, weighting = float(swept["optimizer.lr"]), swept["weighting"]
        grid.add((lr, weighting))
        (run_file,) = job.glob("wandb/offline-run-*/run-*.wandb")
        records = wr.read_records(run_file)
        kinds = [r.WhichOneof("record_type") for r in records]
        assert kinds[0] == "header" and kinds.count("run") == 1, kinds

        (run,) = (r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_id == (job / "wandb" / "run_id").read_text().strip() and run.project == "sd_lightning"
        groups.add(run.run_group)
        names.add(run.display_name)
        assert all(f"{key}={value}" in run.display_name for key, value in swept.items()), run.display_name
        assert {"sweep", run.run_group} <= set(run.tags)

        # The swept keys are config columns (nested dicts: W&B shows optimizer.lr) holding this job's values.
        config = _effective_config(records)
        assert config["optimizer"]["lr"] == pytest.approx(lr)
        # Structured, not a repr string: sub-keys (weighting.gamma) are columns of their own too.
        assert isinstance(config["weighting"], dict), config["weighting"]
        shown = json.dumps(config["weighting"])
        assert WEIGHTING_CLASSES[weighting] in shown
        assert all(cls not in shown for key, cls in WEIGHTING_CLASSES.items() if key != weighting), shown
        assert weighting != "min_snr" or config["weighting"]["gamma"] == pytest.approx(5.0)

        history = _history(records)
        losses = [row["train/loss"] for row in history if "train/loss" in row]
        assert len(losses) == 3 and all(isinstance(v, float) and math.isfinite(v) for v in losses)
        assert any(isinstance(row.get("val/mse"), float) for row in history)
        (samples,) = [row["val/samples"] for row in history if "val/samples" in row]
        assert samples["_type"] in {"images/separated", "image-file"} and samples["format"] == "png", samples
        uploads = {f.path for r in records if r.WhichOneof("record_type") == "files" for f in r.files.files}
        for name in samples["filenames"]:  # the grid PNG, in the run's files/ and listed for upload
            assert name in uploads, uploads
            with Image.open(run_file.parent / "files" / name) as image:
                assert image.size == (samples["width"], samples["height"])
        # Artifacts (the manifest, the sample table's images) upload from staged copies: this job's, in its folder.
        staged = [Path(e.local_path) for r in records if r.WhichOneof("record_type") == "artifact"
                  for e in r.artifact.manifest.contents]
        assert staged and all(p.is_file() and p.is_relative_to(job) for p in staged), staged
        (exit_record,) = (r.exit for r in records if r.WhichOneof("record_type") == "exit")
        assert exit_record.exit_code == 0

    assert groups == {f"default-{sweep_dir.name}"}  # one group per sweep, named by the sweep folder
    assert len(names) == 4
    assert grid == {(1e-3, "uniform"), (1e-3, "min_snr"), (2e-3, "uniform"), (2e-3, "min_snr")}
