"""``hydra/launcher=gpu_parallel``: a multirun's jobs at once on one machine, each on its own GPU(s).

submitit's local executor already starts each job as its own process with ``CUDA_VISIBLE_DEVICES`` set from
``visible_gpus``; what it lacks is a queue: it would start every job at once on the same devices. This launcher
splits the machine's devices into disjoint slots of ``devices_per_job`` and keeps one job per slot running,
starting the next queued job on the slot that frees first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from hydra.core.singleton import Singleton
from hydra.core.utils import JobReturn, filter_overrides
from hydra_plugins.hydra_submitit_launcher.submitit_launcher import LocalLauncher

log = logging.getLogger(__name__)

# Keys of this launcher's config that are not submitit executor parameters.
OWN_KEYS = ("devices", "devices_per_job", "poll_seconds", "submitit_folder")


def visible_devices() -> list[int]:
    """The GPUs this process may use: ``CUDA_VISIBLE_DEVICES`` when set (integer ids), else every device torch sees."""
    listed = os.environ.get("CUDA_VISIBLE_DEVICES")
    if listed is not None and listed.strip():
        try:
            return [int(part) for part in listed.split(",") if part.strip()]
        except ValueError:
            raise ValueError(f"CUDA_VISIBLE_DEVICES={listed!r} is not a list of integer ids; set "
                             "hydra.launcher.devices=[0,1,...] instead") from None
    import torch

    return list(range(torch.cuda.device_count()))


def device_slots(devices: Sequence[int], per_job: int) -> list[tuple[int, ...]]:
    """Disjoint groups of ``per_job`` devices (left-over devices stay unused)."""
    if per_job < 1:
        raise ValueError(f"hydra.launcher.devices_per_job={per_job} must be at least 1")
    if len(set(devices)) != len(devices):
        raise ValueError(f"hydra.launcher.devices={list(devices)} lists a device twice")
    slots = [tuple(devices[i:i + per_job]) for i in range(0, len(devices) - per_job + 1, per_job)]
    if not slots:
        raise ValueError(
            f"hydra/launcher=gpu_parallel needs {per_job} device(s) per job but found {len(devices)} "
            f"({list(devices)}): set hydra.launcher.devices=[0,1,...], lower hydra.launcher.devices_per_job, "
            "or use hydra/launcher=cpu_parallel on a machine without GPUs")
    return slots


def run_queued(count: int, slots: Sequence[tuple[int, ...]], submit: Callable[[int, tuple[int, ...]], Any],
               poll_seconds: float = 1.0) -> list[Any]:
    """Run ``count`` jobs, one per slot at a time, in order; ``submit(index, slot)`` returns a submitit-like job
    (``done()``, ``results()``). Returns the jobs' first results in job order."""
    queue = list(range(count))
    free = list(range(len(slots)))
    running: dict[int, tuple[int, Any]] = {}
    results: dict[int, Any] = {}
    while queue or running:
        while queue and free:
            slot = free.pop(0)
            index = queue.pop(0)
            running[slot] = (index, submit(index, slots[slot]))
        finished = [slot for slot, (_, job) in running.items() if job.done()]
        for slot in finished:
            index, job = running.pop(slot)
            results[index] = job.results()[0]
            free.append(slot)
        if not finished:
            time.sleep(poll_seconds)
    return [results[index] for index in range(count)]


class GpuParallelLauncher(LocalLauncher):
    def __init__(self, devices: Sequence[int] | None = None, devices_per_job: int = 1, poll_seconds: float = 1.0,
                 **params: Any) -> None:
        super().__init__(**params)
        self.devices = None if devices is None else [int(d) for d in devices]
        self.devices_per_job = int(devices_per_job)
        self.poll_seconds = float(poll_seconds)

    def launch(self, job_overrides: Sequence[Sequence[str]], initial_job_idx: int) -> Sequence[JobReturn]:
        import submitit

        assert self.config is not None
        slots = device_slots(visible_devices() if self.devices is None else self.devices, self.devices_per_job)
        # submitit's LocalExecutor itself: the AutoExecutor front refuses its visible_gpus parameter.
        executor = submitit.LocalExecutor(folder=self.params["submitit_folder"])
        executor.update_parameters(**{key: value for key, value in self.params.items()
                                      if key not in OWN_KEYS and value is not None})
        sweep_dir = Path(str(self.config.hydra.sweep.dir))
        sweep_dir.mkdir(parents=True, exist_ok=True)
        log.info(f"gpu_parallel: {len(job_overrides)} jobs on {len(slots)} device slot(s) {slots}, sweep output dir: "
                 f"{sweep_dir}")

        def submit(index: int, slot: tuple[int, ...]) -> Any:
            number = initial_job_idx + index
            overrides = list(job_overrides[index])
            log.info(f"\t#{number} on CUDA_VISIBLE_DEVICES={','.join(map(str, slot))}: "
                     f"{' '.join(filter_overrides(overrides))}")
            executor.update_parameters(visible_gpus=slot, gpus_per_node=len(slot))
            return executor.submit(self, overrides, "hydra.sweep.dir", number, f"job_id_for_{number}",
                                   Singleton.get_state())

        return run_queued(len(job_overrides), slots, submit, self.poll_seconds)
