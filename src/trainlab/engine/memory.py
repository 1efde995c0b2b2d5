"""Memory guard: poll host RAM and device memory; over a ceiling, try to recover, then stop cleanly.

The SHA-256 curriculum script's memory guard slept and hoped; this one ends in a saved state instead of a swap storm:
gc + empty the device cache -> re-check -> wait `pause_s` (if set) -> re-check -> stop with a
checkpoint and a message naming the figure and the ceiling.  Peaks are kept for the logs.
"""

from __future__ import annotations

import gc
import time
from dataclasses import dataclass

import psutil
import torch

from trainlab.config import MemoryConfig

GB = 1024**3


def host_used_gb(measure: str) -> float:
    if measure == "system":
        vm = psutil.virtual_memory()
        return (vm.total - vm.available) / GB
    proc = psutil.Process()
    rss = proc.memory_info().rss
    for child in proc.children(recursive=True):  # data-producer processes count too
        try:
            rss += child.memory_info().rss
        except psutil.Error:
            pass
    return rss / GB


def device_used_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.memory_allocated(device) / GB
    if device.type == "mps":
        return torch.mps.current_allocated_memory() / GB
    return 0.0


def device_peak_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / GB
    return 0.0


def empty_device_cache(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.empty_cache()
    elif device.type == "mps":
        torch.mps.empty_cache()


@dataclass
class MemoryReading:
    host_gb: float
    device_gb: float


class MemoryGuard:
    def __init__(self, cfg: MemoryConfig, device: torch.device):
        self.cfg = cfg
        self.device = device
        self.peak_host_gb = 0.0
        self.peak_device_gb = 0.0

    @property
    def watching(self) -> bool:
        """Whether a ceiling is set.  Without one there is nothing to guard, and the trainer reads memory
        at log rows only: a host-RAM poll walks /proc for producer processes (~0.7 ms with 70
        processes, measured by bench/engine_overhead.py), too dear to pay every few steps for nothing."""
        return bool(self.cfg.host_ceiling_gb or self.cfg.device_ceiling_gb)

    def read(self) -> MemoryReading:
        reading = MemoryReading(host_used_gb(self.cfg.host_measure), device_used_gb(self.device))
        self.peak_host_gb = max(self.peak_host_gb, reading.host_gb)
        self.peak_device_gb = max(self.peak_device_gb, reading.device_gb, device_peak_gb(self.device))
        return reading

    def over(self, reading: MemoryReading) -> str | None:
        """A description of the ceiling exceeded, or None."""
        if self.cfg.host_ceiling_gb and reading.host_gb > self.cfg.host_ceiling_gb:
            return (f"host RAM {reading.host_gb:.3f} GB ({self.cfg.host_measure}) over "
                    f"memory.host_ceiling_gb={self.cfg.host_ceiling_gb:g}")
        if self.cfg.device_ceiling_gb and reading.device_gb > self.cfg.device_ceiling_gb:
            return (f"device memory {reading.device_gb:.3f} GB over "
                    f"memory.device_ceiling_gb={self.cfg.device_ceiling_gb:g}")
        return None

    def check(self, on_event) -> str | None:
        """Poll; on excess try to recover.  Returns why the run must stop, or None to go on."""
        problem = self.over(self.read())
        if problem is None:
            return None
        on_event({"kind": "memory_warning", "detail": problem, "action": "gc + empty cache"})
        gc.collect()
        empty_device_cache(self.device)
        problem = self.over(self.read())
        if problem and self.cfg.pause_s > 0:
            on_event({"kind": "memory_pause", "detail": problem, "seconds": self.cfg.pause_s})
            time.sleep(self.cfg.pause_s)
            problem = self.over(self.read())
        if problem is None:
            on_event({"kind": "memory_recovered"})
        return problem
