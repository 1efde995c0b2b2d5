"""README.md's commands are part of the contract: its first code block starts with the set-up-and-run
command and the set-up-and-test command, .ci/run runs that same test command, and the five-minute
tour does what its comments say, followed line by line.

test_the_tour_does_what_its_comments_say reads the tour's code block from README.md and runs its
lines in order, in one working directory, as a user would after the README's first command (whose
run directory, runs/modadd-quick, is stood in for by the recorded run tests/data/modadd_quick).
Each line is recognised by its command and checked against what its comment promises; a line the
test does not know fails it, so the README cannot change without this test.  Shortened where the
real thing takes minutes, by text substitution on the lines of the kill-and-resume demo (those
naming runs/tour), nothing else:

    --preset quick -> --preset smoke     the smoke model: a 200-step run takes seconds, not half a minute
    --steps 500    -> --steps 200        (and the extension's 1000 -> 240)
    sleep 1        -> sleep 0.05         the smoke run is fast: a finer poll lands the kill right
                                         after the first checkpoint, long before the run's end

Lines left out, each with its reason, are in NOT_RUN.  The killed run runs as the README says, in
bash (`&`, the wait, `kill -9 $!`); every other line runs the CLI in this process (conftest.trainlab).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from conftest import cli_env, history, trainlab
from trainlab.engine.logs import read_events

ROOT = Path(__file__).resolve().parent.parent

TOUR_SUBSTITUTIONS = [("--preset quick", "--preset smoke"), ("--steps 500", "--steps 200"),
                      ("--steps 1000", "--steps 240"), ("sleep 1;", "sleep 0.05;")]
# Tour lines this test does not run, by how they start, and why.
NOT_RUN = {
    "source .venv/bin/activate": "the test runs the trainlab of the Python running it",
    "trainlab sweep bitnet_lm --preset cpu": "four 1500-step points; tests/test_sweep.py runs sweeps through the CLI",
    "trainlab sweep bitnet_lm --preset original": "GPU points (--device cuda)",
    "trainlab preflight sha256": "a 200-step sha256 run, 25 s on a CPU; its verdict on the same stall is judged by "
                                 "tests/test_preflight_goal.py (a task with parts at chance) and "
                                 "tests/test_sha256_experiment.py (the sha256 smoke model)",
}


def _code_blocks(text: str) -> list[list[str]]:
    return [block.strip().splitlines() for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]


def test_first_block_holds_the_two_commands_and_ci_runs_the_second():
    first = [line for line in _code_blocks((ROOT / "README.md").read_text())[0]
             if line.strip() and not line.lstrip().startswith("#")]
    assert first[0] == ("python3 scripts/bootstrap.py && .venv/bin/trainlab preflight modadd "
                        "&& .venv/bin/trainlab run modadd")
    assert first[1] == "python3 scripts/bootstrap.py --test && .venv/bin/python -m pytest -q -n 2"
    ci = (ROOT / ".ci" / "run").read_text()
    setup, test = first[1].split(" && ")
    assert setup in ci and test in ci
    assert "-eq 5" in ci  # pytest's "no tests collected" is a failure on purpose


def _split_comment(line: str) -> tuple[str, str]:
    """(command, comment) of a shell line: the comment starts at a '#' after a blank, outside quotes."""
    quote = None
    for i, ch in enumerate(line):
        if quote:
            quote = None if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1].isspace()):
            return line[:i].strip(), line[i + 1:].strip()
    return line.strip(), ""


def tour_lines() -> list[tuple[str, str]]:
    """The tour block's commands with their comments, in order; a line ending in '&' joined with
    the next (the shell that started the job is the one whose `$!` kills it)."""
    text = (ROOT / "README.md").read_text()
    tour = text[text.index("## A five-minute tour"):]
    block = _code_blocks(tour)[0]
    lines, pending = [], None
    for raw in block:
        command, comment = _split_comment(raw)
        if not command:
            continue
        if pending:
            command, comment = f"{pending[0]}\n{command}", " ".join(c for c in (pending[1], comment) if c)
            pending = None
        if command.endswith("&"):
            pending = (command, comment)
            continue
        lines.append((shortened(command) if "runs/tour" in command else command, comment))
    assert pending is None, f"the tour ends with a job started in the background: {pending}"
    return lines


def shortened(command: str) -> str:
    for old, new in TOUR_SUBSTITUTIONS:
        command = command.replace(old, new)
    return command


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def _option(args: list[str], name: str) -> str | None:
    return args[args.index(name) + 1] if name in args else None


def _status(run_dir: Path) -> dict:
    return json.loads((run_dir / "status.json").read_text())


def _run_the_killed_job(command: str, cwd: Path) -> None:
    """The background job and its kill, in bash as the README has them; `trainlab` on PATH is this
    Python's CLI."""
    bin_dir = cwd / ".bin"
    bin_dir.mkdir(exist_ok=True)
    shim = bin_dir / "trainlab"
    shim.write_text(f'#!/bin/sh\nexec "{sys.executable}" -m trainlab "$@"\n')
    shim.chmod(0o755)
    env = {**cli_env(), "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}"}
    proc = subprocess.run(["bash", "-c", command], cwd=cwd, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, f"{command}\n{proc.stdout}\n{proc.stderr}"


class Tour:
    """The tour's state as its lines run: which run-directory lines came before."""

    def __init__(self, cwd: Path):
        self.cwd = cwd
        self.killed: Path | None = None  # the run directory of the killed job
        self.resumed: Path | None = None
        self.moved_aside: Path | None = None
        self.state: dict[Path, str] = {}  # run directory -> "killed" | "finished", as the tour left it
        self.steps: dict[Path, int] = {}  # train.steps a run directory was last run with

    def check(self, command: str, comment: str) -> None:
        where = f"README tour line: {command}  # {comment}"
        if any(command.startswith(prefix) for prefix in NOT_RUN):
            return
        if "\n" in command:  # `trainlab run ... &` and the wait-and-kill line
            self.check_kill(command, where)
            return
        args = shlex.split(command)
        assert args[0] == "trainlab", f"not a trainlab command; the test does not know it. {where}"
        before = _files(self.cwd)
        out = trainlab(*args[1:], cwd=self.cwd)
        said = f"{where}\n--- stdout:\n{out.stdout}--- stderr:\n{out.stderr}"
        verb = args[1]
        if verb == "list":
            self.check_list(out, said)
        elif verb == "config":
            assert out.returncode == 0, said
            assert yaml.safe_load(out.stdout)["preset"] == _option(args, "--preset"), said
            assert _files(self.cwd) == before, f"config wrote files; {said}"
        elif verb == "runs":
            self.check_runs(out, said)
        elif verb == "run" and "->" in comment:  # refused: the comment gives the message
            message = comment.split("->", 1)[1].strip().removesuffix("...").strip()
            assert out.returncode == 2 and message in out.stderr, said
            assert _files(self.cwd) == before, f"a refused command wrote files; {said}"
        elif verb == "run":
            self.check_run(args, comment, out, said)
        elif verb == "check":
            run_dir = self.cwd / args[2]
            assert out.returncode in (0, 1), said  # 1: warnings (this run has its step-600 jump)
            for detector in ("divergence", "spike", "plateau", "stuck", "collapse", "grokking", "overfitting"):
                assert detector in out.stdout, f"{detector} not in check's output; {said}"
            if "the spike at step 600 and the overfitting" in comment:  # what the README promises of this run
                verdicts = {c["name"]: c for c in json.loads((run_dir / "check.json").read_text())["claims"]}
                assert verdicts["spike"]["verdict"] == "warn" and verdicts["spike"]["value"].startswith("step 600:"), said
                assert verdicts["overfitting"]["verdict"] == "warn", said
            assert (run_dir / "check.json").is_file(), said
        elif verb == "report":
            run_dir = self.cwd / args[2]
            assert out.returncode == 0, said
            assert (run_dir / "report.md").is_file() and (run_dir / "report.html").is_file(), said
            html = (run_dir / "report.html").read_text()
            assert "data:image" in html or "<svg" in html, f"report.html has no plots of its own; {said}"
        else:
            raise AssertionError(f"a tour command this test does not know; {said}")

    def check_list(self, out, said: str) -> None:
        from trainlab.experiment import registry

        assert out.returncode == 0, said
        lines = out.stdout.splitlines()
        for exp in registry().values():
            assert any(line.startswith(f"{exp.name}: ") for line in lines), said
            for name in exp.presets:
                assert sum(line.strip().startswith(f"{exp.name} --preset {name}") for line in lines) == 1, said

    def check_kill(self, command: str, where: str) -> None:
        job = shlex.split(command.splitlines()[0].removesuffix("&"))
        run_dir = self.cwd / _option(job, "--run-dir")
        _run_the_killed_job(command, self.cwd)
        status = _status(run_dir)
        assert status["state"] == "running", f"the job ended by itself, the kill did not land: {status}; {where}"
        assert list((run_dir / "checkpoints").glob("step_*")), f"killed before its first checkpoint; {where}"
        assert status["step"] < int(_option(job, "--steps")), where
        self.killed = run_dir
        self.state[run_dir] = "killed"
        self.steps[run_dir] = int(_option(job, "--steps"))

    def check_runs(self, out, said: str) -> None:
        assert out.returncode == 0, said
        states = {line.split()[0]: line.split()[1] for line in out.stdout.splitlines()[1:]}
        assert self.killed is not None, f"`trainlab runs` before the kill: the comment names a crashed run; {said}"
        assert states.pop(self.killed.name) == "crashed", said
        assert states and set(states.values()) == {"finished"}, said

    def check_run(self, args: list[str], comment: str, out, said: str) -> None:
        """A run, judged by what its run directory held before it (nothing, a killed run, a finished
        one) against what its comment says about that."""
        target = args[2]
        run_dir = self.cwd / (_option(args, "--run-dir") or f"runs/{target}-{_option(args, '--preset')}")
        steps = int(_option(args, "--steps")) if "--steps" in args else None
        before = self.state.get(run_dir)
        assert out.returncode == 0, said
        if target.endswith("config.yaml"):  # reproduces the run the config came from
            assert before is None and "reproduces" in comment, said
            source = (self.cwd / target).parent
            assert history(run_dir) == history(source), f"the reproduced run's metrics differ; {said}"
        elif "--fresh" in args:
            assert before is not None and "moved aside" in comment, said
            self.check_fresh(run_dir, said)
        elif before == "killed":
            self.check_resume(args, run_dir, comment, out, said)
        elif before == "finished" and steps in (None, self.steps.get(run_dir)):
            assert "already finished" in comment and "exits 0" in comment, said
            assert "already finished" in out.stdout, said
        elif before == "finished":
            assert steps > self.steps[run_dir] and "extends" in comment, said
            assert history(run_dir)[-1]["step"] == steps, said
            named = re.search(r"to step (\d+)", comment)
            assert named and shortened(f"--steps {named.group(1)}") == f"--steps {steps}", said
        else:  # a new run: it finished into the directory its comment names (or --run-dir)
            named = re.search(r"into (\S+?)/?$", comment)
            if named:
                assert named.group(1).rstrip("/") == str(run_dir.relative_to(self.cwd)), said
            saved = yaml.safe_load((run_dir / "config.yaml").read_text())
            for key, value in (s.split("=", 1) for s in args[args.index("run") + 1:] if "=" in s):
                section, name = key.split(".")
                assert saved[section][name] == float(value), f"{key}={value} not in config.yaml; {said}"
        assert _status(run_dir)["state"] == "finished", said
        self.state[run_dir] = "finished"
        if steps:
            self.steps[run_dir] = steps

    def check_resume(self, args: list[str], run_dir: Path, comment: str, out, said: str) -> None:
        quoted = re.search(r'"(resuming \S+ at step) (\d+) \.\.\."', comment)
        assert quoted, f"the comment quotes the resume line; {said}"
        resumes = [e for e in read_events(run_dir / "events.jsonl") if e["kind"] == "resume"]
        assert len(resumes) == 1, said
        # the first checkpoint's step (the README's), or a later one if the kill came late
        every = next(int(a.split("=")[1]) for a in args if a.startswith("ckpt.every="))
        step = resumes[0]["step"]
        assert step % every == 0 and step >= int(quoted.group(2)) == every, said
        assert f"{quoted.group(1)} {step} " in out.stderr, said
        self.resumed = run_dir

    def check_fresh(self, run_dir: Path, said: str) -> None:
        moved = sorted(p for p in run_dir.parent.iterdir() if p.name.startswith(f"{run_dir.name}.old-"))
        assert len(moved) == 1, said
        self.moved_aside = moved[0]
        assert [e["kind"] for e in read_events(run_dir / "events.jsonl")][0] == "start", said
        # the killed-and-resumed run (extended since) against this run that was never stopped
        fresh = history(run_dir)
        assert [r for r in history(moved[0]) if r["step"] <= fresh[-1]["step"]] == fresh, \
            f"the resumed run's curve is not the uninterrupted one; {said}"


def test_the_tour_does_what_its_comments_say(tmp_path: Path):
    # what the README's first command leaves: a finished runs/modadd-quick (the recorded run lacks
    # only its status file)
    main_run = tmp_path / "runs" / "modadd-quick"
    shutil.copytree(ROOT / "tests" / "data" / "modadd_quick", main_run, ignore=shutil.ignore_patterns("check.json"))
    (main_run / "status.json").write_text(json.dumps({"state": "finished", "step": 1500, "total_steps": 1500}))
    tour = Tour(tmp_path)
    lines = tour_lines()
    for command, comment in lines:
        tour.check(command, comment)
    ran = [c for c, _ in lines if not any(c.startswith(p) for p in NOT_RUN)]
    assert tour.killed is not None and tour.resumed == tour.killed and tour.moved_aside is not None, ran
    assert any(c.startswith("trainlab run runs/tour/config.yaml") for c in ran), ran
