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
from trainlab.errors import UsageError

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


# --------------------------------------------------------------------------------------------
# Before a run: does the model fit at all?
# --------------------------------------------------------------------------------------------

@dataclass
class TrainingMemory:
    """Bytes a training step holds for certain, whatever the batch: the parameters (and buffers),
    their gradients and the optimizer's state.  Activations, the data and the allocator's slack
    come on top and are not counted."""

    params: int  # number of parameters
    weights_bytes: int
    grads_bytes: int
    optimizer_bytes: int
    optimizer_words: str  # "AdamW's 2 states", ...

    @property
    def total_bytes(self) -> int:
        return self.weights_bytes + self.grads_bytes + self.optimizer_bytes


def _optimizer_state_bytes(optim, params: list[torch.nn.Parameter]) -> tuple[int, str]:
    """The optimizer's state for `params`, as trainlab.optim builds it: AdamW keeps 2 moments of the
    parameter's dtype, Lion 1 (bf16 with optim.momentum_dtype=bf16); with GaLore a projected 2-D
    weight keeps its moments at rank r (r x n or m x r, float32) and its projection (min(m, n) x r)."""
    from trainlab.optim.galore import _low_rank_shape, _projected

    states = 1 if optim.name == "lion" else 2  # AdamW and RiemannianAdam: two moments
    moment_size = 2 if optim.name == "lion" and optim.momentum_dtype == "bf16" else None
    total = 0
    for p in params:
        if optim.galore_rank and _projected(p, optim.galore_rank):
            rows, cols = _low_rank_shape(p.shape, optim.galore_rank)
            total += states * rows * cols * (moment_size or 4) + min(p.shape) * optim.galore_rank * 4
        else:
            total += states * p.numel() * (moment_size or p.element_size())
    name = {"adamw": "AdamW", "lion": "Lion", "riemannian_adam": "RiemannianAdam"}.get(optim.name, optim.name)
    words = f"{name}'s {states} state{'s' if states > 1 else ''}" + (" (GaLore)" if optim.galore_rank else "")
    return total, words


def estimate_training_memory(experiment, cfg) -> TrainingMemory | None:
    """The model built on the meta device (shapes and dtypes, no memory) and counted; None when
    the experiment's build_model cannot run there (it reads values, say): then there is no estimate."""
    try:
        with torch.device("meta"):
            model = experiment.build_model(cfg)
        params = list(model.parameters())
        buffers = list(model.buffers())
    except Exception:  # noqa: BLE001 -- any failure on meta only means "not estimated"; the run itself decides
        return None
    trainable = [p for p in params if p.requires_grad]
    weights = sum(t.numel() * t.element_size() for t in params + buffers)
    grads = sum(p.numel() * p.element_size() for p in trainable)
    optimizer, words = _optimizer_state_bytes(cfg.optim, trainable)
    return TrainingMemory(sum(p.numel() for p in params), weights, grads, optimizer, words)


def memory_room(device: torch.device) -> tuple[int, int, str]:
    """(bytes available now, bytes in all, what that memory is) where the run's tensors live."""
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        free, total = torch.cuda.mem_get_info(index)  # free: what other processes and this one left
        return free, total, f"cuda:{index} ({torch.cuda.get_device_name(index)}) has"
    vm = psutil.virtual_memory()  # CPU, and MPS's memory shared with the host
    return vm.available, vm.total, "this machine's host RAM has"


def format_bytes(n: float) -> str:
    """Bytes in the units the memory guard uses (GB = 2**30 bytes): 3.42 GB, 512 MB, 7.7 TB."""
    for unit, size in (("TB", 1024**4), ("GB", GB), ("MB", 1024**2)):
        if n >= size:
            return f"{n / size:.3g} {unit}"
    return f"{n / 1024:.3g} KB"


def refuse_if_it_cannot_fit(experiment, cfg, device: torch.device) -> None:
    """UsageError when the parameters, gradients and optimizer state alone exceed the memory
    available where they would live: the run could only fail, after allocating."""
    need = estimate_training_memory(experiment, cfg)
    if need is None:
        return
    available, total, where = memory_room(device)
    if need.total_bytes <= available:
        return
    raise UsageError(
        f"the model does not fit: {need.params:,} parameters need at least {format_bytes(need.total_bytes)} to "
        f"train (weights {format_bytes(need.weights_bytes)}, gradients {format_bytes(need.grads_bytes)}, "
        f"{need.optimizer_words} {format_bytes(need.optimizer_bytes)}; activations and data not counted), and "
        f"{where} {format_bytes(available)} available of {format_bytes(total)}; make the model smaller "
        "(model.*) or use a device with more memory")
