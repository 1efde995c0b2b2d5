"""The shared-memory loader: deterministic batches, a killed producer restarted, stale prefetches
dropped on a level change, and no /dev/shm segment left behind -- after close, after Ctrl+C, and
after the trainer itself is SIGKILLed."""

from __future__ import annotations

import os
import signal
import time
from functools import partial
from pathlib import Path

import numpy as np
import pytest

from conftest import spawn
from trainlab.data.shared_memory import ArraySpec, SharedMemoryLoader
from trainlab.experiments.sha256 import _numpy_batch
from trainlab.engine.logs import read_events, read_rows

SHM = Path("/dev/shm")
pytestmark = pytest.mark.skipif(not SHM.is_dir(), reason="needs POSIX shared memory at /dev/shm")


def _segments(pid: int) -> list[str]:
    return sorted(p.name for p in SHM.iterdir() if p.name.startswith(f"trainlab_{pid}_"))


def _loader(events: list, accum: int = 2) -> SharedMemoryLoader:
    make = partial(_numpy_batch, 0, 16, "step", 8)
    specs = {"x": ArraySpec((16, 10, 32), "uint8"), "y": ArraySpec((16, 8, 32), "uint8")}
    return SharedMemoryLoader(make, specs, accum=accum, workers=2, slots=5, poll_s=0.1, on_event=events.append)


def test_batches_match_the_pure_function_and_a_killed_producer_is_restarted():
    events: list = []
    loader = _loader(events)
    try:
        assert len(_segments(os.getpid())) == 5
        for step in range(30):
            if step == 10:
                os.kill(loader.procs[0].pid, signal.SIGKILL)
            for micro in range(2):
                got = loader.get(step, micro, 8.0)
                expected = _numpy_batch(0, 16, "step", 8, step, micro, 8.0)
                assert np.array_equal(got["x"].numpy(), expected["x"]), (step, micro)
                assert np.array_equal(got["y"].numpy(), expected["y"]), (step, micro)
        assert loader.restarts == 1
        assert events[0]["kind"] == "producer_restarted" and events[0]["exitcode"] == -signal.SIGKILL
    finally:
        loader.close()
    assert _segments(os.getpid()) == []
    assert all(not p.is_alive() for p in loader.procs)


def test_level_change_drops_prefetched_batches_of_the_old_level():
    loader = _loader([])
    try:
        loader.get(0, 0, 8.0)  # prefetches (0, 1), (1, 0), ... at level 8
        got = loader.get(0, 1, 16.0)  # the curriculum moved on: level 16 from here
        assert np.array_equal(got["y"].numpy(), _numpy_batch(0, 16, "step", 8, 0, 1, 16.0)["y"])
        got = loader.get(1, 0, 16.0)
        assert np.array_equal(got["x"].numpy(), _numpy_batch(0, 16, "step", 8, 1, 0, 16.0)["x"])
        assert len(loader.free) + len(loader.ready) + len(loader.in_flight) == 5  # no slot leaked
    finally:
        loader.close()


def _wait_rows(run_dir: Path, proc, step: int) -> None:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = read_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
        if rows and rows[-1]["step"] >= step:
            return
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.01)
    raise AssertionError("no progress")


SHM_RUN = ["run", "sha256", "--preset", "smoke", "--steps", "400", "--set", "data.loader=shm",
           "--set", "data.workers=2", "--set", "model.dim=64"]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGKILL], ids=["ctrl-c", "sigkill"])
def test_no_segment_left_after_the_trainer_stops(tmp_path: Path, sig):
    proc = spawn(*SHM_RUN, "--run-dir", "r", cwd=tmp_path)
    _wait_rows(tmp_path / "r", proc, 10)
    assert _segments(proc.pid), "the run should be using shared memory"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    if sig == signal.SIGINT:
        assert proc.returncode == 130, err
    deadline = time.monotonic() + 15  # after SIGKILL the producers notice within ~1 s, then the tracker cleans
    while _segments(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert _segments(proc.pid) == []
    kinds = [e["kind"] for e in read_events(tmp_path / "r" / "events.jsonl")]
    assert kinds[0] == "start"


def test_producer_killed_during_a_real_run_is_restarted_and_the_run_stays_exact(tmp_path: Path):
    import psutil

    from conftest import history, trainlab

    run = [*SHM_RUN[:5], "120", *SHM_RUN[6:]]  # 120 steps
    trainlab(*run, "--run-dir", "ref", cwd=tmp_path, check=True)
    proc = spawn(*run, "--run-dir", "r", cwd=tmp_path)
    _wait_rows(tmp_path / "r", proc, 10)
    producers = [c for c in psutil.Process(proc.pid).children()
                 if not any("resource_tracker" in part for part in c.cmdline())]
    assert producers, "no producer processes found"
    producers[0].kill()
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    restarted = [e for e in read_events(tmp_path / "r" / "events.jsonl") if e["kind"] == "producer_restarted"]
    assert len(restarted) == 1 and restarted[0]["exitcode"] == -signal.SIGKILL
    assert history(tmp_path / "r") == history(tmp_path / "ref")  # the batches did not change
    assert _segments(proc.pid) == []
