"""The CLI's promise on bad input (cli.py docstring): exit code 2, one line on stderr naming the
offending key or value and what is allowed, no traceback, and nothing written.

Every case runs the real CLI in its own subprocess (`python -m trainlab ...`) in its own pytest
temporary directory.  A subprocess costs ~1.5 s of Python + torch import, so the selected cases
are started together on a thread pool (one worker per CPU) as soon as the first of them runs; each
test then waits for its own result.  Before and after each command the whole working directory
is snapshot (relative path -> bytes, directories included), so "nothing written" covers both a run
directory that must not appear and an existing one that must stay byte-identical.

`trainlab check` and `trainlab report` refusing a run directory, and the refusals of `trainlab run`
and `preflight` that come before any training (a run directory that cannot be created, too many
steps, a model that cannot fit), run in this process instead (test_bad_run_dir): they train
nothing, and the same promise is checked on trainlab.cli.main.
A read-only directory is made with chmod, or, for root (CI), as a tmpfs remounted read-only.
"""

from __future__ import annotations

import os
import re
import stat
import subprocess
import sys
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable

import pytest
import yaml

SMOKE = ("--preset", "smoke")
TIMEOUT_S = 120


def run_cli(cwd: Path, *args: str) -> subprocess.CompletedProcess:
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    # The cases run side by side; one intra-op thread each keeps the one real (smoke) training run
    # from spinning OpenMP threads against the others (2.7 s instead of ~10 s on a busy 2-core box).
    env.setdefault("OMP_NUM_THREADS", "1")
    return subprocess.run([sys.executable, "-m", "trainlab", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def snapshot(root: Path) -> dict[str, bytes | None]:
    """Everything under `root`: files as bytes, directories as None."""
    out: dict[str, bytes | None] = {}
    for path in sorted(root.rglob("*")):
        rel = path.relative_to(root).as_posix()
        out[rel] = path.read_bytes() if path.is_file() else None
    return out


@lru_cache(maxsize=None)
def cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


# --------------------------------------------------------------------------------------------
# Setups: each gets the case's empty working directory; a returned string skips the case
# --------------------------------------------------------------------------------------------

def write(name: str, text: str) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        (cwd / name).write_text(text, encoding="utf-8")
    return setup


def make_dir(name: str) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        (cwd / name).mkdir()
    return setup


def skip_with_cuda(cwd: Path) -> str | None:
    return "CUDA is available here, so --device cuda is valid input" if cuda_available() else None


def _make_read_only(ro: Path, fill: Callable[[Path], None] | None = None) -> str | None:
    """Directory `ro`, filled by `fill`, made read-only: by chmod for a normal user; for root, who
    ignores permission bits (CI runs as root), as a tmpfs remounted read-only, which stops root too."""
    ro.mkdir()
    ro.chmod(stat.S_IRUSR | stat.S_IXUSR)
    by_chmod = not os.access(ro, os.W_OK)
    ro.chmod(stat.S_IRWXU)
    if not by_chmod:
        mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(ro)], capture_output=True)
        if mounted.returncode != 0:
            return ("cannot make a directory read-only here: chmod does not bind this user (root) and "
                    f"mount failed ({mounted.stderr.decode().strip()[:80]})")
    if fill:
        fill(ro)
    if by_chmod:
        for path in [*ro.rglob("*"), ro]:
            path.chmod(stat.S_IRUSR | stat.S_IXUSR)
    else:
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], capture_output=True, check=True)
    assert not os.access(ro, os.W_OK), "the directory is still writable"
    return None


def needs_proc(cwd: Path) -> str | None:
    return None if Path("/proc/self").is_dir() else "no /proc here"


def read_only_dir(cwd: Path) -> str | None:
    return _make_read_only(cwd / "ro")


