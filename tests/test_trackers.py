"""The experiment trackers (log.mlflow, log.wandb), read back with each tool's own reader:
MLflow's client on the run's store, and W&B's offline transaction logs (run-<id>.wandb) through
W&B's own reader, `wandb-core leet inspect --json` (what `wandb leet inspect` runs).

Kill and resume, three attempts of one run: a crash while step 6 is computed (every tracker
closes its run holding steps 1-5; the resume from the checkpoint of step 4 computes step 5 again),
a SIGKILL while step 10 is computed (nothing closes; W&B, told to flush only when its buffer
fills, loses the attempt's rows; the resume from step 8 computes step 9 again), and a resume that
finishes.  Each tracker must end with steps 1-12 once each, every value equal to metrics.csv's
(the last row per step).  Refusals: an mlflow that does not import ends `trainlab
run` with one line, exit 2, before the run directory exists; check_trackers(), which refuses it,
is also asked directly about a missing package, an unwritable store and a WANDB_MODE W&B refuses.

A CLI process with both trackers costs ~10 s of CPU (torch, mlflow and wandb imports); the runs
are started together, two at a time, when the first test asks.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Callable

import pytest

from conftest import VOLATILE, job_result, jobs_fixture, trainlab
from trainlab.config import resolve
from trainlab.engine.logs import EventLog, read_events, read_metrics
from trainlab.errors import UsageError
from trainlab.experiment import get_experiment

# the test extra installs both trackers: a missing one is a failure here, never a silent skip
import mlflow  # noqa: E402,F401
import wandb  # noqa: E402,F401

FAULT_DIR = Path(__file__).parent / "fault_injection"
# 12 steps, a row each, a checkpoint every 4: a fault at step 10 leaves checkpoints 4 and 8
RUN = ("run", "modadd", "--preset", "smoke", "--steps", "12", "--set", "log.every=1", "--set", "ckpt.every=4",
       "--set", "log.progress=off", "--run-dir", "r")
TRACKED = ("--set", "log.mlflow=true", "--set", "log.wandb=true")
STEPS = list(range(1, 13))
# A SIGKILL while step N is computed: nothing of the process's own cleanup runs
KILL_SHIM = '''
import os, signal
_at = int(os.environ.get("TRACKERS_TEST_SIGKILL_AT", "0"))
if _at:
    from trainlab.experiments.modadd import ModAdd
    _loss = ModAdd.loss
    def _loss_then_kill(self, model, batch, ctx):
        if ctx.step + 1 == _at:
            os.kill(os.getpid(), signal.SIGKILL)
        return _loss(self, model, batch, ctx)
    ModAdd.loss = _loss_then_kill
'''


def clean_env() -> dict:
    """No tracker settings of the machine running the tests: the defaults are under test."""
    return {k: "" for k in ("MLFLOW_TRACKING_URI", "WANDB_MODE", "MLFLOW_ALLOW_FILE_STORE")}


def with_path(folder: Path) -> str:
    return os.pathsep.join([str(folder)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))


# ------------------------------------------------------------------------------ the runs, started together

def crash_kill_resume_job(cwd: Path) -> dict:
    """Three attempts of one run: a crash while step 6 is computed (both trackers close their runs
    holding steps 1-5; the checkpoint is step 4), a SIGKILL while step 10 is computed (nothing closes;
    the checkpoint is step 8), and a resume that finishes."""
    shim = cwd / "kill_shim"
    shim.mkdir()
    (shim / "sitecustomize.py").write_text(KILL_SHIM, encoding="utf-8")
    crash = {"TRAINLAB_TEST_FAULT": "raise@6", "PYTHONPATH": with_path(FAULT_DIR)}
    # 0: W&B writes its transaction log only when a buffer fills or the run finishes, so the kill
    # loses all the rows of the second attempt: the third must send 6-8 from metrics.csv
    kill = {"TRACKERS_TEST_SIGKILL_AT": "10", "PYTHONPATH": with_path(shim),
            "WANDB__TRANSACTION_LOG_FLUSH_INTERVAL": "0"}
    return {"attempts": [trainlab(*RUN, *TRACKED, cwd=cwd, env={**clean_env(), **env}) for env in (crash, kill, {})]}


def broken_mlflow_job(cwd: Path) -> dict:
    shim = cwd / "shim"
    (shim / "mlflow").mkdir(parents=True)
    (shim / "mlflow" / "__init__.py").write_text('raise ImportError("a broken install")\n', encoding="utf-8")
    env = {**clean_env(), "PYTHONPATH": with_path(shim)}
    return {"out": trainlab(*RUN, "--set", "log.mlflow=true", cwd=cwd, env=env)}


JOBS: dict[str, Callable[[Path], dict]] = {  # the longest first
    "test_after_a_crash_a_sigkill_and_a_resume_each_tracker_holds_every_step_once": crash_kill_resume_job,
    "test_the_resumes_continue_the_same_tracker_runs_and_close_them": crash_kill_resume_job,
    "test_an_mlflow_that_does_not_import_is_refused_before_the_run_starts": broken_mlflow_job,
}


jobs = jobs_fixture(JOBS)


def result(jobs, job) -> tuple[Path, dict]:
    cwd, out = job_result(jobs, job)
    return cwd / "r", out


# ------------------------------------------------------------------------------ reading back

def mlflow_client(run_dir: Path, monkeypatch):
    from mlflow import MlflowClient

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # MLflow 3 keeps its file store behind this
    return MlflowClient(tracking_uri=f"file:{run_dir / 'mlruns'}")


def kept(run_dir: Path) -> dict:
    return json.loads((run_dir / "trackers.json").read_text(encoding="utf-8"))


def wandb_records(path: Path) -> list[dict]:
    from wandb.util import get_core_path

    out = subprocess.run([get_core_path(), "leet", "inspect", "--no-observability", "--json", "--run-file", str(path),
                          str(path.parent.parent)], capture_output=True, text=True, timeout=60, check=True)
    return [json.loads(line) for line in out.stdout.splitlines() if line.strip()]


def wandb_attempts(run_dir: Path) -> list[Path]:
    run_id = kept(run_dir)["wandb"]["id"]
    return sorted((run_dir / "wandb").glob(f"offline-run-*-{run_id}/run-{run_id}.wandb"))


def wandb_history(run_dir: Path) -> list[dict]:
    """The history rows of every offline attempt of the run, in the order W&B wrote them."""
    return [r["history"]["item"] for path in wandb_attempts(run_dir) for r in wandb_records(path)
            if r.get("type") == "history"]


def expected_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """metrics.csv's true history (last row per step), per metric: the finite numbers of the
    columns that do not measure the machine (those differ between an attempt and its replay)."""
    series: dict[str, list] = {}
    for row in read_metrics(run_dir / "metrics.csv"):
        for key, value in row.items():
            if key not in VOLATILE | {"step"} and isinstance(value, (int, float)) and math.isfinite(value):
                series.setdefault(key, []).append((row["step"], float(value)))
    return series


def assert_holds_every_step_once(got: dict[str, list[tuple[int, float]]], run_dir: Path, tracker: str) -> None:
    expected = expected_series(run_dir)
    assert [s for s, _ in expected["loss"]] == STEPS, "metrics.csv itself lacks steps"
    for key, pairs in expected.items():
        steps = [s for s, _ in got.get(key, [])]
        assert steps == [s for s, _ in pairs], f"{tracker} {key}: steps {steps}, metrics.csv {[s for s, _ in pairs]}"
        assert [v for _, v in got[key]] == pytest.approx([v for _, v in pairs], rel=1e-6), f"{tracker} {key}"


def mlflow_series(client, run_id: str, keys) -> dict[str, list[tuple[int, float]]]:
    return {key: sorted(((m.step, m.value) for m in client.get_metric_history(run_id, key)), key=lambda p: p[0])
            for key in keys}


def wandb_series(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    series: dict[str, list] = {}
    for item in wandb_history(run_dir):
        for key, value in item.items():
            if not key.startswith("_"):
                series.setdefault(key, []).append((item["_step"], value))
    return series


# ------------------------------------------------------------------------------ kill and resume

def test_after_a_crash_a_sigkill_and_a_resume_each_tracker_holds_every_step_once(jobs, monkeypatch):
    run_dir, got = result(jobs, crash_kill_resume_job)
    crashed, killed, finished = got["attempts"]
    assert (crashed.returncode, killed.returncode, finished.returncode) == (1, -9, 0), finished.stderr
    assert "tracker failed" not in crashed.stderr + finished.stderr
    assert [r["step"] for r in read_metrics(run_dir / "metrics.csv")] == STEPS
    # W&B, attempt by attempt: 1-5 (step 5, computed again after the crash, is not sent twice);
    # nothing (lost by the kill); 6-8 from metrics.csv, then 9-12 as they come
    per_attempt = [[r["history"]["item"]["_step"] for r in wandb_records(path) if r.get("type") == "history"]
                   for path in wandb_attempts(run_dir)]
    assert per_attempt == [list(range(1, 6)), [], list(range(6, 13))]
    assert_holds_every_step_once(wandb_series(run_dir), run_dir, "W&B")
    # MLflow wrote every row as it came: the kill lost nothing, step 9 came again and is not sent twice
    client = mlflow_client(run_dir, monkeypatch)
    run_id = kept(run_dir)["mlflow"]["run_id"]
    assert_holds_every_step_once(mlflow_series(client, run_id, expected_series(run_dir)), run_dir, "MLflow")


def test_the_resumes_continue_the_same_tracker_runs_and_close_them(jobs, monkeypatch):
    run_dir, got = result(jobs, crash_kill_resume_job)
    assert got["attempts"][-1].returncode == 0, got["attempts"][-1].stderr
    client = mlflow_client(run_dir, monkeypatch)
    experiment = client.get_experiment_by_name("trainlab")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [kept(run_dir)["mlflow"]["run_id"]], "a resume started a second run"
    run = runs[0]
    assert run.info.status == "FINISHED"
    assert run.data.params["train.steps"] == "12" and run.data.params["optim.name"] == "adamw"
    assert run.data.params["log.every"] == "1" and len(run.data.params) > 50  # the whole resolved config
    tags = run.data.tags
    assert (tags["trainlab.experiment"], tags["trainlab.preset"], tags["trainlab.attempt"]) == ("modadd", "smoke", "3")
    assert sorted(a.path for a in client.list_artifacts(run.info.run_id)) == ["config.yaml", "report.html"]
    # W&B: one offline directory per attempt, all under the kept id
    records = [wandb_records(p) for p in wandb_attempts(run_dir)]
    exits = [[r["exit"].get("exit_code", 0) for r in rs if r.get("type") == "exit"] for rs in records]
    assert exits == [[1], [], [0]]  # the crash, the kill (no exit record), the finished resume
    run_records = [r["run"] for rs in records for r in rs if r.get("type") == "run"]
    assert [r["run_id"] for r in run_records] == [kept(run_dir)["wandb"]["id"]] * 2  # the killed one flushed none
    assert all(r["project"] == "trainlab" for r in run_records)
    config = run_records[-1]["config"]["update"]
    assert config["train.steps"] == 12 and config["experiment"] == "modadd"


# ------------------------------------------------------------------------------ refusals

def one_line(text: str) -> str:
    lines = text.strip().splitlines()
    assert len(lines) == 1, f"expected exactly one line, got:\n{text}"
    return lines[0]


def test_an_mlflow_that_does_not_import_is_refused_before_the_run_starts(jobs):
    run_dir, got = result(jobs, broken_mlflow_job)
    out = got["out"]
    assert out.returncode == 2, out.stderr
    assert one_line(out.stderr) == ("trainlab: error: config log.mlflow: true, but mlflow does not import "
                                    "(ImportError: a broken install); reinstall with pip install "
                                    "'trainlab[mlflow]', or leave log.mlflow false")
    assert not run_dir.exists()


def smoke_config(*sets: tuple[str, str]):
    return resolve(get_experiment("modadd"), "smoke", None, list(sets), None)


@pytest.mark.parametrize("key, module, package", [("log.tensorboard", "tensorboard", "the tensorboard package"),
                                                  ("log.mlflow", "mlflow", "mlflow-skinny"),
                                                  ("log.wandb", "wandb", "wandb")])
def test_a_tracker_whose_package_is_missing_is_refused_in_one_line(key, module, package, monkeypatch, tmp_path):
    import importlib.util

    from trainlab.trackers import check_trackers

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == module else real(name, *a))
    extra = key.split(".")[1]
    with pytest.raises(UsageError) as refused:
        check_trackers(smoke_config((key, "true")), tmp_path / "r")
    assert str(refused.value) == (f"config {key}: true needs {package}; pip install 'trainlab[{extra}]', "
                                  f"or leave {key} false")
    assert not (tmp_path / "r").exists()


def test_an_unwritable_mlflow_store_is_refused_before_the_run_starts(monkeypatch, tmp_path):
    """check_trackers() is what `trainlab run` calls first (the CLI's exit 2 and its one line:
    test_an_mlflow_that_does_not_import_is_refused_before_the_run_starts)."""
    from trainlab.trackers import check_trackers

    monkeypatch.setenv("MLFLOW_ALLOW_FILE_STORE", "true")  # set by the check; undone after the test
    (tmp_path / "a_file").write_text("not a directory\n", encoding="utf-8")
    uri = f"file:{tmp_path / 'a_file' / 'mlruns'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    with pytest.raises(UsageError) as refused:
        check_trackers(smoke_config(("log.mlflow", "true")), tmp_path / "r")
    message = str(refused.value)
    assert message.startswith(f"MLFLOW_TRACKING_URI={uri}: cannot write the MLflow store there (")
    assert "\n" not in message
    assert not (tmp_path / "r").exists()
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"file:{tmp_path / 'store'}")  # a writable one passes
    check_trackers(smoke_config(("log.mlflow", "true")), tmp_path / "r")
    assert not (tmp_path / "r").exists()


def test_a_wandb_mode_wandb_refuses_is_refused_in_one_line(monkeypatch, tmp_path):
    from trainlab.trackers import check_trackers

    monkeypatch.setenv("WANDB_MODE", "sometimes")
    with pytest.raises(UsageError) as refused:
        check_trackers(smoke_config(("log.wandb", "true")), tmp_path / "r")
    message = str(refused.value)
    assert message.startswith("WANDB_MODE=sometimes: W&B refuses it") and "\n" not in message
    check_trackers(smoke_config(("log.wandb", "false")), tmp_path / "r")  # off: the variable is not its business


def test_trackers_switched_off_import_neither_mlflow_nor_wandb():
    code = ("import sys; from trainlab.config import RunConfig; "
            "from trainlab.trackers import build_trackers, check_trackers; "
            "cfg = RunConfig(); check_trackers(cfg, 'r'); "
            "assert build_trackers(cfg, 'r') == []; "
            "print(sorted(m for m in ('mlflow', 'wandb', 'tensorboard') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


# ------------------------------------------------------------------------------ a failure mid-run

class _BrokenStore(Exception):
    pass


def test_a_tracker_that_fails_mid_run_says_so_once_and_the_run_goes_on(tmp_path, capsys):
    from trainlab.trackers import Tracker

    class FailsAtStepThree(Tracker):
        label = "test"

        def open(self, trainer):
            self.sent = []

        def send(self, step, values):
            if step == 3:
                raise _BrokenStore("the disk is full")
            self.sent.append(step)

        def close(self, result):
            raise AssertionError("a failed tracker is not closed as if it worked")

    class Trainer:  # the two attributes a tracker's failure report reads
        step = 0
        events = EventLog(tmp_path)

    trainer, tracker = Trainer(), FailsAtStepThree(tmp_path)
    tracker.on_fit_start(trainer)
    for step in range(1, 6):
        trainer.step = step
        tracker.on_log_row(trainer, {"step": step, "attempt": 1, "loss": 1.0 / step})  # must not raise
    tracker.on_fit_end(trainer, None)
    trainer.events.close()
    assert tracker.sent == [1, 2]
    line = one_line(capsys.readouterr().err)
    assert line == ("trainlab: the test tracker failed to log a row at step 3 (_BrokenStore: the disk is full); "
                    "training goes on without it (metrics.csv has every row)")
    failures = [e for e in read_events(tmp_path / "events.jsonl") if e["kind"] == "tracker_failed"]
    assert [(e["tracker"], e["step"]) for e in failures] == [("test", 3)]


def test_a_row_sends_only_finite_numbers_and_never_a_step_the_tracker_holds(tmp_path):
    from trainlab.trackers import Tracker

    class Recorder(Tracker):
        def open(self, trainer):
            self.sent = []
            self.held = {"loss": 2}  # as read back from the store

        def send(self, step, values):
            self.sent.append((step, values))

        def close(self, result):  # this test never ends a run
            pass

    tracker = Recorder(tmp_path)
    history = [{"step": s, "attempt": 1, "loss": 1.0 / s, "acc": 0.5} for s in (1, 2)]
    tracker.on_resume(None, history, "resume")
    tracker.on_fit_start(None)
    tracker.on_log_row(None, {"step": 3, "attempt": 2, "loss": float("nan"), "acc": None, "grad_norm": 1.5,
                              "flag": True})
    # the backfill sends acc for 1-2 (not held) but no loss (held to step 2); NaN, None, bools never
    assert tracker.sent == [(1, {"acc": 0.5}), (2, {"acc": 0.5}), (3, {"grad_norm": 1.5})]
