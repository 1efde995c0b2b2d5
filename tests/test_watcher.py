"""`trainlab watch -- COMMAND`: the live detectors on a plain script that is no trainlab run.

Real child processes are the point: each test starts a small Python script written to tmp_path
that appends to a CSV log, and a poll interval of 0.1 s keeps each test to a few seconds."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import cli_env, trainlab
from trainlab.config import HealthConfig

ONSET = 30  # the step after which the script's loss climbs
SCRIPT = """\
import math, os, random, signal, sys, time
ONSET, STEPS, DIVERGE = {onset}, {steps}, {diverge}
step = 0
def save_and_exit(signum, frame):  # the script's own checkpoint-on-Ctrl-C handler
    with open("checkpoint.txt", "w") as fh:
        fh.write(f"step {{step}}\\n")
    sys.exit(130)
signal.signal(signal.SIGINT, {on_int})
signal.signal(signal.SIGTERM, {on_term})
with open("pid.txt", "w") as fh:
    fh.write(str(os.getpid()))
random.seed(0)
best = 0.69 * math.exp(-ONSET / 15) + 0.05
with open("log.csv", "w") as fh:
    fh.write("step,loss,phase\\n")
    for step in range(1, STEPS + 1):
        loss = 0.69 * math.exp(-step / 15) + 0.05
        if DIVERGE and step > ONSET:
            loss = best * 1.3 ** (step - ONSET)
        fh.write(f"{{step}},{{loss * (1 + 0.01 * random.random()):.6f}},train\\n")
        fh.flush()
        time.sleep({sleep})
sys.exit({exit_code})
"""


def write_script(tmp_path: Path, *, steps: int = 200, diverge: bool = True, on_int: str = "save_and_exit",
                 on_term: str = "signal.SIG_DFL", sleep: float = 0.02, exit_code: int = 0) -> Path:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT.format(onset=ONSET, steps=steps, diverge=diverge, on_int=on_int, on_term=on_term,
                                  sleep=sleep, exit_code=exit_code))
    return path


def events(tmp_path: Path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "log.csv.trainlab" / "events.jsonl").read_text().splitlines()]


def logged_steps(tmp_path: Path) -> int:
    return len((tmp_path / "log.csv").read_text().splitlines()) - 1


def test_stop_policy_stops_a_diverging_script_within_a_window_and_its_checkpoint_handler_runs(tmp_path):
    write_script(tmp_path, sleep=0.05)  # a window of rows is 1 s: a loaded machine's slow poll still fits
    proc = trainlab("watch", "--policy", "divergence=stop", "--log", "log.csv", "--baseline", "bce", "--poll", "0.1",
                    "--grace", "5", "--", sys.executable, "train.py", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    window = HealthConfig().window
    alerts = [e for e in events(tmp_path) if e.get("detector") == "divergence"]
    assert alerts and alerts[0]["policy"] == "stop" and ONSET < alerts[0]["step"] <= ONSET + window, alerts
    # the script was stopped, not left to run its 200 steps: within one window of the onset
    assert logged_steps(tmp_path) <= ONSET + window, logged_steps(tmp_path)
    checkpoint = (tmp_path / "checkpoint.txt").read_text()
    assert checkpoint.startswith("step ") and int(checkpoint.split()[1]) <= ONSET + window
    signals = [e["signal"] for e in events(tmp_path) if e["kind"] == "signal"]
    assert signals == ["SIGINT"]
    summary = json.loads((tmp_path / "log.csv.trainlab" / "watch.json").read_text())
    assert summary["child_exit_code"] == 130 and summary["stopped_by"]["detector"] == "divergence"
    assert "exited 130 after" in proc.stderr and "stopped by policy divergence=stop" in proc.stderr
    check = json.loads((tmp_path / "log.csv.trainlab" / "check.json").read_text())
    assert {c["name"]: c["verdict"] for c in check["claims"]}["divergence"] == "fail"
    assert (tmp_path / "log.csv.trainlab" / "report.html").is_file()


def test_a_healthy_script_runs_to_its_end_and_its_exit_code_is_reported(tmp_path):
    write_script(tmp_path, steps=40, diverge=False, sleep=0.005)
    proc = trainlab("watch", "--policy", "divergence=stop", "--log", "log.csv", "--poll", "0.1", "--",
                    sys.executable, "train.py", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert logged_steps(tmp_path) == 40 and not (tmp_path / "checkpoint.txt").exists()
    assert "exited 0 after 40 rows; 0 alerts" in proc.stderr  # the last step is fed once the child exited
    assert [e["kind"] for e in events(tmp_path)] == ["watch", "exit"]


def test_the_childs_own_exit_code_is_the_watchers_when_no_policy_stopped_it(tmp_path):
    proc = trainlab("watch", "--log", "never.csv", "--poll", "0.1", "--", sys.executable, "-c",
                    "import sys; sys.exit(3)", cwd=tmp_path)
    assert proc.returncode == 3, proc.stderr
    assert "exited 3 after 0 rows" in proc.stderr and "no final check: log never.csv: not found" in proc.stderr


def test_a_child_that_ignores_sigint_and_sigterm_is_killed_after_the_grace(tmp_path):
    write_script(tmp_path, on_int="signal.SIG_IGN", on_term="signal.SIG_IGN")
    start = time.monotonic()
    proc = trainlab("watch", "--policy", "divergence=stop", "--log", "log.csv", "--poll", "0.1", "--grace", "0.3",
                    "--", sys.executable, "train.py", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    assert [e["signal"] for e in events(tmp_path) if e["kind"] == "signal"] == ["SIGINT", "SIGTERM", "SIGKILL"]
    summary = json.loads((tmp_path / "log.csv.trainlab" / "watch.json").read_text())
    assert summary["child_exit_code"] == 128 + signal.SIGKILL
    assert not (tmp_path / "checkpoint.txt").exists()
    assert time.monotonic() - start < 15  # not the 200 steps' 4 s + the default 30 s grace


TB_SCRIPT = """\
import math, signal, sys, time
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.proto.summary_pb2 import Summary
from tensorboard.summary.writer.event_file_writer import EventFileWriter
step = 0
def save_and_exit(signum, frame):
    open("checkpoint.txt", "w").write(f"step {step}\\n")
    sys.exit(130)
