"""What the node has and how busy it is: psutil for CPU and memory, NVML for GPUs."""

from __future__ import annotations

import logging
from typing import Any

import psutil

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

    def hardware(self) -> dict[str, Any]:
        gpus = []
        for handle in self._gpus:
            name = pynvml.nvmlDeviceGetName(handle)
            memory = pynvml.nvmlDeviceGetMemoryInfo(handle)
            gpus.append({"name": name.decode() if isinstance(name, bytes) else name,
                         "memory_gb": round(memory.total / 2**30, 1)})
        return {
            "cpu_cores": psutil.cpu_count() or 0,
            "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "gpus": gpus,
        }

    def usage(self, running_jobs: int) -> dict[str, Any]:
        gpu_percent = None
        if self._gpus:
            try:
                gpu_percent = max(float(pynvml.nvmlDeviceGetUtilizationRates(h).gpu) for h in self._gpus)
            except pynvml.NVMLError as exc:
                log.warning("cannot read GPU utilisation: %s", exc)
        return {
            "cpu_percent": psutil.cpu_percent(interval=None),
            "gpu_percent": gpu_percent,
            "mem_percent": psutil.virtual_memory().percent,
            "running_jobs": running_jobs,
        }

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
