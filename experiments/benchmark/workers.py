"""Benchmark workers: each configuration of experiments/benchmark.py runs in one of these, in its own process.

The parent (experiments/benchmark.py) starts a worker with ``--worker <json>``; the worker builds its configuration,
warms up, then runs blocks of units when told over stdin and reports each block's seconds on stdout.
"""

from __future__ import annotations

import json
import math
import os
import resource
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, TextIO

PROTOCOL = "@@BENCH "


class Channel:
    """The worker's side of the protocol: report the last block's time, then wait for the next command."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self.started: float | None = None
        self.ready_info: dict[str, Any] = {}

    def send(self, message: dict[str, Any]) -> None:
        self.out.write(PROTOCOL + json.dumps(message) + "\n")
        self.out.flush()

    def boundary(self) -> int | None:
        """Units to run next (None: finish)."""
        now = time.perf_counter()
        if self.started is None:
            self.send({"ready": True, **self.ready_info})
        else:
            self.send({"seconds": now - self.started})
        command = json.loads(sys.stdin.readline() or '{"cmd": "finish"}')
        self.started = time.perf_counter()
        return int(command["units"]) if command["cmd"] == "run" else None


def peak_rss() -> dict[str, float]:
    """Peak resident set size of this process and of its waited-for children (data-loader workers), in MiB."""
    return {"peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
            "children_peak_rss_mib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024}


def compose_config(overrides: list[str], run_dir: Path, logger: str | None = "csv") -> Any:
    """``conf/train.yaml`` with ``overrides``, writing into ``run_dir``; ``logger=None`` keeps the default loggers."""
    from hydra import compose, initialize_config_dir

    from sd_lightning.cli.config import CONFIG_DIR

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("train", overrides=[f"paths.run_dir={run_dir}", f"paths.output_root={run_dir.parent}",
                                           *([f"logger={logger}"] if logger else []), *overrides])


def apply_unet_option(unet: Any, option: str | None, info: dict[str, Any]) -> None:
    """channels_last or torch.compile (in place, so parameter names and the optimizer are unchanged)."""
    import torch

    if option == "channels_last":
        unet.to(memory_format=torch.channels_last)
    elif option and option.startswith("compile:"):
        unet.compile(backend=option.split(":", 1)[1])
        info["compile_backend"] = option.split(":", 1)[1]


def write_image_folder(root: Path, size: int, count: int = 400) -> Path:
    """``count`` digits as ``size``-pixel PNGs in class folders (captions from the folder names), like a user's folder."""
    from sd_lightning.data.sources import DigitsSource

    source = DigitsSource(size=size, limit=count)
    for index, item in enumerate(source.items):
        folder = root / str(item.label).replace(" ", "_")
        folder.mkdir(parents=True, exist_ok=True)
        source.load_image(index).save(folder / f"{index:05d}.png")
    return root


def block_controller(channel: Channel | None, warmup: int, info: dict[str, Any]) -> Any:
    """A callback holding the loop at block boundaries until the parent says go (rank 0; other ranks follow via DDP).

    A block runs from one batch start to the batch start after it, so data loading and every callback's hooks of
    those steps are inside it.
    """
    import lightning as L

    class BlockController(L.Callback):
        def __init__(self) -> None:
            self.next_boundary = warmup
            self.fit_started = 0.0

        def on_train_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
            self.fit_started = time.perf_counter()

        def on_train_batch_start(self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any,
                                 batch_idx: int) -> None:
            if channel is None or trainer.global_step != self.next_boundary:
                return
            if channel.started is None:
                channel.ready_info = {**info, "warmup_seconds": time.perf_counter() - self.fit_started,
                                      "torch_threads": __import__("torch").get_num_threads(),
                                      "world_size": trainer.world_size}
            units = channel.boundary()
            self.next_boundary = math.inf if units is None else self.next_boundary + units

    return BlockController()