signal.signal(signal.SIGINT, save_and_exit)
time.sleep(0.3)  # the directory does not exist when the watcher starts
writer = EventFileWriter("tb")
best = 0.69 * math.exp(-%(onset)d / 15) + 0.05
for step in range(1, 200):
    loss = 0.69 * math.exp(-step / 15) + 0.05 if step <= %(onset)d else best * 1.3 ** (step - %(onset)d)
    # one event per tag, as SummaryWriter.add_scalar writes them: the watcher joins a step's events
    for tag, value in (("train/loss", loss), ("lr", 0.1)):
        writer.add_event(Event(step=step, wall_time=time.time(), summary=Summary(value=[
            Summary.Value(tag=tag, simple_value=value)])))
    writer.flush()
    time.sleep(0.02)
"""


def test_a_tensorboard_directory_being_written_is_followed(tmp_path):
    (tmp_path / "tb_train.py").write_text(TB_SCRIPT % {"onset": ONSET})
    proc = trainlab("watch", "--policy", "divergence=stop", "--log", "tb", "--out", "health", "--poll", "0.1",
                    "--", sys.executable, "tb_train.py", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    found = [json.loads(line) for line in (tmp_path / "health" / "events.jsonl").read_text().splitlines()]
    alerts = [e for e in found if e.get("detector") == "divergence"]
    assert alerts and ONSET < alerts[0]["step"] <= ONSET + HealthConfig().window, alerts
    assert (tmp_path / "checkpoint.txt").is_file()
    assert not list((tmp_path / "tb").glob("*.trainlab"))  # nothing written into the user's TensorBoard directory


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie has exited; only its parent's wait is missing


def _spawn_watch(tmp_path: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainlab", "watch", "--log", "log.csv", "--poll", "0.1",
                             "--grace", "5", *extra, "--", sys.executable, "train.py"], cwd=tmp_path,
                            env=cli_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(path: Path, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while not path.exists() or not path.read_text():
        assert time.monotonic() < deadline, f"{path} never appeared"
        time.sleep(0.05)


def test_a_signal_sent_to_the_watcher_reaches_the_child(tmp_path):
    write_script(tmp_path, diverge=False, steps=2000, on_term="save_and_exit", sleep=0.01)
    watch = _spawn_watch(tmp_path)
    try:
        _wait_for(tmp_path / "pid.txt")
        time.sleep(0.3)
        watch.send_signal(signal.SIGTERM)
        _, err = watch.communicate(timeout=20)
    finally:
        watch.kill()
    assert (tmp_path / "checkpoint.txt").is_file(), err  # the child's handler ran
    assert watch.returncode == 130, err  # the child's exit code, passed on
    assert "SIGTERM received: passed to the child" in err and "exited 130 after" in err
    assert not _alive(int((tmp_path / "pid.txt").read_text()))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="PR_SET_PDEATHSIG is Linux's")
def test_the_child_does_not_outlive_a_watcher_killed_with_sigkill(tmp_path):
    write_script(tmp_path, diverge=False, steps=2000, sleep=0.01)
    watch = _spawn_watch(tmp_path)
    try:
        _wait_for(tmp_path / "pid.txt")
        child = int((tmp_path / "pid.txt").read_text())
        watch.kill()  # SIGKILL: no handler, no finally; only the kernel can end the child
        watch.wait(timeout=10)
        deadline = time.monotonic() + 5
        while _alive(child) and time.monotonic() < deadline:
            time.sleep(0.05)
        survived = _alive(child)
    finally:
        if 'child' in locals() and _alive(child):
            os.kill(child, signal.SIGKILL)
    assert not survived


@pytest.mark.parametrize("args, message", [
    (["--log", "log.csv"], "no COMMAND"),
    (["--log", "log.csv", "--"], "no COMMAND"),
    (["--", "python", "-c", "pass"], "--log PATH is required"),
    (["--log", "log.csv", "--policy", "divergense=stop"], "NAME one of: nonfinite, divergence"),
    (["--log", "log.csv", "--policy", "divergence=rollback"], "allowed policies: warn, stop"),
    (["--log", "log.csv", "--policy", "grokking=stop"], "grokking takes only warn"),
    (["--log", "log.csv", "--policy", "jump=stop"], "jump takes only warn"),
    (["--log", "log.csv", "--stop-signal", "KILL9"], "allowed: INT, TERM"),
    (["--log", "log.csv", "--poll", "0"], "--poll 0.0"),
    (["--log", "log.csv", "--baseline", "ce:1"], "--baseline ce:1"),
])
def test_bad_input_exits_2_with_one_line_and_starts_nothing(tmp_path, args, message):
    command = [] if "--" in args or "no COMMAND" in message else \
        ["--", sys.executable, "-c", "open('started', 'w')"]
    proc = trainlab("watch", *args, *command, cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and message in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written, the child never started


def test_the_follower_feeds_a_step_once_with_all_its_values_and_waits_for_a_late_file(tmp_path):
    from trainlab.health.watcher import LogFollower

    log = tmp_path / "metrics.csv"
    follower = LogFollower(log, None, {})
    assert follower.read() == [] and "not found" in follower.waiting_note  # not written yet: wait, no error
    log.write_text("step,loss,val_loss\n1,0.9,\n1,,0.95\n2,0.8,\n")
    # step 1's two rows (training, then validation, as Lightning's CSVLogger writes them) are one row;
    # step 2 waits: its validation may follow
    assert follower.read() == [{"step": 1, "loss": 0.9, "val_loss": 0.95}]
    with log.open("a") as fh:
        fh.write("2,,0.85\n1,0.7,\n3,0.6,")  # a restart's step 1 again, and a line still being written
    assert follower.read() == [] and follower.skipped == 1  # step 1 was judged: not fed again live
    assert follower.read(final=True) == [{"step": 2, "loss": 0.8, "val_loss": 0.85}]
    assert follower.reader.notes.torn == "3,0.6,"  # the writer is done: a torn line, never a row
