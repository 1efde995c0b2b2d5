"""The jump detector (health.jump, health.jumps): a sudden change of a configured metric after a
plateau, on hand-made rows, on the recorded grokking run, through the config's refusals and through
one real smoke run of modadd."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import trainlab
from trainlab.config import HealthConfig
from trainlab.engine.logs import read_events, read_metrics
from trainlab.health.check import judge_rows
from trainlab.health.detectors import DETECTORS, Jump, run_offline

RECORDED = Path(__file__).parent / "data"
EVIDENCE_KEYS = {"metric", "jump_step", "confirm_step", "level_before", "first_value", "value", "size", "z", "noise",
                 "threshold", "least_change", "window_kind", "slope_per_value", "trend_p_value", "plateau_values",
                 "plateau_first_step", "plateau_last_step", "plateau_steps", "window_values", "test"}


def _rows(values, metric: str = "coverage", every: int = 100) -> list[dict]:
    """One row per value, `every` steps apart; None leaves the metric out of its row."""
    return [{"step": every * i, "loss": 1.0, **({} if v is None else {metric: v})} for i, v in enumerate(values)]


def _jumps(values, jumps=None, metric: str = "coverage", **knobs) -> list[dict]:
    cfg = HealthConfig(jumps=jumps or {metric: 0.05}, **knobs)
    alerts, _ = run_offline(cfg, None, 100 * len(values), _rows(values, metric))
    return [a for a in alerts if a["detector"] == "jump"]


def _noisy(level: float, n: int, seed: int, sd: float = 0.01) -> list[float]:
    return list(level + np.random.default_rng(seed).normal(0, sd, n))


def test_a_flat_then_step_series_fires_once_at_the_step_with_its_size():
    values = _noisy(0.41, 20, seed=0) + _noisy(1.0, 20, seed=1)
    alerts = _jumps(values)
    assert len(alerts) == 1
    a, ev = alerts[0], alerts[0]["evidence"]
    assert set(ev) == EVIDENCE_KEYS
    # reported at the confirming row (index 21), naming the step of the first value beyond (index 20)
    assert (a["step"], ev["jump_step"], ev["confirm_step"]) == (2100, 2000, 2100)
    assert a["severity"] == "info" and ev["metric"] == "coverage" and ev["window_kind"] == "plateau"
    assert ev["level_before"] == pytest.approx(np.median(values[12:20]))
    assert ev["value"] == values[21] and ev["first_value"] == values[20]
    assert ev["size"] == pytest.approx(values[21] - ev["level_before"]) and 0.55 < ev["size"] < 0.65
    assert ev["z"] == pytest.approx(abs(ev["size"]) / ev["noise"]) and ev["z"] > 6
    # the plateau traced back to the series' start: all 20 values, steps 0-1900
    assert (ev["plateau_values"], ev["plateau_first_step"], ev["plateau_last_step"]) == (20, 0, 1900)
    assert ev["window_values"] == 8 and ev["trend_p_value"] > 0.01
    assert a["message"].startswith("jump: coverage 0.4") and "at step 2000 after a plateau of 20 values (steps 0-1900" in a["message"]
    json.dumps(a, allow_nan=False)  # JSON-able: no inf, no nan


def test_a_fall_is_a_jump_too_with_a_negative_size():
    values = _noisy(-0.62, 12, seed=2, sd=0.005) + _noisy(-0.81, 6, seed=3, sd=0.005)
    alerts = _jumps(values, {"hierarchy": 0.05}, metric="hierarchy")
    assert len(alerts) == 1
    ev = alerts[0]["evidence"]
    assert ev["jump_step"] == 1200 and -0.21 < ev["size"] < -0.17
    assert alerts[0]["message"].startswith("jump: hierarchy -0.6") and " -> -0.8" in alerts[0]["message"]


def test_a_steady_linear_trend_of_the_same_total_change_does_not_fire():
    values = list(np.linspace(0.41, 1.0, 40) + np.random.default_rng(4).normal(0, 0.01, 40))
    assert _jumps(values) == []
    clean = list(np.linspace(0.41, 1.0, 40))
    assert _jumps(clean) == []
    # the same change in one row does fire (the test can fail)
    assert len(_jumps(clean[:20] + [v + 0.3 for v in clean[20:]])) == 1


def test_a_creep_that_ends_in_a_leap_is_a_jump_against_the_trend_line():
    """modadd's grokking: val_acc creeps 0.30 -> 0.36 (a Mann-Kendall trend, no plateau), then leaps
    to 0.84; the level it leaps from is the Theil-Sen line extrapolated, not the window's median."""
    creep = [0.30 + 0.008 * i for i in range(10)]
    alerts = _jumps(creep + [0.84, 0.96, 0.98])
    assert len(alerts) == 1
    ev = alerts[0]["evidence"]
    assert ev["window_kind"] == "trend" and ev["slope_per_value"] == pytest.approx(0.008)
    assert ev["level_before"] == pytest.approx(0.30 + 0.008 * 10) and ev["jump_step"] == 1000
    assert "after a steady trend of +0.008 per value over 8 values" in alerts[0]["message"]


