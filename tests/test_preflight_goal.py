"""`trainlab preflight` judges the run's goal, not only its loss (health/goals.py).

The SHA-256 round study's quick preset learns six of its eight state words and stalls below its
curriculum gate while its loss falls; preflight used to call it READY.  Cheapest first:
- the statistics the judgement rests on (stats.plateau, stats.project_path), on built series;
- the judgement of one goal and of the parts, on built metric rows;
- run_preflight in this process on a tiny task of the same shape as the SHA-256 study (copy 8 bits,
  two of them replaced by coin flips: those two parts cannot be learned), a second or two each;
- the CLI's refusals of a bad --target or health.targets (exit 2, one line, nothing written).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn

from trainlab.cli import main as cli_main
from trainlab.config import knob, parse_set, resolve
from trainlab.engine.state import step_seed
from trainlab.experiment import Experiment, Preset
from trainlab.health import stats
from trainlab.engine.logs import read_metrics
from trainlab.health.goals import Goal, declared_goals, gate_goal, judge_goal, judge_parts, parse_target
from trainlab.health.preflight import run_preflight


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


# --------------------------------------------------------------------------------------------
# The statistics
# --------------------------------------------------------------------------------------------

def _rise_then_flat(seed: int, level: float = 0.888, knee: int = 30, n: int = 100, noise: float = 0.003):
    rng = np.random.default_rng(seed)
    return np.concatenate([np.linspace(0.5, level - 0.008, knee), level + rng.normal(0.0, noise, n - knee)])


@pytest.mark.parametrize("seed", range(5))
def test_plateau_starts_where_a_rise_levels_off(seed: int):
    flat = stats.plateau(_rise_then_flat(seed))
    assert flat is not None and flat.start == 30 and flat.n == 70
    assert flat.mean == pytest.approx(0.888, abs=0.002) and 0 < flat.half_width < 0.003
    assert flat.ci[0] <= flat.mean <= flat.ci[1] and not flat.trend.significant


def test_plateau_is_none_while_a_series_still_moves_and_zero_for_a_flat_one():
    rng = np.random.default_rng(0)
    steady_rise = np.linspace(0.5, 0.8, 100) + rng.normal(0.0, 0.01, 100)
    assert stats.plateau(steady_rise) is None  # a straight line wins: no knee, no plateau
    saturating = 1 - 0.5 * np.exp(-np.arange(100) / 15) + rng.normal(0.0, 0.003, 100)
    assert stats.plateau(saturating) is None  # bends, but its tail still rises significantly
    coin = 0.5 + rng.normal(0.0, 0.01, 100)
    assert stats.plateau(coin).start == 0
    assert stats.plateau(coin[:9]) is None  # fewer than min_points


def test_project_path_is_project_at_each_step():
    rng = np.random.default_rng(1)
    s = np.arange(2, 202, 2.0)
    y = 0.5 * np.exp(-s / 80) + 0.1 + rng.normal(0.0, 0.01, len(s))
    for bound in (None, 0.12):  # free floors; a floor the curve presses against
        path = stats.project_path(s, y, [300.0, 5000.0], lower_bound=bound, n_boot=40)
        for j, at in enumerate((300.0, 5000.0)):
            one = stats.project(s, y, at, lower_bound=bound, n_boot=40)
            assert (path.values[j], path.lo[j], path.hi[j]) == (one.value, *one.interval), (bound, at)


# --------------------------------------------------------------------------------------------
# One goal, judged from built rows
# --------------------------------------------------------------------------------------------

class _Exp:
    """What judge_goal reads of an experiment."""
    loss_lower_bound = 0.0


GATE = Goal("acc", ">=", 0.95, "curriculum phase 0 of 2, level 1", window=20, earliest_step=0, phase=0)


def _rows(values, every: int = 2, phase: int = 0, **extra) -> list[dict]:
    return [{"step": every * (i + 1), "acc": float(v), "phase": phase, **extra} for i, v in enumerate(values)]


def test_a_gate_below_a_plateau_is_not_reached_and_says_where_it_stalled():
    rows = _rows(_rise_then_flat(0, knee=40, n=125))  # rows after the 20 % warm-up: the rise's last 15, the plateau
    judged = judge_goal(GATE, rows, 100000, _Exp())
    assert judged.status == "not reached" and judged.claim.verdict == "fail"
    # the plateau starts at the 41st row (step 82), the mean and its interval are measured
    found = re.match(r"gate 0\.95 on acc not reached: plateau at (0\.88\d*) \+- (0\.000\d+) since step 82; "
                     r"projected (\S+) \[(\S+), (\S+)\] at step 100000 -- projection \(not a measurement\)$",
                     judged.reason)
    assert found, judged.reason
    flat = judged.details["plateau"]
    assert flat["since_step"] == 82 and float(found[1]) == pytest.approx(0.888, abs=0.001)
    assert float(found[2]) == pytest.approx(flat["half_width"], rel=0.01) and 0 < flat["half_width"] < 0.002
    assert float(found[5]) < 0.95  # even the interval's top end stays below the gate


def test_a_gate_on_its_way_is_reached_at_about_the_step_the_curve_crosses_it():
    # acc = 1 - 0.5 exp(-s / 300): 0.95 at s = 300 ln 10 = 691, and the running mean over 20 steps
    # trails by about 10: the gate passes at about step 701
    rng = np.random.default_rng(3)
    steps = np.arange(4, 204, 4)  # 50 rows: enough for the fit, and each projection is cheaper
    rows = _rows(1 - 0.5 * np.exp(-steps / 300.0) + rng.normal(0.0, 0.002, len(steps)), every=4)
    judged = judge_goal(GATE, rows, 5000, _Exp())
    assert judged.status == "reached", judged.reason
    early, late = judged.details["reached_interval"]
    assert early <= 701 <= late and late < 5000 and early <= judged.details["reached_at"] <= late
    assert judged.claim.value.startswith(f"gate 0.95 on acc reached at about step {judged.details['reached_at']} "
                                         f"[{early}, {late}] of 5000")
    # the running mean trails the curve by half its window: 10 steps later than the curve itself
    curve = judge_goal(dataclasses.replace(GATE, window=0), rows, 5000, _Exp())
    assert curve.details["reached_at"] == judged.details["reached_at"] - 10
    assert curve.details["reached_interval"] == [early - 10, late - 10]
    # planned to end inside the interval of that step: uncertain, not READY
    inside = judge_goal(GATE, rows, (early + late) // 2, _Exp())
    assert inside.status == "uncertain" and inside.claim.verdict == "warn", inside.reason
    assert inside.reason.startswith("gate 0.95 on acc uncertain: projected 0.9") and ", an interval that holds 0.95" in \
        inside.reason
    # the same run planned too short: the gate is not projected to be passed in time
    short = judge_goal(GATE, rows, 500, _Exp())
    assert short.status == "not reached" and short.reason.startswith("gate 0.95 on acc not reached: projected 0.9")
    assert " at step 500 -- projection (not a measurement)" in short.reason


def test_a_goal_with_too_few_rows_is_not_measured():
    judged = judge_goal(Goal("val_acc", ">=", 0.9, "--target"), [{"step": 200, "val_acc": 0.3}], 1500, _Exp())
    assert judged.status == "not measured" and "only 1 logged row after the warm-up of val_acc" in judged.reason


def test_a_declared_metric_range_bounds_the_projection():
    """A correlation falling toward -0.9 along a decaying curve is projected past its floor unless the
    experiment says where the floor is (Experiment.metric_ranges): then the projection stops there."""
    steps = np.arange(10, 210, 10)  # the last logged value is -0.74: the goal is not met yet
    rows = [{"step": int(s), "hierarchy": float(-0.9 + 0.6 * math.exp(-s / 150))} for s in steps]
    goal = Goal("hierarchy", "<=", -0.85, "--target")
    free = judge_goal(goal, rows, 3000, _Exp())
    assert free.status == "reached"

    class Bounded(_Exp):
        metric_ranges = {"hierarchy": (-0.83205, 0.83205)}

    bounded = judge_goal(goal, rows, 3000, Bounded())
    assert bounded.status == "not reached" and bounded.reason.startswith(
        "target hierarchy <= -0.85 not reached: hierarchy can reach no lower than -0.832 while its range is "
        "[-0.832, 0.832] (the experiment's metric_ranges)"), bounded.reason


# --------------------------------------------------------------------------------------------
# Parts: which learn, which sit at chance, and what that costs
# --------------------------------------------------------------------------------------------

PART_NAMES = tuple(f"acc_bit_{i}" for i in range(8))
PARTS = {"metrics": PART_NAMES, "chance": 0.5, "perfect": 1.0, "loss_at_chance": math.log(2) / 8,
         "mean_of": ("acc", "val_acc")}


def _part_rows(n: int = 100, seed: int = 0) -> list[dict]:
    """Six parts rising to 1, bits 6 and 7 at chance (noise of 512 coin flips per row)."""
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        row = {"step": 2 * (i + 1)}
        for j, name in enumerate(PART_NAMES):
            row[name] = 0.5 + rng.normal(0.0, 0.022) if j >= 6 else 1 - 0.5 * math.exp(-i / 15) + rng.normal(0.0, 0.005)
        rows.append(row)
    return rows


def test_parts_at_chance_are_named_and_set_the_ceiling_and_the_loss_floor():
    claim, parts = judge_parts(PARTS, _part_rows())
    assert parts.at_chance == ["acc_bit_6", "acc_bit_7"] and parts.learning == list(PART_NAMES[:6])
    for name in ("acc_bit_6", "acc_bit_7"):
        lo, hi = parts.levels[name]["ci"]
        assert lo < 0.5 < hi  # measured: its interval holds chance
    # at most what the parts at chance were measured at (their intervals' top ends), the rest perfect
    tops = sum(parts.levels[m]["ci"][1] for m in ("acc_bit_6", "acc_bit_7"))
    assert parts.ceiling("acc") == pytest.approx((6 * 1.0 + tops) / 8) and parts.ceiling("loss") is None
    assert 0.875 < parts.ceiling("acc") < 0.885
    assert parts.loss_floor() == pytest.approx(2 * math.log(2) / 8)
    assert claim.verdict == "info" and claim.value.startswith("6 of 8 learn; 2 sit at chance: acc_bit_6 0.")
    # every part learning: nothing caps anything
    claim, parts = judge_parts({**PARTS, "metrics": PART_NAMES[:6]}, _part_rows())
    assert claim.verdict == "pass" and parts.at_chance == [] and parts.ceiling("acc") == 1.0
    assert judge_parts({}, _part_rows()) == (None, None)


def test_a_part_a_hair_above_chance_sits_at_chance_one_clearly_above_learns():
    """Thousands of bits per row resolve 0.503 from 0.5; no gate can be reached on such a part (the
    SHA-256 study's word e after 600 steps: 0.5026 [0.5019, 0.5033]).  Within 5 % of the way from
    chance to perfect it counts as at chance; flat at 0.56 it is above that and counts as learning."""
    rng = np.random.default_rng(2)
    rows = [{"step": i + 1, "near": 0.503 + rng.normal(0.0, 0.0005), "above": 0.56 + rng.normal(0.0, 0.0005)}
            for i in range(100)]
    _, parts = judge_parts({"metrics": ("near", "above"), "chance": 0.5, "mean_of": ("acc",)}, rows)
    assert parts.levels["near"]["ci"][0] > 0.5  # the interval alone would call it learning
    assert parts.at_chance == ["near"] and parts.learning == ["above"]
    assert parts.ceiling("acc") == pytest.approx((1.0 + parts.levels["near"]["ci"][1]) / 2)


def test_a_gate_above_what_the_parts_at_chance_leave_is_not_reached():
    rows = _part_rows()
    for r in rows:
        r["acc"], r["phase"] = sum(r[m] for m in PART_NAMES) / 8, 0
    _, parts = judge_parts(PARTS, rows)
    judged = judge_goal(GATE, rows, 100000, _Exp(), parts)
    cap = parts.ceiling("acc")
    assert judged.status == "not reached" and judged.details["bound"] == cap
    assert judged.reason.startswith(f"gate 0.95 on acc not reached: acc can reach at most {cap:.4g} while 2 of 8 "
                                    "parts sit at chance 0.5 (acc_bit_6, acc_bit_7)"), judged.reason
    # a goal below that ceiling is judged on its projection as usual
    assert judge_goal(Goal("acc", ">=", 0.8, "--target"), rows, 100000, _Exp(), parts).status == "reached"


# --------------------------------------------------------------------------------------------
# Targets
# --------------------------------------------------------------------------------------------

def test_targets_parse_and_bad_ones_say_what_is_expected():
    assert parse_target("val_acc>=0.9") == ("val_acc", ">=", 0.9)
    assert parse_target(" loss < 1e-3 ") == ("loss", "<", 1e-3)
    assert parse_target("acc>.5") == ("acc", ">", 0.5)
    with pytest.raises(ValueError, match="quote it"):  # what the shell leaves of an unquoted val_acc>=0.9
        parse_target("val_acc")
    for bad in ("val_acc=>0.9", "val_acc>=", "val_acc>=0.9x", ">=0.9", "val_acc >= inf"):
        with pytest.raises(ValueError, match="expected METRIC OP LEVEL"):
            parse_target(bad)


# --------------------------------------------------------------------------------------------
# run_preflight on a task shaped like the SHA-256 study: parts that cannot be learned
# --------------------------------------------------------------------------------------------

@dataclass
class CopyModelConfig:
    hidden: int = knob(16, "width", ge=1)
    unused: bool = knob(False, "add a parameter outside the graph (a failure besides the goal's)")


@dataclass
class CopyDataConfig:
    coins: int = knob(2, "target bits that are coin flips instead of copies (they cannot be learned)", ge=0, le=8)


class CopyData:
    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device

    def _draw(self, seed: int, n: int):
        g = torch.Generator().manual_seed(seed)
        x = torch.randint(0, 2, (n, 8), generator=g).float()
        y = x.clone()
        coins = self.cfg.data.coins
        if coins:
            y[:, 8 - coins:] = torch.randint(0, 2, (n, coins), generator=g).float()
        return x.to(self.device), y.to(self.device)

    def batch(self, step: int, micro: int, level):
        return self._draw(step_seed(self.cfg.train.seed, step, micro), self.cfg.train.micro_batch)


class CopyBits(Experiment):
    """Copy 8 bits; the last `data.coins` targets are coin flips: parts at chance for good, as
    the SHA-256 study's words a and e in its quick preset."""

    name = "copybits"
    model_config = CopyModelConfig
    data_config = CopyDataConfig
    train_metrics = ("acc",) + PART_NAMES
    eval_metrics = ("val_loss", "val_acc")
    parts = PARTS
    presets = {"smoke": Preset("tests", {
        "train": {"steps": 100, "micro_batch": 256},
        "optim": {"lr": 0.03, "weight_decay": 0.0},
        "schedule": {"warmup": 0, "decay": "constant"},
        "curriculum": {"name": "level", "values": [1, 2], "min_steps": [0, 0], "gates": [0.95, 1.0],
                       "metric": "acc", "window": 20},
        "log": {"progress": "off"},
    })}

    def build_model(self, cfg):
        model = nn.Sequential(nn.Linear(8, cfg.model.hidden), nn.Tanh(), nn.Linear(cfg.model.hidden, 8))
        if cfg.model.unused:
            model.register_parameter("unused", nn.Parameter(torch.ones(2)))
        return model

    def build_data(self, cfg, device):
        return CopyData(cfg, device)

    def _metrics(self, logits, y):
        hits = ((logits > 0).float() == y).float()
        per_bit = hits.mean(0)
        return {"acc": hits.mean(), **{name: per_bit[i] for i, name in enumerate(PART_NAMES)}}

    def loss(self, model, batch, ctx):
        x, y = batch
        logits = model(x)
        return F.binary_cross_entropy_with_logits(logits, y), self._metrics(logits.detach(), y)

    def baseline_loss(self, cfg):
        return math.log(2)

    def evaluate(self, model, data, cfg, level=None):
        x, y = data._draw(12345, 512)
        logits = model(x)
        return {"val_loss": F.binary_cross_entropy_with_logits(logits, y), "val_acc": self._metrics(logits, y)["acc"]}


STEPS = 60  # a row per step: 48 after the warm-up, the late half 24 -- enough for every claim here


def _copy_preflight(run_dir: Path, sets: list[str], planned: int = 5000, targets=()):
    cfg = resolve(CopyBits(), "smoke", overrides=parse_set(sets))
    result = run_preflight(CopyBits(), cfg, torch.device("cpu"), run_dir, STEPS, planned, 300.0, targets)
    return result, {c.name: c for c in result.claims}, json.loads((run_dir / "preflight.json").read_text())


def test_preflight_of_a_run_whose_parts_stall_below_the_gate_is_not_ready_and_says_so_first(tmp_path: Path):
    result, claims, saved = _copy_preflight(tmp_path / "pf", ["model.unused=true"], targets=["val_acc>=0.9"])
    assert result.verdict == "NOT READY"
    # the goals' reasons come first, the other failures after them
    assert result.reasons[2] == "1 parameters never receive a gradient", result.reasons
    # the loss falls: the old verdict would have passed it
    assert claims["learning signal"].verdict == "pass" and claims["learning signal"].value.startswith("learning")
    first = result.reasons[0]
    assert re.match(r"gate 0\.95 on acc not reached: acc can reach at most 0\.8[78]\d* while 2 of 8 parts sit at "
                    r"chance 0\.5 \(acc_bit_6, acc_bit_7\)", first), result.reasons
    assert claims["parts"].value.startswith("6 of 8 learn; 2 sit at chance: acc_bit_6 ")
    # the held-out target: evaluated 20 times (every 3 steps) instead of once, capped the same way
    val = claims["goal: target val_acc >= 0.9"]
    assert val.verdict == "fail" and re.search(r"val_acc can reach at most 0\.8[78]\d* while 2 of 8", val.value), val
    assert saved["goals"][1]["rows"] == 16  # 20 evaluations less the first 20 %
    # no projection counts on the parts at chance: the loss's floor is their ln 2 / 8 each
    assert saved["learning"]["projection"]["lower_bound"] == pytest.approx(2 * math.log(2) / 8)
    assert saved["learning"]["projection"]["value"] >= 2 * math.log(2) / 8
    assert "floor 0.1733 (parts at chance)" in claims["projection (not a measurement)"].value
    # preflight.json begins with the verdict, its one-sentence summary and the reasons
    assert list(saved)[:3] == ["verdict", "summary", "reasons"]
    assert saved["summary"] == f"NOT READY: {first}" and saved["reasons"] == result.reasons


def test_preflight_of_a_run_that_reaches_its_gate_is_ready(tmp_path: Path):
    # every target bit a copy; the phase may end only at step 1000, so the gate is judged as a goal
    result, claims, saved = _copy_preflight(tmp_path / "pf", ["data.coins=0", "curriculum.min_steps=[1000,0]"])
    gate = claims["goal: gate 0.95 on acc"]
    assert gate.verdict == "pass" and gate.value.startswith("gate 0.95 on acc reached (measured): running mean over "
                                                            "20 steps (gate_mean) "), gate.value
    assert "the phase can end at step 1000, when its min_steps are done" in gate.value
    assert claims["parts"].verdict == "pass" and claims["parts"].value == "8 of 8 learn"
    assert result.verdict == "READY", result.reasons
    assert saved["summary"] == f"READY: {result.reasons[0]}" and result.reasons[0].startswith(gate.value)
    # planned shorter than the phase's min_steps: the gate cannot be passed in time
    cfg = resolve(CopyBits(), "smoke", overrides=parse_set(["curriculum.min_steps=[1000,0]"]))
    short = judge_goal(gate_goal(cfg, 0, 0), read_metrics(tmp_path / "pf" / "metrics.csv"), 800, CopyBits())
    assert short.status == "not reached" and short.reason.startswith(
        "gate 0.95 on acc reached, but the phase cannot end before step 1000 > the planned 800")


def test_a_goal_of_the_experiment_itself_is_judged(tmp_path: Path):
    class WithGoal(CopyBits):
        goal = "val_loss<=0.05"

    cfg = resolve(WithGoal(), "smoke", overrides=parse_set(["curriculum.values=[]", "curriculum.min_steps=[]",
                                                            "curriculum.gates=[]", "health.targets=[acc>=0.6]"]))
    assert [g.source for g in declared_goals(WithGoal(), cfg)] == ["health.targets", "the experiment's goal"]
    result = run_preflight(WithGoal(), cfg, torch.device("cpu"), tmp_path / "pf", STEPS, 5000, 300.0)
    claims = {c.name: c for c in result.claims}
    claim = claims["goal: target val_loss <= 0.05"]
    # two coin-flip bits hold the loss at >= 2 ln 2 / 8 = 0.173: never 0.05
    assert claim.verdict == "fail" and result.verdict == "NOT READY" and result.reasons[0] == claim.value
    assert "val_loss" in claim.value
    # the config's target, met within the preflight (no curriculum here: no gate)
    assert claims["goal: target acc >= 0.6"].value.startswith("target acc >= 0.6 reached (measured): mean of the last ")
    assert "curriculum" not in claims


# --------------------------------------------------------------------------------------------
# The CLI: a bad target is refused before anything is written
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("args,says", [
    (("--target", "vall_acc>=0.9"), ("--target 'vall_acc>=0.9': 'vall_acc' is not a logged metric of modadd; "
                                      "allowed: loss, acc, val_loss, val_acc",)),
    (("--target", "val_acc"), ("--target 'val_acc': expected METRIC OP LEVEL", "quote it")),
    (("--target", "acc>=0.5", "--target", "acc=>0.5"), ("--target 'acc=>0.5': expected METRIC OP LEVEL",)),
    (("--set", "health.targets=[val_acc=0.9]"), ("health.targets[0]", "expected METRIC OP LEVEL")),
    (("--set", "health.targets=[top5>=0.9]"), ("health.targets[0]", "'top5' is not a logged metric of modadd",
                                                "allowed: loss, acc, val_loss, val_acc")),
])
def test_a_bad_target_is_exit_2_with_one_line_naming_the_allowed_metrics(args, says, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    code = cli_main(["preflight", "modadd", "--preset", "smoke", "--steps", "20", *args])
    out = capsys.readouterr()
    line = out.err.strip()
    assert code == 2 and out.out == "" and line.count("\n") == 0 and line.startswith("trainlab: error: "), out
    for needle in says:
        assert needle in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written
