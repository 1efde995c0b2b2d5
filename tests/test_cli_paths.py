"""The CLI's exits other than "finished" and "bad input", through the real `python -m trainlab`:
a failure inside training (error.log, exit 1), a report that cannot be written (the run still
counts), Ctrl-C once and twice (exit 130), `trainlab check` and `trainlab report` on a run
directory, and the verdicts of check.json and preflight.json reaching the report.

Failures inside training are injected by tests/fault_injection/sitecustomize.py (see there): the
CLI process is the unmodified one, only modadd's loss raises or signals at a chosen step.

A CLI process costs ~4 s of CPU (most of it importing torch), so the runs the selected tests need
are started together, two at a time, when the first test asks; each test waits for its own.
"""

from __future__ import annotations

import json
import os
import re
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable


from conftest import job_result, jobs_fixture, trainlab
from trainlab.engine.logs import read_events, read_metrics

FAULT_DIR = Path(__file__).parent / "fault_injection"
# 10 steps, a checkpoint every 3 (ckpt.keep=2 keeps the last two): a fault at step 8 leaves 3 and 6
RUN = ("run", "modadd", "--preset", "smoke", "--steps", "10", "--set", "ckpt.every=3", "--set", "log.every=5",
       "--set", "log.progress=off")


def fault(spec: str) -> dict:
    """The environment that makes the CLI process inject `spec` (sitecustomize.py's syntax)."""
    path = [str(FAULT_DIR)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
    return {"TRAINLAB_TEST_FAULT": spec, "PYTHONPATH": os.pathsep.join(path)}


def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line, got:\n{text}"
    return lines[0]


def status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text(encoding="utf-8"))


def complete_checkpoints(run_dir: Path) -> list[int]:
    return sorted(int(p.name[5:]) for p in (run_dir / "checkpoints").iterdir()
                  if p.name.startswith("step_") and p.name[5:].isdigit())


# ------------------------------------------------------------------------------ the runs, started together
# Each job gets its own empty directory and returns what its test looks at.

def crash_job(cwd: Path) -> dict:
    return {"out": trainlab(*RUN, "--run-dir", "r", cwd=cwd, env=fault("raise@8"))}


def report_fails_job(cwd: Path) -> dict:
    (cwd / "r" / "report.md").mkdir(parents=True)  # a directory where the report file must go
    return {"out": trainlab(*RUN, "--run-dir", "r", cwd=cwd)}


def sigint_job(cwd: Path) -> dict:
    return {"out": trainlab(*RUN, "--run-dir", "r", cwd=cwd, env=fault("sigint@5"))}


def sigint_twice_job(cwd: Path) -> dict:
    return {"out": trainlab(*RUN, "--run-dir", "r", cwd=cwd, env=fault("sigint2@5"))}


# A run that learns within 24 steps (7 classes, a high LR), logged every step.  Warm-up of 40 %
# of its 40 planned steps keeps the stuck detector off the first 16 rows, where the loss is still
# near ln 7.  grad_regime is off: "detector off".  plateau needs half its 50-row window, 25 rows:
# with 24 it is "never judged".
JUDGED = ("modadd", "--preset", "smoke", "--steps", "24", "--set", "log.every=1", "--set", "log.progress=off",
          "--set", "optim.lr=0.01", "--set", "data.modulus=7", "--set", "data.train_fraction=0.8",
          "--set", "health.warmup_fraction=0.4", "--set", "health.grad_regime=off")


def judged_job(cwd: Path) -> dict:
    """One preflight, then `trainlab check` and `trainlab report` on its run directory."""
    preflight = trainlab("preflight", *JUDGED, "--run-dir", "pf", cwd=cwd)
    check = trainlab("check", "pf", cwd=cwd)
    return {"preflight": preflight, "check": check, "report": trainlab("report", "pf", cwd=cwd)}


