"""Skip steps whose loss or gradients are NaN/Inf, count them, and stop cleanly when they persist."""

from __future__ import annotations

import logging
from typing import Any

import lightning as L
import torch

from sd_lightning.callbacks.checkpointing import last_checkpoint_path

log = logging.getLogger(__name__)


class NonFiniteTrainingError(RuntimeError):
    """Training produced non-finite losses or gradients too many times in a row."""


def _finite_gradients(parameters: list[torch.nn.Parameter]) -> bool:
    """One multi-tensor L2 norm per gradient, in float32 (a half-precision norm overflows at 65504), then one sync: a
    norm is finite when every entry is (overflow needs entries near 1e19). 7× faster than a check per tensor."""
    grads = [p.grad for p in parameters if p.grad is not None]
    return not grads or bool(torch.stack(torch._foreach_norm(grads, dtype=torch.float32)).isfinite().all())


class NonFiniteGuardCallback(L.Callback):
    """Non-finite gradients are dropped before the optimizer sees them (so weights and optimizer state stay
    as they were); modules return no loss for a non-finite loss. After ``max_consecutive`` bad steps in a
    row, the last good state is saved as ``last.ckpt`` and training stops with an actionable message.
    """

    def __init__(self, max_consecutive: int = 5) -> None:
        if max_consecutive < 1:
            raise ValueError(f"callbacks.nonfinite.max_consecutive must be >= 1, got {max_consecutive}")
        self.max_consecutive = max_consecutive
        self.skipped = 0
        self.consecutive = 0
        self._bad_gradients = False

    @property
    def state_key(self) -> str:
        return "nonfinite"

    def state_dict(self) -> dict[str, Any]:
        return {"skipped": self.skipped, "consecutive": self.consecutive}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.skipped = int(state_dict.get("skipped", 0))
        self.consecutive = int(state_dict.get("consecutive", 0))

    def on_before_optimizer_step(self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: Any) -> None:
        parameters = [p for group in optimizer.param_groups for p in group["params"]]
        if not _finite_gradients(parameters):
            for parameter in parameters:
                parameter.grad = None
            self._bad_gradients = True

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if loss is None or self._bad_gradients:
            self.skipped += 1
            self.consecutive += 1
            log.warning("step %d skipped: non-finite %s (%d in a row, %d in all)", trainer.global_step,
                        "gradients" if self._bad_gradients else "loss", self.consecutive, self.skipped)
        else:
            self.consecutive = 0
        self._bad_gradients = False
        pl_module.log("train/nonfinite_skipped", float(self.skipped), reduce_fx="max")
        if self.consecutive >= self.max_consecutive:
            self._stop(trainer, pl_module)

    def _stop(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        weights_ok = all(torch.isfinite(p).all() for p in pl_module.parameters())
        path = last_checkpoint_path(trainer)
        if weights_ok and path is not None:
            trainer.save_checkpoint(path, weights_only=False)
            where = f"the last good state is saved at {path}"
        else:
            where = "the weights are no longer finite, so nothing was saved: resume from the newest existing checkpoint"
        raise NonFiniteTrainingError(
            f"{self.consecutive} consecutive training steps had non-finite loss or gradients "
            f"(at step {trainer.global_step}); {where}. Try a lower optimizer.lr, "
            "trainer.gradient_clip_val=1.0, or check the data for broken images."
        )
