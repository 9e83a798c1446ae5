"""Every optimizer and LR-schedule option: the named package's class, real updates, correct stepping."""

import importlib.machinery
import importlib.util
import logging
import sys
import types
from functools import partial
from pathlib import Path

import lightning as L
import pytest
import torch
from hydra.utils import instantiate
from lightning.pytorch.callbacks import ModelCheckpoint

from sd_lightning.callbacks.ema import EMACallback
from sd_lightning.callbacks.schedule_free import ScheduleFreeModeCallback
from sd_lightning.cli.config import CONFIG_DIR
from sd_lightning.optim.optimizers import (
    auto_precision,
    build_adamw_8bit,
    build_memory_efficient_adamw,
    build_schedule_free_adamw,
    split_weight_decay,
)
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


def _regression_problem() -> tuple[torch.nn.Linear, torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 1)
    x = torch.randn(64, 8)
    return model, x, x @ torch.arange(8.0).unsqueeze(1) / 8


@pytest.mark.parametrize("name", sorted(EXPECTED_CLASS))
def test_optimizer_option_is_the_packages_class_and_trains(tmp_path, name):
    cfg = compose_train(tmp_path / "run", [f"optimizer={name}"])
    model, x, y = _regression_problem()
    optimizer = instantiate(cfg.optimizer)(params=model.parameters())
    assert f"{type(optimizer).__module__}.{type(optimizer).__name__}" == EXPECTED_CLASS[name]
    if hasattr(optimizer, "train"):
        optimizer.train()  # schedule-free: step() refuses to run in eval mode
    before = model.weight.detach().clone()
    with torch.no_grad():
        initial = torch.nn.functional.mse_loss(model(x), y).item()
    for _ in range(3):
        optimizer.zero_grad()
        torch.nn.functional.mse_loss(model(x), y).backward()
        optimizer.step()
    with torch.no_grad():
        final = torch.nn.functional.mse_loss(model(x), y).item()
    assert not torch.equal(model.weight, before), name
    assert final < initial, f"{name}: {initial:.6f} → {final:.6f}"


def test_every_optimizer_yaml_is_covered():
    assert {p.stem for p in (Path(CONFIG_DIR) / "optimizer").glob("*.yaml")} == set(EXPECTED_CLASS) | {"adamw_8bit"}


def test_adamw_8bit_option_builds_or_explains_itself_on_this_machine(tmp_path):
    """The real hardware decides: bitsandbytes' AdamW8bit with CUDA and bitsandbytes, else an error naming what is
    missing and the option to use instead."""
    factory = instantiate(compose_train(tmp_path / "run", ["optimizer=adamw_8bit"]).optimizer)
    cuda, bitsandbytes = torch.cuda.is_available(), importlib.util.find_spec("bitsandbytes") is not None
    if cuda and bitsandbytes:
        optimizer = factory(params=[torch.nn.Parameter(torch.zeros(2, device="cuda"))])
        assert type(optimizer).__module__.startswith("bitsandbytes") and type(optimizer).__name__ == "AdamW8bit"
    else:
        missing = "needs a CUDA GPU" if not cuda else "needs bitsandbytes"
        with pytest.raises(RuntimeError, match=rf"{missing}.*use optimizer=adamw\b"):
            factory(params=[torch.nn.Parameter(torch.zeros(2))])


class _StandInAdamW8bit(torch.optim.AdamW):
    """Stands in for ``bitsandbytes.optim.AdamW8bit``, which needs a real CUDA device to build and step."""


def _machine(monkeypatch: pytest.MonkeyPatch, *, cuda: bool, bitsandbytes: bool) -> None:
    """Make torch report a CUDA device (or none) and bitsandbytes importable (a stand-in module) or absent.

    Under these patches only the package's decision is tested, not bitsandbytes: its real optimizer needs CUDA
    tensors, so the stand-in records which class the package chose and with which settings.
    """
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    if bitsandbytes:
        module = types.ModuleType("bitsandbytes")
        module.__spec__ = importlib.machinery.ModuleSpec("bitsandbytes", loader=None)  # find_spec reads it
        module.optim = types.SimpleNamespace(AdamW8bit=_StandInAdamW8bit)
        monkeypatch.setitem(sys.modules, "bitsandbytes", module)
    else:
        monkeypatch.setitem(sys.modules, "bitsandbytes", None)  # find_spec gives None and the import fails


@pytest.mark.parametrize(("cuda", "bitsandbytes", "error"), [
    (True, True, None), (True, False, "needs bitsandbytes"), (False, True, "needs a CUDA GPU"),
    (False, False, "needs a CUDA GPU")])
