"""Fault injection for the reliability tests (importable by training subprocesses via PYTHONPATH)."""

import json
import os
import signal
from pathlib import Path

import lightning as L
import torch
import torch.distributed as dist


class KillAtStep(L.Callback):
    """kill -9 of the training process itself when ``global_step`` reaches ``step`` (between checkpoints); only
    of data-parallel process ``rank`` when it is set."""

    def __init__(self, step: int, rank: int | None = None) -> None:
        self.step = step
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and self.rank in (None, trainer.global_rank):
            os.kill(os.getpid(), signal.SIGKILL)


class SignalAtStep(L.Callback):
    """Deliver ``signum`` (a preemption notice) to the process at ``step``."""

    def __init__(self, step: int, signum: int = signal.SIGTERM) -> None:
        self.step = step
        self.signum = signum

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if trainer.global_step == self.step and batch_idx >= 0:
            os.kill(os.getpid(), self.signum)
            self.step = -1


class PoisonBatches(L.Callback):
    """Makes the pixels of batches from ``start`` on NaN (a broken image that got through); only on process
    ``rank`` when it is set."""

    def __init__(self, start: int, count: int = 1000, rank: int | None = None) -> None:
        self.start = start
        self.stop = start + count
        self.rank = rank

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        if self.start <= trainer.global_step < self.stop and self.rank in (None, trainer.global_rank):
            batch["pixel_values"].fill_(float("nan"))


class SaveRankWeights(L.Callback):
    """Each process writes its trained weights at the end of fit (``<folder>/rank<r>.pt``)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def on_train_end(self, trainer, pl_module) -> None:
        Path(self.folder).mkdir(parents=True, exist_ok=True)
        weights = {n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad}
        torch.save(weights, Path(self.folder) / f"rank{trainer.global_rank}.pt")


class OutOfMemoryLoss:
    """A per-sample MSE loss, except that training call number ``at_call`` (from 0) raises ``torch.OutOfMemoryError``.

    Used as ``loss._target_=faults.OutOfMemoryLoss``: the allocation fails inside a real training step, after
    the forward pass, as a CUDA OOM does. Calls without autograd (validation, sampling) are not counted.
    """

    def __init__(self, at_call: int) -> None:
        self.at_call = at_call
        self.calls = 0

    def __call__(self, prediction, target):
        if torch.is_grad_enabled():
            if self.calls == self.at_call:
                raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected by the test)")
            self.calls += 1
        return (prediction.float() - target.float()).square().flatten(1).mean(dim=1)


class RecordProcess(L.Callback):
    """Writes, from every process, the world size and rank it really ran with (``<folder>/<stage>-rank<r>.json``)."""

    def __init__(self, folder: str) -> None:
        self.folder = folder

    def setup(self, trainer, pl_module, stage: str) -> None:
        initialized = dist.is_available() and dist.is_initialized()
        record = {
            "pid": os.getpid(),
            "trainer_world_size": trainer.world_size,
            "global_rank": trainer.global_rank,
            "stage": stage,
            "dist_world_size": dist.get_world_size() if initialized else None,
            "dist_rank": dist.get_rank() if initialized else None,
            "backend": dist.get_backend() if initialized else None,
        }
        folder = Path(self.folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / f"{stage}-rank{trainer.global_rank}.json").write_text(json.dumps(record))


class DropSampleIds(L.Callback):
    """Removes the sample ids from training batches, so a step's randomness falls back to the per-process
    generator (seeded by rank): the negative control of the data-parallel equivalence test."""

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        batch.pop("id", None)
