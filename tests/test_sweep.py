"""trainlab sweep: real two-point sweeps of tiny models through the CLI (their conclusion and figures
checked against the points' own metrics.csv), a sweep with a failing point, --report-only, a sweep
killed midway and rerun, refusals of bad input, the decision rules (and the points they leave out),
the GPU each point is given, and the power-law fit."""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import os
import re
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ET
from pathlib import Path

import numpy as np
import pytest

from conftest import cli_env, trainlab
from trainlab.cli import main as trainlab_main
from trainlab.engine.logs import read_events, read_rows
from trainlab.sweep import runner
from trainlab.sweep.powerlaw import fit_power_law
from trainlab.sweep.report import PointResult, conclude, fits
from trainlab.sweep.spec import SweepSpec

TINY = ["sweep", "bitnet_lm", "--preset", "smoke", "--grid", "model.hidden=16,32", "--set", "model.heads=1",
        "--set", "data.sample_tokens=4"]
SVG = "{http://www.w3.org/2000/svg}"


# ------------------------------------------------------------------ an independent reading of the points

def _csv_rows(run_dir: Path) -> list[dict]:
    """metrics.csv read with the csv module, not trainlab's reader: the oracle shares no code with the report."""
    with open(run_dir / "metrics.csv", newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _column(rows: list[dict], col: str) -> list[tuple[int, float]]:
    return [(int(r["step"]), float(r[col])) for r in rows if r.get(col) not in (None, "")]


def _size_study_rule(diverse_smallest_first: list[bool]) -> str:
    """The decision tree as docs/experiments/bitnet_lm.md states it, on the diverse flags of the sizes
    from the smallest: 2 is "not diverse, then diverse from some size on" (False < True, so the flags are
    sorted ascending), 4 is "diverse up to some size, then not" (sorted descending)."""
    flags = diverse_smallest_first
    if all(flags):
        return "1"
    if not any(flags):
        return "3"
    if flags == sorted(flags):
        return "2"
    if flags == sorted(flags, reverse=True):
        return "4"
    return "5"


def _vertices(path: ET.Element) -> list[tuple[float, float]]:
    """The (x, y) of each vertex of an SVG path as matplotlib writes it ("M x y L x y ...")."""
    numbers = [float(v) for v in re.findall(r"-?\d+(?:\.\d+)?", path.get("d"))]
    return list(zip(numbers[::2], numbers[1::2]))


def _series_polylines(svg_path: Path) -> tuple[ET.Element, dict[str, list[tuple[float, float]]]]:
    """The parsed SVG and, per series title, the pixel vertices of its drawn line (the groups
    series-K the figure code names, each with its series' name as <title>; markers excepted)."""
    root = ET.fromstring(svg_path.read_text(encoding="utf-8"))
    lines = {}
    for group in root.iter(f"{SVG}g"):
        if re.fullmatch(r"series-\d+", group.get("id") or ""):
            vertices = []
            for path in group.findall(f"{SVG}path"):
                vertices += _vertices(path)
            lines[group.find(f"{SVG}title").text] = vertices
    return root, lines


def _assert_drawn_from(data: dict[str, list[tuple[float, float]]], drawn: dict[str, list[tuple[float, float]]],
                       extra_y: dict[float, float] | None = None) -> None:
    """Each series is drawn with one vertex per data point, and every vertex sits where one affine map
    per axis (shared by all series, y pointing down) puts its data: the figure shows these numbers."""
    assert set(drawn) == set(data)
    xs, ys, px, py = [], [], [], []
    for name, points in data.items():
        assert len(drawn[name]) == len(points) >= 2, (name, drawn[name], points)
        xs += [x for x, _ in points]
        ys += [y for _, y in points]
        px += [p for p, _ in drawn[name]]
        py += [p for _, p in drawn[name]]
    for (value, pixel) in (extra_y or {}).items():  # reference lines share the y map of the data
        ys.append(value)
        py.append(pixel)
    for data_axis, pixels, sign in ((xs, px, 1), (ys, py, -1)):
        if len(set(data_axis)) < 2:
            assert len(set(pixels)) == 1
            continue
        slope, offset = np.polyfit(data_axis, pixels, 1)
        assert slope * sign > 0
        assert np.max(np.abs(np.polyval([slope, offset], data_axis) - np.array(pixels))) < 0.2  # 0.1 px rounding


def test_two_point_sweep_finishes_with_table_and_conclusion(tmp_path: Path):
    proc = trainlab(*TINY, "--parallel", "2", "--sweep-dir", "sw", cwd=tmp_path, timeout=300)
    assert proc.returncode == 0, proc.stderr
    sweep = tmp_path / "sw"
    for name in ("hidden-16", "hidden-32"):
        assert json.loads((sweep / name / "status.json").read_text())["state"] == "finished"
    # the table (the evaluated steps nearest 10 / 40 / 100 % of the run, as the BitNet size study's 1k / 4k / 10k of
    # 10k; the smoke preset evaluates every 10 steps) and a conclusion by a named rule
    assert "point | params (non-embedding) | state | step 10 | step 30" in proc.stdout
    assert "rule " in proc.stdout and "distinct_preds" in proc.stdout
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    assert summary["table_steps"] == [10, 30]
    assert [p["name"] for p in summary["points"]] == ["hidden-16", "hidden-32"]
    assert summary["points"][0]["params"] < summary["points"][1]["params"]
    for f in ("sweep_report.md", "sweep_report.html", "logs/hidden-16.log"):
        assert (sweep / f).is_file(), f

    # the conclusion recomputed from the points' own metrics.csv by the documented rules
    rows = {name: _csv_rows(sweep / name) for name in ("hidden-16", "hidden-32")}  # smallest first
    targets = {_column(r, "distinct_targets")[-1][1] for r in rows.values()}
    assert len(targets) == 1  # the same fixed validation batch for every point
    threshold = targets.pop() / 2  # "half the distinct true next tokens in the batch"
    finals = {name: _column(r, "distinct_preds")[-1] for name, r in rows.items()}  # the last evaluation
    (c,) = summary["conclusions"]
    assert c["diverse_threshold"] == threshold
    assert c["rule"] == _size_study_rule([v >= threshold for _, v in finals.values()])
    assert c["left_out"] == []
    for (name, (step, value)), line in zip(finals.items(), c["numbers"][1:3]):
        kind = "diverse" if value >= threshold else "collapsed" if value < 10 else "partial"
        assert line.startswith(f"hidden={name[7:]} (") and f"distinct_preds {value:g} at step {step}" in line
        assert line.endswith(f"-> {kind}"), line
    for point in summary["points"]:  # the table's cells are the logged values at those steps
        logged = dict(_column(rows[point["name"]], "distinct_preds"))
        assert point["metric_at"] == {str(s): logged[s] for s in summary["table_steps"]}

    # the figures draw these numbers: one vertex per logged value, on shared axes, with the thresholds
    _, loss_lines = _series_polylines(sweep / "plots" / "sweep-loss.svg")
    _assert_drawn_from({n: _column(r, "val_loss") for n, r in rows.items()}, loss_lines)
    root, collapse_lines = _series_polylines(sweep / "plots" / "sweep-collapse.svg")
    hlines = {g.find(f"{SVG}title").text: _vertices(g.find(f"{SVG}path"))[0][1]
              for g in root.iter(f"{SVG}g") if re.fullmatch(r"hline-\d+", g.get("id") or "")}
    assert set(hlines) == {"collapse below 10", f"diverse from {threshold:g}"}
    _assert_drawn_from({n: _column(r, "distinct_preds") for n, r in rows.items()}, collapse_lines,
                       {10.0: hlines["collapse below 10"], threshold: hlines[f"diverse from {threshold:g}"]})
    texts = [t.text for t in root.iter(f"{SVG}text")]
    assert "step" in texts and "distinct_preds" in texts  # the axes are labelled
    _, power_lines = _series_polylines(sweep / "plots" / "sweep-powerlaw.svg")
    final_loss = [(np.log10(p["params"]), _column(rows[p["name"]], "val_loss")[-1][1]) for p in summary["points"]]
    _assert_drawn_from({"measured [all points]": final_loss}, power_lines)  # size on a log axis
    for name in ("sweep-loss", "sweep-collapse", "sweep-powerlaw"):  # and a PNG of each, to paste elsewhere
        assert (sweep / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # a rerun finds everything finished and runs nothing
    again = trainlab(*TINY, "--sweep-dir", "sw", cwd=tmp_path, timeout=120)
    assert again.returncode == 0 and "(2 finished before, skipped)" in again.stdout
    assert sum(e["kind"] == "start" for e in read_events(sweep / "hidden-16" / "events.jsonl")) == 1
    # trainlab report on a sweep directory writes the sweep report
    rep = trainlab("report", "sw", cwd=tmp_path)
    assert rep.returncode == 0 and "sweep_report.md" in rep.stdout


def test_sweep_yaml_with_a_failing_point_reports_it_and_report_only_runs_nothing(tmp_path: Path, capsys,
                                                                               monkeypatch):
    # a sweep YAML (steps, set and parallel from the file); at LR 1e30 the first steps are non-finite:
    # that point stops (train.nonfinite=stop), the other finishes
    (tmp_path / "sweep.yaml").write_text(
        "target: bitnet_lm\npreset: smoke\nsteps: 12\nparallel: 2\n"
        "set: {model.hidden: 16, model.heads: 1, data.sample_tokens: 0, train.clip: 0}\n"
        "grid:\n  optim.lr: [0.003, 1e30]\n", encoding="utf-8")
    proc = trainlab("sweep", "sweep.yaml", "--sweep-dir", "sw", cwd=tmp_path, timeout=300)
    sweep = tmp_path / "sw"
    assert proc.returncode == 1, proc.stderr  # README: 1 = stopped by a policy or a training failure
    assert json.loads((sweep / "lr-0.003" / "status.json").read_text())["state"] == "finished"
    assert [r["step"] for r in read_rows(sweep / "lr-0.003" / "metrics.csv")][-1] == 12
    assert "model.hidden=16" in (sweep / "logs" / "lr-0.003.log").read_text()
    failed = json.loads((sweep / "lr-1e30" / "status.json").read_text())
    assert failed["state"] == "stopped" and failed["step"] < 12 and "non-finite" in failed["reason"]
    assert proc.stderr.strip().splitlines()[-1] == (
        f"trainlab: lr-1e30 stopped: {failed['reason']} (exit 1, log {sweep / 'logs' / 'lr-1e30.log'})")
    summary = json.loads((sweep / "sweep_summary.json").read_text())
    by_name = {p["name"]: p for p in summary["points"]}
    assert by_name["lr-1e30"]["state"] == "stopped" and not by_name["lr-1e30"]["judged"]
    assert by_name["lr-0.003"]["judged"]
    by_group = {c["group"]: c for c in summary["conclusions"]}
    expected = f"lr-1e30 stopped at step {failed['step']} of 12 ({failed['reason']})"
    assert by_group["optim.lr=1e30"]["left_out"] == [expected] and by_group["optim.lr=0.003"]["left_out"] == []
    assert f"left out, their last values are not final: {expected}" in proc.stdout

    # --report-only writes the report of the directory as it stands and resumes nothing (a rerun would)
    for f in ("sweep_report.md", "sweep_summary.json"):
        (sweep / f).unlink()
    before = {p: p.read_bytes() for p in sweep.rglob("*") if p.is_file() and p.parent not in (sweep, sweep / "plots")}
    monkeypatch.chdir(tmp_path)
    assert trainlab_main(["sweep", "--report-only", "--sweep-dir", "sw"]) == 0  # no target needed
    out = capsys.readouterr().out
    assert json.loads((sweep / "sweep_summary.json").read_text()) == summary
    assert f"left out, their last values are not final: {expected}" in out and "wrote" in out
    assert len(before) > 10 and {p: p.read_bytes() for p in before} == before  # no point's file or log touched
    for extra, needle in ((["--report-only"], "--report-only needs --sweep-dir"),
                          (["--report-only", "--sweep-dir", "sw/lr-0.003"], "no sweep.json")):
        assert trainlab_main(["sweep", "bitnet_lm", *extra]) == 2
        err = capsys.readouterr().err
        assert needle in err and len(err.strip().splitlines()) == 1, err
    assert trainlab_main(["sweep", "--grid", "optim.lr=1,2"]) == 2  # a sweep to run needs its target
    err = capsys.readouterr().err
    assert "needs a TARGET" in err and len(err.strip().splitlines()) == 1, err


def test_killed_sweep_reruns_without_redoing_finished_points(tmp_path: Path):
    args = [*TINY, "--steps", "400", "--set", "ckpt.every=20", "--set", "eval.every=100", "--parallel", "1",
            "--sweep-dir", "sw"]
    proc = subprocess.Popen([sys.executable, "-m", "trainlab", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    second = tmp_path / "sw" / "hidden-32"
    deadline = time.monotonic() + 240
    while time.monotonic() < deadline:  # wait until point 1 is done and point 2 has a checkpoint
        ckpts = list((second / "checkpoints").glob("step_*")) if (second / "checkpoints").exists() else []
        if ckpts:
            break
        assert proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    else:
        raise AssertionError("the second point never checkpointed")
    proc.send_signal(signal.SIGKILL)  # the sweep dies; its running point gets SIGTERM from the kernel
    proc.communicate(timeout=60)
    for _ in range(200):
        status = json.loads((second / "status.json").read_text())
        if status["state"] != "running":
            break
        time.sleep(0.1)
    assert status["state"] == "stopped" and status["step"] < 400, status
    first_rows = (tmp_path / "sw" / "hidden-16" / "metrics.csv").read_text()

    rerun = trainlab(*args, cwd=tmp_path, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    assert "(1 finished before, skipped)" in rerun.stdout
    assert (tmp_path / "sw" / "hidden-16" / "metrics.csv").read_text() == first_rows  # not redone
    events = read_events(second / "events.jsonl")
    assert [e["kind"] for e in events if e["kind"] in ("start", "resume")] == ["start", "resume"]
    assert json.loads((second / "status.json").read_text())["step"] == 400


def test_sigint_to_the_sweep_checkpoints_its_points_and_exits_130(tmp_path: Path):
    args = [*TINY, "--steps", "2000", "--set", "ckpt.every=20", "--set", "eval.every=1000", "--parallel", "2",
            "--sweep-dir", "sw"]
    proc = subprocess.Popen([sys.executable, "-m", "trainlab", *args], cwd=tmp_path, env=cli_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    points = [tmp_path / "sw" / n for n in ("hidden-16", "hidden-32")]
    deadline = time.monotonic() + 240
    while not all((p / "checkpoints").exists() and list((p / "checkpoints").glob("step_*")) for p in points):
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.05)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "rerun the same command to resume" in err
    for p in points:
        status = json.loads((p / "status.json").read_text())
        assert status["state"] == "stopped" and "SIGINT" in status["reason"], status


@pytest.mark.parametrize("extra,needle", [
    (["--grid", "model.hiden=16,32"], "did you mean 'hidden'"),
    (["--grid", "model.hidden"], "expected key=v1,v2"),
    (["--grid", "model.hidden=16,x"], "model.hidden"),
    (["--grid", "model.hidden=16", "--set", "model.hidden=8"], "both a grid key and a --set"),
    (["--grid", "model.hidden=16", "--parallel", "0"], "--parallel 0"),
    (["--grid", "model.hidden=16", "--at", "1k"], "--at"),
    (["--grid", "model.hidden=16", "--backend", "ray", "--gpus-per-point", "-1"], "--gpus-per-point -1"),
])
def test_bad_sweeps_exit_2_with_one_line_and_write_nothing(tmp_path: Path, extra, needle):
    proc = trainlab("sweep", "bitnet_lm", "--preset", "smoke", *extra, "--sweep-dir", "sw", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "sw").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="needs a machine without CUDA")
def test_sweep_on_cuda_without_cuda_is_refused(tmp_path: Path):
    proc = trainlab("sweep", "bitnet_lm", "--preset", "smoke", "--grid", "model.hidden=16", "--device", "cuda",
                    "--sweep-dir", "sw", cwd=tmp_path)
    assert proc.returncode == 2 and "CUDA is not available" in proc.stderr and not (tmp_path / "sw").exists()


@pytest.mark.parametrize("body,needle", [
    ("target: bitnet_lm\ngrid: {model.hidden: [16]}\ndevice: gpu\n", "device 'gpu' is not one of"),
    ("target: bitnet_lm\ngrid: {model.hidden: 16}\n", "must be a non-empty list"),
    ("target: bitnet_lm\ngrid: {model.hidden: [16]}\nparalel: 2\n", "unknown key 'paralel'"),
    ("target: bitnet_lm\n", "needs 'grid:'"),
    ("grid: [", "not valid YAML"),
])
def test_bad_sweep_files_exit_2(tmp_path: Path, body, needle):
    (tmp_path / "s.yaml").write_text(body, encoding="utf-8")
    proc = trainlab("sweep", "s.yaml", "--sweep-dir", "sw", cwd=tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "sw").exists()


def test_another_sweep_in_the_same_directory_is_refused(tmp_path: Path):
    (tmp_path / "sw").mkdir()
    (tmp_path / "sw" / "sweep.json").write_text(json.dumps(
        {"target": "bitnet_lm", "preset": "smoke", "sets": [], "grid": [["model.hidden", ["8"]]], "points": []}))
    proc = trainlab("sweep", "bitnet_lm", "--preset", "smoke", "--grid", "model.hidden=16", "--sweep-dir", "sw",
                    cwd=tmp_path)
    assert proc.returncode == 2 and "holds another sweep (its grid differ" in proc.stderr


def test_ray_backend_runs_the_same_points(tmp_path: Path):
    pytest.importorskip("ray")
    proc = trainlab(*TINY, "--steps", "10", "--backend", "ray", "--parallel", "2", "--sweep-dir", "sw",
                    cwd=tmp_path, timeout=300, own_process=True)  # Ray's driver stays in its process
    assert proc.returncode == 0, proc.stderr[-2000:]
    for name in ("hidden-16", "hidden-32"):
        assert json.loads((tmp_path / "sw" / name / "status.json").read_text())["state"] == "finished"
    assert "(ray)" in (tmp_path / "sw" / "logs" / "hidden-16.log").read_text()


# ------------------------------------------------------------------ decision rules

def _point(hidden: int, trajectory: list[float], lr: str | None = None, state: str = "finished",
           planned: int | None = None, reason: str = "", final_loss: float = 2.0) -> PointResult:
    """A point evaluated every 1000 steps; `planned` steps (default: where the trajectory ends)."""
    values = {"model.hidden": str(hidden)} | ({"optim.lr": lr} if lr else {})
    steps = [1000 * (i + 1) for i in range(len(trajectory))]
    return PointResult(f"hidden-{hidden}", values, Path("."), state, steps[-1], planned or steps[-1],
                       hidden * hidden * 12, "val_loss", final_loss, list(zip(steps, trajectory)), [], 80.0, 10.0,
                       reason=reason)


@pytest.mark.parametrize("finals,rule,verdict", [
    ([60, 70, 75, 78], "1", "no size collapses"),
    ([2, 30, 60, 70], "2", "scaling fixes it from size hidden=768"),
    ([2, 2, 3, 5], "3", "no size stays diverse: LR is the lever"),
    ([60, 50, 5, 2], "4", "larger sizes lose diversity (diverse up to hidden=512 only): LR is the lever"),
    ([2, 60, 5, 70], "5", "non-monotonic: investigate"),
])
def test_decision_rules_follow_the_bitnet_size_study(finals, rule, verdict):
    points = [_point(h, [20, f]) for h, f in zip((256, 512, 768, 1024), finals)]
    (c,) = conclude(points, collapse_min=10, diverse_above=None, metric="distinct_preds")
    assert c.rule == rule and c.verdict.startswith(verdict)
    assert "half the 80 distinct true next tokens" in c.numbers[0]  # the threshold, with where it came from
    assert len(c.numbers) == 5 and all("distinct_preds" in n for n in c.numbers[1:5])


def test_rules_run_per_lr_group_and_report_a_recovery():
    points = [_point(256, [40, 3, 50], "1e-3"), _point(1024, [40, 50, 60], "1e-3"),
              _point(256, [40, 2, 2], "3e-3"), _point(1024, [40, 2, 2], "3e-3")]
    by_group = {c.group: c for c in conclude(points, 10, 45, "distinct_preds")}
    assert by_group["optim.lr=1e-3"].rule == "1" and by_group["optim.lr=3e-3"].rule == "3"
    assert not any("within 10 %" in n for c in by_group.values() for n in c.numbers)
    (near,) = conclude([_point(256, [40, 44]), _point(1024, [40, 60])], 10, 45, "distinct_preds")
    assert near.numbers[-1] == "within 10 % of the diverse threshold, so the verdict hangs on them: hidden=256 44"
    assert "minimum 3" in by_group["optim.lr=1e-3"].numbers[1]  # collapsed, then recovered


def test_points_that_did_not_finish_are_named_and_left_out_of_the_rules_and_the_fit():
    # judged on their last values, the crashed and the stopped point would make this "non-monotonic"
    # (diverse, not, diverse, not); among the points that finished every size is diverse
    points = [_point(256, [40, 60]),
              _point(512, [40, 3], state="crashed", planned=4000, reason="RuntimeError: boom"),
              _point(768, [40, 70]),
              _point(1024, [40, 2], state="stopped", planned=4000, reason="non-finite loss=nan"),
              _point(1536, [40, 5], state="finished", planned=4000, reason="time budget of 60 s reached"),
              _point(2048, [40, 60, 70, 1], state="running", planned=8000)]
    (c,) = conclude(points, collapse_min=10, diverse_above=45, metric="distinct_preds")
    assert c.rule == "1", (c.rule, c.verdict)
    assert c.left_out == ["hidden-512 crashed at step 2000 of 4000 (RuntimeError: boom)",
                          "hidden-1024 stopped at step 2000 of 4000 (non-finite loss=nan)",
                          "hidden-1536 finished early at step 2000 of 4000 (time budget of 60 s reached)",
                          "hidden-2048 running at step 4000 of 8000"]
    judged = [n for n in c.numbers if "->" in n]
    assert [n.split(" ")[0] for n in judged] == ["hidden=256", "hidden=768"]
    assert c.numbers[-1] == "left out, their last values are not final: " + "; ".join(c.left_out)
    # with one finished size left there is no conclusion, and it still says which points were left out
    (alone,) = conclude(points[:2], 10, 45, "distinct_preds")
    assert alone.rule == "-" and "has 1" in alone.verdict and alone.left_out == [c.left_out[0]]
    assert alone.numbers == [f"left out, their last values are not final: {c.left_out[0]}"]
    # the power law too fits final losses only: a crash's last loss is not the loss of its size
    with_losses = [dataclasses.replace(p, final_loss=loss) for p, loss in zip(points, [3.0, 9.0, 2.6, 9.0, 9.0, 2.3])]
    (fit,) = fits(with_losses).values()
    assert fit.n_points == 2 and "needs 3 or more distinct sizes, has 2" in fit.note


# ------------------------------------------------------------------ GPUs: which GPU each point's process sees

def test_gpu_indices_count_the_gpus_the_sweep_sees():
    assert runner.gpu_ids(["0", "1"], None) == ["0", "1"]  # nothing hidden: an index is the GPU
    assert runner.gpu_ids(["0", "1"], "2,3") == ["2", "3"]  # as torch numbers them under the caller's mask
    assert runner.gpu_ids(["1"], "GPU-6f1a, MIG-2b") == ["MIG-2b"]
    with pytest.raises(runner.UsageError, match=r"index 2 does not exist; CUDA_VISIBLE_DEVICES='4,5' makes 2 GPUs"):
        runner.gpu_ids(["0", "2"], "4,5")
    with pytest.raises(runner.UsageError, match="no GPU visible"):
        runner.gpu_ids(["0"], "")


class _FakeProcess:
    """A point process that ends after `polls` polls with `code`, first writing the status.json a real
    `trainlab run` would leave."""

    def __init__(self, run_dir: Path, polls: int, code: int, status: dict | None):
        self.run_dir, self.polls, self.code, self.status = run_dir, polls, code, status

    def poll(self):
        self.polls -= 1
        if self.polls > 0:
            return None
        if self.status is not None:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            (self.run_dir / "status.json").write_text(json.dumps(self.status))
        return self.code


def test_each_point_gets_the_least_busy_gpu_in_its_environment(tmp_path: Path, monkeypatch):
    # 4 points, 3 at a time on GPUs 0 and 1 (physical 6 and 7 under the caller's mask): the third point
    # joins GPU 0 (a tie goes to the first listed), the first point's end frees GPU 0, so the fourth goes
    # there too -- a round robin would have sent it to GPU 1, where two points still run
    lifetimes = {"hidden-1": (2, 0, {"state": "finished"}), "hidden-2": (6, 1, {"state": "stopped", "reason": "x"}),
                 "hidden-3": (6, 1, {"state": "crashed", "reason": "RuntimeError: boom"}), "hidden-4": (2, 0, None)}
    started = []

    def fake_popen(cmd, env, stdout, **kwargs):
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        polls, code, status = lifetimes[run_dir.name]
        started.append((run_dir.name, env["CUDA_VISIBLE_DEVICES"], env["OMP_NUM_THREADS"], kwargs))
        return _FakeProcess(run_dir, polls, code, status)

    monkeypatch.setattr(runner.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(runner, "POLL_S", 0.0)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "6,7")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    spec = SweepSpec("bitnet_lm", "smoke", [], 10, [("model.hidden", ["1", "2", "3", "4"])], parallel=3,
                     gpus=runner.gpu_ids(["0", "1"], os.environ["CUDA_VISIBLE_DEVICES"]))
    states = [runner.PointState(p, tmp_path / p.name, 10) for p in spec.points()]
    table = runner.Table(states, "distinct_preds", out=io.StringIO())
    assert runner.run_local(spec, states, table, tmp_path / "logs") is None
    threads = str(max(1, (os.cpu_count() or 1) // 3))
    assert [s[:3] for s in started] == [("hidden-1", "6", threads), ("hidden-2", "7", threads),
                                        ("hidden-3", "6", threads), ("hidden-4", "6", threads)]
    assert all(s[3]["preexec_fn"] is runner._die_with_parent for s in started)  # no orphans if the sweep dies
    assert "# " in (log := (tmp_path / "logs" / "hidden-4.log").read_text()) and "CUDA_VISIBLE_DEVICES=6 " in log
    # exit 1 is a stop or a training failure: the point's status.json tells which, and why
    assert [(s.state, s.note) for s in states] == [("finished", ""), ("stopped", "x"),
                                                   ("failed", "RuntimeError: boom"), ("finished", "")]
    # without --gpus a point gets no CUDA_VISIBLE_DEVICES of its own, and a caller's OMP_NUM_THREADS stands
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert runner.point_env(SweepSpec("bitnet_lm", None, [], None, [], parallel=2), None) == {"PYTHONUNBUFFERED": "1"}


def test_bad_gpu_lists_exit_2_before_anything_is_written(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3")
    for gpus, needle in (("0,a", "--gpus 0,a: expected comma-separated GPU indices"),
                         ("0,1", "--gpus 0,1: index 1 does not exist; CUDA_VISIBLE_DEVICES='3' makes 1 GPU visible")):
        code = trainlab_main(["sweep", "bitnet_lm", "--preset", "smoke", "--grid", "model.hidden=16", "--gpus", gpus,
                              "--sweep-dir", "sw"])
        err = capsys.readouterr().err
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1, err
        assert not (tmp_path / "sw").exists()


# ------------------------------------------------------------------ power law

def test_power_law_recovers_known_exponent_within_its_interval():
    rng = np.random.default_rng(0)
    n = np.array([1e5, 3e5, 1e6, 3e6, 1e7, 3e7])
    loss = 1.7 + 40.0 * n ** -0.3 + rng.normal(0, 0.003, len(n))
    fit = fit_power_law(n.tolist(), loss.tolist())
    assert fit.alpha == pytest.approx(0.3, abs=0.05)
    lo, hi = fit.alpha_interval
    assert lo <= 0.3 <= hi and hi - lo < 0.3
    assert fit.E_interval[0] <= 1.7 + 0.05 and fit.E_interval[1] >= 1.7 - 0.05
    assert np.allclose(fit.predict(n), loss, atol=0.02)


def test_power_law_says_what_it_cannot_determine():
    three = fit_power_law([1e5, 1e6, 1e7], [3.0, 2.5, 2.2])
    assert three.alpha is not None and three.alpha_interval is None and "no degree of freedom" in three.describe()
    assert "needs 3 or more" in fit_power_law([1e5, 1e6], [3.0, 2.5]).describe()
    assert "does not fall with size" in fit_power_law([1e5, 1e6, 1e7, 1e8], [2.0, 2.5, 3.0, 3.5]).describe()
