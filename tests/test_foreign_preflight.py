"""`trainlab preflight --log PATH --max-seconds S -- COMMAND`: preflight's verdict on a plain script.

Real child processes are the point: a small Python script written to tmp_path appends a row to a
CSV every 0.05 s; a budget of 2-3 s keeps each test to a few seconds."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from conftest import trainlab

SCRIPT = """\
import math, random, sys, time
random.seed(0)
with open("log.csv", "w") as fh:
    fh.write("step,loss\\n")
    fh.flush()
    for step in range(1, 100000):
        if {learning}:
            loss = 0.69 * math.exp(-step / 30) + 0.05 + random.gauss(0, 0.005)
        else:
            loss = 0.70 + random.gauss(0, 0.01)  # just above ln 2: nothing learned
        fh.write(f"{{step}},{{loss:.6f}}\\n")
        fh.flush()
        if step == {crash_at}:
            sys.exit(3)
        time.sleep(0.05)
"""


def write_script(tmp_path: Path, *, learning: bool = True, crash_at: int = 0) -> list[str]:
    path = tmp_path / "train.py"
    path.write_text(SCRIPT.format(learning=learning, crash_at=crash_at))
    return [sys.executable, str(path)]


def preflight(tmp_path: Path, command: list[str], *extra: str, seconds: str = "3"):
    proc = trainlab("preflight", "--log", "log.csv", "--max-seconds", seconds, "--grace", "2", *extra, "--",
                    *command, cwd=tmp_path)
    out = tmp_path / "log.csv.trainlab"
    details = json.loads((out / "preflight.json").read_text()) if (out / "preflight.json").is_file() else None
    return proc, details


def claim(details: dict, name: str) -> dict:
    return next(c for c in details["claims"] if c["name"] == name)


def test_a_learning_script_is_ready_with_every_number(tmp_path):
    proc, details = preflight(tmp_path, write_script(tmp_path), "--baseline", "bce", "--planned-steps", "1000")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert list(details)[:3] == ["verdict", "summary", "reasons"]
    assert details["verdict"] == "READY" and details["stopped_at_budget"] is True
    assert claim(details, "learning signal")["verdict"] == "pass"
    assert "below the baseline" in claim(details, "learning signal")["value"]
    assert "ln 2" in claim(details, "learning signal")["evidence"]  # the baseline named as given
    assert claim(details, "run")["value"].startswith("stopped at the budget of 3 s")
    projection = claim(details, "projection (not a measurement)")
    assert projection["verdict"] == "info" and "loss at step 1000" in projection["value"]
    # the script writes a row every 0.05 s (plus its own time): about 20 steps/s, never more
    rate = details["learning"]["steps_per_s"]
    assert 10 < rate < 25, rate
    assert "ETA for 1000 steps" in claim(details, "speed")["value"]
    for name in ("gradients", "resume", "memory", "update-to-weight ratios"):
        assert claim(details, name)["value"] == "not measured: foreign script"
    for name in ("check.json", "report.md", "report.html", "events.jsonl"):
        assert (tmp_path / "log.csv.trainlab" / name).is_file(), name
    assert "not measured: foreign script" in (tmp_path / "log.csv.trainlab" / "report.md").read_text()


def test_a_script_stuck_at_the_baseline_is_not_ready(tmp_path):
    proc, details = preflight(tmp_path, write_script(tmp_path, learning=False), "--baseline", "bce",
                              "--planned-steps", "1000")
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert details["verdict"] == "NOT READY"
    assert details["reasons"][0].startswith("not learning"), details["reasons"]


def test_a_script_that_crashes_is_not_ready_with_its_exit_code(tmp_path):
    proc, details = preflight(tmp_path, write_script(tmp_path, crash_at=8), "--baseline", "bce")
    assert proc.returncode == 1
    assert details["verdict"] == "NOT READY" and details["child_exit_code"] == 3
    assert details["reasons"][0] == "the script crashed: exit code 3 at step 8"
    assert claim(details, "run")["verdict"] == "fail"


def test_without_baseline_or_planned_steps_it_says_what_is_not_measured(tmp_path):
    proc, details = preflight(tmp_path, write_script(tmp_path), seconds="2")
    learning = claim(details, "learning signal")
    assert learning["verdict"] == "pass" and "not measured (--baseline)" in learning["value"]
    assert claim(details, "projection (not a measurement)")["value"] == "not measured: --planned-steps not given"
    assert "ETA" not in claim(details, "speed")["value"]


@pytest.mark.parametrize("args, message", [
    (("modadd", "--log", "log.csv", "--", "true"), "not both"),
    (("--log", "log.csv"), "no COMMAND"),
    (("--", "true"), "needs --log PATH"),
    (("--log", "log.csv", "--max-seconds", "0", "--", "true"), "--max-seconds 0"),
    (("--log", "log.csv", "--baseline", "ce:x", "--", "true"), "--baseline"),
    (("--log", "log.csv", "--steps", "40", "--", "true"), "--steps"),
    (("modadd", "--baseline", "bce"), "only with --log"),
])
def test_bad_input_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    proc = trainlab("preflight", *args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], proc.stderr
    assert list(tmp_path.iterdir()) == []