# the job each test needs, by test name; the longest first
JOBS: dict[str, Callable[[Path], dict]] = {
    "test_check_on_a_healthy_run_exits_0_and_says_what_it_could_not_judge": judged_job,
    "test_report_shows_the_verdicts_of_preflight_and_check": judged_job,
    "test_sigint_saves_a_checkpoint_writes_the_report_and_exits_130": sigint_job,
    "test_a_report_that_cannot_be_written_does_not_fail_the_finished_run": report_fails_job,
    "test_a_failure_inside_training_leaves_its_traceback_in_error_log_and_exits_1": crash_job,
    "test_a_second_sigint_stops_at_once_exits_130_and_keeps_the_last_checkpoint": sigint_twice_job,
}


jobs = jobs_fixture(JOBS)


def result(jobs, job) -> tuple[Path, dict]:
    cwd, out = job_result(jobs, job)
    return cwd, out


# ------------------------------------------------------------------------------ training fails

def test_a_failure_inside_training_leaves_its_traceback_in_error_log_and_exits_1(jobs):
    cwd, got = result(jobs, crash_job)
    out, run = got["out"], cwd / "r"
    assert out.returncode == 1, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert one_line(out.stderr) == ("trainlab: training failed: RuntimeError: injected fault at step 8; "
                                    "traceback in r/error.log")
    log = (run / "error.log").read_text(encoding="utf-8")
    assert log.startswith("Traceback (most recent call last):")
    assert "_loss_with_fault" in log  # the frame that raised, not only the message
    assert log.rstrip().endswith("RuntimeError: injected fault at step 8")
    # step 7 was the last one completed; the run directory says it crashed, and why
    st = status(run)
    assert (st["state"], st["step"], st["reason"]) == ("crashed", 7, "RuntimeError: injected fault at step 8")
    last = read_events(run / "events.jsonl")[-1]
    assert (last["kind"], last["step"]) == ("crashed", 7)
    assert complete_checkpoints(run) == [3, 6]  # what a rerun resumes from (resume: test_resume.py)


# ------------------------------------------------------------------------------ the report fails

def test_a_report_that_cannot_be_written_does_not_fail_the_finished_run(jobs):
    cwd, got = result(jobs, report_fails_job)
    out, run = got["out"], cwd / "r"
    assert out.returncode == 0, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert out.stdout.startswith("trainlab: finished r at step 10/10: loss ")
    line = one_line(out.stderr)
    assert line.startswith("trainlab: could not write the report (IsADirectoryError: ")
    assert line.endswith("); `trainlab report r` retries")
    assert not (run / "report.html").exists()
    assert not list(run.glob(".report*")), "a failed write must leave no temporary file"
    assert status(run)["state"] == "finished" and complete_checkpoints(run)[-1] == 10


# ------------------------------------------------------------------------------ Ctrl-C

def test_sigint_saves_a_checkpoint_writes_the_report_and_exits_130(jobs):
    """The rerun's exact resume from such a checkpoint: test_resume.py (SIGINT and SIGTERM)."""
    cwd, got = result(jobs, sigint_job)
    out, run = got["out"], cwd / "r"
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert one_line(out.stderr) == "trainlab: SIGINT: checkpoint saved; rerun the same command to resume (r)"
    # the step in flight is finished and saved, between the periodic checkpoints of steps 3 and 6
    assert complete_checkpoints(run) == [3, 5]
    saved = [e["step"] for e in read_events(run / "events.jsonl") if e["kind"] == "checkpoint"
             and e["reason"] == "SIGINT"]
    assert saved == [5]
    st = status(run)
    assert (st["state"], st["step"]) == ("stopped", 5) and st["reason"].startswith("SIGINT"), st
    assert "| status | stopped: SIGINT" in (run / "report.md").read_text(encoding="utf-8")


def test_a_second_sigint_stops_at_once_exits_130_and_keeps_the_last_checkpoint(jobs):
    """The second Ctrl-C arrives before the first one's checkpoint: KeyboardInterrupt, no new save."""
    cwd, got = result(jobs, sigint_twice_job)
    out, run = got["out"], cwd / "r"
    assert out.returncode == 130, out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert one_line(out.stderr) == ("trainlab: interrupted before a checkpoint could be saved; rerun the same "
                                    "command to resume from the last one (r)")
    assert complete_checkpoints(run) == [3]
    st = status(run)
    assert (st["state"], st["step"]) == ("stopped", 4) and st["reason"].startswith("SIGINT twice"), st


