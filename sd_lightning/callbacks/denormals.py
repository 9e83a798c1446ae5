"""Denormal floats flushed to zero while training on a CPU.

Once training moves a model's weights, some intermediate values of its step fall below float32's normal range
(~1.2e-38; none are at initialization, nor in a checkpoint's weights); x86 CPUs compute on such denormals far more
slowly. Measured on the digits step (2 cores, interleaved runs): 94 ms → 78 ms per step, flushing in every thread.
Values that small carry nothing a diffusion loss can use.

``torch.set_flush_denormal`` sets the calling thread's floating-point control only. torch's intra-op threads (an
OpenMP team, created at the first parallel op) keep theirs: with 2 threads, half of an op's outputs stayed denormal
when a run flushed after its data and model were built. New threads inherit the setting, so only a process that
flushes before its first parallel op is covered by the call alone; ``set_flush_denormal`` here also runs it on each
thread of the team, through the OpenMP runtime torch loaded.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import os

import lightning as L
import torch

log = logging.getLogger(__name__)
_TEAM_FUNCTION = ctypes.CFUNCTYPE(None, ctypes.c_void_p)


def _loaded_gomp_paths() -> list[str]:
    """Files of GNU OpenMP runtimes mapped into this process (a wheel may carry one renamed, e.g. libgomp-<hash>)."""
    try:
        with open("/proc/self/maps") as maps:
            return sorted({line.split()[-1] for line in maps if "libgomp" in line.rsplit("/", 1)[-1]})
    except OSError:
        return []


@functools.cache
def _openmp() -> ctypes.CDLL | None:
    """The GNU OpenMP runtime torch already loaded (Linux), or None (another runtime, or none)."""
    no_load = getattr(os, "RTLD_NOLOAD", None)
    if no_load is None:
        return None
    for name in ("libgomp.so.1", *_loaded_gomp_paths()):
        try:
            runtime = ctypes.CDLL(name, mode=no_load)  # only one already loaded: never a second copy
        except OSError:
            continue
        if hasattr(runtime, "GOMP_parallel"):
            return runtime
    return None


def set_flush_denormal(on: bool) -> None:
    """Flush denormals to zero (or keep them) on the calling thread and on every thread of torch's OpenMP team."""
    torch.set_flush_denormal(on)
    runtime, threads = _openmp(), torch.get_num_threads()
    if threads <= 1:
        return
    if runtime is None:
        log.info("denormals: no GNU OpenMP runtime found, so only the calling thread of %d changes", threads)
        return
    team_function = _TEAM_FUNCTION(lambda _: torch.set_flush_denormal(on))
    runtime.GOMP_parallel(team_function, None, ctypes.c_uint(threads), ctypes.c_uint(0))


def denormals_kept(size: int = 1 << 20) -> bool:
    """Whether an op spread over torch's threads keeps any denormal (a one-element op runs on the calling thread).
    The denormal is written as bits: a flushing thread would turn the literal 1e-40 into zero before the test."""
    denormals = torch.full((size,), 71362, dtype=torch.int32).view(torch.float32)  # 1.0e-40
    return bool(denormals.mul(1.0).ne(0).any())


class FlushDenormalsCallback(L.Callback):
    """``set_flush_denormal(True)`` in every training process from setup to teardown, then as it was."""

    def __init__(self) -> None:
        self._kept: bool | None = None

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self._kept is None:
            self._kept = denormals_kept()
            set_flush_denormal(True)

    def teardown(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        self._restore()

    def on_exception(self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException) -> None:
        self._restore()  # a failed or interrupted fit skips teardown: the process gets its setting back here

    def _restore(self) -> None:
        if self._kept is not None:
            set_flush_denormal(not self._kept)
            self._kept = None