def restore_read_only_dir(cwd: Path) -> None:
    ro = cwd / "ro"
    if os.path.ismount(ro):
        subprocess.run(["umount", str(ro)], capture_output=True, check=True)
    elif ro.exists():
        for path in [ro, *ro.rglob("*")]:
            path.chmod(stat.S_IRWXU)


# A run directory written by hand: the least `trainlab check` and `trainlab report` accept.
FAKE_CONFIG = b"experiment: modadd\npreset: smoke\n"
FAKE_METRICS = b"step,loss\n5,3.1\n10,3.0\n"


def write_run_files(run: Path, files: dict[str, bytes | None] | None = None) -> None:
    """config.yaml and metrics.csv into `run`, each replaced (None: left out) or added to by `files`."""
    for name, data in {"config.yaml": FAKE_CONFIG, "metrics.csv": FAKE_METRICS, **(files or {})}.items():
        if data is not None:
            (run / name).write_bytes(data)


def fake_run(files: dict[str, bytes | None] | None = None) -> Callable[[Path], None]:
    def setup(cwd: Path) -> None:
        (cwd / "r").mkdir()
        write_run_files(cwd / "r", files)
    return setup


def read_only_run(cwd: Path) -> str | None:
    return _make_read_only(cwd / "ro", write_run_files)


def finished_smoke_run(cwd: Path) -> None:
    proc = run_cli(cwd, "run", "modadd", *SMOKE, "--run-dir", "r")
    assert proc.returncode == 0, f"setup run failed: {proc.stderr}"
    assert (cwd / "r" / "config.yaml").is_file() and (cwd / "r" / "checkpoints").is_dir()


YAML_HEAD = "experiment: modadd\npreset: smoke\n"


@dataclass(frozen=True)
class Bad:
    id: str
    args: tuple[str, ...]
    expect: tuple[str, ...]  # substrings the one stderr line must contain
    setup: Callable[[Path], str | None] | None = None
    teardown: Callable[[Path], None] | None = None
    marks: tuple = field(default=())


def run_smoke(*args: str) -> tuple[str, ...]:
    return ("run", "modadd", *SMOKE, *args)


