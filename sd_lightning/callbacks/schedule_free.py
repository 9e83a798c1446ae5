"""Train/eval mode switching for schedule-free optimizers (their weights differ between the two modes)."""

from __future__ import annotations

from typing import Any

import lightning as L
import torch


def _is_switchable(optimizer: Any) -> bool:
    """Schedule-free optimizers have ``train()``/``eval()`` methods; ordinary ones have neither."""
    return callable(getattr(optimizer, "train", None)) and callable(getattr(optimizer, "eval", None))


def _switchable(trainer: L.Trainer) -> list[Any]:
    return [opt for opt in trainer.optimizers if _is_switchable(opt)]


def _in_train_mode(optimizer: Any) -> bool:
    return any(group.get("train_mode", False) for group in optimizer.param_groups)


class ScheduleFreeModeCallback(L.Callback):
    """Puts schedule-free optimizers in train mode while training and eval mode for validation and saving.

    Schedule-free optimizers keep two points in the parameters: in train mode the one gradients are taken
    at, in eval mode the averaged weights that should be validated, sampled from and saved. Switching is
    a no-op for ordinary optimizers and for one already in the wanted mode.

    Back to train mode happens at the next training batch rather than in ``on_validation_end``: callbacks
    later in the list (``EMACallback``) restore their own swapped-in weights in that same hook, and
    switching first would move the EMA weights instead of the model's. Checkpoints always hold the
    eval-mode weights with the optimizer state marked as eval mode, so a resumed run switches back to train
    mode exactly as the uninterrupted run does.
    """

    def _set(self, trainer: L.Trainer, mode: str) -> None:
        for optimizer in _switchable(trainer):
            getattr(optimizer, mode)()

    def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "train")

    def on_train_epoch_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "train")

    def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # After a validation or a checkpoint left the optimizer in eval mode.
        self._set(trainer, "train")

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._set(trainer, "eval")

    def on_train_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # The module left after fit() holds the averaged weights, ready for sampling or export.
        self._set(trainer, "eval")

    def on_save_checkpoint(self, trainer: L.Trainer, pl_module: L.LightningModule,
                           checkpoint: dict[str, Any]) -> None:
        """Save eval-mode weights even when the checkpoint is taken mid-training (``every_n_train_steps``).

        Lightning has already collected the state dict when this hook runs, so the switched parameters are
        copied into it and their optimizer state is marked as eval mode to match. The optimizer stays in
        eval mode until the next training batch, so the live run continues from the same weights a resumed
        run would load.
        """
        switched = [(index, opt) for index, opt in enumerate(trainer.optimizers)
                    if _is_switchable(opt) and _in_train_mode(opt)]
        if not switched:
            return
        with torch.no_grad():
            for _, optimizer in switched:
                optimizer.eval()
        state_dict = checkpoint.get("state_dict")
        if state_dict is not None:
            ids = {id(p) for _, opt in switched for group in opt.param_groups for p in group["params"]}
            for name, param in pl_module.named_parameters():
                if id(param) in ids and name in state_dict:
                    state_dict[name] = param.detach().clone()
        optimizer_states = checkpoint.get("optimizer_states", [])
        for index, _ in switched:
            if index < len(optimizer_states):
                for group in optimizer_states[index]["param_groups"]:
                    if "train_mode" in group:
                        group["train_mode"] = False
