"""Data-parallel runs under torchrun, on the CPU with gloo and two processes (docs/distributed.md).

Every run here is a real `trainlab run --nproc 2` (torchrun's agent, two ranks, DistributedDataParallel)
in a process of its own.  The reference two-rank run is made once per module."""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import torch

from conftest import assert_same_weights, cli_env, final_weights, history, trainlab
from trainlab.engine.logs import read_events, read_rows

FAULT_DIR = Path(__file__).parent / "fault_injection"
STEPS = 120
RUN = ("run", "modadd", "--preset", "smoke", "--device", "cpu", "--steps", str(STEPS), "--set", "ckpt.every=10",
       "--set", "log.every=5")
TWO = ("--nproc", "2")


def _files(run_dir: Path) -> set[str]:
    return {str(p.relative_to(run_dir)) for p in run_dir.rglob("*") if p.is_file()}


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    cwd = tmp_path_factory.mktemp("two_ranks")
    done = trainlab(*RUN, *TWO, "--run-dir", "two", cwd=cwd, own_process=True)
    assert done.returncode == 0, done.stderr
    return cwd / "two", done


def test_two_ranks_give_the_losses_and_weights_of_one_rank_with_twice_the_accumulation(two_ranks, tmp_path):
    run_dir, done = two_ranks
    assert "effective batch 64 x 1 x 2 processes = 128" in done.stderr and "2 ranks, gloo" in done.stderr
    one = trainlab(*RUN, "--set", "train.accum=2", "--run-dir", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    a, b = history(tmp_path / "one"), history(run_dir)
    assert [r["step"] for r in a] == [r["step"] for r in b] and len(a) == STEPS // 5
    for name in ("loss", "grad_norm", "acc", "val_loss", "val_acc"):
        x = [r[name] for r in a if r.get(name) is not None]
        y = [r[name] for r in b if r.get(name) is not None]
        assert x and len(x) == len(y)
        assert torch.allclose(torch.tensor(x), torch.tensor(y), rtol=1e-4, atol=1e-6), name
    # the same throughput unit: samples of the whole job
    w1, w2 = final_weights(tmp_path / "one"), final_weights(run_dir)
    assert w1.keys() == w2.keys() and w1
    for k in w1:
        assert torch.allclose(w1[k], w2[k], rtol=1e-4, atol=1e-5), k


def test_only_rank_zero_writes_the_run_directory(two_ranks, tmp_path):
    run_dir, _ = two_ranks
    one = trainlab(*RUN, "--run-dir", "one", cwd=tmp_path)
    assert one.returncode == 0, one.stderr
    assert _files(run_dir) == _files(tmp_path / "one")  # no second log, no per-rank file, no error.rank1.log
    rows = read_rows(run_dir / "metrics.csv")
    assert [r["step"] for r in rows] == list(range(5, STEPS + 1, 5))  # one row per log step, not one per rank
    events = read_events(run_dir / "events.jsonl")
    starts = [e for e in events if e["kind"] == "start"]
    assert len(starts) == 1 and starts[0]["world_size"] == 2
    checkpoints = [e["step"] for e in events if e["kind"] == "checkpoint"]
    assert checkpoints == list(range(10, STEPS + 1, 10))  # each saved once
    status = json.loads((run_dir / "status.json").read_text())
    assert status["state"] == "finished" and status["pid"] == starts[0]["pid"]  # rank 0's process


def test_a_sigkilled_two_rank_job_reruns_to_the_exact_history(two_ranks, tmp_path):
    """The whole job (launcher and both ranks) SIGKILLed at a random step, then rerun."""
    reference, _ = two_ranks
    kill_at = random.Random().randint(15, STEPS - 20)
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "trainlab", *RUN, *TWO, "--run-dir", str(run_dir)], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    killed, deadline = False, time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        rows = read_rows(run_dir / "metrics.csv") if (run_dir / "metrics.csv").exists() else []
        if rows and rows[-1]["step"] >= kill_at:
            # the launcher and every rank at once (torchrun puts its workers in sessions of their own)
            tree = [proc.pid] + [c.pid for c in psutil.Process(proc.pid).children(recursive=True)]
            for pid in tree:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert killed, f"the run finished before the kill at step {kill_at} landed"
    again = trainlab(*RUN, *TWO, "--run-dir", str(run_dir), cwd=tmp_path, own_process=True)
    assert again.returncode == 0, (kill_at, again.stderr)
    assert any(e["kind"] == "resume" for e in read_events(run_dir / "events.jsonl"))
    assert history(run_dir) == history(reference), f"killed at step {kill_at}"
    assert_same_weights(final_weights(reference), final_weights(run_dir))


