"""What the node has and how busy it is: psutil for CPU and memory, NVML for GPUs."""

from __future__ import annotations

import logging
from typing import Any

import psutil

from dispatcher.messages import Gpu, Hardware, ResourceUsage

log = logging.getLogger("dispatcher.agent.probe")

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency, but keep the agent usable without it
    pynvml = None


class Probe:
    def __init__(self) -> None:
        self._gpus: list[Any] = []
        if pynvml is not None:
            try:
                pynvml.nvmlInit()
                self._gpus = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            except pynvml.NVMLError as exc:
                log.info("no NVIDIA GPU: %s", exc)
        psutil.cpu_percent(interval=None)  # the first reading is meaningless; prime it

    def hardware(self) -> Hardware:
        gpus = []
        for handle in self._gpus:
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append(Gpu(name=(name.decode() if isinstance(name, bytes) else name)[:200],
                            memory_gb=round(memory.total / 2**30, 1)))
        return Hardware(cpu_cores=psutil.cpu_count() or 0, memory_gb=round(psutil.virtual_memory().total / 2**30, 1),
                        gpus=gpus)

    def usage(self, running_jobs: int) -> ResourceUsage:
        gpu_percent = None
        if self._gpus:
            try:
                gpu_percent = max(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self._gpus)
            except pynvml.NVMLError as exc:
                log.warning("cannot read GPU utilisation: %s", exc)
        return ResourceUsage(cpu_percent=_percent(psutil.cpu_percent(interval=None)),
                             gpu_percent=None if gpu_percent is None else _percent(gpu_percent),
                             mem_percent=_percent(psutil.virtual_memory().percent), running_jobs=running_jobs)

    def gpu_available(self) -> bool:
        """A GPU is available when NVML can still talk to every one we found."""
        if not self._gpus:
            return False
        try:
            for handle in self._gpus:
                pynvml.nvmlDeviceGetUtilizationRates(handle)
        except pynvml.NVMLError:
            return False
        return True


def _percent(value: float) -> float:
    # A reading a hair past 100 (rounding, a counter that wrapped) would make the frame invalid.
    return min(100.0, max(0.0, float(value)))
