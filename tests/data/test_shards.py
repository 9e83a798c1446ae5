"""WebDataset shards: writer, exact coverage across ranks x workers, deterministic shuffle, resume, safety."""

import hashlib
import io
import json
import math
import pathlib
import pickle
import tarfile
from collections import Counter
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch
from omegaconf import OmegaConf
from PIL import Image

from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.shards import (
    ShardDataModule,
    ShardFormatError,
    WebDatasetSource,
    decode_key,
    encode_key,
    shard_main,
    write_shards,
)
from sd_lightning.data.sources import DataRootError, DigitsSource, ImageFolderSource

from conftest import FAST, compose_train


def make_folder(root: Path, per_class: int = 24, classes=("cats", "dogs")) -> Path:
    rng = np.random.default_rng(0)
    for name in classes:
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 255, (20, 24, 3), dtype=np.uint8)).save(root / name / f"im.{i}.png")
    return root


def folder_digest(root: Path) -> dict[str, str]:
    return {p.relative_to(root).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def module(shards: Path, **kwargs) -> ShardDataModule:
    kwargs = {"batch_size": 4, "val_fraction": 0.0, "shuffle_buffer": 8, **kwargs}
    dm = ShardDataModule(WebDatasetSource(shards), **kwargs)
    dm.setup()
    return dm


def epoch_ids(dm: ShardDataModule, epoch: int, world_size: int) -> list[list[str]]:
    """Ids per rank, in loader order, for one epoch."""
    dm.set_epoch(epoch)
    per_rank = []
    for rank in range(world_size):
        loader = dm.train_dataloader(rank=rank, world_size=world_size)
        batches = list(loader)
        assert len(batches) == len(loader)
        per_rank.append([i for batch in batches for i in batch["id"]])
    return per_rank


def test_write_then_read_back_every_sample_once_with_captions(tmp_path):
    root = make_folder(tmp_path / "src", per_class=6)
    (root / "cats" / "im.0.txt").write_text("a sidecar caption, ünïcode\n", encoding="utf-8")
    Image.new("RGB", (16, 16), (0, 90, 0)).save(root / "loose.jpg", quality=80)
    Image.new("RGB", (16, 16), (9, 9, 9)).save(root / "old.bmp")
    (root / "broken.png").write_bytes(b"not an image")
    before = folder_digest(root)
    source = ImageFolderSource(root, caption_template="a photo of {class_name}")

    index = write_shards(source, tmp_path / "shards", shard_size=5)

    assert folder_digest(root) == before  # the source folder is only read
    files = sorted(p.name for p in (tmp_path / "shards").iterdir())
    assert files == [f"data-{i:06d}.tar" for i in range(3)] + ["data-index.json"]  # no temp files left
    assert [s["count"] for s in index["shards"]] == [5, 5, 4] and index["num_samples"] == 14
    assert [s["id"] for s in index["skipped"]] == ["broken.png"]
    assert json.loads((tmp_path / "shards" / "data-index.json").read_text()) == index
    with tarfile.open(tmp_path / "shards" / "data-000002.tar") as tar:  # jpg bytes kept as-is, bmp re-encoded
        names = tar.getnames()
        assert tar.extractfile(f"{encode_key('loose.jpg')}.jpg").read() == (root / "loose.jpg").read_bytes()
    assert f"{encode_key('old.bmp')}.png" in names and f"{encode_key('loose.jpg')}.txt" not in names

    dm = module(tmp_path / "shards")
    examples = [(i, p) for batch in dm.plain_train_dataloader() for i, p in zip(batch["id"], batch["prompt"])]
    expected = {item.id: item.caption or "" for item in source.items if item.id != "broken.png"}
    assert Counter(i for i, _ in examples) == Counter(expected.keys())  # every sample exactly once
    assert dict(examples) == expected  # captions intact (sidecar, class template, unlabeled -> "")
    assert dict(examples)["cats/im.0.png"] == "a sidecar caption, ünïcode"
    by_class = module(tmp_path / "shards", conditioning="class", caption_template="the {class_name}")
    prompts = {i: p for batch in by_class.train_dataloader() for i, p in zip(batch["id"], batch["prompt"])}
    assert prompts and all(p == f"the {i.split('/')[0]}" if "/" in i else p == "" for i, p in prompts.items())

    with pytest.raises(DataRootError, match="already holds data-000000.tar"):
        write_shards(source, tmp_path / "shards")
    with pytest.raises(DataRootError, match="inside the source folder"):
        write_shards(source, root / "shards")


def test_keys_round_trip_and_split_matches_the_folder(tmp_path):
    for item_id in ["cats/im.0.png", "_x.y", "a b/ü%2E.jpg"]:
        key = encode_key(item_id)
        assert "." not in key and "/" not in key and not key.startswith("_") and decode_key(key) == item_id
    root = make_folder(tmp_path / "src", per_class=15)
    write_shards(ImageFolderSource(root), tmp_path / "shards", shard_size=7)
    shards_dm = module(tmp_path / "shards", val_fraction=0.3)
    folder_dm = DiffusionDataModule(ImageFolderSource(root), val_fraction=0.3)
    folder_dm.setup()
    val_ids = [i for batch in shards_dm.val_dataloader() for i in batch["id"]]
    assert sorted(val_ids) == sorted(root_id for root_id in (folder_dm.source.items[i].id
                                                             for i in folder_dm.val_dataset.indices))
    assert len(shards_dm.train_dataset) + len(val_ids) >= 28  # train is balanced: at most batch-1 left out


@pytest.mark.parametrize("shard_size", [6, 16])  # 8 shards, and 3 shards for 4 slots (slots then share shards)
def test_two_ranks_two_workers_cover_each_sample_once_per_epoch(tmp_path, shard_size):
    root = make_folder(tmp_path / "src")
    write_shards(ImageFolderSource(root), tmp_path / "shards", shard_size=shard_size)
    all_ids = sorted(item.id for item in ImageFolderSource(root).items)
    dm = module(tmp_path / "shards", num_workers=2)
    epochs = []
    for epoch in range(2):
        per_rank = epoch_ids(dm, epoch, world_size=2)
        assert len(per_rank[0]) == len(per_rank[1]) == 24  # equal shares: DDP ranks stay in step
        assert sorted(per_rank[0] + per_rank[1]) == all_ids  # each sample exactly once across ranks x workers
        epochs.append(per_rank)
    assert epochs[0] != epochs[1]  # reshuffled every epoch
    again = module(tmp_path / "shards", num_workers=2)
    assert epoch_ids(again, 1, world_size=2) == epochs[1]  # deterministic for a seed
    other = module(tmp_path / "shards", num_workers=2, seed=1)
    assert epoch_ids(other, 1, world_size=2) != epochs[1]


def test_unbalanced_data_drops_less_than_one_batch_per_slot(tmp_path):
    root = make_folder(tmp_path / "src", per_class=25)  # 50 samples, 4 slots, batch 4: 12 -> 8 per slot
    write_shards(ImageFolderSource(root), tmp_path / "shards", shard_size=7)
    dm = module(tmp_path / "shards", num_workers=2)
    per_rank = epoch_ids(dm, 0, world_size=2)
    seen = per_rank[0] + per_rank[1]
    assert len(seen) == len(set(seen)) == 4 * 12 and len(per_rank[0]) == len(per_rank[1])


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_continues_with_the_next_samples(tmp_path, num_workers):
    write_shards(ImageFolderSource(make_folder(tmp_path / "src")), tmp_path / "shards", shard_size=6)
    dm = module(tmp_path / "shards", num_workers=num_workers, shuffle_buffer=16)
    dm.set_epoch(1)
    loader = dm.train_dataloader()
    iterator = iter(loader)
    seen = [next(iterator)["id"] for _ in range(3)]
    saved_loader, saved_module = loader.state_dict(), dm.state_dict()
    rest = [batch["id"] for batch in iterator]
    assert len(seen) + len(rest) == 48 // 4

    resumed = module(tmp_path / "shards", num_workers=num_workers, shuffle_buffer=16)
    resumed.load_state_dict(saved_module)  # the epoch, as Lightning restores the datamodule
    resumed_loader = resumed.train_dataloader()
    resumed_loader.load_state_dict(saved_loader)  # the position, as Lightning restores the loader
    assert [batch["id"] for batch in resumed_loader] == rest
    fresh = module(tmp_path / "shards", num_workers=num_workers, shuffle_buffer=16)
    fresh.set_epoch(1)
    assert [batch["id"] for batch in fresh.train_dataloader()] == seen + rest


def _gloo_rank(rank: int, world_size: int, shards: str, init_file: str, out_dir: str) -> None:
    """One DDP rank: its epoch-1 stream, and the same stream resumed from a loader state taken after 2 batches."""
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world_size)
    try:
        dm = module(Path(shards), num_workers=1, shuffle_buffer=16)
        dm.set_epoch(1)
        loader = dm.train_dataloader()  # rank and world size come from torch.distributed
        iterator = iter(loader)
        head = [next(iterator)["id"] for _ in range(2)]
        state = loader.state_dict()
        tail = [batch["id"] for batch in iterator]
        resumed = module(Path(shards), num_workers=1, shuffle_buffer=16)
        resumed.load_state_dict(dm.state_dict())
        resumed_loader = resumed.train_dataloader()
        resumed_loader.load_state_dict(state)
        result = {"ids": [i for batch in head + tail for i in batch],
                  "resumed_tail": [batch["id"] for batch in resumed_loader], "tail": tail}
        gathered = [None] * world_size
        torch.distributed.all_gather_object(gathered, result)
        if rank == 0:
            (Path(out_dir) / "ranks.json").write_text(json.dumps(gathered))
    finally:
        torch.distributed.destroy_process_group()


