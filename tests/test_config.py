"""Unit tests of trainlab.config, in-process: resolution order, conversions and refusals, unknown
keys, the YAML round trip, and docs/config.md kept equal to the generated reference."""

from __future__ import annotations

import dataclasses
import typing
from pathlib import Path

import pytest
import yaml

from trainlab import config as C
from trainlab.config import (LRPhase, OptimConfig, RunConfig, ScheduleConfig, TrainConfig, build, coerce,
                             dump_yaml, from_dict, load_yaml_file, parse_set, render_reference, resolve)
from trainlab.errors import ConfigError, UsageError
from trainlab.experiment import registry

REPO = Path(__file__).resolve().parents[1]
DOC = REPO / "docs" / "config.md"
DOC_COMMAND = "cd <repo> && .venv/bin/python -m trainlab.config > docs/config.md"


@pytest.fixture(scope="module")
def exp():
    return registry()["modadd"]


SECTION = {typing.get_type_hints(RunConfig)[s]: s for s in C.SHARED_SECTIONS}


def hint(cls: type, name: str) -> tuple[typing.Any, dict]:
    """The declared type and metadata (bounds) of a real config field."""
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return typing.get_type_hints(cls)[name], dict(f.metadata)


# --------------------------------------------------------------------------------------------
# Resolution order: defaults < preset < YAML data < --set < --steps
# --------------------------------------------------------------------------------------------

def test_resolve_order_on_concrete_keys(exp):
    defaults = RunConfig()
    preset = exp.presets["smoke"].overrides
    # Keys the smoke preset leaves alone come from the dataclass defaults; the others from the preset.
    assert "plain_interval_s" not in preset["log"] and "accum" not in preset["train"]
    cfg = resolve(exp, "smoke")
    assert cfg.log.plain_interval_s == defaults.log.plain_interval_s == 10.0
    assert cfg.train.accum == defaults.train.accum == 1
    assert (cfg.train.steps, defaults.train.steps) == (40, 1000)
    assert (cfg.optim.lr, defaults.optim.lr) == (3e-3, 1e-3)
    assert cfg.model.dim == 32 and cfg.data.modulus == 23
    assert cfg.experiment == "modadd" and cfg.preset == "smoke"

    # A YAML file beats the preset, key by key: sections merge, untouched keys keep the preset.
    file_data = {"experiment": "modadd", "preset": "quick",  # these two are load_target's business
                 "train": {"steps": 7, "micro_batch": 8}, "optim": {"lr": 0.01}, "model": {"layers": 2}}
    cfg = resolve(exp, "smoke", file_data)
    assert (cfg.train.steps, cfg.train.micro_batch, cfg.optim.lr) == (7, 8, 0.01)
    assert cfg.optim.weight_decay == 0.1 and cfg.optim.betas == (0.9, 0.98)  # still the preset's
    assert (cfg.model.layers, cfg.model.dim) == (2, 32)
    assert cfg.preset == "smoke"

    # --set beats the YAML file; a later --set beats an earlier one.
    sets = [("train.micro_batch", "16"), ("train.steps", "9"), ("optim.lr", "1"), ("optim.lr", "2e-2")]
    cfg = resolve(exp, "smoke", file_data, sets)
    assert (cfg.train.steps, cfg.train.micro_batch, cfg.optim.lr) == (9, 16, 0.02)
    assert cfg.model.layers == 2  # from the file, --set did not touch it

    # --steps beats --set train.steps.
    cfg = resolve(exp, "smoke", file_data, sets, steps=11)
    assert (cfg.train.steps, cfg.train.micro_batch) == (11, 16)


def test_resolve_refuses_unknown_preset_listing_the_allowed(exp):
    with pytest.raises(UsageError, match=r"unknown preset 'tiny'.*allowed: smoke, quick, grok"):
        resolve(exp, "tiny")


def test_resolve_refuses_experiment_and_preset_in_set(exp):
    for key in ("experiment", "preset"):
        with pytest.raises(ConfigError, match="cannot be changed with --set") as info:
            resolve(exp, "smoke", None, [(key, "x")])
        assert info.value.key == key


def test_resolve_steps_is_still_validated(exp):
    with pytest.raises(ConfigError, match=r"must be >= 1, got 0") as info:
        resolve(exp, "smoke", steps=0)
    assert info.value.key == "train.steps"


