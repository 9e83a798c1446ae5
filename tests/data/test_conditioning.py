"""Conditioning modes (text, class, none), partly labeled data and tag shuffling."""

import random
from collections import Counter

import numpy as np
import pandas as pd
import pytest
from hydra.utils import instantiate

from sd_lightning.cli.config import ConfigError, validate_train_config
from sd_lightning.cli.train import train
from sd_lightning.data.datamodule import DiffusionDataModule
from sd_lightning.data.sources import DigitsSource, SourceItem
from sd_lightning.data.transforms import CaptionTransform, edit_tags

from conftest import FAST, compose_train


def _prompts(datamodule: DiffusionDataModule, split: str = "train") -> dict[str, str]:
    dataset = datamodule.train_dataset if split == "train" else datamodule.val_dataset
    return {dataset[i]["id"]: dataset[i]["prompt"] for i in range(len(dataset))}


def _datamodule(**kwargs) -> DiffusionDataModule:
    datamodule = DiffusionDataModule(DigitsSource(size=8, limit=kwargs.pop("limit", 300)), resolution=8, **kwargs)
    datamodule.setup("fit")
    return datamodule


def test_modes_give_the_captions_the_class_template_or_the_null_prompt():
    text = _prompts(_datamodule(conditioning="text"))
    assert set(text.values()) == {f"a handwritten digit {n}" for n in
                                  ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")}
    classes = _prompts(_datamodule(conditioning="class", caption_template="digit {class_name}, handwritten"))
    assert classes.keys() == text.keys()
    assert all(classes[i] == text[i].replace("a handwritten digit ", "digit ") + ", handwritten" for i in text)
    none = _datamodule(conditioning="none")
    assert set(_prompts(none).values()) == {""} and set(_prompts(none, "val").values()) == {""}


def test_labeled_fraction_keeps_a_stable_share_independent_of_the_split():
    source = DigitsSource(size=8)
    policy = CaptionTransform(labeled_fraction=0.3)
    labeled = {item.id for item in source.items if policy(item) is not None}
    assert abs(len(labeled) / len(source) - 0.3) < 0.03
    # Stable: the same ids on a new instance; nested: raising the fraction only adds ids.
    assert labeled == {item.id for item in source.items if CaptionTransform(labeled_fraction=0.3)(item) is not None}
    assert labeled < {item.id for item in source.items if CaptionTransform(labeled_fraction=0.5).is_labeled(item.id)}
    # Independent of the split: changing the validation share or salt does not change which ids are labeled.
    for val_fraction, salt in ((0.1, ""), (0.4, "other")):
        datamodule = _datamodule(labeled_fraction=0.3, val_fraction=val_fraction, split_salt=salt, limit=None)
        prompts = {**_prompts(datamodule), **_prompts(datamodule, "val")}
        assert {i for i, p in prompts.items() if p} == labeled
    # Labeled items are spread over both splits (about 30% of each).
    for split in ("train", "val"):
        share = np.mean([bool(p) for p in _prompts(datamodule, split).values()])
        assert 0.22 < share < 0.38, (split, share)


def test_unlabeled_samples_get_exactly_the_null_prompt_condition_dropout_uses(train_config):
    datamodule = _datamodule(labeled_fraction=0.3)
    prompts = list(_prompts(datamodule).values())
    counts = Counter(prompts)
    assert counts[""] == sum(1 for p in prompts if not p.startswith("a handwritten digit"))
    model = instantiate(train_config("model.components.conditioner.drop_prob=1.0", "model.components.denoiser.block_out_channels=[8,16]").model)
    (null,) = set(model.conditioner.drop(["a handwritten digit one"] * 4, __import__("torch").Generator()))
    assert null == "" and null in counts
    # A source item without a caption (an unlabeled image) takes the same path.
    assert CaptionTransform()(SourceItem(id="x", caption=None)) is None


def test_unlabeled_drop_trains_on_the_labeled_share_alone_with_the_same_validation():
    semi = _datamodule(labeled_fraction=0.3, limit=None)
    alone = _datamodule(labeled_fraction=0.3, unlabeled="drop", limit=None)
    semi_train, alone_train = _prompts(semi), _prompts(alone)
    assert set(alone_train) == {i for i, p in semi_train.items() if p}  # exactly the labeled training items
    assert all(alone_train.values()) and "" in semi_train.values()
    assert _prompts(alone, "val") == _prompts(semi, "val")
    assert abs(len(alone_train) / len(semi_train) - 0.3) < 0.04


def test_labeled_oversampling_repeats_labeled_items_with_distinct_sample_ids():
    semi = _datamodule(labeled_fraction=0.1, limit=None)
    over = _datamodule(labeled_fraction=0.1, labeled_oversample=9, limit=None)
    base = _prompts(semi)
    labeled = {i for i, p in base.items() if p}
    samples = [over.train_dataset[i] for i in range(len(over.train_dataset))]
    ids = [s["id"] for s in samples]
    assert len(ids) == len(set(ids)) == len(base) + 8 * len(labeled)  # every copy its own id (own noise)
    assert {i.split("#")[0] for i in ids} == set(base)  # every image still trains, unlabeled ones once
    copies = Counter(i.split("#")[0] for i in ids)
    assert {copies[i] for i in labeled} == {9} and {copies[i] for i in set(base) - labeled} == {1}
    assert all(s["prompt"] == base[s["id"].split("#")[0]] for s in samples)
    share = sum(bool(s["prompt"]) for s in samples) / len(samples)
    assert 0.4 < share < 0.6  # 10% labeled x 9 copies: about half of every epoch is conditioned
    assert _prompts(over, "val") == _prompts(semi, "val")
    for bad in (0, 1.5):
        with pytest.raises(ValueError, match=r"data.labeled_oversample=(0 must be >= 1|1.5 must be an integer)"):
            _datamodule(labeled_oversample=bad)
    with pytest.raises(ValueError, match="data.labeled_oversample > 1 works with square crops"):
        _datamodule(labeled_fraction=0.1, labeled_oversample=2, buckets={"multiple": 8})


def test_labeled_oversampling_resumes_mid_epoch_exactly():
    over = _datamodule(labeled_fraction=0.1, labeled_oversample=5, batch_size=16)
    loader = over.train_dataloader()
    iterator = iter(loader)
    head = [next(iterator)["id"] for _ in range(3)]
    state = loader.state_dict()
    tail = [batch["id"] for batch in iterator]
    resumed = _datamodule(labeled_fraction=0.1, labeled_oversample=5, batch_size=16).train_dataloader()
    resumed.load_state_dict(state)
    assert [batch["id"] for batch in resumed] == tail and len(head) == 3


def test_train_fraction_keeps_a_stable_nested_share_of_training_and_leaves_validation_alone():
    full = _datamodule(limit=None)
    tenth, fifth = _datamodule(train_fraction=0.1, limit=None), _datamodule(train_fraction=0.2, limit=None)
    assert abs(len(tenth.train_dataset) / len(full.train_dataset) - 0.1) < 0.02
    assert set(tenth.train_dataset.indices) < set(fifth.train_dataset.indices) < set(full.train_dataset.indices)
    assert tenth.train_dataset.indices == _datamodule(train_fraction=0.1, limit=None).train_dataset.indices
    assert tenth.val_dataset.indices == full.val_dataset.indices
    with pytest.raises(ValueError, match=r"data.train_fraction=0.0 must be > 0.0"):
        _datamodule(train_fraction=0.0)
    with pytest.raises(ValueError, match="data.unlabeled='skip' must be 'null_prompt' or 'drop'"):
        _datamodule(unlabeled="skip")
    with pytest.raises(ValueError, match="training split .* is empty .*data.unlabeled=drop"):
        _datamodule(labeled_fraction=0.0, unlabeled="drop")


def test_tag_shuffling_keeps_leading_tokens_and_is_deterministic_per_seed_epoch_sample():
    caption = "portrait, oil painting, red hair, smiling, blue background"
    shuffled = {edit_tags(caption, random.Random(s), keep_tokens=1) for s in range(30)}
    assert len(shuffled) > 10
    for text in shuffled:
        tags = text.split(", ")
        assert tags[0] == "portrait" and sorted(tags) == sorted(caption.split(", "))
    assert edit_tags(caption, random.Random(3), 2) == edit_tags(caption, random.Random(3), 2)

    item = SourceItem(id="im.png", caption=caption)
    datamodule = DiffusionDataModule(DigitsSource(size=8, limit=40), resolution=8, shuffle_tags=True, keep_tokens=2,
                                     val_fraction=0.2)
    datamodule.setup("fit")
    datamodule.source.items = [item] * len(datamodule.source.items)  # every sample has this tagged caption
    train_set = datamodule.train_dataset
    epoch0 = [train_set[i]["prompt"] for i in range(len(train_set))]
    assert epoch0 == [train_set[i]["prompt"] for i in range(len(train_set))]  # deterministic
    assert all(p.startswith("portrait, oil painting, ") for p in epoch0)
    datamodule.set_epoch(1)
    epoch1 = [train_set[i]["prompt"] for i in range(len(train_set))]
    assert epoch1 != epoch0
    assert {datamodule.val_dataset[i]["prompt"] for i in range(len(datamodule.val_dataset))} == {caption}


def test_tag_dropout_and_trigger_word_as_the_anchors_do_them():
    """Each tag after keep_tokens is dropped with data.tag_dropout's probability (per seed, epoch and sample in
    training), the trigger word leads every caption in training and validation, and neither survives into a
    prompt that has no condition (the null prompt of an unlabeled item)."""
    caption = "portrait, oil painting, red hair, smiling, blue background"
    rest = caption.split(", ")[1:]
    kept_counts = Counter()
    for s in range(400):
        tags = edit_tags(caption, random.Random(s), keep_tokens=1, dropout=0.25, shuffle=False).split(", ")
        assert tags[0] == "portrait" and tags[1:] == [t for t in rest if t in tags]  # order kept without shuffle
        kept_counts.update(tags[1:])
    assert all(0.68 < kept_counts[t] / 400 < 0.82 for t in rest), kept_counts  # 1 - 0.25 each
    assert edit_tags(caption, random.Random(0), keep_tokens=1, dropout=0.0, shuffle=False) == caption  # control

    captions = CaptionTransform(tag_dropout=0.5, trigger_word=" sks ", keep_tokens=1)
    item = SourceItem(id="im.png", caption=caption)
    trained = [captions(item, random.Random(s)) for s in range(50)]
    assert all(p.startswith("sks, portrait") for p in trained) and len(set(trained)) > 5
    assert captions(item, None) == f"sks, {caption}"  # validation and the cache: no dropout
    assert captions(SourceItem(id="x.png", caption=None), None) == "sks"  # an image without a caption
    assert CaptionTransform(conditioning="none", trigger_word="sks")(item, None) is None  # unconditional stays so
    assert captions.varies and not CaptionTransform(trigger_word="sks").varies  # the cache refuses only dropout


def test_bad_conditioning_settings_fail_naming_the_key(tmp_path):
    for override, message in (("data.conditioning=labels", "data.conditioning='labels' must be"),
                              ("data.labeled_fraction=1.5", "data.labeled_fraction=1.5 must be <= 1.0"),
                              ("data.keep_tokens=-1", "data.keep_tokens=-1 must be >= 0"),
                              ("data.tag_dropout=1.0", "data.tag_dropout=1.0 must be <= 0.99"),
                              ("data.unlabeled=skip", "data.unlabeled='skip' must be 'null_prompt' or 'drop'"),
                              ("data.train_fraction=2", "data.train_fraction=2 must be <= 1.0"),
                              ("data.train_fraction=0", "data.train_fraction=0 must be > 0.0"),
                              ("data.labeled_oversample=0", "data.labeled_oversample=0 must be >= 1"),
                              ("data.caption_template=digit", "must contain '{class_name}'")):
        with pytest.raises(ConfigError, match=message.replace("(", r"\(").replace("'", "'")):
            validate_train_config(compose_train(tmp_path / "run", [override]))
        # One rule, one source: the data module itself refuses the same value with the same words.
        with pytest.raises(Exception, match=message.replace("(", r"\(")):
            instantiate(compose_train(tmp_path / "run", [override]).data)


def test_class_mode_without_labels_says_what_to_do(tmp_path):
    from PIL import Image

    for name in ("a.png", "b.png"):
        Image.new("RGB", (16, 16)).save(tmp_path / name)
    cfg = compose_train(tmp_path / "run", ["data=imagefolder", f"data.root={tmp_path}", "data.val_fraction=0.0",
                                           "data.conditioning=class"])
    with pytest.raises(ValueError, match="has no class labels.*data.conditioning=text or none"):
        instantiate(cfg.data).setup("fit")


@pytest.mark.slow
@pytest.mark.parametrize("overrides", [
    ("data.conditioning=text", "data.shuffle_tags=true", "data.keep_tokens=1"),
    ("data.conditioning=class", "data.caption_template='digit {class_name}'", "data.labeled_fraction=0.3"),
    ("data.conditioning=none", "augmentation=color_jitter"),
], ids=["text", "class", "none"])
def test_each_mode_trains_a_few_steps(tmp_path, overrides):
    """Each mode through the real training loop (random VAE: this checks the prompt path, not quality)."""
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, [*FAST, "trainer.max_steps=4",
                                  "data.source.limit=48", "data.batch_size=16", "data.val_batch_size=16",
                                  "~callbacks.sample_grid", *overrides])
    train(cfg)
    metrics = pd.read_csv(run_dir / "csv" / "metrics.csv")
    losses = metrics["train/loss"].dropna()
    assert len(losses) == 4 and np.isfinite(losses).all()
    assert np.isfinite(metrics["val/mse"].dropna()).all() and len(metrics["val/mse"].dropna()) >= 1
