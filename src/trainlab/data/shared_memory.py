"""A ring of shared-memory batch buffers filled by CPU producer processes (the SHA-256 curriculum's
SharedMemoryLoader, made deterministic and fault-tolerant).

- Each slot is one POSIX shared-memory segment holding one batch (a fixed set of named arrays).
  Producers write a batch straight into a free slot; the trainer maps the slot as numpy arrays and
  copies them out once (onto the device) -- no pickling of batches through a queue.
- The batch for key (step, micro, level) is `make_batch(step, micro, level)`, a pure function: which
  producer makes it, and when, does not change it.  So the stream is deterministic and a resumed run
  gets the same batches.
- The trainer asks for keys in order; the loader keeps up to `slots - 1` keys ahead in flight,
  assuming the level stays the same.  When the curriculum changes the level, the prefetched batches
  of the old level are dropped and made again.
- A producer that dies (killed, OOM) is restarted and its outstanding keys are sent again.
- close() stops the producers and unlinks every segment; it runs at the end of training, on
  SIGINT/SIGTERM (the trainer's `finally`), and at interpreter exit.  If the trainer itself is
  SIGKILLed, Python's resource tracker (a separate process) unlinks the segments it registered.
"""

from __future__ import annotations

import atexit
import multiprocessing as mp
import os
import queue
import sys
from dataclasses import dataclass
from multiprocessing import shared_memory
from typing import Callable

import numpy as np
import torch

Key = tuple[int, int, float | None]
_STOP = None


@dataclass(frozen=True)
class ArraySpec:
    shape: tuple[int, ...]
    dtype: str

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape)) * np.dtype(self.dtype).itemsize


def _views(buf, specs: dict[str, ArraySpec]) -> dict[str, np.ndarray]:
    out, offset = {}, 0
    for name, spec in specs.items():
        out[name] = np.ndarray(spec.shape, dtype=spec.dtype, buffer=buf, offset=offset)
        offset += spec.nbytes
    return out


def _producer_main(tasks, done, slot_names: list[str], specs: dict[str, ArraySpec],
                   make_batch: Callable[[int, int, float | None], dict[str, np.ndarray]], worker: int,
                   parent_pid: int) -> None:
    torch.set_num_threads(1)  # producers are single-threaded; the trainer keeps the cores it has
    segments = {}
    try:
        while True:
            try:
                task = tasks.get(timeout=1.0)
            except queue.Empty:
                # a trainer killed with SIGKILL cannot stop us: notice it and leave, so that the
                # resource tracker can unlink the segments once every holder is gone
                if os.getppid() != parent_pid:
                    return
                continue
            if task is _STOP:
                return
            slot, key = task
            if slot not in segments:
                segments[slot] = shared_memory.SharedMemory(name=slot_names[slot])
            views = _views(segments[slot].buf, specs)
            for name, array in make_batch(*key).items():
                views[name][...] = array
            del views
            done.put((slot, key, worker))
    except KeyboardInterrupt:  # the trainer handles Ctrl+C; producers just stop
        return
    finally:
        for shm in segments.values():
            shm.close()


