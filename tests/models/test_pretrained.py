"""model=pretrained loads a local Stable Diffusion folder (written here with save_pretrained) and fine-tunes it."""

import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.cli.train import train
from sd_lightning.diffusion.schedules import sampling_scheduler
from sd_lightning.models.builders import MissingModelError, build_components, load_pretrained_components
from sd_lightning.models.checkpoint_io import pipeline_from_components

from conftest import FAST


@pytest.fixture(scope="module")
def sd_folder(tmp_path_factory):
    components = build_components(vae={"block_out_channels": [8, 16, 32]}, unet={"block_out_channels": [16, 32]})
    pipeline = pipeline_from_components(components, sampling_scheduler("ddim", components.noise_scheduler.config))
    folder = tmp_path_factory.mktemp("sd") / "tiny-sd"
    pipeline.save_pretrained(folder, safe_serialization=True)
    return folder, components


def test_loader_reads_every_component_offline(sd_folder):
    folder, original = sd_folder
    loaded = load_pretrained_components(folder)
    for name in ("unet", "vae", "text_encoder"):
        for (key, a), b in zip(getattr(original, name).state_dict().items(), getattr(loaded, name).state_dict().values()):
            assert torch.equal(a, b), f"{name}.{key}"
    assert loaded.tokenizer("a b c").input_ids == original.tokenizer("a b c").input_ids
    assert loaded.noise_scheduler.config.num_train_timesteps == 1000
    assert loaded.tokenizer_source.endswith("tokenizer")


def test_missing_parts_are_named(tmp_path):
    (tmp_path / "unet").mkdir()
    with pytest.raises(MissingModelError, match="missing vae/, text_encoder/, tokenizer/, scheduler/"):
        load_pretrained_components(tmp_path)


def test_fine_tune_a_pretrained_folder(sd_folder, train_config):
    folder, original = sd_folder
    cfg = train_config(*FAST, "model=pretrained", f"model.path={folder}", "trainer.max_steps=4",
                       "data.source.limit=64", "data.batch_size=8", "objective=epsilon")
    model = instantiate(cfg.model)
    assert torch.equal(next(model.unet.parameters()), next(original.unet.parameters()))
    assert model.noise_scheduler.config.prediction_type == "epsilon"
    train(cfg)
    ckpt = torch.load(cfg.paths.run_dir + "/checkpoints/last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 4
    first = next(k for k in ckpt["state_dict"] if k.startswith("unet."))
    assert not torch.equal(ckpt["state_dict"][first], original.unet.state_dict()[first.removeprefix("unet.")])
