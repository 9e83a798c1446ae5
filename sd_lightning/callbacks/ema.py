"""Exponential moving average of the trained weights, as a callback whose state lives in the checkpoint."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from diffusers.training_utils import EMAModel


def _named_trainable(module: L.LightningModule) -> list[tuple[str, torch.nn.Parameter]]:
    """Trained weights only: the frozen VAE / text encoder are not averaged."""
    wanted = {id(p) for p in module.trainable_parameters()}
    return [(name, p) for name, p in module.named_parameters() if id(p) in wanted]


class EMACallback(L.Callback):
    """diffusers' EMAModel over the module's trainable parameters, swapped in for validation.

    The shadow weights are saved with their parameter names so sampling and export can use them
    without the training config. The raw weights are what a checkpoint's ``state_dict`` holds.
    """

    def __init__(self, decay: float = 0.999, use_ema_warmup: bool = False, update_after_step: int = 0,
                 validate_with_ema: bool = True, foreach: bool = True) -> None:
        """``foreach``: update the shadow weights with torch's multi-tensor ops (one kernel per op for all weights,
        not one per weight: the per-weight loop was a few percent of a tiny model's CPU step)."""
        if not 0.0 < decay < 1.0:
            raise ValueError(f"callbacks.ema.decay must be in (0, 1), got {decay}")
        self.decay = decay
        self.use_ema_warmup = use_ema_warmup
        self.update_after_step = update_after_step
        self.validate_with_ema = validate_with_ema
        self.foreach = foreach
        self._parameters: list[torch.nn.Parameter] = []
        self.ema: EMAModel | None = None
        self.param_names: list[str] = []
        self._pending_state: dict[str, Any] | None = None
        self._last_step = -1
        self._swapped = False

    @property
    def state_key(self) -> str:
        return "ema"

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        named = _named_trainable(pl_module)
        self.param_names = [name for name, _ in named]
        self._parameters = [p for _, p in named]  # the same objects for the whole fit
        self.ema = EMAModel(
            [p for _, p in named],
            decay=self.decay,
            use_ema_warmup=self.use_ema_warmup,
            update_after_step=self.update_after_step,
            foreach=self.foreach,
        )
        if self._pending_state is not None:
            if self._pending_state["param_names"] != self.param_names:
                raise ValueError("the checkpoint's EMA weights do not match this model's trainable parameters")
            self.ema.load_state_dict({k: v for k, v in self._pending_state.items() if k != "param_names"})
            self._pending_state = None
        self.ema.to(pl_module.device)

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # After Lightning restored the loops: a resumed run must not count the restored step as new.
        self._last_step = trainer.global_step

    def on_train_batch_end(self, trainer: L.Trainer, pl_module: L.LightningModule, *args: Any) -> None:
        if self.ema is not None and trainer.global_step > self._last_step:
            self.ema.step(self._parameters)
            self._last_step = trainer.global_step

    def _swap_in(self, pl_module: L.LightningModule) -> None:
        if self.ema is None or not self.validate_with_ema or self._swapped:
            return
        params = [p for _, p in _named_trainable(pl_module)]
        self.ema.store(params)
        self.ema.copy_to(params)
        self._swapped = True

    def _swap_out(self, pl_module: L.LightningModule) -> None:
        if self._swapped and self.ema is not None:
            self.ema.restore([p for _, p in _named_trainable(pl_module)])
            self._swapped = False

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_in(pl_module)

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._swap_out(pl_module)

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule, checkpoint: dict[str, Any]) -> None:
        """Never let a checkpoint taken while EMA weights are swapped in store them as the raw weights."""
        if self._swapped and self.ema is not None:
            prefix_names = dict(_named_trainable(pl_module))
            for name, raw in zip(prefix_names, self.ema.temp_stored_params):
                checkpoint["state_dict"][name] = raw.detach().clone()

    def state_dict(self) -> dict[str, Any]:
        if self.ema is None:
            return {}
        state = self.ema.state_dict()
        state["param_names"] = list(self.param_names)
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if state_dict:
            self._pending_state = dict(state_dict)
