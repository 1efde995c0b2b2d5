"""README.md's commands are part of the contract: its first code block starts with the set-up-and-run
command and the set-up-and-test command, .ci/run runs that same test command, and the tour's
quick commands do what the README says."""

from __future__ import annotations

import re
from pathlib import Path

from conftest import trainlab

ROOT = Path(__file__).resolve().parent.parent


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


def test_tour_commands(tmp_path: Path):
    out = trainlab("list", cwd=tmp_path)
    assert out.returncode == 0 and "modadd --preset smoke" in out.stdout
    out = trainlab("run", "modadd", "--preset", "smoke", cwd=tmp_path)
    assert out.returncode == 0 and (tmp_path / "runs" / "modadd-smoke" / "metrics.csv").exists()
    out = trainlab("run", "modadd", "--set", "optim.lrr=1", cwd=tmp_path)
    assert out.returncode == 2
    assert "config optim.lrr: unknown key; did you mean 'lr'?" in out.stderr
    out = trainlab("runs", cwd=tmp_path)
    assert "modadd-smoke" in out.stdout and "finished" in out.stdout
