"""An experiment of the user's own, without forking trainlab: a file or module reference
(`trainlab run path/to/file.py:NAME`, `package.module:NAME`) and installed packages registering
under the `trainlab.experiments` entry-point group (docs/adding-an-experiment.md)."""

from __future__ import annotations

import json
import math
import os
import re
import sys
from pathlib import Path

import pytest
import yaml

from conftest import history, trainlab

REPO = Path(__file__).resolve().parent.parent
EXAMPLE = REPO / "examples" / "argmax.py"
DOC = REPO / "docs" / "adding-an-experiment.md"


def _one_line_error(proc, *parts: str) -> None:
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    for part in parts:
        assert part in lines[0], lines[0]


def test_the_worked_example_runs_checks_reports_and_preflights_by_its_file_reference(tmp_path: Path):
    here = tmp_path / "project"
    here.mkdir()
    ref = f"{os.path.relpath(EXAMPLE, here)}:EXPERIMENT"  # relative to where the user stands
    run = trainlab("run", ref, "--preset", "smoke", cwd=here)
    assert run.returncode == 0, run.stderr
    run_dir = here / "runs" / "argmax-smoke"  # named by the experiment, not by the reference
    saved = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert saved["experiment"] == "argmax" and saved["experiment_ref"] == f"{EXAMPLE}:EXPERIMENT"
    rows = history(run_dir)
    assert rows[-1]["step"] == 300
    assert rows[-1]["loss"] < 0.25 * math.log(8) and rows[-1]["val_acc"] > 0.9  # it learns, visibly

    # from another directory, by the run directory alone: config.yaml leads back to the file
    elsewhere = tmp_path / "elsewhere" / "deeper"  # where a path relative to `here` leads nowhere
    elsewhere.mkdir(parents=True)
    check = trainlab("check", str(run_dir), cwd=elsewhere)
    assert check.returncode == 0, check.stderr
    assert json.loads((run_dir / "check.json").read_text())["claims"]
    report = trainlab("report", str(run_dir), cwd=elsewhere)
    assert report.returncode == 0, report.stderr
    assert "from `argmax.baseline_loss` on config.yaml" in (run_dir / "report.md").read_text()
    again = trainlab("config", str(run_dir / "config.yaml"), cwd=elsewhere)  # what a rerun from it would run
    assert again.returncode == 0 and yaml.safe_load(again.stdout) == saved, again.stderr
    # the same reference again: the finished run is recognised, not refused as another experiment's
    done = trainlab("run", ref, "--preset", "smoke", cwd=here)
    assert done.returncode == 0 and "already finished at step 300" in done.stdout, done.stderr

    pre = trainlab("preflight", ref, "--preset", "smoke", "--steps", "100", cwd=here)
    assert pre.returncode == 0, pre.stdout + pre.stderr
    verdict = pre.stdout.strip().splitlines()[-1]
    assert verdict.startswith("trainlab: preflight READY") and "val_acc >= 0.9" in verdict  # its own goal


def test_the_doc_shows_the_example_file_verbatim():
    text = DOC.read_text(encoding="utf-8")
    match = re.search(r"<!-- examples/argmax\.py, verbatim[^>]*-->\n```python\n(.*?)```", text, re.S)
    assert match, "docs/adding-an-experiment.md lost the worked example"
    assert match[1] == EXAMPLE.read_text(encoding="utf-8")