def run_lightning(config: dict[str, Any], channel: Channel | None, budget: int, scratch: Path) -> dict[str, Any]:
    """A real L.Trainer fit of LatentDiffusionModule built from the Hydra config, as sdl-train builds it."""
    import lightning as L
    from hydra.utils import instantiate

    overrides = list(config["overrides"])
    if config.get("image_folder"):
        size = int(config["image_folder"])
        folder = write_image_folder(scratch / "images", size)
        overrides += ["data=imagefolder", f"data.root={folder}", f"data.resolution={size}"]
    cfg = compose_config(overrides, scratch / "run")
    info: dict[str, Any] = {}
    if config.get("cache"):
        from omegaconf import OmegaConf

        from sd_lightning.data.cache import build_cache

        started = time.perf_counter()
        OmegaConf.update(cfg, "data.cache", str(scratch / "cache"))
        build_cache(cfg)  # seeds and builds the model as below, so the cache matches its random VAE
        info["cache_build_seconds"] = time.perf_counter() - started
    L.seed_everything(int(cfg.seed), workers=True)
    datamodule = instantiate(cfg.data)
    model = instantiate(cfg.model)
    apply_unet_option(model.denoiser.model, config.get("unet"), info)
    warmup = int(config["warmup"])

    info["rss_before_fit_mib"] = peak_rss()["peak_rss_mib"]  # parts built; the rest of the peak is training
    trainer = instantiate(cfg.trainer, max_steps=warmup + budget + 1, callbacks=[block_controller(channel, warmup, info)], logger=False,
                          enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
                          limit_val_batches=0, num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    return {"global_step": trainer.global_step}


def run_sdl_train(config: dict[str, Any], channel: Channel | None, budget: int, scratch: Path) -> dict[str, Any]:
    """The real ``sdl-train`` loop: ``build_run`` gives every configured callback and logger (W&B offline + CSV,
    EMA, checkpoints, progress, guards, …) as training has them; only validation is moved out of reach, so the
    blocks time training steps."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from sd_lightning.cli.train import build_run, finish_loggers, log_run_config

    run_dir = scratch / "run"
    cfg = compose_config(list(config["overrides"]), run_dir, logger=None)
    warmup = int(config["warmup"])
    OmegaConf.update(cfg, "trainer.max_steps", warmup + budget + 1)
    OmegaConf.update(cfg, "trainer.check_val_every_n_epoch", 1_000_000)
    run = build_run(cfg, run_dir)
    info = {"rss_before_fit_mib": peak_rss()["peak_rss_mib"],
            "callbacks": sorted(type(c).__name__ for c in run.callbacks),
            "loggers": sorted(type(logger).__name__ for logger in run.loggers)}
    trainer = instantiate(cfg.trainer, callbacks=[*run.callbacks, block_controller(channel, warmup, info)],
                          logger=run.loggers or False)
    log_run_config(run)
    trainer.fit(run.model, datamodule=run.datamodule)
    finish_loggers(run.loggers)
    return {"global_step": trainer.global_step}


def run_sampling(config: dict[str, Any], channel: Channel, scratch: Path) -> dict[str, Any]:
    """Images from random-init weights: sd_lightning's pipeline + generate() or a hand-built diffusers pipeline."""
    import lightning as L
    import torch
    from diffusers import StableDiffusionPipeline
    from hydra.utils import instantiate

    from sd_lightning.diffusion.sampling import generate

    cfg = compose_config(config["overrides"], scratch / "run")
    L.seed_everything(int(cfg.seed), workers=True)
    model = instantiate(cfg.model).eval()
    sdl_pipeline = model.build_pipeline("ddim")
    prompts = [list(cfg.sample_prompts)[i % 10] for i in range(int(config["batch"]))]
    steps, guidance = int(config["steps"]), float(cfg.sampling.guidance_scale)
    if config["kind"] == "sample_sdl":
        def call() -> None:
            generate(sdl_pipeline, prompts, seed=0, steps=steps, guidance_scale=guidance, batch_size=len(prompts))
    else:
        pipeline = StableDiffusionPipeline(
            vae=model.vae, text_encoder=model.text_encoder, tokenizer=model.tokenizer, unet=model.denoiser.model,
            scheduler=type(sdl_pipeline.scheduler).from_config(sdl_pipeline.scheduler.config),
            safety_checker=None, feature_extractor=None, requires_safety_checker=False)
        pipeline.set_progress_bar_config(disable=True)

        def call() -> None:
            pipeline(prompt=prompts, num_inference_steps=steps, guidance_scale=guidance,
                     generator=torch.Generator().manual_seed(0), output_type="pil")
    sdl_pipeline.set_progress_bar_config(disable=True)
    started = time.perf_counter()
    with torch.no_grad():
        call()
        channel.ready_info = {"warmup_seconds": time.perf_counter() - started, "torch_threads": torch.get_num_threads()}
        while (units := channel.boundary()) is not None:
            for _ in range(units):
                call()
    return {}


def run_matmul(config: dict[str, Any], channel: Channel) -> dict[str, Any]:
    """The machine's fp32 matmul throughput: one unit is an n×n @ n×n product (2n³ FLOPs)."""
    import torch

    n = int(config["n"])
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(2):
        a @ b
    channel.ready_info = {"flops_per_unit": 2 * n**3, "torch_threads": torch.get_num_threads()}
    while (units := channel.boundary()) is not None:
        for _ in range(units):
            a @ b
    return {}


def worker_main(config: dict[str, Any]) -> None:
    """Entry of a worker subprocess; protocol lines go to the real stdout, everything else to stderr."""
    import logging
    import warnings

    warnings.filterwarnings("ignore")
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    rank = int(os.environ.get("LOCAL_RANK", "0"))
    out = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())  # library prints must not mix into the protocol
    channel = Channel(out) if rank == 0 else None
    import torch

    from sd_lightning.callbacks.denormals import set_flush_denormal

    # sdl-train flushes denormals while training (callbacks.flush_denormals), in every torch thread: every worker
    # does, so that the plain floor and the loops compared with it do the same arithmetic.
    set_flush_denormal(True)
    if config.get("threads") and "LOCAL_RANK" not in os.environ:
        torch.set_num_threads(int(config["threads"]))
    with tempfile.TemporaryDirectory(prefix="sdl-bench-") as scratch:
        kind = config["kind"]
        if kind == "lightning":
            result = run_lightning(config, channel, int(config["budget"]), Path(scratch))
        elif kind == "sdl_train":
            result = run_sdl_train(config, channel, int(config["budget"]), Path(scratch))
        elif kind == "plain":
            from floor import run_plain

            result = run_plain(config, channel, Path(scratch))
        elif kind in ("sample_sdl", "sample_diffusers"):
            result = run_sampling(config, channel, Path(scratch))
        elif kind == "matmul":
            result = run_matmul(config, channel)
        else:
            raise ValueError(f"unknown worker kind {kind!r}")
    if channel is not None:
        channel.send({"done": True, **result, **peak_rss()})
