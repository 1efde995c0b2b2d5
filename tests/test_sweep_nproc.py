"""trainlab sweep --nproc-per-point N: each point a torchrun job of N ranks (`trainlab run --nproc N`).

Checked without training anything: the command a point runs, the N distinct GPUs a point gets on the
local backend (and the load they count for the next point), the threads per rank, the Ray task's
request, the refusals of bad N, the sweep YAML's nproc_per_point and that a rerun may change N."""

from __future__ import annotations

import dataclasses
import importlib.machinery
import io
import sys
import types
from pathlib import Path

import pytest

from conftest import trainlab
from trainlab.cli import build_parser
from trainlab.sweep import cli as sweep_cli
from trainlab.sweep import runner
from trainlab.sweep.cli import build_spec
from trainlab.sweep.spec import SweepSpec, check_same_sweep, write_manifest

BASE = ["sweep", "bitnet_lm", "--preset", "smoke", "--grid", "model.hidden=16,32"]


def _spec(**kw) -> SweepSpec:
    return SweepSpec("bitnet_lm", "smoke", ["model.heads=1"], 10, [("model.hidden", ["1", "2", "3", "4"])], **kw)


# ------------------------------------------------------------------ the command and environment of a point

def test_point_command_gains_nproc_only_above_one(tmp_path: Path):
    one, two = _spec(), _spec(nproc_per_point=2)
    point = one.points()[0]
    plain = [sys.executable, "-m", "trainlab", "run", "bitnet_lm", "--run-dir", str(tmp_path / "p"), "--device",
             "auto", "--preset", "smoke", "--set", "model.heads=1", "--set", "model.hidden=1", "--steps", "10"]
    assert runner.point_command(one, point, tmp_path / "p") == plain
    assert runner.point_command(two, point, tmp_path / "p") == plain + ["--nproc", "2"]


def test_each_rank_gets_its_share_of_the_cores(monkeypatch):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runner.os, "cpu_count", lambda: 16)
    assert runner.point_env(_spec(parallel=2), None)["OMP_NUM_THREADS"] == "8"
    assert runner.point_env(_spec(parallel=2, nproc_per_point=2), "0,1") == {
        "PYTHONUNBUFFERED": "1", "CUDA_VISIBLE_DEVICES": "0,1", "OMP_NUM_THREADS": "4"}
    assert runner.point_env(_spec(parallel=4, nproc_per_point=8), None)["OMP_NUM_THREADS"] == "1"  # at least one


# ------------------------------------------------------------------ local backend: N distinct GPUs per point

def _running(*gpus: str) -> list[runner.PointState]:
    return [runner.PointState(p, Path("x"), 10, state="running", gpu=g)
            for p, g in zip(_spec().points(), gpus)]


def test_least_busy_gpus_count_every_gpu_of_every_running_point():
    gpus = ["0", "1", "2", "3"]
    assert runner.least_busy_gpus([], _running(), 2) is None
    assert runner.least_busy_gpus(gpus, _running(), 2) == "0,1"
    assert runner.least_busy_gpus(gpus, _running("0,1"), 2) == "2,3"
    # a point on 0,1 and one on 2: GPU 3 is free, then the tie 0/1/2 goes to the first listed
    assert runner.least_busy_gpus(gpus, _running("0,1", "2"), 2) == "3,0"
    # N == 1 as before: one GPU, the least busy, counting the GPUs of multi-GPU points too
    assert runner.least_busy_gpus(gpus, _running("0,1"), 1) == "2"
    assert runner.least_busy_gpus(["0", "1"], _running("0", "1", "0")) == "1"


class _FakeProcess:
    def __init__(self, polls: int):
        self.polls = polls

    def poll(self):
        self.polls -= 1
        return 0 if self.polls <= 0 else None