CASES = [
    # --- names -------------------------------------------------------------------------------
    Bad("unknown-experiment", ("run", "modad", *SMOKE), ("unknown experiment 'modad'", "did you mean 'modadd'", "allowed: modadd")),
    Bad("unknown-preset", ("run", "modadd", "--preset", "tiny"), ("unknown preset 'tiny'", "allowed: smoke, quick, grok")),
    Bad("set-unknown-key", run_smoke("--set", "optim.lrr=0.1"), ("optim.lrr", "did you mean 'lr'", "allowed:")),
    Bad("set-unknown-section", run_smoke("--set", "optimm.lr=0.1"), ("optimm", "did you mean 'optim'", "allowed:")),
    Bad("yaml-unknown-key", ("run", "c.yaml"), ("train.stepz", "did you mean 'steps'", "allowed:"),
        setup=write("c.yaml", YAML_HEAD + "train: {stepz: 10}\n")),
    # --- wrong types ---------------------------------------------------------------------------
    Bad("steps-abc", run_smoke("--set", "train.steps=abc"), ("train.steps", "expected an integer", "'abc'")),
    Bad("clip-list", run_smoke("--set", "train.clip=[1,2]"), ("train.clip", "expected a number", "[1,2]")),
    Bad("yaml-steps-many", ("run", "c.yaml"), ("train.steps", "expected an integer", "'many'"),
        setup=write("c.yaml", YAML_HEAD + 'train: {steps: "many"}\n')),
    Bad("bool-maybe", run_smoke("--set", "train.deterministic=maybe"), ("train.deterministic", "true or false", "'maybe'")),
    # --- out of range / not allowed ----------------------------------------------------------------
    Bad("lr-zero", run_smoke("--set", "optim.lr=0"), ("optim.lr", "must be > 0", "got 0.0")),
    Bad("lr-negative", run_smoke("--set", "optim.lr=-1e-3"), ("optim.lr", "must be > 0", "got -0.001")),
    Bad("accum-zero", run_smoke("--set", "train.accum=0"), ("train.accum", "must be >= 1", "got 0")),
    Bad("micro-batch-zero", run_smoke("--set", "train.micro_batch=0"), ("train.micro_batch", "must be >= 1", "got 0")),
    Bad("gate-above-one", run_smoke("--set", "curriculum.values=[1]", "--set", "curriculum.min_steps=[0]",
                                    "--set", "curriculum.gates=[1.5]"), ("curriculum.gates[0]", "must be <= 1", "1.5")),
    Bad("curriculum-unequal", run_smoke("--set", "curriculum.values=[1,2]", "--set", "curriculum.min_steps=[0]",
                                        "--set", "curriculum.gates=[0.5]"),
        ("curriculum", "equal lengths", "values has 2", "min_steps has 1", "gates has 1")),
    # Via a YAML file: `--set schedule.phases=...` is refused even when valid (see test_config.py).
    Bad("phase-zero-not-last", ("run", "c.yaml"), ("schedule.phases[0].steps", "last phase only"),
        setup=write("c.yaml", YAML_HEAD + "schedule:\n  phases: [{kind: constant, steps: 0}, {kind: linear, steps: 5}]\n")),
    Bad("precision-fp8", run_smoke("--set", "train.precision=fp8"), ("train.precision", "auto, fp32, bf16, fp16", "'fp8'")),
    Bad("optim-sgd", run_smoke("--set", "optim.name=sgd"), ("optim.name", "adamw, lion", "'sgd'")),
    Bad("momentum-bf16-adamw", run_smoke("--set", "optim.momentum_dtype=bf16"), ("optim.momentum_dtype", "optim.name=lion")),
    Bad("heads-not-dividing", run_smoke("--set", "model.heads=3"), ("model.heads", "model.dim=32", "got 3")),
    Bad("clip-nan", run_smoke("--set", "train.clip=nan"), ("train.clip", "finite", "nan")),
    # --- config files ------------------------------------------------------------------------------
    Bad("yaml-malformed", ("run", "bad.yaml"), ("bad.yaml", "malformed YAML"),
        setup=write("bad.yaml", YAML_HEAD + "train: {steps: 3\n")),
    Bad("yaml-top-list", ("run", "list.yaml"), ("list.yaml", "mapping", "got list"),
        setup=write("list.yaml", "- experiment: modadd\n- preset: smoke\n")),
    Bad("yaml-no-experiment", ("run", "noexp.yaml"), ("noexp.yaml", "'experiment:'"),
        setup=write("noexp.yaml", "preset: smoke\ntrain: {steps: 3}\n")),
    Bad("yaml-missing", ("run", "nothere.yaml"), ("nothere.yaml", "not found")),
    Bad("yaml-is-directory", ("run", "conf.yaml"), ("conf.yaml", "is a directory"), setup=make_dir("conf.yaml")),
    # --- arguments ---------------------------------------------------------------------------------
    Bad("set-without-equals", run_smoke("--set", "optim.lr"), ("--set 'optim.lr'", "key=value")),
    Bad("steps-not-int", run_smoke("--steps", "x"), ("--steps", "invalid int value", "'x'")),
    Bad("steps-zero", run_smoke("--steps", "0"), ("train.steps", "must be >= 1", "got 0")),
    Bad("unknown-option", run_smoke("--bogus"), ("unrecognized arguments", "--bogus")),
    Bad("missing-target", ("run", *SMOKE), ("required", "target")),
    Bad("device-cuda", run_smoke("--device", "cuda"), ("--device cuda", "not available", "allowed here: auto, cpu"),
        setup=skip_with_cuda),
    # --- run directories ---------------------------------------------------------------------------
    Bad("run-dir-is-file", run_smoke("--run-dir", "afile"), ("afile", "not a directory"),
        setup=write("afile", "not a run\n")),
    Bad("run-dir-read-only", run_smoke("--run-dir", "ro/run"), ("ro", "not writable"),
        setup=read_only_dir, teardown=restore_read_only_dir),
    Bad("resume-changed-model", run_smoke("--run-dir", "r", "--set", "model.dim=64"), ("model.dim", "32 -> 64", "--fresh"),
        setup=finished_smoke_run),
    Bad("runs-root-not-dir", ("runs", "afile"), ("afile", "not a directory"), setup=write("afile", "x\n")),
]
CASE_BY_ID = {c.id: c for c in CASES}
assert len(CASE_BY_ID) == len(CASES), "case ids must be unique"