def test_another_world_size_is_refused_then_rescaled_when_allowed(two_ranks, tmp_path):
    import shutil

    run_dir = tmp_path / "copy"
    shutil.copytree(two_ranks[0], run_dir)
    before = {p: (run_dir / p).read_bytes() for p in ("config.yaml", "metrics.csv", "events.jsonl")}
    refused = trainlab(*RUN[:-4], "--steps", str(STEPS + 20), "--run-dir", str(run_dir), cwd=tmp_path)
    lines = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(lines) == 1, refused.stderr
    assert "trained with 2 processes and this run has 1" in lines[0] and "allow_world_size_change" in lines[0]
    assert {p: (run_dir / p).read_bytes() for p in before} == before  # nothing written
    allowed = trainlab(*RUN[:-4], "--steps", str(STEPS + 20), "--set", "train.allow_world_size_change=true",
                       "--run-dir", str(run_dir), cwd=tmp_path)
    assert allowed.returncode == 0, allowed.stderr
    assert "2 -> 1 processes: train.accum 1 -> 2" in allowed.stderr
    changed = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "config_changed"]
    assert changed and changed[-1]["changes"]["train.accum"] == [1, 2]
    assert history(run_dir)[-1]["step"] == STEPS + 20


def test_a_count_that_cannot_keep_the_effective_batch_is_refused(two_ranks, tmp_path):
    import shutil

    from trainlab.errors import UsageError
    from trainlab.launch import Launch, load_target

    run_dir = tmp_path / "copy"
    shutil.copytree(two_ranks[0], run_dir)
    experiment, cfg = load_target("modadd", "smoke", ["train.allow_world_size_change=true", "ckpt.every=10",
                                                      "log.every=5"], STEPS)
    with pytest.raises(UsageError, match="2 x 1 = 2 micro-batches per step, which 3 processes cannot share"):
        Launch(experiment, cfg, run_dir, torch.device("cpu"), world_size=3).prepare(False)


def test_sigterm_to_the_job_stops_every_rank_at_one_step_with_one_checkpoint(two_ranks, tmp_path):
    reference, _ = two_ranks
    run_dir = tmp_path / "term"
    # SIGTERM reaches rank 1 alone: the ranks agree on it, stop at the same step, rank 0 saves
    env = {"PYTHONPATH": str(FAULT_DIR), "TRAINLAB_TEST_FAULT": "sigterm@33", "TRAINLAB_TEST_FAULT_RANK": "1"}
    cut = trainlab(*RUN, *TWO, "--run-dir", str(run_dir), cwd=tmp_path, env=env)
    assert cut.returncode == 143, cut.stderr
    assert "SIGTERM: checkpoint saved" in cut.stderr.strip().splitlines()[-1]
    events = read_events(run_dir / "events.jsonl")
    saved = [e for e in events if e["kind"] == "checkpoint" and e["reason"] == "SIGTERM"]
    assert [e["step"] for e in saved] == [33], saved
    again = trainlab(*RUN, *TWO, "--run-dir", str(run_dir), cwd=tmp_path, own_process=True)
    assert again.returncode == 0, again.stderr
    assert history(run_dir) == history(reference)
    assert_same_weights(final_weights(reference), final_weights(run_dir))