def test_two_gloo_ddp_ranks_see_disjoint_samples_and_resume_their_streams(tmp_path):
    """Real torch.distributed (2 CPU processes, gloo): the ranks detect their place themselves."""
    root = make_folder(tmp_path / "src")
    write_shards(ImageFolderSource(root), tmp_path / "shards", shard_size=6)
    torch.multiprocessing.spawn(_gloo_rank, args=(2, str(tmp_path / "shards"), str(tmp_path / "init"), str(tmp_path)),
                                nprocs=2, join=True)
    ranks = json.loads((tmp_path / "ranks.json").read_text())
    first, second = ranks[0]["ids"], ranks[1]["ids"]
    assert len(first) == len(second) == 24 and not set(first) & set(second)
    assert sorted(first + second) == sorted(item.id for item in ImageFolderSource(root).items)
    for rank in ranks:
        assert rank["resumed_tail"] == rank["tail"] and len(rank["tail"]) == 4  # 6 batches of 4, 2 seen


class Recorder(L.LightningModule):
    """Records the ids of every training batch; calls set_epoch like the real modules do."""

    def __init__(self) -> None:
        super().__init__()
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.seen: list[list[str]] = []

    def on_train_epoch_start(self) -> None:
        self.trainer.datamodule.set_epoch(self.current_epoch)

    def training_step(self, batch, batch_idx):
        self.seen.append(list(batch["id"]))
        return (self.weight * batch["pixel_values"].mean()).sum()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