# `trainlab check RUN_DIR` and `trainlab report RUN_DIR` refusing a run directory.  They train
# nothing, so they run in this process through trainlab.cli.main (the `trainlab` entry point):
# milliseconds each instead of a subprocess's torch import, with the same promise checked.
RUN_DIR_CASES = [
    # --- trainlab check RUN_DIR --------------------------------------------------------------------
    Bad("check-dir-missing", ("check", "nowhere"), ("run directory nowhere: not found",)),
    Bad("check-not-a-run-dir", ("check", "plain"), ("plain", "needs config.yaml and metrics.csv"),
        setup=make_dir("plain")),
    Bad("check-metrics-not-utf8", ("check", "r"), ("run directory r: metrics.csv is unreadable", "utf-8"),
        setup=fake_run({"metrics.csv": FAKE_METRICS + b"15,\xff\xfe\n"})),
    Bad("check-config-not-utf8", ("check", "r"), ("run directory r: config.yaml is unreadable", "utf-8"),
        setup=fake_run({"config.yaml": FAKE_CONFIG + b"# \xff\n"})),
    Bad("check-config-malformed", ("check", "r"), ("run directory r: config.yaml is malformed",),
        setup=fake_run({"config.yaml": b"experiment: [modadd\n"})),
    Bad("check-read-only-run", ("check", "ro"), ("run directory ro: cannot write check.json",),
        setup=read_only_run, teardown=restore_read_only_dir),
    # --- trainlab report RUN_DIR -------------------------------------------------------------------
    Bad("report-dir-missing", ("report", "nowhere"), ("run directory nowhere: not found",)),
    Bad("report-not-a-run-dir", ("report", "plain"), ("plain", "no metrics.csv"), setup=make_dir("plain")),
    Bad("report-verdicts-not-an-object", ("report", "r"), ("a saved verdict file is malformed", "check.json"),
        setup=fake_run({"check.json": b"[]\n"})),
    Bad("report-verdict-unknown", ("report", "r"), ("a saved verdict file is malformed", "verdict must be one of",
                                                    "'great'"),
        setup=fake_run({"preflight.json": b'{"claims": [{"name": "x", "verdict": "great"}]}'})),
    Bad("report-metrics-not-utf8", ("report", "r"), ("run directory r: metrics.csv is unreadable", "utf-8"),
        setup=fake_run({"metrics.csv": FAKE_METRICS + b"15,\xff\xfe\n"})),
    Bad("report-events-not-utf8", ("report", "r"), ("run directory r: events.jsonl is unreadable", "utf-8"),
        setup=fake_run({"events.jsonl": b'{"kind": "start"}\n\xff\n'})),
    Bad("report-read-only-run", ("report", "ro"), ("run directory ro: cannot write the report", "ro/"),
        setup=read_only_run, teardown=restore_read_only_dir),
    # --- trainlab run / preflight refused before training: nothing trains, so in this process too ----
    Bad("run-dir-under-proc", run_smoke("--run-dir", "/proc/trainlab-tour"),
        ("run directory /proc/trainlab-tour: cannot be created",), setup=needs_proc),
    Bad("preflight-dir-under-proc", ("preflight", "modadd", *SMOKE, "--run-dir", "/proc/trainlab-tour/pre"),
        ("run directory /proc/trainlab-tour/pre: cannot be created", "/proc/trainlab-tour"), setup=needs_proc),
    Bad("run-dir-below-a-file", run_smoke("--run-dir", "afile/run"), ("afile/run", "afile is not a directory"),
        setup=write("afile", "not a run\n")),
    # (each with a run directory below a file, refused later: were the bound gone, the case would
    # fail at once on that refusal instead of training for 1e29 steps)
    Bad("steps-huge", run_smoke("--steps", "1" + "0" * 29, "--run-dir", "afile/run"),
        ("train.steps", "allowed: 1 to 1,000,000,000", "1e+29"), setup=write("afile", "x\n")),
    Bad("set-steps-exponent", run_smoke("--set", "train.steps=1e30", "--run-dir", "afile/run"),
        ("train.steps", "allowed: 1 to 1,000,000,000", "1e+30"), setup=write("afile", "x\n")),
    Bad("steps-just-over", run_smoke("--steps", str(10**9 + 1), "--run-dir", "afile/run"),
        ("train.steps", "got 1,000,000,001"), setup=write("afile", "x\n")),
    Bad("model-cannot-fit", ("run", "modadd", "--set", "model.dim=200000"),
        ("the model does not fit", "960,043,600,000 parameters", "AdamW's 2 states", "activations and data not counted",
         "available of")),
]
assert not {c.id for c in RUN_DIR_CASES} & set(CASE_BY_ID), "case ids must be unique"


