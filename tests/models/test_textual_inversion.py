"""experiment=textual_inversion_sd on tiny SD 1.x and SDXL folders: one new token's row trains, every other weight
stays bit-identical, and the exported embedding loads with diffusers' load_textual_inversion."""

from __future__ import annotations

import json

import numpy as np
import pytest
import test_families
import test_pretrained
import torch
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoTokenizer

from sd_lightning.cli.export import export
from sd_lightning.cli.train import train
from sd_lightning.models.families import SD, SDXL
from sd_lightning.models.textual_inversion import EMBEDDINGS_FILE

from conftest import FAST

sd_folder = test_pretrained.sd_folder
TOKEN = "<digit>"
TEXT = ["text_encoder", "text_encoder_2"]

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    return test_families._write_folder(tmp_path_factory.mktemp("ti"), "sdxl")[0]


@pytest.mark.parametrize("name", ["sd", "sdxl"])
def test_only_the_new_row_trains_and_the_embedding_loads_in_diffusers(name, sd_folder, sdxl_folder, train_config,
                                                                     tmp_path):
    folder, family = (sd_folder[0], SD) if name == "sd" else (sdxl_folder, SDXL)
    cfg = train_config(*FAST, "experiment=textual_inversion_sd", f"model.path={folder}", "data=digits",
                       "data.source.limit=32", "data.batch_size=4", "trainer.max_steps=6", "optimizer.lr=0.05",
                       "lr_scheduler.num_warmup_steps=0", "callbacks.ema.decay=0.5",
                       "trainer.check_val_every_n_epoch=100", f"model.components.textual_inversion.placeholder_token='{TOKEN}'",
                       "model.components.textual_inversion.initializer_token=three", run=name)
    model = instantiate(cfg.model)
    trained = [n for n, p in model.named_parameters() if p.requires_grad]
    encoders = [e for e in TEXT if getattr(model.conditioner, e, None) is not None]
    assert len(trained) == len(encoders) and all(
        n.startswith(f"conditioner.{e}.") and n.endswith(".token_embedding.added") for n, e in zip(sorted(trained), encoders))
    base_tokenizer = AutoTokenizer.from_pretrained(folder / "tokenizer", local_files_only=True)
    (init,) = base_tokenizer.encode("three", add_special_tokens=False)
    for encoder in encoders:  # the new row starts as the initializer word's
        embedding = getattr(model.conditioner, encoder).get_input_embeddings()
        assert torch.equal(embedding.added[0], embedding.frozen[init])
    train(cfg)

    state = torch.load(f"{cfg.paths.run_dir}/checkpoints/last.ckpt", weights_only=True)["state_dict"]
    pipeline = family.load(folder)  # the base weights, as plain diffusers reads them
    for key, value in getattr(pipeline, family.denoiser_part).state_dict().items():
        assert torch.equal(state[f"denoiser.model.{key}"], value), key
    for encoder in encoders:
        for key, value in getattr(pipeline, encoder).state_dict().items():
            trained_value = state[f"conditioner.{encoder}.{key}"]
            if key.endswith("token_embedding.weight"):
                assert trained_value.shape[0] == value.shape[0] + 1
                assert torch.equal(trained_value[:-1], value)  # every other row bit-identical
                assert not torch.equal(trained_value[-1], value[init])  # the new row trained
            else:
                assert torch.equal(trained_value, value), key

    out = tmp_path / "export"
    export(test_families._compose("export", f"ckpt_path={cfg.paths.run_dir}/checkpoints/last.ckpt", f"out_dir={out}"))
    sampling = json.loads((out / "sd_lightning.json").read_text())
    assert sampling["placeholder_token"] == TOKEN
    prompts = [f"{TOKEN}, a handwritten digit three", f"{TOKEN}, a handwritten digit seven"]
    from_checkpoint = test_families._sampled(f"{cfg.paths.run_dir}/checkpoints/last.ckpt", tmp_path / "samples",
                                             prompts)
    before = test_families._images(pipeline, sampling, prompts)
    embeddings = load_file(out / EMBEDDINGS_FILE)
    if family is SD:
        assert list(embeddings) == ["emb_params"]
        pipeline.load_textual_inversion(out / EMBEDDINGS_FILE, token=TOKEN)
    else:  # diffusers' documented SDXL way: each encoder's entry into its encoder
        assert sorted(embeddings) == ["clip_g", "clip_l"]
        pipeline.load_textual_inversion(embeddings["clip_l"], token=TOKEN, text_encoder=pipeline.text_encoder,
                                        tokenizer=pipeline.tokenizer)
        pipeline.load_textual_inversion(embeddings["clip_g"], token=TOKEN, text_encoder=pipeline.text_encoder_2,
                                        tokenizer=pipeline.tokenizer_2)
    images = test_families._images(pipeline, sampling, prompts)
    assert np.abs(images - from_checkpoint).max() <= 2, "the plain pipeline with the embedding differs from sdl-sample"
    assert np.abs(images - before).mean() > 1  # the learned token matters


def test_bad_tokens_are_refused_naming_the_key(sd_folder, train_config):
    for override, message in (("initializer_token='handwritten digit'", r"initializer_token='handwritten digit' is \d+ tok"),
                              ("placeholder_token=three", "placeholder_token='three' is already a token")):
        cfg = train_config("experiment=textual_inversion_sd", f"model.path={sd_folder[0]}", "data=digits",
                           f"model.components.textual_inversion.{override}", run="bad")
        with pytest.raises(Exception, match=message):
            instantiate(cfg.model)
