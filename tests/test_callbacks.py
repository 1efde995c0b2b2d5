"""The Callback contract: the engine knows only itself, events come in their documented order,
a callback's state rides in the checkpoint, a stop request reaches status.json and the exit
message, and a user's callback from config is refused with one line when it cannot be used."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import cli_env, trainlab
from trainlab import Callback
from trainlab.cli import main
from trainlab.config import resolve
from trainlab.engine.trainer import Trainer
from trainlab.experiments.modadd import ModAdd

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "adding-an-experiment.md"
FAULT_DIR = Path(__file__).parent / "fault_injection"


def test_the_engine_imports_no_health_report_sweep_or_trackers():
    """The arrows run one way: nothing under engine/ names the layers above it, and importing the
    trainer loads none of them."""
    pattern = re.compile(r"trainlab\.(health|report|sweep|trackers)")
    named = [f"{p.relative_to(ROOT)}:{i}" for p in sorted((ROOT / "src/trainlab/engine").rglob("*.py"))
             for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if pattern.search(line)]
    assert not named, named
    code = ("import sys, trainlab.engine.trainer; "
            "print([m for m in sys.modules if m.split('.')[:2] in "
            "(['trainlab', 'health'], ['trainlab', 'report'], ['trainlab', 'sweep'], ['trainlab', 'trackers'])])")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=cli_env(), check=True)
    assert out.stdout.strip() == "[]", out.stdout


class _Recorder(Callback):
    """Every event in order, with the step it came at; a count that rides in the checkpoint."""

    def __init__(self):
        self.seen: list[tuple[str, int]] = []
        self.rows = 0
        self.loaded: dict | None = None

    def on_resume(self, trainer, rows, kind):
        self.seen.append((f"resume:{kind}:{len(rows)}", trainer.step))

    def on_fit_start(self, trainer):
        self.seen.append(("fit_start", trainer.step))

    def on_before_update(self, trainer):
        self.seen.append(("before_update", trainer.step))

    def on_after_update(self, trainer):
        self.seen.append(("after_update", trainer.step))

    def on_log_row(self, trainer, row):
        self.rows += 1
        self.seen.append(("log_row", row["step"]))

    def on_evaluate(self, trainer, evaluation):
        assert evaluation.step == trainer.step and "val_acc" in evaluation.metrics
        self.seen.append((f"evaluate:{evaluation.kind}:{evaluation.tag}", trainer.step))

    def on_checkpoint(self, trainer, path, reason):
        assert Path(path).name == f"step_{trainer.step:08d}"
        self.seen.append((f"checkpoint:{reason}", trainer.step))

    def on_fit_end(self, trainer, result):
        self.seen.append((f"fit_end:{result.state}:{result.reason}", trainer.step))

    def state_dict(self):
        return {"rows": self.rows}

    def load_state_dict(self, state):
        self.loaded = dict(state)
        self.rows = state["rows"]


def test_events_come_in_order_and_the_state_rides_in_the_checkpoint(tmp_path: Path):
    cfg = resolve(ModAdd(), "smoke", None, [("train.steps", "12"), ("log.every", "5"), ("eval.every", "10"),
                                            ("ckpt.every", "10"), ("log.progress", "off")])
    first = _Recorder()
    result = Trainer(cfg, ModAdd(), tmp_path / "r", torch.device("cpu"), callbacks=[first], stop_at=10).fit()
    assert result.state == "finished" and result.reason == "stopped at step 10 as asked"
    seen = first.seen
    assert seen[0] == ("fit_start", 0)
    assert seen[1:5] == [("before_update", 0), ("after_update", 0), ("before_update", 1), ("after_update", 1)]
    # the log row of step 5 comes after its update, before step 6's
    i = seen.index(("log_row", 5))
    assert seen[i - 1] == ("after_update", 4) and seen[i + 1] == ("before_update", 5)
    # step 10: evaluation (the last step of this attempt: final), its row, the checkpoint, the end
    assert seen[-4:] == [("evaluate:final:final-step10", 10), ("log_row", 10), ("checkpoint:final", 10),
                         ("fit_end:finished:stopped at step 10 as asked", 10)]
    assert sum(1 for name, _ in seen if name == "before_update") == 10
    state = torch.load(tmp_path / "r" / "checkpoints" / "step_00000010" / "state.pt", weights_only=True)
    assert state["callbacks"] == {first.key: {"rows": 2}}

    again = _Recorder()
    Trainer(cfg, ModAdd(), tmp_path / "r", torch.device("cpu"), callbacks=[again]).fit()
    assert again.loaded == {"rows": 2}  # loaded before on_resume ...
    assert again.seen[:2] == [("resume:resume:2", 10), ("fit_start", 10)]  # ... which has the rows so far
    assert again.rows == 3 and again.seen[-1] == ("fit_end:finished:", 12)


def test_a_time_budget_says_why_the_run_ended(tmp_path: Path):
    cfg = resolve(ModAdd(), "smoke", None, [("log.progress", "off")])
    result = Trainer(cfg, ModAdd(), tmp_path / "r", torch.device("cpu"), max_seconds=0.0).fit()
    assert result.step == 1 and result.reason == "time budget of 0 s reached at step 1"
    status = json.loads((tmp_path / "r" / "status.json").read_text())
    assert status["state"] == "finished" and status["reason"] == result.reason


class _FailsAtEnd(Callback):
    def on_fit_end(self, trainer, result):
        raise RuntimeError("tracker store vanished")


class _SeesTheEnd(Callback):
    def __init__(self):
        self.result = None

    def on_fit_end(self, trainer, result):
        self.result = result


def test_a_failing_on_fit_end_neither_skips_the_others_nor_hides_the_runs_own_error(tmp_path: Path):
    cfg = resolve(ModAdd(), "smoke", None, [("train.steps", "5"), ("log.progress", "off")])
    later = _SeesTheEnd()
    with pytest.raises(RuntimeError, match="tracker store vanished"):  # the run succeeded: the failure is raised
        Trainer(cfg, ModAdd(), tmp_path / "ok", torch.device("cpu"), callbacks=[_FailsAtEnd(), later]).fit()
    assert later.result is not None and later.result.state == "finished"
    events = [json.loads(line) for line in (tmp_path / "ok" / "events.jsonl").read_text().splitlines()]
    assert [e["callback"] for e in events if e["kind"] == "callback_failed"] == ["_FailsAtEnd"]

    class Broken(ModAdd):
        def loss(self, model, batch, ctx):
            raise ValueError("the experiment's own bug")

    later = _SeesTheEnd()
    with pytest.raises(ValueError, match="the experiment's own bug"):
        Trainer(cfg, Broken(), tmp_path / "bad", torch.device("cpu"), callbacks=[_FailsAtEnd(), later]).fit()
    assert later.result.state == "crashed" and isinstance(later.result.error, ValueError)


def _doc_example(folder: Path) -> str:
    """The example module of docs/adding-an-experiment.md, written into `folder`; its module name."""
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- example: (\w+)\.py -->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/adding-an-experiment.md lost its callback example"
    (folder / f"{match[1]}.py").write_text(match[2], encoding="utf-8")
    return match[1]


def test_the_documented_callback_stops_the_run_and_its_state_survives_a_resume(tmp_path: Path, monkeypatch):
    module = _doc_example(tmp_path)
    spec = f'callbacks=[{{path: "{module}:StopAtAccuracy", kwargs: {{target: 0.0, patience: 3}}}}]'
    args = ("run", "modadd", "--preset", "smoke", "--steps", "80", "--set", "eval.every=10", "--set", spec)
    monkeypatch.syspath_prepend(str(tmp_path))  # the in-process runs import the module from there
    # target 0: every evaluation counts, so the third (step 30) stops the run
    straight = trainlab(*args, "--run-dir", "a", cwd=tmp_path)
    assert straight.returncode == 1, straight.stderr
    reason = "val_acc >= 0.0 at 3 evaluations in a row"
    assert reason in straight.stderr.strip().splitlines()[-1]
    status = json.loads((tmp_path / "a" / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 30 and reason in status["reason"]
    # interrupted at step 25 (two evaluations counted), resumed: the streak is restored from the
    # checkpoint, so the run stops at 30 again -- not at 50, as a callback that forgot would
    env_fault = {"PYTHONPATH": f"{FAULT_DIR}:{tmp_path}", "TRAINLAB_TEST_FAULT": "sigint@25"}
    cut = trainlab(*args, "--run-dir", "b", cwd=tmp_path, env=env_fault)
    assert cut.returncode == 130, cut.stderr
    resumed = trainlab(*args, "--run-dir", "b", cwd=tmp_path)
    assert resumed.returncode == 1, resumed.stderr
    status = json.loads((tmp_path / "b" / "status.json").read_text())
    assert status["state"] == "stopped" and status["step"] == 30 and reason in status["reason"]


class NotACallback:
    pass


class NeedsNothing(Callback):
    def __init__(self):
        pass


@pytest.mark.parametrize("spec, message", [
    ("no_such_module_xyz:Thing", "cannot import 'no_such_module_xyz'"),
    ("test_callbacks:Missing", "module 'test_callbacks' has no 'Missing'"),
    ("test_callbacks:NotACallback", "is not a trainlab Callback class"),
    ('{path: "test_callbacks:NeedsNothing", kwargs: {patience: 3}}', "refused its arguments ['patience']"),
    ("test_callbacks.NeedsNothing", "must look like 'package.module:ClassName'"),
])
def test_a_callback_that_cannot_be_used_is_refused_before_anything_is_written(
        spec: str, message: str, tmp_path: Path, capsys):
    run_dir = tmp_path / "r"
    code = main(["run", "modadd", "--preset", "smoke", "--run-dir", str(run_dir), "--set", f"callbacks=[{spec}]"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("trainlab: error: config callbacks[0]") and message in err, err
    assert not run_dir.exists()
