"""Shared helpers: run the real CLI (in this process or a subprocess), read run directories back."""

from __future__ import annotations

import contextlib
import io
import os
import subprocess
import sys
import threading
import traceback
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Iterator

import pytest
import torch
from safetensors.torch import load_file

from trainlab.engine.logs import read_metrics

# Columns that measure the machine, not the run: they differ between two identical runs.
VOLATILE = {"attempt", "elapsed_s", "samples_per_s", "tokens_per_s", "ram_gb", "peak_ram_gb", "dev_mem_gb", "peak_dev_mem_gb"}


def cli_env() -> dict:
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    env.pop("TRAINLAB_FAULTS", None)
    return env


# The CLI runs in the test's own process unless a test needs a process of its own (variables in
# `env`, such as an injected fault or PYTHONPATH; `own_process=True`).  A new Python process pays ~4 s
# importing torch, matplotlib and scipy before it does anything; with ~150 CLI calls that was most
# of the suite's time.  In-process runs use one torch thread, as the subprocesses do (OMP_NUM_THREADS=1
# in cli_env), so a run gives the same numbers either way.  Calls from other threads (the files that
# start several CLI runs at once) get subprocesses: the working directory and signal handlers belong
# to the whole process.  TRAINLAB_TEST_SUBPROCESS=1 sends every call to a subprocess (to check that
# nothing depends on the difference).
torch.set_num_threads(1)
ALWAYS_SUBPROCESS = os.environ.get("TRAINLAB_TEST_SUBPROCESS") == "1"


def _in_process(args: tuple[str, ...], cwd: Path) -> subprocess.CompletedProcess:
    """`python -m trainlab ARGS` as main(ARGS) here: same exit code and output; an exception that
    escapes main() is exit code 1 with its traceback on stderr, as Python would print it."""
    from trainlab.cli import main

    out, err = io.StringIO(), io.StringIO()
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse's --help / usage errors
                code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            except Exception:  # noqa: BLE001 -- what an uncaught exception does to a process
                traceback.print_exc(file=err)
                code = 1
    finally:
        os.chdir(before)
    return subprocess.CompletedProcess([sys.executable, "-m", "trainlab", *args], code, out.getvalue(), err.getvalue())


def trainlab(*args: str, cwd: Path, timeout: float = 120, check: bool = False,
             env: dict | None = None, own_process: bool = False) -> subprocess.CompletedProcess:
    """`env`: variables set on top of cli_env() for this one command (runs it in a subprocess)."""
    here = threading.current_thread() is threading.main_thread()
    if env is None and not own_process and not ALWAYS_SUBPROCESS and here:
        proc = _in_process(args, cwd)
    else:
        proc = subprocess.run([sys.executable, "-m", "trainlab", *args], cwd=cwd,
                              env={**cli_env(), **(env or {})}, capture_output=True, text=True, timeout=timeout)
    if check and proc.returncode != 0:
        raise AssertionError(f"trainlab {' '.join(args)} exited {proc.returncode}\n{proc.stderr}")
    return proc


def spawn(*args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "trainlab", *args], cwd=cwd, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def history(run_dir: Path) -> list[dict]:
    """The true metric history with the machine-dependent columns removed."""
    return [{k: v for k, v in row.items() if k not in VOLATILE} for row in read_metrics(run_dir / "metrics.csv")]


def final_weights(run_dir: Path) -> dict:
    steps = sorted((run_dir / "checkpoints").glob("step_*"))
    steps = [p for p in steps if p.name[5:].isdigit()]
    return load_file(str(steps[-1] / "model.safetensors"))


def assert_same_weights(expected: dict, actual: dict) -> None:
    """Two name -> tensor maps hold the same weights: the same non-empty set of names, and each
    tensor equal bit for bit in dtype, shape and value.  (zip() over two dicts' values would pass
    on an empty or a shorter side, and pairs tensors by position, not by name.)"""
    assert expected, "no weights to compare: the expected side is empty"
    missing, extra = sorted(expected.keys() - actual.keys()), sorted(actual.keys() - expected.keys())
    assert not missing and not extra, f"different tensor names: missing {missing[:4]}, unexpected {extra[:4]}"
    differ = [k for k in expected if expected[k].dtype != actual[k].dtype or not torch.equal(expected[k], actual[k])]
    assert not differ, f"{len(differ)} of {len(expected)} tensors differ, e.g. {differ[:4]}"


@pytest.fixture
def tmp_cwd(tmp_path: Path) -> Path:
    return tmp_path


@contextlib.contextmanager
def started_together(request, tmp_path_factory, jobs_by_test: dict) -> Iterator[dict]:
    """For a module whose tests each need a slow CLI run: the runs of the selected tests (by test
    name in `jobs_by_test`), started two at a time when the first test asks; job -> (its own empty
    directory, the Future of what it returns)."""
    selected = {item.originalname for item in request.session.items if item.module is request.module}
    needed = list(dict.fromkeys(job for name, job in jobs_by_test.items() if name in selected))
    with ThreadPoolExecutor(max_workers=2) as pool:
        started = {}
        for job in needed:
            cwd = tmp_path_factory.mktemp(job.__name__)
            started[job] = (cwd, pool.submit(job, cwd))
        yield started


def jobs_fixture(jobs_by_test: dict):
    """The module-scoped `jobs` fixture of a module built on started_together()."""
    @pytest.fixture(scope="module")
    def jobs(request, tmp_path_factory):
        """job -> (its directory, the Future of its result), for the jobs of the selected tests."""
        with started_together(request, tmp_path_factory, jobs_by_test) as started:
            yield started
    return jobs


def job_result(jobs: dict, job, timeout: float = 600) -> tuple[Path, Any]:
    """(the job's directory, what it returned), waiting for it."""
    cwd, future = jobs[job]
    return cwd, future.result(timeout=timeout)


def kill_then_resume(run_args: list[str], run_dir: Path, cwd: Path, kill_at: int, timeout: float = 120) -> None:
    """Start `trainlab *run_args --run-dir run_dir`, SIGKILL it once metrics.csv has a row at or past
    step `kill_at`, then rerun the same command to its end; asserts the kill landed and the rerun
    resumed.  The caller compares the history and weights with an uninterrupted run."""
    import signal
    import time

    from trainlab.engine.logs import read_events, read_rows

    proc = spawn(*run_args, "--run-dir", str(run_dir), cwd=cwd)
    metrics = run_dir / "metrics.csv"
    killed = False
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and proc.poll() is None:
        rows = read_rows(metrics) if metrics.exists() else []
        if rows and rows[-1]["step"] >= kill_at:
            proc.send_signal(signal.SIGKILL)
            killed = True
            break
        time.sleep(0.002)
    proc.communicate(timeout=60)
    assert killed, "the run finished before the kill landed"
    done = trainlab(*run_args, "--run-dir", str(run_dir), cwd=cwd)
    assert done.returncode == 0, done.stderr
    assert any(e["kind"] == "resume" for e in read_events(run_dir / "events.jsonl"))