def test_yaml_file_exponent_string_becomes_float(exp):
    """PyYAML (YAML 1.1) loads `1e-3` as a string and `1e4` too; the config types fix both."""
    data = yaml.safe_load("optim: {lr: 1e-3}\ntrain: {steps: 1e4}\n")
    assert data == {"optim": {"lr": "1e-3"}, "train": {"steps": "1e4"}}
    cfg = resolve(exp, "smoke", data)
    assert type(cfg.optim.lr) is float and cfg.optim.lr == 0.001
    assert type(cfg.train.steps) is int and cfg.train.steps == 10000


# --------------------------------------------------------------------------------------------
# coerce(): conversions
# --------------------------------------------------------------------------------------------

PHASES_TEXT = "[{kind: linear, steps: 100, start: 0, end: 1}, {kind: cosine, steps: 0, start: 1, end: 0.1}]"


@pytest.mark.parametrize("value, cls, name, expected", [
    ("1e4", TrainConfig, "steps", 10000),
    (" 12 ", TrainConfig, "steps", 12),
    ("2.0", TrainConfig, "micro_batch", 2),
    (1e4, TrainConfig, "steps", 10000),
    ("3e-4", OptimConfig, "lr", 3e-4),
    ("0.5", OptimConfig, "lr", 0.5),
    (2, OptimConfig, "lr", 2.0),
    ("0", TrainConfig, "clip", 0.0),
    ("bf16", TrainConfig, "precision", "bf16"),
    ("[0.9, 0.95]", OptimConfig, "betas", (0.9, 0.95)),
    ([0, 0.5], OptimConfig, "betas", (0.0, 0.5)),
    (PHASES_TEXT, ScheduleConfig, "phases",
     [LRPhase("linear", 100, 0.0, 1.0), LRPhase("cosine", 0, 1.0, 0.1)]),
    ("{l2: [[0, 0], [0.5, 1]]}", ScheduleConfig, "loss_weights", {"l2": [(0.0, 0.0), (0.5, 1.0)]}),
    ("[8, 16, 32]", C.CurriculumConfig, "values", [8.0, 16.0, 32.0]),
    ("[]", C.CurriculumConfig, "gates", []),
    ("val_loss", C.CkptConfig, "best_metric", "val_loss"),
], ids=lambda v: None if not isinstance(v, str) else v[:20])
def test_coerce_converts(value, cls, name, expected):
    tp, meta = hint(cls, name)
    got = coerce(value, tp, name, meta)
    assert got == expected
    assert type(got) is type(expected)
    if isinstance(got, (list, tuple)):
        assert [type(x) for x in got] == [type(x) for x in expected]
    if isinstance(got, dict):
        assert all(type(p) is tuple and all(type(x) is float for x in p) for pts in got.values() for p in pts)


@pytest.mark.parametrize("text", ["true", "True", "YES", "on", "1", " true "])
def test_coerce_bool_true(text):
    assert coerce(text, bool, "train.deterministic") is True


@pytest.mark.parametrize("text", ["false", "False", "no", "OFF", "0"])
def test_coerce_bool_false(text):
    assert coerce(text, bool, "train.deterministic") is False


def test_coerce_bool_passes_real_bools():
    assert coerce(True, bool, "k") is True and coerce(False, bool, "k") is False