@pytest.mark.slow
def test_lightning_resume_mid_epoch_does_not_repeat_the_epoch_start(tmp_path):
    from lightning.pytorch.callbacks import ModelCheckpoint

    write_shards(ImageFolderSource(make_folder(tmp_path / "src")), tmp_path / "shards", shard_size=6)

    def fit(max_steps: int, ckpt_path=None, callbacks=()) -> Recorder:
        model = Recorder()
        trainer = L.Trainer(max_steps=max_steps, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            limit_val_batches=0, default_root_dir=tmp_path, callbacks=list(callbacks),
                            enable_checkpointing=bool(callbacks))
        trainer.fit(model, datamodule=module(tmp_path / "shards", num_workers=2), ckpt_path=ckpt_path)
        return model

    # 12 batches per epoch; the checkpoint is taken 3 batches into epoch 1, as last.ckpt is during a run.
    saver = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=15, save_top_k=-1, filename="{step}")
    full = fit(17, callbacks=[saver])
    checkpoint = torch.load(tmp_path / "ckpt" / "step=15.ckpt", weights_only=True)
    assert checkpoint["ShardDataModule"] == {"epoch": 1}
    workers = checkpoint["loops"]["fit_loop"]["state_dict"]["combined_loader"][0]["_snapshot"]["_worker_snapshots"]
    assert sorted(w["dataset_state"]["consumed"] for w in workers.values()) == [4, 8]
    resumed = fit(17, ckpt_path=tmp_path / "ckpt" / "step=15.ckpt")
    assert resumed.seen == full.seen[15:] and len(resumed.seen) == 2


