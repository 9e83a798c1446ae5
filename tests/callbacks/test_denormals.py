"""Denormal floats are flushed to zero in every training process and every torch thread, and only while it trains."""

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.callbacks.denormals import FlushDenormalsCallback, denormals_kept, set_flush_denormal

from conftest import compose_train, torch_threads


@pytest.fixture
def two_threads():
    with torch_threads(2):
        yield


def test_every_torch_thread_flushes_not_only_the_calling_one(two_threads):
    """torch.set_flush_denormal alone leaves the intra-op threads (made by the op below) computing denormals."""
    assert denormals_kept()
    torch.set_flush_denormal(True)
    try:
        assert denormals_kept()  # the negative control: the other thread's share of the op still holds denormals
        set_flush_denormal(True)
        assert not denormals_kept()
        set_flush_denormal(False)
        assert denormals_kept()
    finally:
        set_flush_denormal(False)


class Probe(L.Callback):
    def __init__(self) -> None:
        self.seen: list[bool] = []

    def on_train_batch_start(self, *args) -> None:
        self.seen.append(denormals_kept())


@pytest.mark.parametrize("flush", [True, False])
def test_training_steps_flush_denormals_and_the_process_gets_them_back(tmp_path, flush, two_threads):
    cfg = compose_train(tmp_path / "run", ["model.components.denoiser.block_out_channels=[16,32]",
                                           "data.source.limit=32", "data.batch_size=8"])
    probe = Probe()
    callbacks = [FlushDenormalsCallback(), probe] if flush else [probe]  # negative control: no callback
    trainer = L.Trainer(max_steps=2, callbacks=callbacks, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, limit_val_batches=0, num_sanity_val_steps=0)
    assert denormals_kept()
    trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    assert probe.seen == [not flush] * 2
    assert denormals_kept()  # restored at teardown


class Failing(L.Callback):
    def on_train_batch_start(self, *args) -> None:
        raise RuntimeError("a step failed")


def test_a_failed_fit_gives_the_process_its_setting_back(tmp_path):
    cfg = compose_train(tmp_path / "run", ["model.components.denoiser.block_out_channels=[16,32]",
                                           "data.source.limit=32", "data.batch_size=8"])
    trainer = L.Trainer(max_steps=2, callbacks=[FlushDenormalsCallback(), Failing()], logger=False,
                        enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                        num_sanity_val_steps=0)
    with pytest.raises(RuntimeError, match="a step failed"):
        trainer.fit(instantiate(cfg.model), datamodule=instantiate(cfg.data))
    assert denormals_kept()


def test_both_training_configs_flush_denormals(tmp_path):
    for overrides in ([], ["experiment=digits_autoencoder"]):
        callbacks = compose_train(tmp_path / "run", overrides).callbacks
        assert callbacks.flush_denormals._target_.endswith("FlushDenormalsCallback")