def test_adamw_8bit_option_needs_cuda_and_bitsandbytes(monkeypatch, cuda, bitsandbytes, error):
    _machine(monkeypatch, cuda=cuda, bitsandbytes=bitsandbytes)
    params = [torch.nn.Parameter(torch.zeros(2))]
    if error is None:
        optimizer = build_adamw_8bit(params, lr=1e-3, weight_decay=0.05)
        assert type(optimizer) is _StandInAdamW8bit
        assert optimizer.defaults["lr"] == 1e-3 and optimizer.defaults["weight_decay"] == 0.05
    else:
        with pytest.raises(RuntimeError, match=rf"optimizer=adamw_8bit {error}.*use optimizer=adamw\b"):
            build_adamw_8bit(params)


@pytest.mark.parametrize(("cuda", "bitsandbytes", "reason"), [
    (True, True, None), (True, False, "bitsandbytes is not installed"), (False, True, "no CUDA device"),
    (False, False, "no CUDA device")])
def test_memory_efficient_adamw_is_8bit_only_with_cuda_and_bitsandbytes(monkeypatch, caplog, cuda, bitsandbytes,
                                                                        reason):
    """experiment=finetune_sd's optimizer: 8-bit AdamW on a CUDA machine with bitsandbytes, else torch's AdamW
    with the same settings and one log line naming why."""
    _machine(monkeypatch, cuda=cuda, bitsandbytes=bitsandbytes)
    with caplog.at_level(logging.INFO, logger="sd_lightning"):
        optimizer = build_memory_efficient_adamw([torch.nn.Parameter(torch.zeros(2))], lr=3e-5, weight_decay=0.02)
    assert type(optimizer) is (_StandInAdamW8bit if reason is None else torch.optim.AdamW)
    assert optimizer.defaults["lr"] == 3e-5 and optimizer.defaults["weight_decay"] == 0.02
    fallbacks = [r.getMessage() for r in caplog.records if "8-bit AdamW unavailable" in r.getMessage()]
    if reason is None:
        assert fallbacks == []
    else:
        assert len(fallbacks) == 1 and f"({reason})" in fallbacks[0], fallbacks


def _bf16_probe(native: bool):
    """``torch.cuda.is_bf16_supported`` of a GPU with bf16 units (Ampere and newer) or without (V100, T4), where it
    still answers True unless ``including_emulation=False``."""
    return lambda including_emulation=True: native or including_emulation


@pytest.mark.parametrize(("cuda", "bf16_probe", "expected"), [
    pytest.param(True, _bf16_probe(native=True), "bf16-mixed", id="gpu-with-bf16-units"),
    pytest.param(True, _bf16_probe(native=False), "32-true", id="older-gpu-bf16-only-emulated"),
    # A ROCm build answers True without any device: the CUDA check comes first.
    pytest.param(False, lambda including_emulation=True: True, "32-true", id="no-cuda-device"),
])
def test_auto_precision_follows_the_gpu(monkeypatch, cuda, bf16_probe, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", bf16_probe)
    assert auto_precision() == expected


@pytest.mark.parametrize("name", ["constant", "cosine", "cosine_with_restarts", "linear", "polynomial"])
def test_lr_scheduler_options_build_a_schedule(tmp_path, name):
    factory = instantiate(compose_train(tmp_path / "run", [f"lr_scheduler={name}"]).lr_scheduler)
    result = configure_optimization(partial(torch.optim.SGD, lr=0.1), factory,
                                    [torch.nn.Parameter(torch.zeros(2))], num_training_steps=1000)
    assert isinstance(result["lr_scheduler"]["scheduler"], torch.optim.lr_scheduler.LRScheduler)
    assert result["lr_scheduler"]["interval"] == "step"


def test_lr_scheduler_none_leaves_a_constant_lr(tmp_path):
    factory = instantiate(compose_train(tmp_path / "run", ["lr_scheduler=none"]).lr_scheduler)
    result = configure_optimization(partial(torch.optim.SGD, lr=0.1), factory,
                                    [torch.nn.Parameter(torch.zeros(2))], num_training_steps=1000)
    assert isinstance(result, torch.optim.SGD)


class _Normed(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3)
        self.group_norm = torch.nn.GroupNorm(2, 4)
        self.proj = torch.nn.Linear(4, 4)
        self.ln = torch.nn.LayerNorm(4)  # no "norm" in the name: caught by being 1-D
        self.frozen = torch.nn.Linear(4, 4).requires_grad_(False)


def test_split_weight_decay_splits_norms_and_biases():
    module = _Normed()
    decay, no_decay = split_weight_decay(module.named_parameters(), weight_decay=0.05)
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0
    assert {id(p) for p in decay["params"]} == {id(module.conv.weight), id(module.proj.weight)}
    assert {id(p) for p in no_decay["params"]} == {
        id(p) for p in (module.conv.bias, module.group_norm.weight, module.group_norm.bias, module.proj.bias,
                        module.ln.weight, module.ln.bias)
    }
    torch.optim.AdamW(split_weight_decay(module.named_parameters(), 0.05))  # valid groups

    decay_default, _ = split_weight_decay(module.named_parameters())
    assert "weight_decay" not in decay_default  # inherits the optimizer's own default
    assert torch.optim.AdamW(split_weight_decay(module.named_parameters()), weight_decay=0.3).param_groups[0]["weight_decay"] == 0.3


def test_split_weight_decay_catches_2d_norm_weights_by_name():
    named = [("block.norm_out.weight", torch.nn.Parameter(torch.ones(4, 4))),
             ("block.to_q.weight", torch.nn.Parameter(torch.ones(4, 4)))]
    decay, no_decay = split_weight_decay(named, 0.1)
    assert decay["params"] == [named[1][1]] and no_decay["params"] == [named[0][1]]


class _Tiny(L.LightningModule):
    """A linear layer trained with ``configure_optimization``; records the lr of every optimizer step."""

    def __init__(self, schedule: str | None) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)
        self.schedule = schedule
        self.lrs: list[float] = []

    def trainable_parameters(self) -> list[torch.nn.Parameter]:
        return list(self.parameters())

    def training_step(self, batch, batch_idx):
        return self.layer(batch[0]).pow(2).mean()

    def on_before_optimizer_step(self, optimizer):
        self.lrs.append(optimizer.param_groups[0]["lr"])

    def on_save_checkpoint(self, checkpoint):
        checkpoint["lrs"] = list(self.lrs)

    def configure_optimizers(self):
        factory = None if self.schedule is None else partial(build_lr_scheduler, name=self.schedule, num_warmup_steps=3)
        return configure_optimization(partial(torch.optim.SGD, lr=1.0), factory, self.parameters(),
                                      int(self.trainer.estimated_stepping_batches))