@dataclass
class Outcome:
    skip: str | None = None
    proc: subprocess.CompletedProcess | None = None
    before: dict = field(default_factory=dict)
    after: dict = field(default_factory=dict)


def _execute(case: Bad, cwd: Path) -> Outcome:
    try:
        skip = case.setup(cwd) if case.setup else None
        if skip:
            return Outcome(skip=skip)
        before = snapshot(cwd)
        proc = run_cli(cwd, *case.args)
        return Outcome(proc=proc, before=before, after=snapshot(cwd))
    finally:
        if case.teardown:
            case.teardown(cwd)


@pytest.fixture(scope="module")
def bad_outcomes(request, tmp_path_factory) -> dict[str, Future]:
    """Starts every selected case at once (bounded by the CPU count); maps case id -> Future."""
    selected = [item.callspec.params["case"] for item in request.session.items
                if item.originalname == "test_bad_input" and getattr(item, "callspec", None)
                and item.module is request.module]
    selected.sort(key=lambda c: c.setup is not finished_smoke_run)  # the longest case first
    workers = max(2, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 2)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        futures = {}
        for case in selected:
            cwd = tmp_path_factory.mktemp(case.id)
            futures[case.id] = pool.submit(_execute, case, cwd)
        yield futures


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in CASES])
def test_bad_input(case: Bad, bad_outcomes):
    out: Outcome = bad_outcomes[case.id].result(timeout=4 * TIMEOUT_S)
    if out.skip:
        pytest.skip(out.skip)
    proc = out.proc
    assert_refused(case, proc.returncode, proc.stdout, proc.stderr, out.before, out.after)


def assert_refused(case: Bad, code: int, stdout: str, stderr: str, before: dict, after: dict) -> None:
    """Exit 2, one line on stderr naming what is wrong, nothing on stdout, no file touched."""
    where = f"trainlab {' '.join(case.args)}\n--- stdout:\n{stdout}--- stderr:\n{stderr}"
    assert "Traceback" not in stdout + stderr, where
    assert code == 2, where
    line = stderr.strip()
    assert line and line.count("\n") == 0, f"expected exactly one line on stderr; {where}"
    assert line.startswith("trainlab: error: "), where
    assert stdout == "", where
    for needle in case.expect:
        assert needle in line, f"{needle!r} missing from the message; {where}"
    assert after == before, (
        f"files changed: added {sorted(set(after) - set(before))}, "
        f"removed {sorted(set(before) - set(after))}, "
        f"modified {sorted(k for k in before if k in after and before[k] != after[k])}; {where}")
    assert "runs" not in after, where


