"""Property-based fuzzing of config overrides and CLI arguments: whatever a user types, the CLI
ends with exit code 0 or 2, and a 2 comes with exactly one line naming a key or value -- never a
traceback.  In-process (`trainlab.cli.main`) on `trainlab config`, which resolves and validates a
config without writing anything, so hundreds of examples take seconds."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import re
import typing

import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from trainlab import config as config_mod
from trainlab.cli import main
from trainlab.experiment import registry


def _keys() -> list[str]:
    """Every dotted leaf key of every experiment's config."""
    keys = []
    hints = typing.get_type_hints(config_mod.RunConfig)
    for section in config_mod.SHARED_SECTIONS:
        keys += [f"{section}.{f.name}" for f in dataclasses.fields(hints[section])]
    for exp in registry().values():
        keys += [f"model.{f.name}" for f in dataclasses.fields(exp.model_config)]
        keys += [f"data.{f.name}" for f in dataclasses.fields(exp.data_config)]
    return sorted(set(keys))


KEYS = _keys()
VALUES = st.one_of(
    st.integers(-10**12, 10**12).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["true", "false", "nan", "-inf", "1e-3", "[1,2]", "[0.9, 0.95]", "{a: 1}", "{", "]", "",
                     "adamw", "lion", "fp16", "bf16", "cosine", "[{kind: linear, steps: 0}]", "null", "~",
                     "'quoted'", "0x10", "1_000", "--", "=", "a=b"]),
    st.text(max_size=12),
)


def _run(argv: list[str]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv)
    return code, out.getvalue(), err.getvalue()


def _assert_clean(code: int, out: str, err: str) -> None:
    assert code in (0, 2), (code, err)
    assert "Traceback" not in out + err
    if code == 2:
        lines = err.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("trainlab: error: "), err


def _names_the_key(key: str, value: str, err: str) -> bool:
    """Whether the refusal of `--set key=value` names the key the user typed, as the CLI prints it
    (each run of whitespace one space): the key itself or an element of it (`config
    schedule.phases[0].steps: ...`), the first part of it that does not exist (`config optim.lrr:
    unknown key`), or, for a check across keys, the key with its value (`config model.heads: must
    divide model.dim=443`), the key in full in another key's message (`config
    schedule.two_stage_at: 0.5 cannot be combined with explicit schedule.phases`), or its last part
    in its section's message (`config curriculum: values, min_steps and gates must have equal
    lengths`).  A bare `config:` or another key alone is no answer."""
    line = re.sub(r"\s+", " ", err.strip())
    typed = f"{key}={value}".partition("=")[0]  # the CLI splits at the first '='
    if typed.startswith("-") and "argument --set: expected one argument" in line:
        return True  # argparse took `--set -x=1` for an option: it names --set (`-=1` it passes on)
    typed = re.sub(r"\s+", " ", typed.strip())
    if not typed:
        return "--set" in line and "expected key=value" in line
    if any(f"config {typed}{end}" in line for end in (":", ".", "[")) or \
            re.search(rf"(?<![\w.]){re.escape(typed)}=", line):
        return True
    if "." in typed and re.search(rf"(?<![\w.]){re.escape(typed)}(?![\w.\[])", line):
        return True  # a check across keys naming the typed key in full (`... explicit schedule.phases ...`)
    parts = typed.split(".")
    for i in range(1, len(parts)):
        known, missing = ".".join(parts[:i]), parts[i]
        if f"config {known}: is " in line and f"it has no key '{missing}'" in line:
            return True
    for i in range(1, len(parts) + 1):
        if f"config {'.'.join(parts[:i])}: unknown key" in line:
            return True
    section, name = ".".join(parts[:-1]), parts[-1]
    return bool(section) and f"config {section}: " in line and re.search(rf"\b{re.escape(name)}\b", line) is not None


def test_a_refusal_across_keys_names_the_key_typed():
    """Found by the fuzz test below: bitnet_lm's preset sets the two-stage schedule, so explicit
    phases are refused -- the message must name schedule.phases, the key the user typed."""
    code, out, err = _run(["config", "bitnet_lm", "--preset", "smoke",
                           "--set", "schedule.phases=[{kind: linear, steps: 0}]"])
    _assert_clean(code, out, err)
    assert code == 2 and _names_the_key("schedule.phases", "[{kind: linear, steps: 0}]", err), err
    assert not _names_the_key("schedule.phases", "x", "trainlab: error: config schedule.two_stage_at: too big")


def test_a_key_that_looks_like_an_option_is_named():
    """Found by the fuzz test below: argparse passes on `--set '-=a b'` (a space makes it a value,
    not an option), and the refusal names the key `-`; `--set -x=1` it refuses itself, naming --set."""
    for arg, needle in (("-=a b", "config -: unknown key"), ("-x=1", "argument --set: expected one argument")):
        code, out, err = _run(["config", "modadd", "--preset", "smoke", "--set", arg])
        _assert_clean(code, out, err)
        assert code == 2 and needle in err and _names_the_key(*arg.split("=", 1), err), err


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(experiment=st.sampled_from(sorted(registry())), key=st.one_of(st.sampled_from(KEYS), st.text(max_size=15)),
       value=VALUES)
def test_any_override_is_accepted_or_refused_in_one_line(experiment, key, value):
    code, out, err = _run(["config", experiment, "--preset", "smoke", "--set", f"{key}={value}"])
    _assert_clean(code, out, err)
    if code == 0:  # what was accepted is a valid config that survives its own round trip
        data = yaml.safe_load(out)
        exp = registry()[experiment]
        assert config_mod.build(exp, data) == config_mod.build(exp, yaml.safe_load(config_mod.dump_yaml(
            config_mod.build(exp, data))))
    else:
        assert _names_the_key(key, value, err), (key, err)


@settings(max_examples=150, deadline=None)
@given(argv=st.lists(st.one_of(st.sampled_from(["config", "list", "runs", "report", "check", "--preset", "--set",
                                                "--steps", "modadd", "sha256", "smoke", "quick", "-x", "--help="]),
                               st.text(max_size=10)), max_size=6))
def test_random_argument_lists_never_crash(argv, tmp_path_factory):
    # argparse's own --help prints and exits 0 via SystemExit; anything else must be 0 or 2 in one line
    cwd = tmp_path_factory.mktemp("cwd")
    with contextlib.chdir(cwd):
        try:
            code, out, err = _run(argv)
        except SystemExit as exc:  # only --help/-h may exit through argparse
            assert exc.code == 0 and any(a in ("-h", "--help") for a in argv)
            return
    _assert_clean(code, out, err)
    assert not any(cwd.iterdir()) or argv[:1] == ["list"], "a refused or read-only command wrote files"


@settings(max_examples=100, deadline=None)
@given(doc=st.recursive(st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), st.text(max_size=8)),
                        lambda children: st.one_of(st.lists(children, max_size=3),
                                                   st.dictionaries(st.text(max_size=10), children, max_size=3)),
                        max_leaves=12))
def test_random_yaml_config_files_are_refused_cleanly(doc, tmp_path_factory):
    path = tmp_path_factory.mktemp("yaml") / "c.yaml"
    data = {"experiment": "modadd", "preset": "smoke", **(doc if isinstance(doc, dict) else {"train": doc})}
    path.write_text(yaml.safe_dump(data), encoding="utf-8")
    _assert_clean(*_run(["config", str(path)]))