def test_a_single_row_spike_that_returns_does_not_fire():
    values = _noisy(0.41, 20, seed=5)
    spiked = values[:12] + [0.95] + values[12:]
    assert _jumps(spiked) == []
    # held for two rows it is a jump
    assert len(_jumps(values[:12] + [0.95, 0.95] + values[12:])) == 1


def test_a_jump_smaller_than_the_least_change_does_not_fire():
    values = _noisy(0.30, 15, seed=6, sd=0.001) + _noisy(0.33, 15, seed=7, sd=0.001)
    assert _jumps(values, {"coverage": 0.05}) == []
    assert len(_jumps(values, {"coverage": 0.02})) == 1  # 30 noise sigmas: the least change alone held it back


def test_two_successive_transitions_give_two_events():
    values = _noisy(0.3, 12, seed=8) + _noisy(0.6, 12, seed=9) + _noisy(0.9, 12, seed=10)
    alerts = _jumps(values)
    assert [a["evidence"]["jump_step"] for a in alerts] == [1200, 2400]
    second = alerts[1]["evidence"]
    # the second plateau started again from the value the first jump reached (index 13)
    assert second["plateau_first_step"] == 1300 and second["plateau_values"] == 11
    assert 0.25 < second["size"] < 0.35


def test_nan_and_missing_values_are_skipped():
    values = _noisy(0.41, 20, seed=11) + _noisy(1.0, 10, seed=12)
    clean = _jumps(values)
    holey: list = []
    for i, v in enumerate(values):
        holey += [v, math.nan] if i % 3 == 0 else ([None, v] if i % 3 == 1 else [v, math.inf])
    alerts = _jumps(holey)
    assert len(alerts) == len(clean) == 1
    assert alerts[0]["evidence"]["value"] == clean[0]["evidence"]["value"]
    assert alerts[0]["evidence"]["plateau_values"] == 20


def test_a_perfectly_flat_plateau_works():
    alerts = _jumps([0.3] * 8 + [0.5, 0.5])
    assert len(alerts) == 1
    ev = alerts[0]["evidence"]
    assert (ev["jump_step"], ev["level_before"], ev["noise"], ev["z"]) == (800, 0.3, 0.0, None)
    assert "plateau exactly flat" in alerts[0]["message"]
    json.dumps(alerts[0], allow_nan=False)
    assert _jumps([0.3] * 8 + [0.3 + 1e-15, 0.3 + 1e-15], {"coverage": 0.0}) == []  # rounding is no jump


def test_the_claim_lists_the_jumps_per_metric_or_says_why_not():
    cov = _noisy(0.41, 20, seed=13) + _noisy(1.0, 20, seed=14)
    rows = [{**r, "hierarchy": -0.62 + 0.001 * (i % 2)} for i, r in enumerate(_rows(cov))]

    def claim(**knobs):
        _, claims = judge_rows(HealthConfig(**knobs), None, 4000, rows)
        return next(c for c in claims if c.name == "jump")

    both = claim(jumps={"coverage": 0.05, "hierarchy": 0.05})
    assert both.verdict == "info"
    assert both.value.startswith("coverage: 1 jump, 0.4") and "at step 2000 (+0.5" in both.value
    assert "hierarchy: no jump in 32 judged values" in both.value
    assert "Mann-Kendall" in both.evidence and "health.jump_z=6" in both.evidence
    quiet = claim(jumps={"hierarchy": 0.05})
    assert (quiet.verdict, quiet.value) == ("info", "not observed: hierarchy: no jump in 32 judged values")
    none = claim()
    assert (none.verdict, none.value) == ("not measured", "health.jumps names no metric")
    assert claim(jumps={"absent": 0.1}).value == "absent not logged"
    off = claim(jump="off", jumps={"coverage": 0.05})
    assert (off.verdict, off.value) == ("not measured", "detector off")
    _, short = judge_rows(HealthConfig(jumps={"coverage": 0.05}), None, 500, rows[:5])
    short_claim = next(c for c in short if c.name == "jump")
    assert short_claim.verdict == "not measured" and short_claim.value.startswith("never judged: coverage 5 values")


