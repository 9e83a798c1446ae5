"""Lightning strategies for multi-GPU training, built with what the latent diffusion module needs.

DDP needs nothing special (``conf/trainer/ddp.yaml`` instantiates Lightning's class directly). FSDP
wraps each denoiser block in its own shard unit and keeps original parameters, because the module mixes
frozen (VAE, text encoder) and trained weights, which one flat parameter cannot hold.
"""

from __future__ import annotations

from typing import Any


def denoiser_block_classes() -> set[type]:
    """The diffusers blocks (UNet and MMDiT) that form FSDP units and activation-checkpointing regions."""
    from diffusers.models.attention import JointTransformerBlock
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    return {ResnetBlock2D, Transformer2DModel, JointTransformerBlock}


def ddp_strategy(timeout_seconds: float = 1800.0, **kwargs: Any) -> Any:
    """Lightning's DDPStrategy with its collective timeout in seconds: a process whose peer died or hangs exits
    after at most that long (with a message saying so) instead of waiting forever."""
    from datetime import timedelta

    from lightning.pytorch.strategies import DDPStrategy

    if timeout_seconds <= 0:
        raise ValueError(f"trainer.strategy.timeout_seconds must be positive, got {timeout_seconds}")
    return DDPStrategy(timeout=timedelta(seconds=timeout_seconds), **kwargs)


def fsdp_strategy(sharding_strategy: str = "FULL_SHARD", cpu_offload: bool = False,
                  activation_checkpointing: bool = True, **kwargs: Any) -> Any:
    """Lightning's FSDPStrategy sharding the denoiser block by block."""
    from lightning.pytorch.strategies import FSDPStrategy

    blocks = denoiser_block_classes()
    return FSDPStrategy(
        sharding_strategy=sharding_strategy,
        cpu_offload=cpu_offload,
        auto_wrap_policy=blocks,
        activation_checkpointing_policy=blocks if activation_checkpointing else None,
        use_orig_params=True,
        **kwargs,
    )


def deepspeed_strategy(stage: int = 2, offload_optimizer: bool = False, **kwargs: Any) -> Any:
    """Lightning's DeepSpeedStrategy (ZeRO stage 1-3), with an actionable error when deepspeed is absent."""
    from lightning.pytorch.strategies import DeepSpeedStrategy

    try:
        import deepspeed  # noqa: F401
    except ImportError as err:
        raise RuntimeError(
            "trainer=deepspeed needs the deepspeed package (`pip install deepspeed`, CUDA machines only); "
            "use trainer=ddp or trainer=fsdp instead"
        ) from err
    return DeepSpeedStrategy(stage=stage, offload_optimizer=offload_optimizer, **kwargs)