# ------------------------------------------------------------------------------ check and report on a run

class _VerdictRows(HTMLParser):
    """The cells of report.html's verdict table, row by row (header row left out)."""

    def __init__(self):
        super().__init__()
        self.rows: list[list[str]] = []
        self._inside = self._cell = False

    def handle_starttag(self, tag, attrs):
        if tag == "table" and ("class", "verdicts") in attrs:
            self._inside = True
        elif self._inside and tag == "tr":
            self.rows.append([])
        elif self._inside and tag == "td":
            self._cell = True
            self.rows[-1].append("")

    def handle_endtag(self, tag):
        if tag == "table":
            self._inside = False
        elif tag == "td":
            self._cell = False

    def handle_data(self, data):
        if self._inside and self._cell:
            self.rows[-1][-1] += data


def _claims(path: Path) -> dict[str, dict]:
    return {c["name"]: c for c in json.loads(path.read_text(encoding="utf-8"))["claims"]}


def test_check_on_a_healthy_run_exits_0_and_says_what_it_could_not_judge(jobs):
    cwd, got = result(jobs, judged_job)
    check, run = got["check"], cwd / "pf"
    assert got["preflight"].returncode in (0, 1), got["preflight"].stderr  # READY, or UNCERTAIN on a 24-step run
    assert check.returncode == 0, check.stdout + check.stderr
    assert check.stderr == ""
    saved = json.loads((run / "check.json").read_text(encoding="utf-8"))
    assert saved["alerts"] == []
    assert check.stdout.splitlines()[-1] == "trainlab: check pf: 0 alerts, 0 of them warnings or worse -> pf/check.json"
    rows = len(read_metrics(run / "metrics.csv"))
    assert rows == 24
    claims = _claims(run / "check.json")
    assert claims["nonfinite"]["verdict"] == "pass"
    assert claims["nonfinite"]["value"] == f"no alert in {rows} judged rows of {rows}"
    assert claims["stuck"]["verdict"] == "pass"  # judged after warm-up, and the loss is far below ln 7
    off = claims["grad_regime"]
    assert (off["verdict"], off["value"], off["evidence"]) == ("not measured", "detector off", "health.grad_regime=off")
    never = claims["plateau"]
    assert never["verdict"] == "not measured" and never["value"].startswith(f"never judged: {rows} rows are too few")
    assert "plateau_window=50" in never["value"]
    # every claim printed, one line each, with its verdict
    for c in claims.values():
        assert re.search(rf"^  {re.escape(c['name'])} +{c['verdict'].upper()} +", check.stdout, re.M), c


def test_report_shows_the_verdicts_of_preflight_and_check(jobs):
    cwd, got = result(jobs, judged_job)
    report, run = got["report"], cwd / "pf"
    assert report.returncode == 0, report.stderr
    assert report.stdout.strip() == "trainlab: wrote pf/report.md and pf/report.html"
    expected = [[c["name"], c["verdict"], c["value"], c["evidence"], c["source"]]
                for name in ("preflight.json", "check.json")
                for c in json.loads((run / name).read_text(encoding="utf-8"))["claims"]]
    assert len(expected) > 15  # both files hold claims
    parser = _VerdictRows()
    parser.feed((run / "report.html").read_text(encoding="utf-8"))
    assert [r for r in parser.rows if r] == expected
    md = (run / "report.md").read_text(encoding="utf-8")
    section = md.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]  # header row left out
    # cells split at unescaped pipes, Markdown's backslash escapes undone
    cells = [[re.sub(r"\\(.)", r"\1", c.strip()) for c in re.split(r"(?<!\\)\|", line)[1:-1]] for line in table]
    assert cells == [[" ".join(v.split()) for v in row] for row in expected]

