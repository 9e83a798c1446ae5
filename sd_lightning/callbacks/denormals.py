"""Denormal floats flushed to zero while training on a CPU.

Once training moves a model's weights, some intermediate values of its step fall below float32's normal range
(~1.2e-38; none are at initialization, nor in a checkpoint's weights); x86 CPUs compute on such denormals far more
slowly. Measured on the digits step
(2 cores, interleaved runs): 94 ms → 78 ms per step. It also made the step slow down during a run (the first
steps, before training moves the weights, ran fastest), so a few timed steps under-predicted the run by ~20 %
(``estimate=true``). Values that small carry nothing a diffusion loss can use.
"""

from __future__ import annotations

import lightning as L
import torch


class FlushDenormalsCallback(L.Callback):
    """``torch.set_flush_denormal(True)`` in every training process from setup to teardown, then as it was."""

    def __init__(self) -> None:
        self._kept: bool | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._kept is None:
            self._kept = bool(torch.tensor([1e-40]).mul(1.0).item())  # nonzero: denormals are kept
            torch.set_flush_denormal(True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # a failed or interrupted fit skips teardown: the process gets its setting back here

    def _restore(self) -> None:
        if self._kept is not None:
            torch.set_flush_denormal(not self._kept)
            self._kept = None
