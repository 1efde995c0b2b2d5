"""Exact auto-resume: a run killed with SIGKILL (or stopped by SIGINT/SIGTERM) and resumed gives
the same metrics (last row per step) and the same final weights as a run never stopped."""

from __future__ import annotations

import random
import signal
import time
from pathlib import Path

import pytest

from conftest import assert_same_weights, final_weights, history, spawn, trainlab
from trainlab.engine.logs import read_events, read_rows

# Checkpoints every 7 steps and rows every 5, so kills land between checkpoints and mid-interval.
RUN = ["run", "modadd", "--preset", "smoke", "--steps", "240", "--set", "ckpt.every=7", "--set", "log.every=5",
       "--set", "eval.every=30", "--set", "model.dim=64", "--set", "model.dropout=0.1"]


def _wait_for_step(run_dir: Path, proc, target: int, timeout: float = 60.0) -> int:
    """Poll metrics.csv until a row at or past `target` appears; return the step seen."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            return -1
        rows = read_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
        if rows and rows[-1]["step"] >= target:
            return rows[-1]["step"]
        time.sleep(0.002)
    raise AssertionError("run did not reach the target step in time")


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    cwd = tmp_path_factory.mktemp("reference")
    trainlab(*RUN, "--run-dir", "ref", cwd=cwd, check=True)
    return cwd / "ref"


def test_sigkill_then_resume_is_exact(reference: Path, tmp_path: Path):
    rng = random.Random(1234)
    run_dir = tmp_path / "killed"
    kills = 0
    for target in sorted(rng.sample(range(20, 200), 2)):
        proc = spawn(*RUN, "--run-dir", str(run_dir), cwd=tmp_path)
        seen = _wait_for_step(run_dir, proc, target)
        if seen > 0:
            proc.send_signal(signal.SIGKILL)
            kills += 1
        proc.communicate(timeout=60)
    assert kills >= 1, "the run finished before any kill landed"
    done = trainlab(*RUN, "--run-dir", str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert history(run_dir) == history(reference)
    assert_same_weights(final_weights(reference), final_weights(run_dir))
    events = read_events(run_dir / "events.jsonl")
    assert sum(e["kind"] == "resume" for e in events) >= 1
    # append-only: earlier attempts' rows are still there, and attempts are numbered
    attempts = {row["attempt"] for row in read_rows(run_dir / "metrics.csv")}
    assert len(attempts) >= 2


@pytest.mark.parametrize("sig,code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_signal_saves_checkpoint_and_resume_is_exact(reference: Path, tmp_path: Path, sig, code):
    run_dir = tmp_path / "signalled"
    proc = spawn(*RUN, "--run-dir", str(run_dir), cwd=tmp_path)
    assert _wait_for_step(run_dir, proc, 60) > 0
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == code, err
    assert "checkpoint saved" in err
    events = read_events(run_dir / "events.jsonl")
    stop = [e for e in events if e["kind"] == "checkpoint" and e["reason"] == sig.name]
    assert stop, events
    status = (run_dir / "status.json").read_text()
    assert '"stopped"' in status
    done = trainlab(*RUN, "--run-dir", str(run_dir), cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert history(run_dir) == history(reference)
    assert_same_weights(final_weights(reference), final_weights(run_dir))


def test_rerun_of_finished_run_says_so_and_extension_continues(reference: Path, tmp_path: Path):
    again = trainlab(*RUN, "--run-dir", str(reference), cwd=tmp_path)
    assert again.returncode == 0
    assert "already finished at step 240" in again.stdout
    # extending a copy: the first 240 steps stay, new rows continue from 241
    import shutil
    ext = tmp_path / "ext"
    shutil.copytree(reference, ext)
    longer = [a if a != "240" else "260" for a in RUN]
    out = trainlab(*longer, "--run-dir", str(ext), cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    rows = history(ext)
    assert rows[-1]["step"] == 260
    assert rows[: len(history(reference))] == history(reference)
    kinds = [e["kind"] for e in read_events(ext / "events.jsonl")]
    assert "config_changed" in kinds


def test_config_yaml_reproduces_the_run(reference: Path, tmp_path: Path):
    out = trainlab("run", str(reference / "config.yaml"), "--run-dir", "again", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    assert history(tmp_path / "again") == history(reference)


def test_fresh_moves_old_run_aside(tmp_path: Path):
    args = ["run", "modadd", "--preset", "smoke", "--steps", "10", "--run-dir", "r"]
    trainlab(*args, cwd=tmp_path, check=True)
    before = sorted(p.name for p in (tmp_path / "r").iterdir())
    out = trainlab(*args, "--fresh", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    moved = [p for p in tmp_path.iterdir() if p.name.startswith("r.old-")]
    assert len(moved) == 1
    assert sorted(p.name for p in moved[0].iterdir()) == before
    events = read_events(tmp_path / "r" / "events.jsonl")
    assert [e["kind"] for e in events][0] == "start"


def test_runs_lists_status_including_killed(tmp_path: Path):
    trainlab("run", "modadd", "--preset", "smoke", "--steps", "10", "--run-dir", "runs/done", cwd=tmp_path, check=True)
    proc = spawn(*RUN, "--run-dir", "runs/killed", cwd=tmp_path)
    assert _wait_for_step(tmp_path / "runs" / "killed", proc, 20) > 0
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=60)
    out = trainlab("runs", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    lines = {line.split()[0]: line for line in out.stdout.splitlines()[1:]}
    assert "finished" in lines["done"] and "10/10" in lines["done"]
    assert "crashed" in lines["killed"]


def test_second_process_on_same_run_dir_is_refused(tmp_path: Path):
    long_run = [a if a != "240" else "100000" for a in RUN]  # still running when the second one starts
    proc = spawn(*long_run, "--run-dir", "busy", cwd=tmp_path)
    try:
        assert _wait_for_step(tmp_path / "busy", proc, 5) > 0
        out = trainlab(*long_run, "--run-dir", "busy", cwd=tmp_path)
        assert out.returncode == 2
        assert "in use by pid" in out.stderr
    finally:
        proc.kill()
        proc.communicate()