# --------------------------------------------------------------------------------------------
# coerce(): refusals, each a ConfigError naming the dotted key
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("value, cls, name, key, message", [
    ("abc", TrainConfig, "steps", "train.steps", "expected an integer, got 'abc'"),
    ("1.5", TrainConfig, "steps", "train.steps", "expected an integer"),
    ("", TrainConfig, "steps", "train.steps", "expected an integer"),
    (True, TrainConfig, "steps", "train.steps", "expected an integer"),
    ("1e400", TrainConfig, "steps", "train.steps", "expected an integer"),
    ("0", TrainConfig, "steps", "train.steps", "must be >= 1, got 0"),
    ("-1", TrainConfig, "seed", "train.seed", "must be >= 0, got -1"),
    ("abc", OptimConfig, "lr", "optim.lr", "expected a number, got 'abc'"),
    ("[1,2]", TrainConfig, "clip", "train.clip", "expected a number"),
    (True, OptimConfig, "lr", "optim.lr", "expected a number"),
    ("nan", TrainConfig, "clip", "train.clip", "must be a finite number"),
    ("inf", OptimConfig, "lr", "optim.lr", "must be a finite number"),
    ("0", OptimConfig, "lr", "optim.lr", "must be > 0, got 0.0"),
    ("-3e-4", OptimConfig, "lr", "optim.lr", "must be > 0"),
    ("1.5", ScheduleConfig, "min_lr_ratio", "schedule.min_lr_ratio", "must be <= 1, got 1.5"),
    ("maybe", TrainConfig, "deterministic", "train.deterministic", "expected true or false, got 'maybe'"),
    (1, TrainConfig, "deterministic", "train.deterministic", "expected true or false"),
    (5, C.CkptConfig, "best_metric", "ckpt.best_metric", "expected a string"),
    ("fp8", TrainConfig, "precision", "train.precision", "must be one of auto, fp32, bf16, fp16; got 'fp8'"),
    ("sgd", OptimConfig, "name", "optim.name", "must be one of adamw, lion"),
    ("[0.9]", OptimConfig, "betas", "optim.betas", "expected a list of 2 numbers"),
    ("0.9", OptimConfig, "betas", "optim.betas", "expected a list of 2 numbers"),
    ("[0.9, 1.0]", OptimConfig, "betas", "optim.betas[1]", "must be < 1, got 1.0"),
    ("[1, 2", C.CurriculumConfig, "values", "curriculum.values", "cannot parse"),
    ("5", C.CurriculumConfig, "values", "curriculum.values", "expected a list of numbers"),
    ("[0.5, 1.5]", C.CurriculumConfig, "gates", "curriculum.gates[1]", "must be <= 1, got 1.5"),
    ("[0, -1]", C.CurriculumConfig, "min_steps", "curriculum.min_steps[1]", "must be >= 0"),
    ("[{kind: linear, stepz: 3}]", ScheduleConfig, "phases", "schedule.phases[0].stepz", "did you mean 'steps'"),
    ("[{kind: exp}]", ScheduleConfig, "phases", "schedule.phases[0].kind", "must be one of linear, cosine, constant"),
    ("[5]", ScheduleConfig, "phases", "schedule.phases[0]", "expected a mapping"),
    ("{'': [[0, 0]]}", ScheduleConfig, "loss_weights", "schedule.loss_weights", "keys must be non-empty strings"),
    ("{l2: [[0]]}", ScheduleConfig, "loss_weights", "schedule.loss_weights.l2[0]", "expected a list of 2 numbers"),
])
def test_coerce_refuses(value, cls, name, key, message):
    tp, meta = hint(cls, name)
    with pytest.raises(ConfigError) as info:
        coerce(value, tp, f"{SECTION[cls]}.{name}", meta)
    assert info.value.key == key
    assert message in str(info.value)
    assert str(info.value).startswith(f"config {key}: ")
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("sets, key, message", [
    ([("schedule.phases", "[{kind: constant, steps: 0}, {kind: linear, steps: 5}]")],
     "schedule.phases[0].steps", "last phase only"),
    ([("schedule.loss_weights", "{l2: [[0.5, 1], [0.1, 2]]}")], "schedule.loss_weights.l2", "increasing order"),
    ([("schedule.loss_weights", "{l2: [[0, 1], [2, 2]]}")], "schedule.loss_weights.l2", "in [0, 1]"),
    ([("curriculum.values", "[1, 2]"), ("curriculum.min_steps", "[0]"), ("curriculum.gates", "[0.5]")],
     "curriculum", "values has 2, min_steps has 1, gates has 1"),
    ([("curriculum.values", "[1]"), ("curriculum.min_steps", "[0]"), ("curriculum.gates", "[0.5]"),
      ("curriculum.start_phase", "1")], "curriculum.start_phase", "must be < 1"),
    ([("curriculum.values", "[1]"), ("curriculum.min_steps", "[0]"), ("curriculum.gates", "[0.5]"),
      ("curriculum.metric", "val_acc")], "curriculum.metric", "must be a training metric of modadd: acc"),
    ([("optim.momentum_dtype", "bf16")], "optim.momentum_dtype", "optim.name=lion"),
    ([("model.heads", "3")], "model.heads", "must divide model.dim=32"),
])
def test_cross_field_rules(exp, sets, key, message):
    """Rules across fields run after typing.  Phases go through the YAML-data path: see
    test_set_schedule_phases_is_accepted for `--set schedule.phases`."""
    file_data: dict = {}
    for k, raw in sets:
        tp, meta = C._field_type({"model": exp.model_config, "data": exp.data_config}, k)
        C.set_path(file_data, k, C.to_dict(coerce(raw, tp, k, meta)))
    with pytest.raises(ConfigError) as info:
        resolve(exp, "smoke", file_data)
    assert info.value.key == key
    assert message in str(info.value)