def _assert_schedule_ran_to_its_end(schedule: str, lrs: list[float], last_epoch: int, last_lr: float) -> None:
    assert len(lrs) == 12  # one entry per optimizer step
    assert lrs[:4] == pytest.approx([0.0, 1 / 3, 2 / 3, 1.0])  # warmup advances once per optimizer step
    assert last_epoch == 12
    end = 1e-7 if schedule == "polynomial" else 0.0  # diffusers' polynomial schedule ends at lr_end=1e-7
    assert last_lr == pytest.approx(end, abs=1e-12)  # the end value, reached exactly at max_steps


@pytest.mark.parametrize("accumulate", [1, 3])
@pytest.mark.parametrize("schedule", ["cosine", "linear", "polynomial", "cosine_with_restarts"])
def test_schedule_steps_once_per_optimizer_step_and_ends_at_max_steps(schedule, accumulate):
    data = torch.utils.data.TensorDataset(torch.randn(200, 4))
    module = _Tiny(schedule)
    trainer = L.Trainer(max_steps=12, accumulate_grad_batches=accumulate, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, accelerator="cpu")
    trainer.fit(module, torch.utils.data.DataLoader(data, batch_size=4))
    assert trainer.fit_loop.epoch_loop.batch_progress.total.completed == 12 * accumulate
    scheduler = trainer.lr_scheduler_configs[0].scheduler
    _assert_schedule_ran_to_its_end(schedule, module.lrs, scheduler.last_epoch, scheduler.get_last_lr()[0])


def test_schedule_ends_at_max_steps_with_two_ddp_processes(tmp_path):
    # ddp_spawn, not ddp: the ddp launcher would re-run this pytest command line in the second process.
    data = torch.utils.data.TensorDataset(torch.randn(400, 4))
    trainer = L.Trainer(max_steps=12, accumulate_grad_batches=2, logger=False, enable_progress_bar=False,
                        enable_model_summary=False, accelerator="cpu", strategy="ddp_spawn", devices=2,
                        default_root_dir=tmp_path, enable_checkpointing=True)
    trainer.fit(_Tiny("cosine"), torch.utils.data.DataLoader(data, batch_size=4))
    state = torch.load(next(tmp_path.rglob("*.ckpt")), weights_only=True)
    assert state["global_step"] == 12
    scheduler_state = state["lr_schedulers"][0]
    _assert_schedule_ran_to_its_end("cosine", state["lrs"], scheduler_state["last_epoch"], scheduler_state["_last_lr"][0])


