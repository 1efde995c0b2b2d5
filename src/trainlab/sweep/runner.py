"""Run a sweep's points, K at a time, each as its own `trainlab run` process and run directory.

Why processes and not threads: a point is exactly the command a user would type, so it resumes,
locks, logs and fails exactly like one -- and a crash in one point cannot take the others down.

Backends
- local (default): subprocesses on this machine.  On a GPU machine they share the GPU (as the BitNet size study
  did) or, with --gpus 0,1,..., each point gets one GPU through CUDA_VISIBLE_DEVICES, least-busy
  first.  The indices count the GPUs this process sees, as torch does: under CUDA_VISIBLE_DEVICES=2,3
  `--gpus 0,1` means physical GPUs 2 and 3, and a point gets CUDA_VISIBLE_DEVICES=2 or 3 (passing "0"
  on would hand it a GPU the caller had hidden).  On CPU each point gets cores / K threads
  (OMP_NUM_THREADS) unless the caller set one.
  With --nproc-per-point N a point is a torchrun job of N data-parallel ranks (`trainlab run --nproc N`,
  whose standalone rendezvous picks its own free port, so points running at once do not clash); with
  --gpus it gets N distinct GPUs, least-busy first, and each rank cores / (K * N) threads.
- ray (optional extra): each point is a Ray task holding its GPU request (--gpus-per-point) that
  runs the same command; for grids larger than one machine.  With --nproc-per-point N a task asks
  for N CPUs and, by default, N GPUs.  The run directories must be on a
  filesystem every node sees (the sweep reads them for the table and the report).

A killed sweep leaves no orphans on Linux: every point asks the kernel for SIGTERM when its parent
dies (PR_SET_PDEATHSIG), and SIGTERM makes a point save its checkpoint and exit.  A rerun skips the
points whose run directory says finished at the planned step and resumes the others.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainlab.engine.distributed import die_with_parent
from trainlab.engine.logs import METRICS_FILE, read_metrics
from trainlab.engine.rundir import read_status
from trainlab.errors import EXIT_SIGINT, EXIT_SIGTERM, UsageError
from trainlab.formatting import format_number
from trainlab.sweep.spec import Point, SweepSpec

POLL_S = 1.0
PLAIN_TABLE_EVERY_S = 60.0


def _die_with_parent() -> None:  # runs in the child between fork and exec
    # not Linux: nothing, and a killed sweep may leave its current points running to their end
    die_with_parent(signal.SIGTERM)


@dataclass
class PointState:
    point: Point
    run_dir: Path
    total_steps: int
    state: str = "pending"  # pending | skipped (finished before) | running | finished | stopped | failed
    exit_code: int | None = None
    gpu: str | None = None  # CUDA_VISIBLE_DEVICES of the point: one GPU, or N joined by commas
    proc: subprocess.Popen | None = None
    started: float | None = None
    ended: float | None = None
    note: str = ""
    live: dict = field(default_factory=dict)


def gpu_ids(indices: list[str], visible: str | None) -> list[str]:
    """The CUDA_VISIBLE_DEVICES value for each of --gpus' indices, given the sweep's own
    CUDA_VISIBLE_DEVICES (`visible`, None when unset: every GPU is visible and an index is itself)."""
    if visible is None:
        return list(indices)
    seen = [d.strip() for d in visible.split(",") if d.strip()]
    for i in indices:
        if int(i) >= len(seen):
            shown = f"CUDA_VISIBLE_DEVICES={visible!r} makes " + (
                f"{len(seen)} GPU{'s' if len(seen) != 1 else ''} visible (indices 0-{len(seen) - 1})" if seen
                else "no GPU visible")
            raise UsageError(f"--gpus {','.join(indices)}: index {i} does not exist; {shown}")
    return [seen[int(i)] for i in indices]


def already_finished(run_dir: Path, total_steps: int) -> bool:
    status = read_status(run_dir)
    return status.get("state") == "finished" and int(status.get("step", -1)) >= total_steps


def point_command(spec: SweepSpec, point: Point, run_dir: Path) -> list[str]:
    cmd = [sys.executable, "-m", "trainlab", "run", spec.target, "--run-dir", str(run_dir), "--device", spec.device]
    if spec.preset:
        cmd += ["--preset", spec.preset]
    for item in spec.sets + point.sets:
        cmd += ["--set", item]
    if spec.steps is not None:
        cmd += ["--steps", str(spec.steps)]
    if spec.nproc_per_point > 1:
        cmd += ["--nproc", str(spec.nproc_per_point)]
    return cmd


def point_env(spec: SweepSpec, gpu: str | None) -> dict[str, str]:
    """What a point's environment adds to the one it starts in."""
    env = {"PYTHONUNBUFFERED": "1"}
    if gpu is not None:
        env["CUDA_VISIBLE_DEVICES"] = gpu
    if "OMP_NUM_THREADS" not in os.environ:
        # every rank of every running point is a process of its own competing for the same cores
        processes = max(spec.parallel, 1) * max(spec.nproc_per_point, 1)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // processes))
    return env


