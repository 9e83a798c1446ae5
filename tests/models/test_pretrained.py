"""model=pretrained loads a local Stable Diffusion folder (written here with save_pretrained) and fine-tunes it."""

from functools import partial

import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.cli.train import train
from sd_lightning.diffusion.objectives import EpsilonObjective, from_pretrained
from sd_lightning.models.builders import MissingModelError, build_components, load_pretrained_components
from sd_lightning.models.denoisers import build_unet
from sd_lightning.models.pipelines import diffusers_pipeline

from conftest import FAST


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    components = build_components(denoiser=partial(build_unet, block_out_channels=[16, 32]),
                                  vae={"block_out_channels": [8, 16, 32]})
    scheduler = EpsilonObjective(beta_schedule="scaled_linear").sampling_scheduler("ddim")
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    diffusers_pipeline(components, scheduler).save_pretrained(folder, safe_serialization=True)
    return folder, components


def test_loader_reads_every_component_offline(sd_folder):
    folder, original = sd_folder
    loaded = load_pretrained_components(folder)
    for name in ("denoiser", "vae", "conditioner"):
        for (key, a), b in zip(getattr(original, name).state_dict().items(), getattr(loaded, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    assert loaded.conditioner.tokenizer("a b c").input_ids == original.conditioner.tokenizer("a b c").input_ids
    assert loaded.conditioner.tokenizer_source.endswith("tokenizer")
    objective = from_pretrained(str(folder))  # objective=auto: read from the folder's scheduler
    assert isinstance(objective, EpsilonObjective) and objective.beta_schedule == "scaled_linear"


def test_missing_parts_are_named(sd_folder, tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(MissingModelError, match="is not a diffusers pipeline folder: no model_index.json"):
        load_pretrained_components(tmp_path)
    (tmp_path / "model_index.json").write_text((sd_folder[0] / "model_index.json").read_text())
    with pytest.raises(MissingModelError, match="StableDiffusionPipeline folder without vae, scheduler, tokenizer, text_encoder"):
        load_pretrained_components(tmp_path)


def test_fine_tune_a_pretrained_folder(sd_folder, train_config):
    folder, original = sd_folder
    cfg = train_config(*FAST, "model=pretrained", f"model.path={folder}", "trainer.max_steps=4",
                       "data.source.limit=64", "data.batch_size=8", "objective=auto")
    model = instantiate(cfg.model)
    assert torch.equal(next(model.denoiser.parameters()), next(original.denoiser.parameters()))
    assert model.objective.prediction_type == "epsilon" and model.objective.beta_schedule == "scaled_linear"
    train(cfg)
    ckpt = torch.load(cfg.paths.run_dir + "/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    first = next(k for k in ckpt["state_dict"] if k.startswith("denoiser."))
    assert not torch.equal(ckpt["state_dict"][first], original.denoiser.state_dict()[first.removeprefix("denoiser.")])