def test_schedule_free_optimizers_take_no_lr_schedule():
    params = [torch.nn.Parameter(torch.zeros(2))]
    result = configure_optimization(partial(build_schedule_free_adamw, lr=0.01),
                                    partial(build_lr_scheduler, name="cosine"), params, 100)
    assert type(result).__name__ == "AdamWScheduleFree"  # no scheduler attached
    with_schedule = configure_optimization(partial(torch.optim.AdamW, lr=0.01), partial(build_lr_scheduler, name="cosine"),
                                           params, 100)
    assert "lr_scheduler" in with_schedule


def _schedule_free_module() -> _Tiny:
    torch.manual_seed(0)
    module = _Tiny(None)
    module.configure_optimizers = lambda: build_schedule_free_adamw(module.parameters(), lr=0.05, warmup_steps=0)
    module.validation_step = lambda batch, batch_idx: None
    return module


def _same_batches(count: int) -> torch.utils.data.DataLoader:
    """Identical batches, so a run resumed mid-epoch sees the data the uninterrupted run saw."""
    torch.manual_seed(1)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, 4).repeat(count, 1)), batch_size=4)


def _train_mode(trainer: L.Trainer) -> bool:
    return trainer.optimizers[0].param_groups[0]["train_mode"]


def _trainer(callbacks: list[L.Callback], **kwargs) -> L.Trainer:
    kwargs = {"logger": False, "enable_checkpointing": False, **kwargs}
    return L.Trainer(enable_progress_bar=False, enable_model_summary=False, accelerator="cpu",
                     num_sanity_val_steps=0, callbacks=callbacks, **kwargs)


def test_schedule_free_callback_switches_modes_around_validation():
    modes: list[tuple[str, bool]] = []

    class Spy(L.Callback):
        def on_validation_batch_start(self, trainer, pl_module, batch, batch_idx, dataloader_idx=0):
            modes.append(("val", _train_mode(trainer)))

        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            modes.append(("train", _train_mode(trainer)))

    data = _same_batches(2)
    trainer = _trainer([ScheduleFreeModeCallback(), Spy()], max_steps=6)
    trainer.fit(_schedule_free_module(), data, data)
    assert [kind for kind, _ in modes] == ["train", "train", "val", "val"] * 3
    assert all(mode == (kind == "train") for kind, mode in modes)
    assert not _train_mode(trainer)  # fit() leaves the averaged weights in the module


def test_schedule_free_callback_gets_the_training_weights_back_after_ema_validation():
    """EMACallback swaps its weights in after the switch to eval and out in on_validation_end."""
    before: list[torch.Tensor] = []
    after: list[torch.Tensor] = []

    class First(L.Callback):
        def on_validation_start(self, trainer, pl_module):
            before.append(pl_module.layer.weight.detach().clone())

    class Last(L.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            if len(after) < len(before):
                after.append(pl_module.layer.weight.detach().clone())

    data = _same_batches(2)
    callbacks = [First(), ScheduleFreeModeCallback(), EMACallback(decay=0.5), Last()]
    _trainer(callbacks, max_steps=6).fit(_schedule_free_module(), data, data)
    assert len(after) == 2
    for train_weights, resumed_weights in zip(before, after):
        torch.testing.assert_close(resumed_weights, train_weights, rtol=0, atol=1e-6)


def test_schedule_free_checkpoints_hold_eval_weights_and_resume_exactly(tmp_path):
    saved: dict[str, torch.Tensor] = {}

    class Spy(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, *args):
            if trainer.global_step == 4:
                saved["train"] = pl_module.layer.weight.detach().clone()

    checkpoint = ModelCheckpoint(dirpath=tmp_path, filename="{step}", every_n_train_steps=4, save_top_k=-1)
    uninterrupted = _schedule_free_module()
    _trainer([ScheduleFreeModeCallback(), Spy(), checkpoint], max_steps=8, enable_checkpointing=True,
             limit_val_batches=0).fit(uninterrupted, _same_batches(20))

    state = torch.load(tmp_path / "step=4.ckpt", weights_only=False)
    assert state["optimizer_states"][0]["param_groups"][0]["train_mode"] is False
    assert not torch.equal(state["state_dict"]["layer.weight"], saved["train"])  # the averaged weights

    resumed = _schedule_free_module()
    _trainer([ScheduleFreeModeCallback()], max_steps=8, limit_val_batches=0).fit(
        resumed, _same_batches(20), ckpt_path=tmp_path / "step=4.ckpt")
    for name, value in uninterrupted.state_dict().items():
        assert torch.equal(resumed.state_dict()[name], value), name