def test_lion_accepts_bf16_momentum(exp):
    cfg = resolve(exp, "smoke", None, [("optim.name", "lion"), ("optim.momentum_dtype", "bf16")])
    assert (cfg.optim.name, cfg.optim.momentum_dtype) == ("lion", "bf16")


# --------------------------------------------------------------------------------------------
# Unknown keys
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("sets, key, hint_text", [
    ([("optim.lrr", "1")], "optim.lrr", "did you mean 'lr'?"),
    ([("optimm.lr", "1")], "optimm", "did you mean 'optim'?"),
    ([("model.dimm", "64")], "model.dimm", "did you mean 'dim'?"),
    ([("data.modulos", "7")], "data.modulos", "did you mean 'modulus'?"),
])
def test_unknown_key_in_set_suggests_the_close_name(exp, sets, key, hint_text):
    with pytest.raises(ConfigError) as info:
        resolve(exp, "smoke", None, sets)
    assert info.value.key == key
    assert hint_text in str(info.value) and "allowed: " in str(info.value)


@pytest.mark.parametrize("file_data, key, hint_text", [
    ({"trian": {"steps": 3}}, "trian", "did you mean 'train'?"),
    ({"train": {"stpes": 3}}, "train.stpes", "did you mean 'steps'?"),
    ({"model": {"hedas": 2}}, "model.hedas", "did you mean 'heads'?"),
    ({"schedule": {"phases": [{"knd": "linear"}]}}, "schedule.phases[0].knd", "did you mean 'kind'?"),
])
def test_unknown_key_in_yaml_data_suggests_the_close_name(exp, file_data, key, hint_text):
    with pytest.raises(ConfigError) as info:
        resolve(exp, "smoke", file_data)
    assert info.value.key == key
    assert hint_text in str(info.value)


def test_unknown_key_without_a_close_name_lists_what_is_allowed():
    with pytest.raises(ConfigError) as info:
        from_dict(TrainConfig, {"zzzzzz": 1}, "train")
    message = str(info.value)
    assert info.value.key == "train.zzzzzz"
    assert "did you mean" not in message
    assert "allowed: " + ", ".join(f.name for f in dataclasses.fields(TrainConfig)) in message


def test_set_below_a_scalar_names_the_scalar(exp):
    with pytest.raises(ConfigError, match=r"is an integer, it has no key 'x'") as info:
        resolve(exp, "smoke", None, [("train.steps.x", "1")])
    assert info.value.key == "train.steps"


# --------------------------------------------------------------------------------------------
# Files and --set parsing
# --------------------------------------------------------------------------------------------

def test_parse_set():
    assert parse_set(["optim.lr=3e-4", " train.steps =a=b", "x="]) == [
        ("optim.lr", "3e-4"), ("train.steps", "a=b"), ("x", "")]
    for bad in ("optim.lr", "=3", " =3"):
        with pytest.raises(UsageError, match="expected key=value"):
            parse_set([bad])


@pytest.mark.parametrize("text, message", [
    (None, "not found"),
    ("train: {steps: 3\n", "malformed YAML"),
    ("- a\n- b\n", "expected a mapping of sections at the top, got list"),
    ("just a string\n", "got str"),
])
def test_load_yaml_file_refusals(tmp_path, text, message):
    path = tmp_path / "c.yaml"
    if text is not None:
        path.write_text(text, encoding="utf-8")
    with pytest.raises(UsageError) as info:
        load_yaml_file(str(path))
    assert message in str(info.value) and str(path) in str(info.value)


def test_load_yaml_file_directory_and_empty(tmp_path):
    with pytest.raises(UsageError, match="is a directory"):
        load_yaml_file(str(tmp_path))
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    assert load_yaml_file(str(tmp_path / "empty.yaml")) == {}


# --------------------------------------------------------------------------------------------
# YAML round trip
# --------------------------------------------------------------------------------------------