def _live_values(state: PointState, collapse_metric: str) -> dict:
    """The last logged values of a point, read from its metrics.csv (once per poll)."""
    rows = read_metrics(state.run_dir / METRICS_FILE) if state.run_dir.exists() else []
    out = {"step": rows[-1].get("step") if rows else None, "loss": rows[-1].get("loss") if rows else None}
    for col in ("val_loss", collapse_metric, "tokens_per_s", "samples_per_s"):
        for row in reversed(rows):
            if col and isinstance(row.get(col), (int, float)):
                out[col] = row[col]
                break
    return out


class Table:
    """The live table: a redrawn rich table on a terminal, plain text lines elsewhere."""

    def __init__(self, states: list[PointState], collapse_metric: str, out=None):
        self.states, self.metric = states, collapse_metric
        self.out = out or sys.stdout
        self.live = None
        self._last_plain = 0.0
        self._last_key: tuple = ()
        if self.out.isatty():
            from rich.live import Live

            self.live = Live(self._rich(), refresh_per_second=2, transient=False)
            self.live.start()

    def rows(self) -> tuple[list[str], list[list[str]]]:
        header = ["point", "state", "step", "loss", "val_loss"] + ([self.metric] if self.metric else []) + ["speed"]
        rows = []
        for s in self.states:
            v = s.live
            step = f"{format_number(v.get('step'))}/{s.total_steps}"
            speed = v.get("tokens_per_s") or v.get("samples_per_s")
            state = s.state + (f" (exit {s.exit_code})" if s.state in ("stopped", "failed") else "")
            row = [s.point.name, state, step, format_number(v.get("loss")), format_number(v.get("val_loss"))]
            if self.metric:
                row.append(format_number(v.get(self.metric)))
            row.append(format_number(speed, 3) + ("/s" if speed else ""))
            rows.append(row)
        return header, rows

    def _rich(self):
        from rich.table import Table as RichTable

        header, rows = self.rows()
        table = RichTable(*header, title="trainlab sweep")
        for r in rows:
            table.add_row(*r)
        return table

    def text(self) -> str:
        header, rows = self.rows()
        widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header))]
        return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header] + rows)

    def update(self, force: bool = False) -> None:
        for s in self.states:
            if s.state in ("running", "pending") or not s.live:
                s.live = _live_values(s, self.metric)
        if self.live is not None:
            self.live.update(self._rich())
            return
        key = tuple(s.state for s in self.states)
        now = time.monotonic()
        if force or key != self._last_key or now - self._last_plain >= PLAIN_TABLE_EVERY_S:
            print(self.text(), file=self.out, flush=True)
            print(file=self.out, flush=True)
            self._last_key, self._last_plain = key, now

    def close(self) -> None:
        if self.live is not None:
            self.live.stop()
            self.live = None


class _Signals:
    """SIGINT/SIGTERM to the sweep: forwarded to every running point, which checkpoints and exits."""

    def __init__(self):
        self.received: int | None = None
        self._previous = {}

    def __enter__(self):
        for s in (signal.SIGINT, signal.SIGTERM):
            self._previous[s] = signal.signal(s, self._on)
        return self

    def _on(self, signum, frame):
        self.received = signum

    def __exit__(self, *exc):
        for s, h in self._previous.items():
            signal.signal(s, h)


def _finish(state: PointState, code: int) -> None:
    state.exit_code, state.ended, state.proc = code, time.monotonic(), None
    state.state = {0: "finished", 1: "stopped"}.get(code, "interrupted" if code in (EXIT_SIGINT, EXIT_SIGTERM)
                                                     else "failed")
    # exit 1 is both a stop by a policy and a training failure; the point's status.json tells them apart
    status = read_status(state.run_dir)
    if code == 1 and status.get("state") == "crashed":
        state.state = "failed"
    if code != 0:
        state.note = str(status.get("reason") or "")


