"""Lightning's W&B logger, minus the one argument that makes wandb 0.31 warn on every run.

Lightning passes ``anonymous=None`` to ``wandb.init`` even when the user never set it, and wandb now warns that
"the anonymous setting has no effect" whenever the key is present. Dropping the key changes nothing else.
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.loggers import WandbLogger as LightningWandbLogger


class WandbLogger(LightningWandbLogger):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if self._wandb_init.get("anonymous") is None:
            self._wandb_init.pop("anonymous", None)