def _rich_file_data() -> dict:
    return {
        "train": {"steps": 123, "clip": 0.0, "precision": "fp32", "deterministic": False},
        "optim": {"name": "lion", "lr": 3e-4, "betas": [0.9, 0.95], "eps": 1e-12, "momentum_dtype": "bf16"},
        "schedule": {"phases": [{"kind": "linear", "steps": 10, "start": 0, "end": 1},
                                {"kind": "cosine", "steps": 0, "start": 1, "end": 0.05}],
                     "loss_weights": {"l2": [[0, 0], [0.25, 0.5], [1, 2.0]]}},
        "curriculum": {"name": "rounds", "values": [8, 16], "min_steps": [5, 0], "gates": [0.9, 1.0]},
        "ckpt": {"best_metric": "val_acc", "best_mode": "max"},
        "memory": {"host_ceiling_gb": 1.5, "host_measure": "system"},
        "model": {"dim": 48, "heads": 3, "dropout": 0.1},
        "data": {"modulus": 31, "train_fraction": 0.25},
    }


@pytest.mark.parametrize("preset, file_data", [
    ("smoke", None), ("quick", None), ("grok", None), ("smoke", _rich_file_data())],
    ids=["smoke", "quick", "grok", "non-defaults"])
def test_dump_yaml_round_trip(exp, preset, file_data):
    cfg = resolve(exp, preset, file_data)
    text = dump_yaml(cfg)
    again = build(exp, yaml.safe_load(text))
    assert again == cfg
    assert dump_yaml(again) == text
    if file_data:  # make sure the non-default values really went through
        assert again.optim.betas == (0.9, 0.95) and again.optim.eps == 1e-12
        assert again.schedule.phases[1] == LRPhase("cosine", 0, 1.0, 0.05)
        assert again.schedule.loss_weights == {"l2": [(0.0, 0.0), (0.25, 0.5), (1.0, 2.0)]}
        assert (again.model.dim, again.data.modulus, again.curriculum.name) == (48, 31, "rounds")


# --------------------------------------------------------------------------------------------
# Regressions: --set of structured values, non-mapping sections, best_metric names
# --------------------------------------------------------------------------------------------

def test_set_schedule_phases_is_accepted(exp):
    cfg = resolve(exp, "smoke", None, [("schedule.phases", PHASES_TEXT)])
    assert cfg.schedule.phases == [LRPhase("linear", 100, 0.0, 1.0), LRPhase("cosine", 0, 1.0, 0.1)]


@pytest.mark.parametrize("file_data", [{"model": 5}, {"data": ["x"]}, {"model": None}],
                         ids=["model-int", "data-list", "model-null"])
def test_non_mapping_experiment_section_is_a_config_error(exp, file_data):
    with pytest.raises(ConfigError, match="expected a mapping"):
        resolve(exp, "smoke", file_data)


def test_set_whole_section_and_best_metric_check(exp):
    cfg = resolve(exp, "smoke", None, [("model", "{dim: 64, heads: 4}"), ("train", "{steps: 5}")])
    assert (cfg.model.dim, cfg.model.heads, cfg.train.steps) == (64, 4, 5)
    assert cfg.model.layers == 1  # a section given whole merges over the preset's keys
    with pytest.raises(ConfigError, match="ckpt.best_metric: must be a logged metric"):
        resolve(exp, "smoke", None, [("ckpt.best_metric", "val_ac")])


# --------------------------------------------------------------------------------------------
# docs/config.md is the generated reference
# --------------------------------------------------------------------------------------------

def test_docs_config_md_is_current():
    expected = render_reference(registry())
    assert DOC.is_file(), f"{DOC} is missing; generate it with: {DOC_COMMAND}"
    actual = DOC.read_text(encoding="utf-8")
    assert actual == expected, f"{DOC} is stale; regenerate it with: {DOC_COMMAND}"


def test_reference_covers_every_field(exp):
    text = render_reference(registry())
    for section in C.SHARED_SECTIONS:
        cls = typing.get_type_hints(RunConfig)[section]
        for f in dataclasses.fields(cls):
            assert f"| `{section}.{f.name}` |" in text
    for prefix, cls in (("model", exp.model_config), ("data", exp.data_config)):
        for f in dataclasses.fields(cls):
            assert f"| `{prefix}.{f.name}` |" in text
    for name in exp.presets:
        assert f"- `{name}`: " in text
