"""`trainlab check PATH` on logs trainlab did not write: CSV (appended across restarts), JSON Lines,
JSON (a list of rows, a dict of columns), a TensorBoard directory; torn lines, non-numeric cells,
the baseline flags, exit codes, and bad input refused in one line with nothing written.

Every log is generated here from a seeded generator: small synthetic series, no files in tests/data.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import pytest

from conftest import trainlab
from trainlab.errors import UsageError
from trainlab.health.check import check_log, default_out_dir, judge_log, read_log
from trainlab.health.foreign import open_log, parse_baseline

SHA_HEADER = "step,loss,accuracy,threshold,ram_gb,phase,rounds"


def stuck_losses(n: int, seed: int = 0) -> list[float]:
    """A loss sitting at ln 2, as a network that learned nothing of a binary target."""
    rng = random.Random(seed)
    return [math.log(2) + rng.gauss(0, 0.003) for _ in range(n)]


def falling_losses(n: int, seed: int = 1) -> list[float]:
    rng = random.Random(seed)
    return [0.7 * math.exp(-i / 25) + 0.02 + rng.gauss(0, 0.002) for i in range(n)]


def sha_curriculum_csv(path: Path, losses: list[float], restart_at: int | None = None, torn: str = "") -> None:
    """The SHA-256 curriculum loop's log: appended across restarts (the header written again and the
    steps since the last checkpoint logged a second time, with other values), maybe a torn last line."""
    lines = [SHA_HEADER]
    n = len(losses)
    first_end = n if restart_at is None else n - 10
    for i in range(first_end):
        lines.append(f"{i * 10},{losses[i]:.5f},0.5,0.9,1.2,warmup,8")
    if restart_at is not None:
        lines.append(SHA_HEADER)
        for i in range(restart_at, n):  # the rewritten steps: marked by accuracy 0.75
            lines.append(f"{i * 10},{losses[i]:.5f},0.75,0.9,1.3,main,8")
    path.write_text("\n".join(lines) + "\n" + torn, encoding="utf-8")


def test_csv_appended_across_restarts_keeps_the_last_row_per_step(tmp_path):
    # mutation tried: merge_steps keeping the first row per step (setdefault without update) -> fails
    log = tmp_path / "training.log"
    sha_curriculum_csv(log, stuck_losses(60), restart_at=40, torn="600,0.69")
    reader, roles, rows, raw = read_log(log)
    assert reader.fmt == "csv" and roles["acc"] == "accuracy" and roles["step"] == "step"
    assert raw == 70 and len(rows) == 60 and [r["step"] for r in rows] == [10 * i for i in range(60)]
    assert rows[45]["acc"] == 0.75 and rows[45]["phase"] == "main"  # the row written after the restart
    assert rows[10]["acc"] == 0.5 and "accuracy" not in rows[10]
    notes = reader.notes.lines()
    assert any(n.startswith("last line torn, ignored: '600,0.69'") for n in notes), notes
    assert any("header written again 1 time" in n for n in notes), notes
    assert not any("phase" in n for n in notes), notes  # a column of text is data, not skipped cells


def test_stuck_log_with_bce_exits_1_and_writes_beside_the_log(tmp_path):
    # mutation tried: cmd_check returning 0 for critical alerts -> fails
    sha_curriculum_csv(tmp_path / "training.log", stuck_losses(80))
    proc = trainlab("check", "training.log", "--baseline", "bce", cwd=tmp_path)
    assert proc.returncode == 1, proc.stderr
    stuck = next(ln for ln in proc.stdout.splitlines() if ln.strip().startswith("stuck"))
    assert "FAIL" in stuck and "0.6931" in stuck
    out = tmp_path / "training.log.trainlab"
    saved = json.loads((out / "check.json").read_text())
    claim = next(c for c in saved["claims"] if c["name"] == "stuck")
    assert claim["verdict"] == "fail" and "ln 2 = 0.6931 (--baseline bce)" in claim["evidence"]
    assert (out / "report.html").is_file() and (out / "report.md").is_file()
    assert "no better than the random guess" in (out / "report.md").read_text()


def test_without_a_baseline_stuck_is_not_measured(tmp_path):
    # mutation tried: StuckAtBaseline without its `baseline is None` guard -> TypeError, fails
    log = tmp_path / "training.log"
    sha_curriculum_csv(log, stuck_losses(80))
    result = judge_log(log)
    claims = {c.name: c for c in result.claims}
    assert claims["stuck"].verdict == "not measured"
    assert claims["stuck"].value == "no baseline (--baseline)"
    assert "'back above the baseline' not measured: no baseline" in claims["divergence"].evidence
    # a column the log lacks is named as the reason, not "too few rows" (mutation: the grad_norm case
    # of check._needs removed -> "never judged: 80 rows are too few ...")
    assert (claims["grad_regime"].verdict, claims["grad_regime"].value) == ("not measured", "no grad_norm logged")
    assert not result.critical
    with_bce = judge_log(log, baseline="bce")
    assert [a["detector"] for a in with_bce.critical] == ["stuck"]


def test_healthy_falling_jsonl_exits_0(tmp_path):
    # mutation tried: the JSONL reader dropping the last line without its newline as torn even when
    # it is a whole object -> the steps count fails
    losses = falling_losses(80)
    lines = [json.dumps({"global_step": 5 * i, "train": {"loss": v}, "lr": 1e-3}) for i, v in enumerate(losses)]
    (tmp_path / "m.jsonl").write_text("\n".join(lines), encoding="utf-8")  # no final newline: a whole object
    proc = trainlab("check", "m.jsonl", "--baseline", "ce:10", "--out", "verdicts", cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    saved = json.loads((tmp_path / "verdicts" / "check.json").read_text())
    assert saved["roles"]["loss"] == "train/loss" and saved["roles"]["step"] == "global_step"
    log_claim = next(c for c in saved["claims"] if c["name"] == "log")
    assert "80 steps 0-395" in log_claim["value"]
    assert {c["name"]: c["verdict"] for c in saved["claims"]}["stuck"] == "pass"
    assert not (tmp_path / "m.jsonl.trainlab").exists()


@pytest.mark.parametrize("shape", ["list", "columns", "log_history"])
def test_json_list_dict_of_columns_and_log_history(tmp_path, shape):
    # mutation tried: json_rows reading a dict of columns by key instead of by index -> fails
    losses = falling_losses(30)
    steps = [10 * i for i in range(30)]
    rows = [{"iteration": s, "train_loss": v, "val_acc": 0.5} for s, v in zip(steps, losses)]
    doc = {"list": rows,
           "columns": {"iteration": steps, "train_loss": losses, "val_acc": [0.5] * 30, "name": "run-7"},
           "log_history": {"best": None, "log_history": rows}}[shape]
    (tmp_path / "metrics.json").write_text(json.dumps(doc), encoding="utf-8")
    reader, roles, got, _ = read_log(tmp_path / "metrics.json")
    assert reader.fmt == "json" and roles["loss"] == "train_loss" and roles["val_acc"] == "val_acc"
    assert [r["step"] for r in got] == steps and [r["loss"] for r in got] == losses


def test_tensorboard_directory_read_with_its_own_reader(tmp_path):
    # mutation tried: TensorBoardReader taking the step from the event's position instead of
    # event.step -> the step list fails; default_out_dir inside the TensorBoard directory -> fails
    from torch.utils.tensorboard import SummaryWriter

    tb = tmp_path / "tb"
    writer = SummaryWriter(log_dir=str(tb))
    for i, v in enumerate(falling_losses(40)):
        writer.add_scalar("train/loss", v, global_step=3 * i)
        if i % 5 == 0:
            writer.add_scalar("val/loss", v + 0.05, global_step=3 * i)
    writer.close()
    before = sorted(p.name for p in tb.iterdir())
    result = check_log(tb, baseline="0.7")
    assert result.fmt == "tensorboard" and result.roles["loss"] == "train/loss" and result.roles["val_loss"] == "val/loss"
    assert [r["step"] for r in result.rows] == [3 * i for i in range(40)]
    assert result.rows[5]["val_loss"] == pytest.approx(result.rows[5]["loss"] + 0.05, abs=1e-6)
    assert result.out_dir == tmp_path / "tb.trainlab" == default_out_dir(tb)
    assert sorted(p.name for p in tb.iterdir()) == before  # nothing written inside someone else's directory
    assert (tmp_path / "tb.trainlab" / "check.json").is_file() and not result.critical


def test_non_numeric_cells_are_counted_and_nan_strings_are_non_finite(tmp_path):
    # mutation tried: cell() turning "nan" into text (skipped) -> the nonfinite alert is not raised
    losses = falling_losses(40)
    lines = ["epoch,loss,acc"]
    for i, v in enumerate(losses):
        loss = {7: "oops", 8: "n/a", 9: "-", 30: "nan"}.get(i, f"{v:.5f}")
        lines.append(f"{i},{loss},0.5")
    (tmp_path / "log.csv").write_text("\n".join(lines) + "\n", encoding="utf-8")
    result = judge_log(tmp_path / "log.csv")
    assert "loss: 3 non-numeric cells skipped" in result.notes
    assert [a["detector"] for a in result.critical] == ["nonfinite"] and result.critical[0]["step"] == 30


def test_incremental_reader_keeps_a_partial_line_for_the_next_call(tmp_path):
    # mutation tried: _LineReader dropping self.pending (data.split without keeping the tail) -> fails
    log = tmp_path / "live.csv"
    log.write_text("step,loss\n0,0.7\n1,0.6", encoding="utf-8")
    reader = open_log(log)
    assert reader.read_new() == [{"step": 0, "loss": 0.7}]
    with open(log, "a", encoding="utf-8") as fh:
        fh.write("5\n2,0.5\n")
    assert reader.read_new() == [{"step": 1, "loss": 0.65}, {"step": 2, "loss": 0.5}]
    assert reader.read_new(final=True) == [] and not reader.notes.torn


def test_baseline_forms():
    # mutation tried: bce as ln 2 written 0.693 -> fails
    assert parse_baseline("bce").value == math.log(2)
    assert parse_baseline("ce:50257").value == math.log(50257)
    assert parse_baseline("0.6931").value == 0.6931 and parse_baseline(None) is None
    for bad in ("ce:1", "ce:x", "-1", "nan", "chance"):
        with pytest.raises(UsageError, match=r"--baseline"):
            parse_baseline(bad)


def _stuck_csv(cwd: Path) -> None:
    sha_curriculum_csv(cwd / "training.log", stuck_losses(30))


BAD = [  # (id, files, args, what the one line says)
    ("missing-file", {}, ("check", "nowhere.csv"), "log nowhere.csv: not found"),
    ("no-step-column", {"a.csv": "when,loss\n1,0.5\n"}, ("check", "a.csv"),
     "no step column (looked for step, global_step, iteration, iter, epoch): name it with --step-col; "
     "the log's columns: when, loss"),
    ("unknown-column", None, ("check", "training.log", "--loss-col", "bce_loss"),
     "--loss-col bce_loss: no such column in the log; its columns: step, loss, accuracy, threshold, ram_gb, "
     "phase, rounds"),
    ("unreadable-json", {"m.json": '{"step": [1, 2], "loss": [0.5,'}, ("check", "m.json"), "unreadable JSON"),
    ("empty-log", {"e.csv": SHA_HEADER + "\n"}, ("check", "e.csv"), "log e.csv: no rows"),
    ("empty-tb-dir", {"tb/readme.txt": "x"}, ("check", "tb"), "needs config.yaml and metrics.csv"),
    ("bad-baseline", None, ("check", "training.log", "--baseline", "coin"), "--baseline coin: allowed"),
    ("flags-on-a-run-dir", {"r/config.yaml": "experiment: modadd\n", "r/metrics.csv": "step,loss\n1,3\n"},
     ("check", "r", "--baseline", "bce"), "--baseline: only for a log trainlab did not write"),
]


@pytest.mark.parametrize("case", BAD, ids=[c[0] for c in BAD])
def test_bad_input_exits_2_one_line_nothing_written(tmp_path, case):
    # mutation tried: resolve_roles ignoring an explicit column that does not exist -> unknown-column fails
    _, files, args, said = case
    if files is None:
        _stuck_csv(tmp_path)
    for name, text in (files or {}).items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    before = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*"))
    proc = trainlab(*args, cwd=tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1 and said in proc.stderr, proc.stderr
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == before