def test_two_running_points_get_disjoint_gpu_pairs(tmp_path: Path, monkeypatch):
    # 3 points, 2 at a time, 2 ranks each on GPUs 0-3: the first two points hold disjoint pairs; the
    # first one's end frees 0,1, so the third gets that pair while the second still runs on 2,3
    lifetimes = {"hidden-1": 2, "hidden-2": 6, "hidden-3": 2}
    started = []

    def fake_popen(cmd, env, stdout, **kwargs):
        run_dir = Path(cmd[cmd.index("--run-dir") + 1])
        started.append((run_dir.name, env["CUDA_VISIBLE_DEVICES"], cmd[-2:]))
        return _FakeProcess(lifetimes[run_dir.name])

    monkeypatch.setattr(runner.subprocess, "Popen", fake_popen)
    monkeypatch.setattr(runner, "POLL_S", 0.0)
    spec = SweepSpec("bitnet_lm", "smoke", [], 10, [("model.hidden", ["1", "2", "3"])], parallel=2,
                     gpus=["0", "1", "2", "3"], nproc_per_point=2)
    states = [runner.PointState(p, tmp_path / p.name, 10) for p in spec.points()]
    table = runner.Table(states, "distinct_preds", out=io.StringIO())
    assert runner.run_local(spec, states, table, tmp_path / "logs") is None
    assert started == [("hidden-1", "0,1", ["--nproc", "2"]), ("hidden-2", "2,3", ["--nproc", "2"]),
                       ("hidden-3", "0,1", ["--nproc", "2"])]
    assert "CUDA_VISIBLE_DEVICES=2,3 " in (tmp_path / "logs" / "hidden-2.log").read_text()
    assert [s.state for s in states] == ["finished"] * 3


# ------------------------------------------------------------------ Ray backend: the task's request

def _fake_ray(requests: list[dict]) -> types.ModuleType:
    """Just enough of Ray for run_ray: tasks run nothing and return 0; `requests` records each task's options."""
    ray = types.ModuleType("ray")
    ray.__spec__ = importlib.machinery.ModuleSpec("ray", None)  # importlib.util.find_spec("ray") finds it

    class Remote:
        def options(self, **opts):
            requests.append(dict(opts))
            return self

        def remote(self, cmd, env, log_path):
            requests[-1]["cmd"] = cmd
            return object()

    ray.init = ray.shutdown = lambda *a, **k: None
    ray.remote = lambda fn: Remote()
    ray.wait = lambda refs, num_returns=1, timeout=None: (refs[:num_returns], refs[num_returns:])
    ray.get = lambda ref: 0
    ray.cancel = lambda ref, force=False: None
    return ray


def test_a_ray_task_asks_for_a_cpu_per_rank(tmp_path: Path, monkeypatch):
    requests: list[dict] = []
    monkeypatch.setitem(sys.modules, "ray", _fake_ray(requests))
    monkeypatch.setattr(runner, "POLL_S", 0.0)
    spec = _spec(parallel=2, backend="ray", nproc_per_point=3)
    states = [runner.PointState(p, tmp_path / p.name, 10) for p in spec.points()]
    table = runner.Table(states, "distinct_preds", out=io.StringIO())
    assert runner.run_ray(spec, states, table, tmp_path / "logs", 3.0, None) is None
    assert [(r["num_cpus"], r["num_gpus"], r["cmd"][-2:]) for r in requests] == [(3, 3.0, ["--nproc", "3"])] * 4


def _finish_all(states: list[runner.PointState]) -> None:
    """What a backend that ran every point to its end leaves behind (the sweep then exits 0)."""
    for s in states:
        s.state = "finished"


