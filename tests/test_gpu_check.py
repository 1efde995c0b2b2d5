"""bench/gpu_check, the prepared GPU pass: its dry run (the same plan on the CPU at smoke sizes) must
run every check of the plan or say why not, with real figures from the runs, so the plan cannot rot
between GPU loans; without CUDA and without --dry-run it refuses in one line; its runner records a
failing or hanging command as a failure, with the stderr tail, and ends the hung process group."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import subprocess
import sys
import time
from importlib.machinery import SourceFileLoader
from pathlib import Path

import psutil
import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "bench" / "gpu_check"


def load_gpu_check():
    loader = SourceFileLoader("gpu_check", str(SCRIPT))
    spec = importlib.util.spec_from_loader("gpu_check", loader)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up while the file loads
    loader.exec_module(module)
    return module


G = load_gpu_check()


def run_script(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], capture_output=True, text=True, timeout=timeout,
                          env=env, cwd=ROOT)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    proc = run_script("--dry-run", "--out", str(out))
    return proc, out


def test_dry_run_runs_every_check_of_the_plan_or_says_why_not(dry_run):
    proc, out = dry_run
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    assert (out / "summary.md").is_file() and (out / "summary.json").is_file()
    assert str(out / "summary.md") in proc.stdout.splitlines()[-1]  # it says where the summary is
    summary = json.loads((out / "summary.json").read_text())
    assert summary["environment"]["torch"] == torch.__version__
    assert summary["environment"]["device"] == "cpu"
    records = {r["name"]: r for r in summary["checks"]}
    assert [r["name"] for r in summary["checks"]] == [c.name for c in G.PLAN]  # the whole plan, in order
    markdown = (out / "summary.md").read_text()
    for check in G.PLAN:
        record = records[check.name]
        assert record["status"] in (G.PASSED, G.SKIPPED), record
        assert record["commands"], record  # the command it ran, or would have run
        if record["status"] == G.SKIPPED:
            assert record["reason"].strip(), record  # a skip says why
        if check.dry_skip:
            assert record["status"] == G.SKIPPED and record["reason"] == check.dry_skip, record
        # the GPU form's config resolves here, also for the checks a dry run skips
        assert record["gpu_config"] == ("resolves" if check.gpu_target() else "none"), record
        assert f"| {check.name} | {record['status']} |" in markdown


def test_dry_run_trainlab_runs_give_real_figures(dry_run):
    proc, out = dry_run
    records = {r["name"]: r for r in json.loads((out / "summary.json").read_text())["checks"]}
    runs = [c for c in G.PLAN if isinstance(c, G.RunCheck) and not c.dry_skip]
    assert len(runs) >= 6  # the three experiments, bf16, fp16, resume
    for check in runs:
        record = records[check.name]
        assert record["status"] == G.PASSED, record
        figures = record["figures"]
        assert record["rc"] == 0 and record["wall_s"] > 0, record
        assert figures["steps"] == check.dry_steps, figures
        assert figures["steps_per_s"] > 0, figures
        assert math.isfinite(figures["final_loss"]), figures
        assert (figures.get("samples_per_s") or figures.get("tokens_per_s")) > 0, figures
        assert figures["device"] == "cpu", figures
        assert figures["precision"] == {"auto": "fp32"}.get(check.precision, check.precision), figures
        assert (out / "runs" / (check.resume_of or check.name) / "metrics.csv").is_file()
    assert records["fp16-gradscaler"]["figures"]["amp_scale"] > 0
    assert records["resume"]["figures"]["resumed_at_step"] == records["modadd-grok"]["figures"]["steps"]
    generator = records["sha256-generator"]
    assert generator["status"] == G.PASSED and generator["figures"]["samples_per_s"] > 0, generator
    guard = records["memory-guard"]
    assert guard["status"] == G.PASSED and guard["figures"]["poll_us"] > 0, guard
    assert "needs CUDA" in guard["figures"]["device_part"]  # the device half is not claimed on a CPU


def test_without_cuda_it_refuses_in_one_line(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("CUDA is present: the refusal is for machines without it")
    out = tmp_path / "out"
    proc = run_script("--out", str(out), timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.strip() == (f"bench/gpu_check: no CUDA device here (torch {torch.__version__}); run it on "
                                   "the GPU machine, or pass --dry-run")
    assert proc.stdout == "" and not out.exists()  # nothing started, nothing written


def test_a_spent_budget_starts_no_check_and_says_so(tmp_path):
    out = tmp_path / "out"
    started = time.monotonic()
    proc = run_script("--dry-run", "--budget", "1", "--out", str(out), timeout=120)
    assert proc.returncode == 0, proc.stderr
    records = json.loads((out / "summary.json").read_text())["checks"]
    assert [r["name"] for r in records] == [c.name for c in G.PLAN]
    for check, record in zip(G.PLAN, records):
        if check.dry_skip:
            assert record["status"] == G.SKIPPED
        elif check.depends_on:  # its first leg never ran
            assert record["status"] == G.NOT_RUN and check.depends_on in record["reason"], record
        else:
            assert record["status"] == G.NOT_RUN and record["reason"].startswith("budget"), record
            assert "rc" not in record
    assert not (out / "runs").exists()
    assert time.monotonic() - started < 60


SLEEPER = ("import subprocess, sys, time\n"
           "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)'])\n"
           "print(child.pid, flush=True)\n"
           "time.sleep(120)\n")


def test_sigterm_of_the_script_ends_the_running_check_and_its_children(tmp_path):
    # the device tool ends a command's session when it returns: nothing of the pass may outlive it.
    # A driver runs one command through run_command with the script's own SIGTERM handler.
    driver = (f"import signal, sys, time\nsys.argv = ['gpu_check']\n"
              f"from importlib.machinery import SourceFileLoader\nimport importlib.util\n"
              f"loader = SourceFileLoader('gpu_check', {str(SCRIPT)!r})\n"
              f"spec = importlib.util.spec_from_loader('gpu_check', loader)\n"
              f"G = importlib.util.module_from_spec(spec); sys.modules['gpu_check'] = G; loader.exec_module(G)\n"
              f"signal.signal(signal.SIGTERM, G._exit_on_sigterm)\n"
              f"from pathlib import Path\n"
              f"G.run_command([sys.executable, '-c', {SLEEPER!r}], 300, Path({str(tmp_path / 'out')!r}), "
              f"Path({str(tmp_path / 'err')!r}))\n")
    proc = subprocess.Popen([sys.executable, "-c", driver], cwd=ROOT)
    started, deadline = tmp_path / "out", time.monotonic() + 60
    while not (started.exists() and started.read_text().strip()):  # the command printed its child's pid
        assert proc.poll() is None and time.monotonic() < deadline, "the command did not start"
        time.sleep(0.05)
    command = psutil.Process(proc.pid).children()[0]
    grandchild = psutil.Process(int((tmp_path / "out").read_text().split()[0]))
    proc.terminate()
    assert proc.wait(timeout=60) == 143
    _, alive = psutil.wait_procs([command, grandchild], timeout=20)  # they would sleep 120 s
    assert not alive, alive


def _command_check(tmp_path, code: str, timeout_s: int, judge=G.judge_run_all) -> dict:
    """One CommandCheck through the runner of the plan (GPU mode, so its own timeout holds)."""
    check = G.CommandCheck("probe", "a command of the test", timeout_s=timeout_s,
                           argv=lambda ctx: [sys.executable, "-c", code], judge=judge)
    ctx = G.Context(dry=False, device="cpu", out=tmp_path)
    (tmp_path / "logs").mkdir(exist_ok=True)
    return G.run_check(check, ctx, {}, time.perf_counter(), budget_s=600)


def test_a_failing_command_is_recorded_with_its_stderr_tail(tmp_path):
    code = "import sys\nfor i in range(30): print(f'line {i}', file=sys.stderr)\nsys.exit(3)"
    record = _command_check(tmp_path, code, timeout_s=60)
    assert record["status"] == G.FAILED and record["rc"] == 3, record
    assert record["reason"].startswith("exit 3: line 29"), record
    assert record["stderr_tail"] == [f"line {i}" for i in range(10, 30)]  # the last 20 lines


def test_a_hung_command_is_ended_with_its_children_at_its_timeout(tmp_path):
    started = time.monotonic()
    record = _command_check(tmp_path, SLEEPER, timeout_s=3)
    assert record["status"] == G.FAILED and record["rc"] is None, record
    assert record["reason"] == "timed out after 3 s"
    assert time.monotonic() - started < 30
    grandchild = int((tmp_path / "logs" / "probe.stdout").read_text().split()[0])
    deadline = time.monotonic() + 10
    while psutil.pid_exists(grandchild) and time.monotonic() < deadline:
        try:
            if psutil.Process(grandchild).status() == psutil.STATUS_ZOMBIE:
                break
        except psutil.NoSuchProcess:
            break
        time.sleep(0.1)
    alive = psutil.pid_exists(grandchild) and psutil.Process(grandchild).status() != psutil.STATUS_ZOMBIE
    assert not alive, "the timeout left the command's own child running"


def test_a_gpu_command_whose_config_does_not_resolve_fails_the_dry_run(tmp_path):
    renamed = G.RunCheck("renamed", "a preset that is gone", timeout_s=60, experiment="sha256",
                         preset="no-such-preset", steps=10, dry_skip="not run here")
    assert "unknown preset 'no-such-preset'" in G.gpu_config_problem(renamed)
    bad_key = G.RunCheck("bad-key", "a key that is gone", timeout_s=60, experiment="modadd", preset="grok",
                         steps=10, sets=("train.no_such_key=1",))
    assert "train.no_such_key" in G.gpu_config_problem(bad_key)
    ctx = G.Context(dry=True, device="cpu", out=tmp_path)
    record = G.run_check(renamed, ctx, {}, time.perf_counter(), budget_s=600)
    assert record["status"] == G.FAILED and "does not resolve" in record["reason"], record  # not skipped
    for check in G.PLAN:  # and the plan as it stands resolves
        assert G.gpu_config_problem(check) == "", check.name


def test_run_figures_leave_out_start_up_and_evaluation_intervals():
    rows = [{"step": 10, "attempt": 1, "elapsed_s": 30.0, "loss": 2.0, "samples_per_s": 1.0, "val_loss": None},
            {"step": 20, "attempt": 1, "elapsed_s": 31.0, "loss": 1.5, "samples_per_s": 100.0, "val_loss": None},
            {"step": 30, "attempt": 1, "elapsed_s": 32.0, "loss": 1.2, "samples_per_s": 100.0, "val_loss": None},
            {"step": 40, "attempt": 1, "elapsed_s": 42.0, "loss": 1.0, "samples_per_s": 10.0, "val_loss": 1.1}]
    figures = G.run_figures(rows, attempt=1)
    assert figures["steps_per_s"] == 10.0  # not 40 / 42 (start-up), not pulled down by the evaluation
    assert figures["samples_per_s"] == 100.0
    assert figures["final_loss"] == 1.0 and figures["val_loss"] == 1.1 and figures["first_row_s"] == 30.0
    assert figures["rate_intervals"] == "2 training-only"
    only = G.run_figures(rows[:1], attempt=1)  # one row: the whole attempt
    assert only["steps_per_s"] == 10 / 30.0 and only["rate_intervals"] == "the whole attempt"
    resumed = rows[:2] + [{**rows[2], "attempt": 2}, {**rows[3], "attempt": 2, "val_loss": None}]
    assert G.run_figures(resumed, attempt=2)["steps_per_s"] == 1.0  # within the latest attempt only