def test_an_unconfirmed_last_value_is_named_in_the_claim():
    rows = _rows(_noisy(0.41, 12, seed=15) + [0.99])
    _, claims = judge_rows(HealthConfig(jumps={"coverage": 0.05}), None, 1300, rows)
    value = next(c for c in claims if c.name == "jump").value
    assert "its last value 0.99 at step 1200 lies beyond" in value and "unconfirmed" in value


def test_the_recorded_grokking_run_jumps_where_it_generalises_and_grokking_is_unchanged():
    """tests/data/modadd_grok (a real `trainlab run modadd --preset grok`): val_acc leaps 0.36 -> 0.84
    at step 1600; the grokking detector still says memorised 150, generalised 1650, gap 1500."""
    rows = read_metrics(RECORDED / "modadd_grok" / "metrics.csv")
    alerts, claims = judge_rows(HealthConfig(jumps={"val_acc": 0.05}), 4.575, 4000, rows)
    jumps = [a for a in alerts if a["detector"] == "jump"]
    assert [(a["step"], a["evidence"]["jump_step"]) for a in jumps] == [(1650, 1600)]
    assert 0.55 < jumps[0]["evidence"]["size"] < 0.65 and jumps[0]["evidence"]["value"] > 0.96
    grok = [a["evidence"] for a in alerts if a["detector"] == "grokking"]
    assert [(g["memorisation_step"], g["generalisation_step"], g["gap"]) for g in grok] == [(150, 1650, 1500)]


def test_jump_comes_after_the_older_detectors():
    names = [cls.name for cls in DETECTORS]
    # new detectors go last, so the claims of older runs keep their order (milestone came after jump)
    assert names[-2:] == ["jump", "milestone"] and Jump in DETECTORS


@pytest.mark.parametrize("setting,says", [
    ("health.jumps={nope: 0.1}", ("health.jumps.nope", "'nope' is not a logged metric of modadd",
                                  "allowed: loss, acc, val_loss, val_acc")),
    ("health.jumps={val_acc: -0.1}", ("health.jumps.val_acc", "must be >= 0")),
    ("health.jump_window=4", ("health.jump_window", "must be >= 6")),
    ("health.jump=stop", ("health.jump",)),
])
def test_a_bad_jump_setting_is_exit_2_with_one_line(setting, says, tmp_path: Path):
    out = trainlab("run", "modadd", "--preset", "smoke", "--set", setting, cwd=tmp_path)
    line = out.stderr.strip()
    assert out.returncode == 2 and line.count("\n") == 0 and line.startswith("trainlab: error: "), out.stderr
    for needle in says:
        assert needle in line, line
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_a_smoke_run_with_jumps_writes_the_claim_and_live_alerts_equal_the_check(tmp_path: Path):
    out = trainlab("run", "modadd", "--preset", "smoke", "--set", "health.jumps={val_acc: 0.01}",
                   "--set", "eval.every=2", "--set", "log.every=2", "--set", "log.progress=off",
                   "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    run = tmp_path / "r"
    data = json.loads((run / "check.json").read_text())
    claim = next(c for c in data["claims"] if c["name"] == "jump")
    assert claim["verdict"] == "info", claim
    assert claim["value"].startswith(("val_acc: ", "not observed: val_acc: ")), claim
    assert "judged values" in claim["value"] or " jump" in claim["value"], claim
    assert "Mann-Kendall" in claim["evidence"]
    live = [e for e in read_events(run / "events.jsonl") if e.get("detector") == "jump"]
    offline = [a for a in data["alerts"] if a["detector"] == "jump"]
    assert [(e["step"], e["message"]) for e in live] == [(a["step"], a["message"]) for a in offline]
    for e in live:
        assert e["policy"] == "warn" and set(e["evidence"]) == EVIDENCE_KEYS
