"""The milestone detector (health.milestone): the step at which each goal of health.targets is first
reached, as an event and in the claim, on hand-made rows."""

from __future__ import annotations

from trainlab.config import HealthConfig
from trainlab.health.check import judge_rows
from trainlab.health.detectors import run_offline


def _rows() -> list[dict]:
    # evaluation metrics on every other row only, as an experiment's evaluations leave them
    coverage = [0.2, None, 0.7, None, 0.991, None, 0.985, None, 0.999]
    hierarchy = [-0.1, None, -0.5, None, -0.79, None, -0.801, None, -0.83]
    return [{"step": 10 * i, "loss": 1.0, **({} if c is None else {"coverage": c, "hierarchy": h})}
            for i, (c, h) in enumerate(zip(coverage, hierarchy))]


def _milestones(targets: list[str]) -> list[dict]:
    alerts, _ = run_offline(HealthConfig(targets=targets), 1.0, 100, _rows())
    return [a for a in alerts if a["detector"] == "milestone"]


def test_each_goal_is_reported_once_at_the_first_value_that_meets_it():
    found = _milestones(["coverage>=0.99", "hierarchy<=-0.80", "coverage>1"])
    assert [(a["step"], a["evidence"]["goal"], a["evidence"]["value"]) for a in found] == [
        (40, "coverage>=0.99", 0.991), (60, "hierarchy<=-0.80", -0.801)]  # coverage dipped at 60: still one event
    assert found[0]["severity"] == "info" and "first reached at step 40 (0.991)" in found[0]["message"]


def test_the_claim_says_when_each_goal_was_met_and_where_it_ended():
    _, claims = judge_rows(HealthConfig(targets=["coverage>=0.99", "coverage>1"]), 1.0, 100, _rows())
    claim = next(c for c in claims if c.name == "milestone")
    assert claim.verdict == "info"
    assert claim.value == ("coverage >= 0.99: first at step 40 (0.991), last 0.999; "
                           "coverage > 1: not reached (last 0.999)")


def test_without_goals_or_without_their_metric_it_is_not_measured():
    _, claims = judge_rows(HealthConfig(), 1.0, 100, _rows())
    assert next(c for c in claims if c.name == "milestone").value == "health.targets names no goal"
    _, claims = judge_rows(HealthConfig(targets=["val_acc>=0.9"]), 1.0, 100, _rows())
    claim = next(c for c in claims if c.name == "milestone")
    assert claim.verdict == "not measured" and "val_acc" in claim.value
    _, claims = judge_rows(HealthConfig(targets=["coverage>=0.99"], milestone="off"), 1.0, 100, _rows())
    assert next(c for c in claims if c.name == "milestone").value == "detector off"
