"""sdl-sample and sdl-export: deterministic images, and exports that plain diffusers loads and matches."""

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from hydra import compose, initialize_config_dir
from PIL import Image

from sd_lightning.cli.config import CONFIG_DIR, ConfigError
from sd_lightning.cli.export import export
from sd_lightning.cli.sample import sample
from sd_lightning.diffusion.sampling import generate


def _cfg(name: str, **values):
    overrides = [f"{k}={json.dumps(v) if isinstance(v, str) else v}" for k, v in values.items()]
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose(name, overrides=overrides)


def _arrays(paths):
    return [np.asarray(Image.open(p)) for p in paths]


def test_sample_is_deterministic_for_a_seed(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    common = {"ckpt_path": str(ckpt), "prompt": "a handwritten digit three", "num_images": 3, "steps": 5}
    first = sample(_cfg("sample", out_dir=str(tmp_path / "a"), seed=7, **common))
    again = sample(_cfg("sample", out_dir=str(tmp_path / "b"), seed=7, **common))
    rebatched = sample(_cfg("sample", out_dir=str(tmp_path / "d"), seed=7, batch_size=2, **common))
    other = sample(_cfg("sample", out_dir=str(tmp_path / "c"), seed=8, **common))
    assert len(first) == 3 and (tmp_path / "a" / "grid.png").is_file()
    assert Image.open(tmp_path / "a" / "grid.png").size == (96, 32)
    for a, b, c in zip(_arrays(first), _arrays(again), _arrays(rebatched)):
        assert np.array_equal(a, b)
        # Another batch size changes float summation order only: the same image to a rounding step.
        assert np.abs(a.astype(int) - c.astype(int)).max() <= 2
    assert not np.array_equal(_arrays(first)[0], _arrays(other)[0])
    image = _arrays(first)[0]
    assert image.shape == (32, 32, 3) and image.std() > 0


def test_unconditional_generation_from_noise(trained_run, tmp_path):
    paths = sample(_cfg("sample", ckpt_path=str(trained_run / "checkpoints" / "last.ckpt"), out_dir=str(tmp_path),
                        prompt="", num_images=2, steps=4, scheduler="ddpm"))
    assert [a.shape for a in _arrays(paths)] == [(32, 32, 3)] * 2


def test_export_loads_in_plain_diffusers_and_matches_sdl_sample(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = export(_cfg("export", ckpt_path=str(ckpt), out_dir=str(tmp_path / "pipe")))
    files = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert "model_index.json" in files and not any(f.endswith((".bin", ".pt", ".ckpt")) for f in files)
    assert sum(f.endswith(".safetensors") for f in files) == 3
    pipe = StableDiffusionPipeline.from_pretrained(out, local_files_only=True)
    pipe.set_progress_bar_config(disable=True)
    assert pipe.scheduler.config.prediction_type == "v_prediction"
    assert pipe.scheduler.config.timestep_spacing == "trailing"
    # The plain pipeline with its own defaults produces the model's image size.
    default = pipe("a handwritten digit four", num_inference_steps=3, generator=torch.Generator().manual_seed(0))
    assert default.images[0].size == (32, 32)
    # Same seed, scheduler and steps as sdl-sample → the same pixels.
    paths = sample(_cfg("sample", ckpt_path=str(ckpt), out_dir=str(tmp_path / "s"), prompt="a handwritten digit four",
                        num_images=2, seed=3, steps=6, guidance_scale=2.0))
    plain = pipe(["a handwritten digit four"] * 2, num_inference_steps=6, guidance_scale=2.0, output_type="np",
                 generator=[torch.Generator().manual_seed(3 + i) for i in range(2)]).images
    ours = np.stack(_arrays(paths)).astype(np.float64) / 255.0
    assert np.abs(plain - ours).max() < 2.5 / 255
    # The export folder itself is also a valid sdl-sample source.
    again = sample(_cfg("sample", ckpt_path=str(out), out_dir=str(tmp_path / "e"), prompt="a handwritten digit four",
                        num_images=2, seed=3, steps=6, guidance_scale=2.0))
    assert all(np.array_equal(a, b) for a, b in zip(_arrays(paths), _arrays(again)))


def test_export_uses_ema_weights_by_default(trained_run, tmp_path):
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    ema = StableDiffusionPipeline.from_pretrained(export(_cfg("export", ckpt_path=str(ckpt), out_dir=str(tmp_path / "a"))),
                                                  local_files_only=True)
    raw = StableDiffusionPipeline.from_pretrained(
        export(_cfg("export", ckpt_path=str(ckpt), out_dir=str(tmp_path / "b"), use_ema=False)), local_files_only=True
    )
    checkpoint = torch.load(ckpt, weights_only=True)
    name, shadow = checkpoint["callbacks"]["ema"]["param_names"][0], checkpoint["callbacks"]["ema"]["shadow_params"][0]
    key = name.removeprefix("denoiser.model.")
    assert torch.equal(dict(ema.unet.named_parameters())[key].detach(), shadow)
    assert torch.equal(dict(raw.unet.named_parameters())[key].detach(), checkpoint["state_dict"][name])
    assert not torch.equal(shadow, checkpoint["state_dict"][name])


def test_export_refuses_to_overwrite_and_sample_rejects_bad_values(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    (tmp_path / "taken").mkdir()
    (tmp_path / "taken" / "keep.txt").write_text("user file")
    with pytest.raises(ConfigError, match="overwrite=true"):
        export(_cfg("export", ckpt_path=ckpt, out_dir=str(tmp_path / "taken")))
    assert (tmp_path / "taken" / "keep.txt").read_text() == "user file"
    with pytest.raises(ConfigError, match="scheduler='heun'"):
        sample(_cfg("sample", ckpt_path=ckpt, out_dir=str(tmp_path / "x"), scheduler="heun"))


def test_export_refuses_a_unet_with_a_learned_class_embedding(trained_run, tmp_path):
    """Class labels must travel through prompts to reach a plain pipeline; a class-embedding UNet is refused."""
    from diffusers import UNet2DConditionModel

    pipe = StableDiffusionPipeline.from_pretrained(export(_cfg("export", ckpt_path=str(trained_run / "checkpoints" /
                                                                                      "last.ckpt"),
                                                               out_dir=str(tmp_path / "plain"))), local_files_only=True)
    pipe.unet = UNet2DConditionModel.from_config({**pipe.unet.config, "num_class_embeds": 10})
    pipe.save_pretrained(tmp_path / "classes", safe_serialization=True)
    with pytest.raises(ConfigError, match="learned class embedding .*num_class_embeds=10.*data.conditioning=class"):
        export(_cfg("export", ckpt_path=str(tmp_path / "classes"), out_dir=str(tmp_path / "out")))
    assert not (tmp_path / "out").exists() and not (tmp_path / "out.partial").exists()


def test_sample_cli_end_to_end(trained_run, tmp_path):
    out = tmp_path / "cli"
    result = subprocess.run(
        [sys.executable, "-m", "sd_lightning.cli.sample", f"ckpt_path={trained_run / 'checkpoints' / 'last.ckpt'}",
         f"out_dir={out}", "prompt=a handwritten digit one", "num_images=2", "steps=3"],
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert sorted(p.name for p in out.glob("*.png")) == ["00000.png", "00001.png", "grid.png"]


def test_generate_does_not_depend_on_batch_size(trained_run):
    from sd_lightning.models.pipelines import load_pipeline

    pipeline, _ = load_pipeline(Path(trained_run / "checkpoints" / "last.ckpt"))
    prompts = ["a handwritten digit two"] * 3
    one = generate(pipeline, prompts, seed=1, steps=3, batch_size=1, output_type="np")
    all_ = generate(pipeline, prompts, seed=1, steps=3, batch_size=3, output_type="np")
    assert np.abs(np.asarray(one) - np.asarray(all_)).max() < 1e-5


def test_several_prompts_in_one_call_write_a_folder_each(trained_run, tmp_path):
    ckpt = str(trained_run / "checkpoints" / "last.ckpt")
    prompts = ["a handwritten digit one", "a handwritten digit seven", ""]
    listed = tmp_path / "prompts.txt"
    listed.write_text("a handwritten digit one\n\n  a handwritten digit seven  \n")
    common = {"ckpt_path": ckpt, "num_images": 2, "steps": 3, "seed": 5}
    many_cfg = _cfg("sample", out_dir=str(tmp_path / "many"), **common)
    many_cfg.prompts = prompts
    sample(many_cfg)
    from_file = sample(_cfg("sample", out_dir=str(tmp_path / "file"), prompt_file=str(listed), **common))
    alone = sample(_cfg("sample", out_dir=str(tmp_path / "alone"), prompt=prompts[1], **common))
    folders = sorted(p.name for p in (tmp_path / "many").iterdir() if p.is_dir())
    assert folders == ["000", "001", "002"]
    assert [(tmp_path / "many" / f / "prompt.txt").read_text() for f in folders] == [p + "\n" for p in prompts]
    assert sorted(p.name for p in (tmp_path / "many" / "001").glob("*.png")) == ["00000.png", "00001.png", "grid.png"]
    assert Image.open(tmp_path / "many" / "grid.png").size == (64, 96)  # a row per prompt
    # A prompt's images are the same alone or among others (image j seeded by seed + j), and differ across prompts.
    many = _arrays(sorted((tmp_path / "many" / "001").glob("0*.png")))
    for a, b in zip(many, _arrays(alone)):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 2
    assert len(from_file) == 4 and (tmp_path / "file" / "001" / "prompt.txt").read_text() == prompts[1] + "\n"
    assert not np.array_equal(many[0], _arrays(sorted((tmp_path / "many" / "000").glob("0*.png")))[0])
    with pytest.raises(ConfigError, match="one of prompt, prompts and prompt_file"):
        sample(_cfg("sample", out_dir=str(tmp_path / "x"), prompt="a", prompt_file=str(listed), **common))
    with pytest.raises(ConfigError, match="prompt_file=.*does not exist"):
        sample(_cfg("sample", out_dir=str(tmp_path / "x"), prompt_file=str(tmp_path / "none.txt"), **common))