class SharedMemoryLoader:
    def __init__(self, make_batch: Callable[[int, int, float | None], dict[str, np.ndarray]],
                 specs: dict[str, ArraySpec], accum: int, workers: int = 2, slots: int = 8,
                 device: torch.device | None = None, on_event: Callable[[dict], None] | None = None,
                 poll_s: float = 1.0):
        if workers < 1 or slots < 2:
            raise ValueError("need at least 1 worker and 2 slots")
        self.make_batch, self.specs, self.accum = make_batch, specs, accum
        self.device = device or torch.device("cpu")
        self.on_event = on_event or (lambda e: None)
        self.poll_s = poll_s
        self.restarts = 0
        size = sum(s.nbytes for s in specs.values())
        prefix = f"trainlab_{os.getpid()}_{id(self) & 0xFFFFFF:x}"
        self.segments = [shared_memory.SharedMemory(name=f"{prefix}_{i}", create=True, size=max(size, 1))
                         for i in range(slots)]
        self.slot_names = [s.name for s in self.segments]
        self.free = list(range(slots))
        self.in_flight: dict[Key, tuple[int, int]] = {}  # key -> (slot, worker)
        self.ready: dict[Key, int] = {}  # key -> slot
        self.cursor: tuple[int, int] = (0, 0)  # (step, micro) last asked for; keys before it are stale
        # fork is cheap and keeps make_batch's closure; elsewhere spawn (make_batch must pickle)
        self.ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self.done = self.ctx.Queue()
        self.procs: list = [None] * workers
        self.task_queues: list = [None] * workers
        self._next_worker = 0
        for w in range(workers):
            self._start_worker(w)
        self._closed = False
        atexit.register(self.close)

    # ---- producers -------------------------------------------------------------------------
    def _start_worker(self, w: int) -> None:
        self.task_queues[w] = self.ctx.Queue()
        proc = self.ctx.Process(target=_producer_main, daemon=True, name=f"trainlab-producer-{w}",
                                args=(self.task_queues[w], self.done, self.slot_names, self.specs,
                                      self.make_batch, w, os.getpid()))
        proc.start()
        self.procs[w] = proc

    def _check_workers(self, level: float | None) -> None:
        for w, proc in enumerate(self.procs):
            if proc.is_alive():
                continue
            # batches the dead producer finished before dying are in the queue already: take them
            # first, so that no key is made twice into a slot that may be reused meanwhile
            while self._receive(level, block=False):
                pass
            lost = [k for k, (_, worker) in self.in_flight.items() if worker == w]
            self.on_event({"kind": "producer_restarted", "worker": w, "pid": proc.pid,
                           "exitcode": proc.exitcode, "resent": len(lost)})
            self.restarts += 1
            self._start_worker(w)
            for key in lost:
                slot, _ = self.in_flight[key]
                self.task_queues[w].put((slot, key))

    def _receive(self, level: float | None, block: bool = True) -> bool:
        """Take one finished batch off the queue; keep it if its level is current.  False if none came."""
        try:
            slot, got, _ = self.done.get(timeout=self.poll_s) if block else self.done.get_nowait()
        except queue.Empty:
            if block:
                self._check_workers(level)
            return False
        if self.in_flight.get(got, (None, None))[0] != slot:
            return True  # a duplicate of a key already taken
        del self.in_flight[got]
        if self._wanted(got, level):
            self.ready[got] = slot
        else:  # made for a level the curriculum has left, or for a step already passed
            self.free.append(slot)
        return True

    def _wanted(self, key: Key, level: float | None) -> bool:
        return key[2] == level and key[:2] >= self.cursor

    def _submit(self, key: Key) -> None:
        slot = self.free.pop()
        w = self._next_worker
        self._next_worker = (w + 1) % len(self.procs)
        self.in_flight[key] = (slot, w)
        self.task_queues[w].put((slot, key))

    # ---- the trainer's side ------------------------------------------------------------------
    def _upcoming(self, step: int, micro: int, level: float | None):
        while True:
            yield (step, micro, level)
            micro += 1
            if micro == self.accum:
                step, micro = step + 1, 0

    def _drop_stale(self, level: float | None) -> None:
        for key in [k for k in self.ready if not self._wanted(k, level)]:
            self.free.append(self.ready.pop(key))

    def get(self, step: int, micro: int, level: float | None) -> dict[str, torch.Tensor]:
        key = (step, micro, level)
        self.cursor = (step, micro)
        self._drop_stale(level)
        for upcoming in self._upcoming(step, micro, level):
            if not self.free:
                break
            if upcoming not in self.in_flight and upcoming not in self.ready:
                self._submit(upcoming)
        if key not in self.in_flight and key not in self.ready:
            while not self.free:  # every slot holds keys of a level just left: let one come back
                self._receive(level)
            self._submit(key)
        while key not in self.ready:
            self._receive(level)
        slot = self.ready.pop(key)
        views = _views(self.segments[slot].buf, self.specs)
        # one copy out of shared memory (to the device directly); then the slot is free again
        out = {name: torch.from_numpy(v).to(self.device, copy=True) for name, v in views.items()}
        del views
        self.free.append(slot)
        return out

    def close(self) -> None:
        if getattr(self, "_closed", True):
            return
        self._closed = True
        for q, proc in zip(self.task_queues, self.procs):
            if proc is not None and proc.is_alive():
                q.put(_STOP)
        for proc in self.procs:
            if proc is not None:
                proc.join(timeout=2.0)
                if proc.is_alive():
                    proc.kill()
                    proc.join(timeout=2.0)
        for q in [*self.task_queues, self.done]:
            q.close()
            q.cancel_join_thread()
        for shm in self.segments:
            shm.close()
            try:
                shm.unlink()
            except FileNotFoundError:
                pass
        atexit.unregister(self.close)
