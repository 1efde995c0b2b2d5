"""Memory guard: over the ceiling the run tries gc, waits if asked, then stops with a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from conftest import trainlab
from trainlab.config import MemoryConfig
from trainlab.engine.logs import read_events
from trainlab.engine.memory import MemoryGuard


def test_guard_reports_ceiling_and_peaks():
    events = []
    guard = MemoryGuard(MemoryConfig(host_ceiling_gb=0.001), torch.device("cpu"))
    problem = guard.check(events.append)
    assert problem and "memory.host_ceiling_gb=0.001" in problem
    assert [e["kind"] for e in events] == ["memory_warning"]
    assert guard.peak_host_gb > 0.001
    relaxed = MemoryGuard(MemoryConfig(host_ceiling_gb=1000), torch.device("cpu"))
    assert relaxed.check(events.append) is None


def test_tiny_ceiling_stops_run_with_checkpoint_and_message(tmp_path: Path):
    out = trainlab("run", "modadd", "--preset", "smoke", "--set", "memory.host_ceiling_gb=0.001",
                   "--set", "memory.every=5", "--set", "memory.pause_s=0.01", "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "memory guard" in out.stderr and "host_ceiling_gb=0.001" in out.stderr
    assert "checkpoint saved" in out.stderr
    run = tmp_path / "r"
    assert (run / "checkpoints" / "step_00000005" / "manifest.json").exists()
    kinds = [e["kind"] for e in read_events(run / "events.jsonl")]
    assert kinds.count("memory_warning") == 1 and "memory_pause" in kinds and kinds[-1] == "stopped"
    status = json.loads((run / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 5
    listing = trainlab("runs", str(tmp_path), cwd=tmp_path)
    assert "stopped (memory guard" in listing.stdout