def _tar_with(path: Path, members: dict[str, bytes]) -> None:
    with tarfile.open(path, "w") as tar:
        for name, data in members.items():
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.mark.parametrize("extension", ["pyd", "pickle"])
def test_pickled_member_is_refused_without_unpickling(tmp_path, extension):
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return pathlib.Path.touch, (marker,)

    payload = pickle.dumps(Payload())
    png = io.BytesIO()
    Image.new("RGB", (8, 8)).save(png, format="PNG")
    shards = tmp_path / "shards"
    shards.mkdir()
    _tar_with(shards / "data-000000.tar", {"a.png": png.getvalue(), "a.txt": b"fine", f"a.{extension}": payload})

    with pytest.raises(ShardFormatError, match=rf"\.{extension}.*only images .* and text"):
        WebDatasetSource(shards)  # no index: the header scan refuses it
    (shards / "data-index.json").write_text(json.dumps({"shards": [{"file": "data-000000.tar", "count": 1,
                                                                    "ids": ["a"]}]}))
    dm = module(shards, batch_size=1)  # an index that hides the member: refused when read
    with pytest.raises(ShardFormatError, match=rf"\.{extension}"):
        list(dm.train_dataloader())
    assert not marker.exists()
    pickle.loads(payload)  # the payload was live: unpickling it would have run code
    assert marker.exists()


def test_bad_inputs_name_the_problem(tmp_path):
    with pytest.raises(DataRootError, match="no shards in data.root"):
        WebDatasetSource(tmp_path)
    write_shards(ImageFolderSource(make_folder(tmp_path / "src", per_class=3)), tmp_path / "shards", shard_size=2)
    (tmp_path / "shards" / "data-000001.tar").rename(tmp_path / "moved.tar")
    with pytest.raises(ShardFormatError, match="lists data-000001.tar, which is missing"):
        WebDatasetSource(tmp_path / "shards")
    (tmp_path / "moved.tar").rename(tmp_path / "shards" / "data-000001.tar")
    with pytest.raises(ValueError, match="cannot fill 8 ranks x workers"):
        module(tmp_path / "shards", batch_size=1).train_dataloader(rank=0, world_size=8)


def test_shard_main_writes_from_a_composed_config(tmp_path):
    root = make_folder(tmp_path / "src", per_class=4)
    (tmp_path / "exclude.txt").write_text("cats/im.0.png\n")
    train_cfg = compose_train(tmp_path / "run", ["data=imagefolder", f"data.root={root}",
                                                 f"data.exclude={tmp_path / 'exclude.txt'}"])
    cfg = OmegaConf.create({"data": OmegaConf.to_container(train_cfg.data), "shard": {"out": str(tmp_path / "out"),
                                                                                       "size": 3}})
    index = shard_main(cfg)
    assert index["num_samples"] == 7 and index["num_shards"] == 3 and index["num_excluded"] == 1
    assert "cats/im.0.png" not in WebDatasetSource(tmp_path / "out").ids


@pytest.mark.slow
def test_training_run_on_shards_end_to_end(tmp_path, digits_vae_dir):
    from sd_lightning.cli.train import train

    index = write_shards(DigitsSource(size=32, limit=80), tmp_path / "shards", shard_size=20)
    assert index["num_shards"] == 4
    # 78 training samples, 2 workers x 32: 4 batches of 16 per epoch; validation at the end of epoch 0.
    overrides = [*FAST, "data=shards", f"data.root={tmp_path / 'shards'}", f"model.components.vae_path={digits_vae_dir}",
                 "data.batch_size=16", "data.num_workers=2", "trainer.max_steps=6"]
    metric = train(compose_train(tmp_path / "run", overrides))
    assert metric is not None and math.isfinite(metric)
    checkpoint = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=True)
    assert checkpoint["global_step"] == 6 and checkpoint["ShardDataModule"]["epoch"] == 1