@pytest.mark.parametrize("case", [pytest.param(c, id=c.id, marks=c.marks) for c in RUN_DIR_CASES])
def test_bad_run_dir(case: Bad, tmp_path, monkeypatch, capsys):
    from trainlab.cli import main

    monkeypatch.chdir(tmp_path)
    try:
        skip = case.setup(tmp_path) if case.setup else None
        if skip:
            pytest.skip(skip)
        before = snapshot(tmp_path)
        capsys.readouterr()
        code = main(list(case.args))
        out = capsys.readouterr()
        after = snapshot(tmp_path)
    finally:
        if case.teardown:
            case.teardown(tmp_path)
    assert_refused(case, code, out.out, out.err, before, after)


def test_resume_case_really_had_a_finished_run(bad_outcomes):
    """Guards the resume case: its setup must have produced files to keep unchanged."""
    if "resume-changed-model" not in bad_outcomes:
        pytest.skip("resume case not selected")
    before = bad_outcomes["resume-changed-model"].result(timeout=4 * TIMEOUT_S).before
    assert "r/config.yaml" in before and "r/status.json" in before
    assert any(k.startswith("r/checkpoints/step_") for k in before)
    assert yaml.safe_load(before["r/config.yaml"])["model"]["dim"] == 32


# --------------------------------------------------------------------------------------------
# Good input
# --------------------------------------------------------------------------------------------

def test_list_prints_each_preset_on_its_own_line(tmp_path):
    from trainlab.experiment import registry

    proc = run_cli(tmp_path, "list")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    lines = proc.stdout.splitlines()
    for exp in registry().values():
        assert f"{exp.name}: {exp.description}" in lines
        mine = [ln for ln in lines if ln.startswith(f"  {exp.name} --preset ")]
        listed = [re.match(rf"\s+{exp.name} --preset (\w+)\b", ln).group(1) for ln in mine]
        assert listed == list(exp.presets), proc.stdout
        defaults = [ln for ln in mine if "(default)" in ln]
        assert len(defaults) == 1 and f"--preset {exp.default_preset} (default)" in defaults[0], proc.stdout
    assert {"smoke", "quick", "grok"} <= set(registry()["modadd"].presets)
    assert list(tmp_path.iterdir()) == []


def test_config_prints_resolved_yaml_with_override(tmp_path):
    proc = run_cli(tmp_path, "config", "modadd", *SMOKE, "--set", "optim.lr=0.002")
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""
    data = yaml.safe_load(proc.stdout)
    assert data["experiment"] == "modadd" and data["preset"] == "smoke"
    assert data["optim"]["lr"] == 0.002
    assert data["train"]["steps"] == 40  # the smoke preset, not the default 1000
    assert list(tmp_path.iterdir()) == []


def test_config_exponent_lr_and_yaml_round_trip(tmp_path):
    """`1e-3` is a string to PyYAML (YAML 1.1); the config must still hold the float 0.001.
    The YAML that `trainlab config` prints, used as a config file, resolves to the same YAML."""
    proc = run_cli(tmp_path, "config", "modadd", *SMOKE, "--set", "optim.lr=1e-3")
    assert proc.returncode == 0, proc.stderr
    lr = yaml.safe_load(proc.stdout)["optim"]["lr"]
    assert type(lr) is float and lr == 0.001, repr(lr)

    (tmp_path / "that.yaml").write_text(proc.stdout, encoding="utf-8")
    again = run_cli(tmp_path, "config", "that.yaml")
    assert again.returncode == 0, again.stderr
    assert again.stderr == ""
    assert again.stdout == proc.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["that.yaml"]
