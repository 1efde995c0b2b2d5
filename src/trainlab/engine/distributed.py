"""One process per device under torchrun: which rank this is, and the few collectives the engine needs.

torchrun (torch.distributed.run) sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT for
every process it starts; a process without them is a plain single-process run, and every method of
`World` is then a no-op that costs nothing.

Two process groups:
  - the default one (NCCL on CUDA, gloo on the CPU) carries the gradients (DistributedDataParallel)
    and the log step's metric reduction -- device tensors, one collective per log interval;
  - a gloo group on the CPU carries the engine's decisions (a signal arrived, a stop was asked, an
    out-of-memory error): a few integers per step, which the host must read at once.  On a GPU, reading
    a flag reduced over NCCL would wait for the step's kernels (a host sync per step); over gloo it
    does not touch the device.
"""

from __future__ import annotations

import ctypes
import datetime
import os
import signal
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

# How long a rank waits for the others at a collective before it gives up.  torchrun stops the job
# when a rank dies; this bounds the wait where it cannot (a rank stuck, not dead).
COLLECTIVE_TIMEOUT = datetime.timedelta(minutes=30)

# The flags of World.agree, in the order they are reduced (each the max over ranks).
SIGNAL, STOP, ROLLBACK, OUT_OF_MEMORY = range(4)


_PR_SET_PDEATHSIG = 1


def die_with_parent(sig: int = signal.SIGTERM) -> None:
    """Have the kernel send `sig` to this process when its parent dies (Linux; elsewhere nothing):
    a rank whose torchrun was killed saves its checkpoint with the others and exits, instead of
    training on, orphaned, with the run directory locked."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, int(sig))
    except (OSError, AttributeError):
        pass


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ and "LOCAL_RANK" in os.environ


@dataclass
class World:
    """This process's place in the job: rank, world size, local rank (the GPU of this process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0
    distributed: bool = False  # a process group is up (torchrun, even with one rank)
    _control: Any = field(default=None, repr=False)

    @property
    def is_main(self) -> bool:
        """Rank 0: the one process that writes the run directory and the terminal."""
        return self.rank == 0

    # ------------------------------------------------------------------ setup
    @classmethod
    def from_environment(cls, device_type: str) -> "World":
        """The world torchrun described in the environment, with its process groups up; a plain
        single-process World without torchrun."""
        if not launched_by_torchrun():
            return cls()
        rank, size, local_rank = (int(os.environ[k]) for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))
        die_with_parent()
        if not dist.is_initialized():
            backend = "nccl" if device_type == "cuda" else "gloo"
            kwargs = {}
            if device_type == "cuda":
                torch.cuda.set_device(local_rank)
                kwargs["device_id"] = torch.device("cuda", local_rank)  # NCCL binds its communicator now
            dist.init_process_group(backend, timeout=COLLECTIVE_TIMEOUT, **kwargs)
        control = dist.new_group(backend="gloo", timeout=COLLECTIVE_TIMEOUT) if dist.get_backend() != "gloo" \
            else dist.group.WORLD
        return cls(rank, size, local_rank, True, control)

    def device(self, device: torch.device) -> torch.device:
        """The device of this rank: cuda:LOCAL_RANK under torchrun on CUDA, else `device` itself."""
        if self.distributed and device.type == "cuda":
            return torch.device("cuda", self.local_rank)
        return device

    def close(self) -> None:
        if self.distributed and dist.is_initialized():
            dist.destroy_process_group()

    # ------------------------------------------------------------------ collectives
    def agree(self, flags: list[int]) -> list[int]:
        """Each flag's maximum over all ranks (the control group: host integers, no device sync)."""
        if not self.distributed or self.size == 1:
            return list(flags)
        t = torch.tensor(flags, dtype=torch.int64)
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self._control)
        return t.tolist()

    def mean(self, tensor: torch.Tensor) -> torch.Tensor:
        """The tensor averaged over ranks, in place (default group: device tensors)."""
        if self.distributed and self.size > 1:
            dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
            tensor /= self.size
        return tensor

    def share(self, obj: Any, src: int = 0) -> Any:
        """`obj` of rank `src` on every rank (pickled over the control group)."""
        if not self.distributed or self.size == 1:
            return obj
        box = [obj if self.rank == src else None]
        dist.broadcast_object_list(box, src=src, group=self._control)
        return box[0]

    def gather(self, obj: Any) -> list[Any]:
        """Every rank's `obj`, in rank order, on every rank."""
        if not self.distributed or self.size == 1:
            return [obj]
        out: list[Any] = [None] * self.size
        dist.all_gather_object(out, obj, group=self._control)
        return out

    def barrier(self) -> None:
        if self.distributed and self.size > 1:
            dist.barrier(group=self._control)


SINGLE = World()


# ---------------------------------------------------------------------- `trainlab run --nproc N`
def run_local_job(command: list[str], nproc: int, label: str) -> int:
    """`command` (python arguments: ["-m", "trainlab", "run", ...]) as a torchrun job of `nproc`
    processes on this machine -- torchrun's own elastic agent, called as `torchrun --standalone` is
    (a free rendezvous port, so several jobs may run at once).  Returns the exit code: the one every
    rank agreed on (0, 1, 2, 130, 143: rank 0 has said why), or 1 after one line naming the rank that
    died first, when torchrun had to stop the others."""
    import logging
    import sys
    import uuid

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    # the agent's INFO and WARNING lines (its configuration, "shutting down workers") would bury the
    # run's own; what went wrong is said below, in one line
    logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    if "OMP_NUM_THREADS" not in os.environ:  # as torchrun: the cores shared among the processes
        os.environ["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // nproc))
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc, run_id=str(uuid.uuid4()),
                          rdzv_backend="c10d", rdzv_endpoint="localhost:0", max_restarts=0,
                          monitor_interval=0.1)
    try:
        elastic_launch(config, sys.executable)(*command)
        return 0
    except SignalException as exc:  # the job got SIGINT/SIGTERM: each rank saved and exited with its code
        return 128 + int(exc.sigval)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code in (1, 2, 130, 143):  # trainlab's own exit codes: the rank said why (rank 0, for the job)
            return code
        how = (f"was killed by {signal.Signals(-code).name}" if code < 0 and -code in signal.valid_signals()
               else f"exited with code {code}")
        print(f"trainlab: rank {rank} of {nproc} {how}; torchrun stopped the others; rerun the same command to "
              f"resume from the last checkpoint ({label})", file=sys.stderr, flush=True)
        return 1