def test_a_module_reference_to_a_class_is_instantiated_and_recorded_as_given(tmp_path: Path):
    package = tmp_path / "own_exp_pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "task.py").write_text(EXAMPLE.read_text())
    # the working directory is searched, as `python -m` does: no PYTHONPATH needed
    proc = trainlab("config", "own_exp_pkg.task:Argmax", "--preset", "smoke", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    cfg = yaml.safe_load(proc.stdout)
    assert cfg["experiment"] == "argmax" and cfg["experiment_ref"] == "own_exp_pkg.task:Argmax"


def test_built_in_configs_carry_no_reference_and_it_cannot_be_set(tmp_path: Path):
    proc = trainlab("config", "modadd", "--preset", "smoke", cwd=tmp_path)
    assert proc.returncode == 0 and "experiment_ref" not in proc.stdout  # their config.yaml as before
    # a built-in reached through its module is the built-in
    via = trainlab("config", "trainlab.experiments.modadd:EXPERIMENT", "--preset", "smoke", cwd=tmp_path)
    assert via.stdout == proc.stdout, via.stderr
    _one_line_error(trainlab("run", "modadd", "--set", "experiment_ref=x.py:E", cwd=tmp_path),
                    "experiment_ref", "cannot be changed with --set")


def test_another_file_is_another_experiment_on_resume_and_a_moved_one_is_named(tmp_path: Path, monkeypatch):
    import trainlab.experiment as experiment_mod

    for name in ("a.py", "b.py"):
        (tmp_path / name).write_text(EXAMPLE.read_text())
    (tmp_path / "x").mkdir()
    saved = trainlab("config", "a.py", "--preset", "smoke", cwd=tmp_path)  # a bare file: its EXPERIMENT
    (tmp_path / "x" / "config.yaml").write_text(saved.stdout)
    (tmp_path / "x" / "metrics.csv").write_text("step,loss\n10,2.0\n")
    # same name, same sections, other code: not resumed as if it were the same run
    _one_line_error(trainlab("run", "b.py:EXPERIMENT", "--preset", "smoke", "--run-dir", "x", cwd=tmp_path),
                    "another model", "experiment_ref", "b.py:EXPERIMENT")
    (tmp_path / "a.py").unlink()
    monkeypatch.setattr(experiment_mod, "_LOADED", {})  # as a new process, which has not imported it yet
    _one_line_error(trainlab("check", "x", cwd=tmp_path), "run directory x: config.yaml: experiment reference",
                    "a.py:EXPERIMENT: no file a.py", "correct experiment_ref")


BAD = {  # file name -> (its text, reference suffix, what the one line must say)
    "syntax": ("x = (\n", ":EXPERIMENT", ("SyntaxError", "syntax.py:1")),
    "imports": ("import os\nimport not_a_module_anywhere\n", ":EXPERIMENT",
                ("ModuleNotFoundError", "not_a_module_anywhere", "imports.py:2")),
    # raised inside the standard library: the place named is still the user's own line
    "deep": ("import json\n\njson.loads('{')\n", ":EXPERIMENT", ("JSONDecodeError", "deep.py:3")),
    "noattr": ("from trainlab.experiment import Experiment\n", ":EXPERIMNT", ("no attribute 'EXPERIMNT'",)),
    "wrongtype": ("EXPERIMENT = 3\n", ":EXPERIMENT", ("an object of type int, not an Experiment",)),
    "abstract": ("from trainlab.experiment import Experiment\nclass Half(Experiment):\n    name = 'half'\n",
                 ":Half", ("cannot instantiate Half", "abstract")),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_a_reference_that_does_not_give_an_experiment_is_one_line_and_writes_nothing(tmp_path: Path, case: str):
    text, suffix, says = BAD[case]
    (tmp_path / f"{case}.py").write_text(text)
    for _ in range(2):  # and again: a failed import leaves nothing half-loaded behind in this process
        proc = trainlab("run", f"{case}.py{suffix}", cwd=tmp_path)
        _one_line_error(proc, f"experiment reference {case}.py{suffix}", *says)
    assert not (tmp_path / "runs").exists()


def test_a_missing_file_or_module_is_one_line(tmp_path: Path):
    _one_line_error(trainlab("run", "nowhere/exp.py:EXPERIMENT", cwd=tmp_path), "no file nowhere/exp.py")
    _one_line_error(trainlab("config", "no_such_pkg_zz.exp:EXPERIMENT", cwd=tmp_path),
                    "no module named 'no_such_pkg_zz'")


def _plugin(root: Path, dist: str, module: str, source: str, points: dict[str, str]) -> None:
    """A package "installed" as pip would leave it: the module and a dist-info with its entry points."""
    (root / f"{module}.py").write_text(source)
    info = root / f"{dist}-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    lines = "".join(f"{name} = {value}\n" for name, value in points.items())
    (info / "entry_points.txt").write_text(f"[trainlab.experiments]\n{lines}")


@pytest.fixture
def plugins(tmp_path: Path, monkeypatch) -> Path:
    """A good plugin (argmax renamed own_argmax), an entry point that claims modadd, one whose name
    is not its experiment's, and a broken one."""
    import trainlab.experiment as experiment_mod

    root = tmp_path / "site"
    root.mkdir()
    source = EXAMPLE.read_text().replace('name = "argmax"', 'name = "own_argmax"')
    _plugin(root, "own_argmax_dist", "own_argmax_plugin", source,
            {"own_argmax": "own_argmax_plugin:EXPERIMENT", "modadd": "own_argmax_plugin:Argmax",
             "misnamed": "own_argmax_plugin:EXPERIMENT"})
    _plugin(root, "broken_dist", "broken_plugin_mod", "import json\njson.loads('{')\n",
            {"broken_one": "broken_plugin_mod:EXPERIMENT"})
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.setattr(experiment_mod, "_LOADED", {})
    for name in ("own_argmax_plugin", "broken_plugin_mod"):
        monkeypatch.delitem(sys.modules, name, raising=False)
    return root


def test_trainlab_list_shows_installed_experiments_and_one_line_per_unusable_one(plugins: Path, tmp_path: Path):
    # a process of its own: found through PYTHONPATH, as a real installation is found
    path = os.pathsep.join(p for p in (str(plugins), os.environ.get("PYTHONPATH")) if p)
    proc = trainlab("list", cwd=tmp_path, env={"PYTHONPATH": path})
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert "own_argmax: which of 8 Gaussian numbers" in proc.stdout
    assert "(from package own_argmax_dist 0.1)" in proc.stdout
    assert any(line.startswith("  own_argmax --preset smoke (default): ") for line in lines)
    broken = [line for line in lines if line.startswith("broken_one")]
    assert len(broken) == 1 and "cannot be used" in broken[0] and "JSONDecodeError" in broken[0], lines
    clash = [line for line in lines if line.startswith("modadd (")]
    assert len(clash) == 1 and "the built-in modadd wins" in clash[0], lines
    misnamed = [line for line in lines if line.startswith("misnamed")]
    assert len(misnamed) == 1 and "the experiment 'own_argmax'; the two must agree" in misnamed[0], lines
    assert lines[0].startswith("modadd: learn (a + b) mod p")


def test_an_installed_experiment_runs_by_name_and_a_broken_one_breaks_only_itself(plugins: Path, tmp_path: Path):
    # the built-ins neither import the installed ones nor suffer from a broken one
    builtin = trainlab("config", "modadd", "--preset", "smoke", cwd=tmp_path)
    assert builtin.returncode == 0 and "model: {dim: 32" in builtin.stdout, builtin.stderr
    assert "own_argmax_plugin" not in sys.modules and "broken_plugin_mod" not in sys.modules

    _one_line_error(trainlab("run", "broken_one", cwd=tmp_path),
                    "installed experiment broken_one (broken_plugin_mod:EXPERIMENT in package broken_dist 0.1)",
                    "JSONDecodeError", "broken_plugin_mod.py:2")
    assert "own_argmax_plugin" not in sys.modules  # naming one imports only that one

    run = trainlab("run", "own_argmax", "--steps", "20", cwd=tmp_path)
    assert run.returncode == 0, run.stderr
    saved = yaml.safe_load((tmp_path / "runs" / "own_argmax-smoke" / "config.yaml").read_text())
    assert saved["experiment"] == "own_argmax" and "experiment_ref" not in saved  # found again by its name
    check = trainlab("check", "runs/own_argmax-smoke", cwd=tmp_path)
    assert check.returncode == 0, check.stderr


def test_a_sweep_of_a_file_experiment_hands_its_points_the_absolute_reference(tmp_path: Path, monkeypatch):
    """Each point is `python -m trainlab run TARGET` in a process of its own, maybe elsewhere (Ray): the
    target it gets names the file absolutely (running a reference is the first test's business)."""
    from trainlab.cli import build_parser
    from trainlab.sweep.cli import build_spec
    from trainlab.sweep.runner import point_command

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "exp.py").write_text(EXAMPLE.read_text())
    monkeypatch.chdir(tmp_path)
    spec = build_spec(build_parser().parse_args(["sweep", "mine/exp.py:EXPERIMENT", "--grid", "model.hidden=8,16"]))
    absolute = f"{(tmp_path / 'mine' / 'exp.py').resolve()}:EXPERIMENT"
    assert spec.target == absolute
    assert absolute in point_command(spec, spec.points()[0], tmp_path / "sw" / "hidden-8")
