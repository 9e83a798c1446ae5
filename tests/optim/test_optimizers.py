"""Every optimizer and LR-schedule option: the named package's class, real updates, correct stepping."""

from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate

from sd_lightning.callbacks.schedule_free import ScheduleFreeModeCallback
from sd_lightning.cli.config import CONFIG_DIR
from sd_lightning.optim.schedules import build_lr_scheduler, configure_optimization

from conftest import compose_train

EXPECTED_CLASS = {
    "adamw": "torch.optim.adamw.AdamW",
    "adam": "torch.optim.adam.Adam",
    "sgd": "torch.optim.sgd.SGD",
    "lion": "lion_pytorch.lion_pytorch.Lion",
    "adafactor": "transformers.optimization.Adafactor",
    "prodigy": "prodigyopt.prodigy.Prodigy",
    "schedule_free_adamw": "schedulefree.adamw_schedulefree.AdamWScheduleFree",
}


def _regression_losses(optimizer_factory, steps: int = 30) -> list[float]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(64, 8)
    y = x @ torch.arange(8.0).unsqueeze(1) / 8
    optimizer = optimizer_factory(params=model.parameters())
    if hasattr(optimizer, "train"):
        optimizer.train()
    losses = []
    for _ in range(steps):
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASS))
def test_optimizer_option_is_the_packages_class_and_trains(tmp_path, name):
    cfg = compose_train(tmp_path / "r", [f"optimizer={name}"])
    factory = instantiate(cfg.optimizer)
    optimizer = factory(params=[torch.nn.Parameter(torch.zeros(2))])
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == EXPECTED_CLASS[name]
    losses = _regression_losses(factory)
    assert losses[-1] < 0.99 * losses[0], f"{name}: {losses[0]:.4f} → {losses[-1]:.4f}"


def test_every_optimizer_yaml_is_covered():
    assert {p.stem for p in (Path(CONFIG_DIR) / "optimizer").glob("*.yaml")} == set(EXPECTED_CLASS) | {"adamw_8bit"}


def test_adamw_8bit_explains_itself_without_a_gpu(tmp_path):
    factory = instantiate(compose_train(tmp_path / "r", ["optimizer=adamw_8bit"]).optimizer)
    with pytest.raises(RuntimeError, match="optimizer=adamw"):
        factory(params=[torch.nn.Parameter(torch.zeros(2))])


class _Tiny(L.LightningModule):
    def __init__(self, schedule: str | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.schedule = schedule
        self.lrs: list[float] = []

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def configure_optimizers(self):
        from functools import partial

        factory = None if self.schedule is None else partial(build_lr_scheduler, name=self.schedule, num_warmup_steps=3)
        return configure_optimization(partial(torch.optim.SGD, lr=1.0), factory, self.parameters(),
                                      int(self.trainer.estimated_stepping_batches))


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "polynomial", "cosine_with_restarts"])
def test_schedule_steps_once_per_optimizer_step_and_ends_at_max_steps(schedule, accumulate):
    data = torch.utils.data.TensorDataset(torch.randn(200, 4))
    module = _Tiny(schedule)
    trainer = L.Trainer(max_steps=12, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert len(module.lrs) == 12
    assert module.lrs[:3] == pytest.approx([0.0, 1 / 3, 2 / 3])  # warmup, one step per optimizer step
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    assert scheduler.last_epoch == 12
    end = 1e-7 if schedule == "polynomial" else 0.0  # diffusers' polynomial schedule ends at lr_end=1e-7
    assert scheduler.get_last_lr()[0] == pytest.approx(end, abs=1e-12)  # the end value, exactly at max_steps


def test_schedule_free_callback_switches_modes(tmp_path):
    from sd_lightning.optim.optimizers import build_schedule_free_adamw

    module = _Tiny(None)
    module.configure_optimizers = lambda: build_schedule_free_adamw(module.parameters(), lr=0.01)
    modes = []

    class Spy(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            modes.append(("val", trainer.optimizers[0].param_groups[0]["train_mode"]))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(("train", trainer.optimizers[0].param_groups[0]["train_mode"]))

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    module.validation_step = lambda batch, batch_idx: None
    trainer = L.Trainer(max_steps=6, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                        callbacks=[ScheduleFreeModeCallback(), Spy()], accelerator="cpu", num_sanity_val_steps=0)
    trainer.fit(module, data, data)
    assert ("val", False) in modes and ("train", True) in modes
    assert all(mode for kind, mode in modes if kind == "train")
    assert not trainer.optimizers[0].param_groups[0]["train_mode"]


def test_schedule_free_optimizers_take_no_lr_schedule():
    from functools import partial

    from sd_lightning.optim.optimizers import build_schedule_free_adamw

    params = [torch.nn.Parameter(torch.zeros(2))]
    result = configure_optimization(partial(build_schedule_free_adamw, lr=0.01),
                                    partial(build_lr_scheduler, name="cosine"), params, 100)
    assert type(result).__name__ == "AdamWScheduleFree"  # no scheduler attached
    with_schedule = configure_optimization(partial(torch.optim.AdamW, lr=0.01), partial(build_lr_scheduler, name="cosine"),
                                           params, 100)
    assert "lr_scheduler" in with_schedule
