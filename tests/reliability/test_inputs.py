"""Config overrides and prompts from users: validated, named, never crashing the run."""

import logging

import pytest
from hydra import compose, initialize_config_dir
from hydra.errors import ConfigCompositionException, HydraException
from hydra.utils import instantiate
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from omegaconf.errors import OmegaConfBaseException

from sd_lightning.cli.config import CONFIG_DIR, ConfigError, validate_train_config

KEYS = [
    "data.batch_size", "data.val_fraction", "data.resolution", "data.num_workers", "trainer.max_steps",
    "trainer.accumulate_grad_batches", "model.components.conditioner.drop_prob", "optimizer.lr", "sampling.steps",
    "sampling.scheduler", "sampling.guidance_scale", "seed", "resume", "trainer.max_stepz", "data.sizee",
]
VALUES = st.one_of(
    st.integers(-5, 5000), st.floats(-10, 10, allow_nan=False), st.sampled_from(["abc", "null", "[]", "auto", "ddim", "''"])
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(key=st.sampled_from(KEYS), value=VALUES)
def test_fuzzed_overrides_either_validate_or_fail_naming_the_key(tmp_path_factory, key, value):
    override = f"{key}={value}"
    try:
        with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
            cfg = compose("train", overrides=["paths.run_dir=/tmp/unused", override])
    except (ConfigCompositionException, HydraException, OmegaConfBaseException) as err:
        assert key.split(".")[-1] in str(err) or key in str(err)
        return
    try:
        validate_train_config(cfg)
    except ConfigError as err:
        assert key in str(err)
        return
    # Accepted: the value must then really be usable by the piece it configures.
    if key.startswith("data."):
        instantiate(cfg.data)


@pytest.mark.parametrize("prompt", ["", "a handwritten digit seven", "digit ✨ sept — ü", "tab\tbell\x07 nul\x00",
                                    " ".join(["very"] * 200) + " long"])
def test_any_prompt_encodes(prompt, caplog):
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg = compose("train", overrides=["paths.run_dir=/tmp/unused", "model.components.denoiser.block_out_channels=[16,32]"])
    model = instantiate(cfg.model)
    with caplog.at_level(logging.WARNING):
        states = model.conditioner([prompt])["encoder_hidden_states"]
    assert states.shape == (1, 77, 32) and states.isfinite().all()
    if len(prompt) > 500:
        assert "truncated" in caplog.text