@pytest.mark.parametrize("extra,cuda,per_point", [
    (["--nproc-per-point", "2"], True, 2.0),  # one GPU per rank by default
    ([], True, 1.0),
    (["--nproc-per-point", "2"], False, 0.0),
    (["--nproc-per-point", "2", "--gpus-per-point", "0.5"], True, 0.5),  # a given request stands
])
def test_ray_default_gpus_per_point_is_one_per_rank(tmp_path: Path, monkeypatch, capsys, extra, cuda, per_point):
    import torch

    seen = {}

    def fake_run_ray(spec, states, table, log_dir, gpus_per_point, address):
        seen["per_point"] = gpus_per_point
        _finish_all(states)

    monkeypatch.setitem(sys.modules, "ray", _fake_ray([]))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(runner, "run_ray", fake_run_ray)
    monkeypatch.setattr(sweep_cli, "print_sweep_report", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    code = sweep_cli.run_sweep_command(build_parser().parse_args(
        BASE + ["--backend", "ray", "--sweep-dir", "sw", *extra]))
    assert code == 0 and seen["per_point"] == per_point
    out = capsys.readouterr().out
    assert ("1 at a time, 2 processes per point, backend ray;" in out) == ("--nproc-per-point" in extra), out


def test_the_start_line_names_the_processes_per_point(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(runner, "run_local", lambda spec, states, table, log_dir: _finish_all(states))
    monkeypatch.setattr(sweep_cli, "print_sweep_report", lambda *a, **k: None)
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert sweep_cli.run_sweep_command(build_parser().parse_args(
        BASE + ["--sweep-dir", "sw", "--parallel", "2", "--nproc-per-point", "2", "--gpus", "0,1,2,3"])) == 0
    assert "; 2 at a time, 2 processes per point, backend local;" in capsys.readouterr().out
    assert sweep_cli.run_sweep_command(build_parser().parse_args(BASE + ["--sweep-dir", "sw"])) == 0
    assert "; 1 at a time, backend local;" in capsys.readouterr().out


# ------------------------------------------------------------------ refusals, the sweep YAML, reruns

@pytest.mark.parametrize("extra,needle", [
    (["--nproc-per-point", "0"], "--nproc-per-point 0: must be >= 1"),
    (["--nproc-per-point", "-2"], "--nproc-per-point -2: must be >= 1"),
    (["--nproc-per-point", "3", "--gpus", "0,1"],
     "--nproc-per-point 3: a point needs 3 distinct GPUs but --gpus gives 2"),
])
def test_bad_nproc_exits_2_with_one_line_and_writes_nothing(tmp_path: Path, monkeypatch, extra, needle):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc = trainlab(*BASE, *extra, "--sweep-dir", "sw", cwd=tmp_path)
    assert proc.returncode == 2, proc.stderr
    assert needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "sw").exists()


def test_more_ranks_than_gpus_is_fine_on_ray(monkeypatch):
    # Ray places a task on a node with its GPUs; --gpus (the local backend's list) does not bound N there
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    spec = build_spec(build_parser().parse_args(BASE + ["--backend", "ray", "--gpus", "0", "--nproc-per-point", "2"]))
    assert spec.nproc_per_point == 2


def _sweep_file(tmp_path: Path, extra: str) -> str:
    path = tmp_path / "s.yaml"
    path.write_text("target: bitnet_lm\npreset: smoke\ngrid: {model.hidden: [16, 32]}\n" + extra, encoding="utf-8")
    return str(path)


def test_the_sweep_yaml_gives_nproc_per_point_and_the_flag_wins(tmp_path: Path, monkeypatch):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    path = _sweep_file(tmp_path, "nproc_per_point: 3\nparallel: 2\n")
    assert build_spec(build_parser().parse_args(["sweep", path])).nproc_per_point == 3
    assert build_spec(build_parser().parse_args(["sweep", path, "--nproc-per-point", "2"])).nproc_per_point == 2
    assert build_spec(build_parser().parse_args(["sweep", _sweep_file(tmp_path, "")])).nproc_per_point == 1


@pytest.mark.parametrize("extra,needle", [
    ("nproc_per_point: 0\n", "nproc_per_point must be a positive integer, got 0"),
    ("nproc_per_point: two\n", "nproc_per_point must be a positive integer, got 'two'"),
    ("nproc_per_point: 2\ngpus: [0]\n", "--nproc-per-point 2: a point needs 2 distinct GPUs but --gpus gives 1"),
])
def test_bad_nproc_in_the_sweep_yaml_exits_2(tmp_path: Path, monkeypatch, extra, needle):
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    proc = trainlab("sweep", _sweep_file(tmp_path, extra), "--sweep-dir", "sw", cwd=tmp_path)
    assert proc.returncode == 2 and needle in proc.stderr and len(proc.stderr.strip().splitlines()) == 1, proc.stderr
    assert not (tmp_path / "sw").exists()


def test_a_rerun_may_change_nproc_per_point(tmp_path: Path):
    spec = _spec()
    changed = dataclasses.replace(spec, nproc_per_point=4)
    assert changed.identity() == spec.identity() and "nproc_per_point" not in spec.identity()
    write_manifest(tmp_path, spec, spec.points())
    check_same_sweep(tmp_path, changed)  # the same sweep: not refused