def test_a_rank_that_dies_stops_the_job_in_one_line_and_the_rerun_resumes(two_ranks, tmp_path):
    reference, _ = two_ranks
    run_dir = tmp_path / "dies"
    env = {"PYTHONPATH": str(FAULT_DIR), "TRAINLAB_TEST_FAULT": "sigkill@47", "TRAINLAB_TEST_FAULT_RANK": "1"}
    cut = trainlab(*RUN, *TWO, "--run-dir", str(run_dir), cwd=tmp_path, env=env, timeout=180)
    assert cut.returncode == 1, cut.stderr
    assert "rank 1 of 2 was killed by SIGKILL; torchrun stopped the others" in cut.stderr, cut.stderr
    again = trainlab(*RUN, *TWO, "--run-dir", str(run_dir), cwd=tmp_path, own_process=True)
    assert again.returncode == 0, again.stderr
    resume = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "resume"]
    assert resume and resume[-1]["step"] == 40  # the last checkpoint before step 47
    assert history(run_dir) == history(reference)


def test_an_out_of_memory_error_on_one_rank_splits_every_rank_together(tmp_path):
    env = {"PYTHONPATH": str(FAULT_DIR), "TRAINLAB_TEST_FAULT": "oom@12", "TRAINLAB_TEST_FAULT_RANK": "1"}
    args = (*RUN[:-6], "--steps", "30", "--set", "train.accum=2")
    done = trainlab(*args, *TWO, "--run-dir", "oom", cwd=tmp_path, env=env)
    assert done.returncode == 0, done.stderr
    events = read_events(tmp_path / "oom" / "events.jsonl")
    splits = [e for e in events if e["kind"] == "out_of_memory"]
    assert [(e["step"], e["micro_batch"]) for e in splits] == [(12, 32)], splits
    plain = trainlab(*args, *TWO, "--run-dir", "plain", cwd=tmp_path, own_process=True)
    assert plain.returncode == 0, plain.stderr
    a, b = history(tmp_path / "plain"), history(tmp_path / "oom")
    assert torch.allclose(torch.tensor([r["loss"] for r in a]), torch.tensor([r["loss"] for r in b]), rtol=1e-4)


def test_a_stop_one_rank_asks_for_stops_every_rank_at_that_step(tmp_path):
    (tmp_path / "rank_stop.py").write_text(
        "from trainlab import Callback\n\n"
        "class StopOnRankOne(Callback):\n"
        "    all_ranks = True\n\n"
        "    def on_after_update(self, trainer):\n"
        "        if trainer.world.rank == 1 and trainer.step == 16:\n"
        "            trainer.request_stop('rank 1 asked at step 17')\n", encoding="utf-8")
    spec = '--set=callbacks=[{path: "rank_stop:StopOnRankOne"}]'
    done = trainlab(*RUN, *TWO, spec, "--run-dir", "stop", cwd=tmp_path, env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1, done.stderr
    assert "rank 1 asked at step 17" in done.stderr.strip().splitlines()[-1]
    status = json.loads((tmp_path / "stop" / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 17
    assert (tmp_path / "stop" / "checkpoints" / "step_00000017").is_dir() or any(
        p.name.endswith("17") for p in (tmp_path / "stop" / "checkpoints").iterdir())


def test_nproc_refusals_are_one_line_before_anything_starts(tmp_path):
    for args, text in ((("--nproc", "0"), "--nproc 0: allowed: 1 or more"),):
        proc = trainlab(*RUN, *args, "--run-dir", "x", cwd=tmp_path)
        lines = proc.stderr.strip().splitlines()
        assert proc.returncode == 2 and len(lines) == 1 and text in lines[0], proc.stderr
        assert not (tmp_path / "x").exists()
    inside = trainlab(*RUN, *TWO, "--run-dir", "x", cwd=tmp_path,
                      env={"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0"})
    assert inside.returncode == 2 and "already one of a torchrun job" in inside.stderr


def test_a_loss_that_bypasses_the_models_forward_is_stopped_before_ranks_train_apart(tmp_path):
    """StegaStamp's loss calls the model's encoder and decoder directly: DDP would not average its
    gradients, so every rank would train its own model.  Stopped at the first step, in one line."""
    done = trainlab("run", "stegastamp", "--preset", "smoke", "--device", "cpu", "--steps", "5", *TWO,
                    "--run-dir", "s", cwd=tmp_path, own_process=True)
    assert done.returncode == 1, done.stderr
    last = done.stderr.strip().splitlines()[-1]
    assert "calls the model's parts, not model(...) itself" in last and "one process only" in last
    status = json.loads((tmp_path / "s" / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 0