def run_local(spec: SweepSpec, states: list[PointState], table: Table, log_dir: Path) -> int | None:
    """Run the pending points; returns the exit code of a signal that stopped the sweep, else None."""
    log_dir.mkdir(parents=True, exist_ok=True)
    pending = [s for s in states if s.state == "pending"]
    running: list[PointState] = []
    with _Signals() as signals:
        while pending or running:
            if signals.received is not None:
                for s in running:
                    s.proc.send_signal(signals.received)
                for s in running:
                    _finish(s, s.proc.wait())
                table.update(force=True)
                return EXIT_SIGINT if signals.received == signal.SIGINT else EXIT_SIGTERM
            while pending and len(running) < spec.parallel:
                s = pending.pop(0)
                s.gpu = least_busy_gpus(spec.gpus, running, spec.nproc_per_point)
                cmd = point_command(spec, s.point, s.run_dir)
                log = open(log_dir / f"{s.point.name}.log", "a", encoding="utf-8")
                log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} "
                          f"{'CUDA_VISIBLE_DEVICES=' + s.gpu + ' ' if s.gpu is not None else ''}{' '.join(cmd)}\n")
                log.flush()
                s.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                          env=dict(os.environ, **point_env(spec, s.gpu)),
                                          preexec_fn=_die_with_parent)
                log.close()  # the child holds its own copy of the descriptor
                s.state, s.started = "running", time.monotonic()
                running.append(s)
            time.sleep(POLL_S)
            for s in list(running):
                code = s.proc.poll()
                if code is not None:
                    _finish(s, code)
                    running.remove(s)
            table.update()
    return None


def least_busy_gpus(gpus: list[str], running: list[PointState], count: int = 1) -> str | None:
    """CUDA_VISIBLE_DEVICES for a new point: the `count` distinct GPUs of `gpus` with the fewest running
    points on them (a tie goes to the first listed), joined by commas; None without --gpus."""
    if not gpus:
        return None
    load = {g: 0 for g in gpus}
    for s in running:
        for g in (s.gpu or "").split(","):
            if g in load:
                load[g] += 1
    ranked = sorted(gpus, key=lambda g: (load[g], gpus.index(g)))
    return ",".join(ranked[:count])


def run_ray(spec: SweepSpec, states: list[PointState], table: Table, log_dir: Path,
            gpus_per_point: float, address: str | None) -> int | None:
    """`gpus_per_point`: the GPUs each task requests (the command makes it N by default for N ranks)."""
    import ray  # its presence is checked by the command before anything is written

    log_dir.mkdir(parents=True, exist_ok=True)
    ray.init(address=address, ignore_reinit_error=True, include_dashboard=False, log_to_driver=False,
             configure_logging=False)

    @ray.remote
    def run_point(cmd: list[str], env: dict, log_path: str) -> int:
        # the worker's environment holds Ray's CUDA_VISIBLE_DEVICES for this task's GPU request
        env = dict(os.environ, **env)
        with open(log_path, "a", encoding="utf-8") as log:
            log.write(f"\n# {time.strftime('%Y-%m-%d %H:%M:%S')} (ray) {' '.join(cmd)}\n")
            log.flush()
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env,
                                    preexec_fn=_die_with_parent)
            try:
                return proc.wait()
            except KeyboardInterrupt:  # ray.cancel: let the point save its checkpoint (run() would SIGKILL it)
                proc.send_signal(signal.SIGINT)
                return proc.wait()

    pending = [s for s in states if s.state == "pending"]
    in_flight: dict = {}
    try:
        with _Signals() as signals:
            while pending or in_flight:
                if signals.received is not None:
                    for ref in in_flight:
                        ray.cancel(ref, force=False)  # a KeyboardInterrupt in the task, which passes SIGINT on
                    ray.wait(list(in_flight), num_returns=len(in_flight), timeout=120)
                    return EXIT_SIGINT if signals.received == signal.SIGINT else EXIT_SIGTERM
                while pending and len(in_flight) < spec.parallel:
                    s = pending.pop(0)
                    ref = run_point.options(num_gpus=gpus_per_point, num_cpus=spec.nproc_per_point).remote(
                        point_command(spec, s.point, s.run_dir), point_env(spec, None),
                        str(log_dir / f"{s.point.name}.log"))
                    in_flight[ref] = s
                    s.state, s.started = "running", time.monotonic()
                done, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_S)
                for ref in done:
                    _finish(in_flight.pop(ref), ray.get(ref))
                table.update()
    finally:
        ray.shutdown()
    return None
