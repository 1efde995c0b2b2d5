"""The ternary VAE's homeostasis ablation rules and timeline, on hand-made run directories written with
trainlab's own log writers (metrics.csv, events.jsonl, status.json, config.yaml) and read back through
the sweep report's load_points, as `trainlab sweep` would."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import scipy.stats
import yaml

from trainlab.engine.logs import EventLog, MetricsLog
from trainlab.engine.rundir import write_status
from trainlab.experiments.ternary_vae.ablation import sweep_findings
from trainlab.experiments.ternary_vae.timeline import (draw_timeline, frozen_intervals, homeostasis_history,
                                                       jump_alerts, write_timeline)
from trainlab.sweep.report import load_points

CEILING = -0.83205
COLUMNS = ["step", "loss", "coverage", "hierarchy", "hierarchy_ceiling", "hierarchy_gap", "richness", "dist_corr",
           "Q", "curvature"]


def write_run(run_dir: Path, evals: list[tuple[int, float, float, float]], events: list[dict] = (),
              homeostasis: str = "on", state: str = "finished", total: int | None = None) -> Path:
    """A run directory: a training row every 50 steps, an evaluation row (step, coverage, hierarchy, Q)
    at each of `evals`, the given events, and a status `state` with `total` planned steps."""
    run_dir.mkdir(parents=True)
    (run_dir / "config.yaml").write_text(yaml.safe_dump({"experiment": "ternary_vae",
                                                          "model": {"homeostasis": homeostasis}}))
    log, by_step = MetricsLog(run_dir, COLUMNS), {s: (c, h, q) for s, c, h, q in evals}
    last = evals[-1][0]
    for step in sorted(set(range(50, last + 1, 50)) | set(by_step)):
        row = {"step": step, "loss": 1.0}
        if step in by_step:
            c, h, q = by_step[step]
            row |= {"coverage": c, "hierarchy": h, "hierarchy_ceiling": CEILING, "hierarchy_gap": h - CEILING,
                    "richness": 0.01, "dist_corr": q - 1.5 * abs(h), "Q": q, "curvature": 1.0}
        log.write(row)
    log.close()
    event_log = EventLog(run_dir)
    for event in [{"kind": "start", "attempt": 1}, *events, {"kind": "finish", "step": last}]:
        event_log.write(event)
    event_log.close()
    write_status(run_dir, state, last, total_steps=total or last)
    return run_dir


def decision(step: int, action: str, parts: list[str]) -> dict:
    return {"kind": "homeostasis", "step": step, "action": action, "parts": parts, "reason": "test",
            "coverage": 0.99, "hierarchy": -0.7, "Q": 1.5}


def sweep(tmp_path: Path, q_on: list[float], q_off: list[float], **point_overrides) -> list:
    """A homeostasis x seed sweep whose final Q per seed is given; coverage reaches 0.99 at step 200 with
    homeostasis on and 300 off, the hierarchy reaches -0.80 at step 300 on and never off."""
    manifest = {"points": []}
    for setting, finals in (("on", q_on), ("off", q_off)):
        for seed, q in enumerate(finals):
            name = f"homeostasis-{setting}-seed-{seed}"
            if setting == "on":
                evals = [(100, 0.5, -0.5, 1.0), (200, 0.995, -0.7, 1.2), (300, 0.999, -0.81, 1.3), (400, 0.999, -0.82, q)]
                events = [decision(200, "freeze", ["encoder_a", "decoder"]), decision(300, "relax", []),
                          decision(300, "kept", ["encoder_b"])]
            else:
                evals = [(100, 0.4, -0.5, 1.0), (200, 0.9, -0.6, 1.1), (300, 0.991, -0.7, 1.2), (400, 0.992, -0.75, q)]
                events = []
            write_run(tmp_path / name, evals, events, setting, **point_overrides.get(name, {}))
            manifest["points"].append({"name": name, "values": {"model.homeostasis": setting,
                                                                "train.seed": str(seed)}})
    points, _ = load_points(tmp_path, manifest)
    return points


# ------------------------------------------------------------------ the ablation's rules

@pytest.mark.parametrize("q_on, q_off, rule, verdict", [
    ([1.50, 1.52, 1.51], [1.40, 1.41, 1.40], "1", "homeostasis helps: Q on - off +0.1067"),
    ([1.30, 1.31, 1.30], [1.40, 1.42, 1.41], "2", "homeostasis hurts: Q on - off -0.1067"),
    ([1.40, 1.41, 1.40], [1.40, 1.40, 1.41], "3", "no difference that matters: Q on - off +0.0000"),
    # a real difference (the interval above 0) too small to matter is no help
    ([1.4003, 1.4002, 1.4004], [1.40, 1.40, 1.40], "3", "no difference that matters: Q on - off +0.0003"),
    # above 0 but reaching past the resolution with a mean below it: cannot tell
    ([1.43, 1.47, 1.40], [1.40, 1.40, 1.40], "4", "cannot tell: the interval is too wide"),
    ([1.60, 1.30, 1.40], [1.40, 1.40, 1.41], "4", "cannot tell: the interval is too wide"),
    ([1.50], [1.40], "5", "cannot tell: fewer than 2 seeds"),
])
def test_each_verdict_rule_on_numbers_made_to_trigger_it(tmp_path, q_on, q_off, rule, verdict):
    findings = sweep_findings(sweep(tmp_path, q_on, q_off))
    (conclusion,) = findings.conclusions
    assert conclusion.rule == rule, conclusion.verdict
    assert conclusion.verdict.startswith(verdict), conclusion.verdict
    diffs = [a - b for a, b in zip(q_on, q_off)]
    if len(diffs) > 1:  # the verdict ends with the interval, as scipy computes it
        mean = sum(diffs) / len(diffs)
        lo, hi = scipy.stats.t.interval(0.95, len(diffs) - 1, loc=mean, scale=scipy.stats.sem(diffs)) \
            if len(set(diffs)) > 1 else (mean, mean)
        assert conclusion.verdict.split(", the difference")[0].split(" (not 0")[0].split(", within")[0] \
            .split(", reaching")[0].endswith(
            f"over {len(diffs)} seeds [{lo:+.4f}, {hi:+.4f}]"), conclusion.verdict
    else:
        assert conclusion.verdict.endswith(f"Q on - off {diffs[0]:+.4f} from one seed pair, no interval")
        assert any("(one seed: the interval cannot be computed)" in n for n in conclusion.numbers)


def test_pairs_by_seed_and_counts_steps_to_the_targets_and_decisions(tmp_path):
    findings = sweep_findings(sweep(tmp_path, [1.5, 1.6, 1.7], [1.4, 1.4, 1.4]))
    (conclusion,) = findings.conclusions
    assert conclusion.group == "all points" and conclusion.left_out == []
    assert conclusion.numbers[0] == ("3 seed pairs: seed 0 (homeostasis-on-seed-0 / homeostasis-off-seed-0), seed 1 "
                                     "(homeostasis-on-seed-1 / homeostasis-off-seed-1), seed 2 "
                                     "(homeostasis-on-seed-2 / homeostasis-off-seed-2)")
    assert "final Q: on 1.6000, off 1.4000; on - off +0.2000" in " ".join(conclusion.numbers)
    steps = {n.split(":")[0]: n for n in conclusion.numbers if n.startswith("steps to")}
    # every pair differs by exactly -100 steps: a zero-width interval
    assert steps["steps to coverage >= 0.99"] == (
        "steps to coverage >= 0.99: on 200, off 300 (reached by 3 of 3 on-runs, 3 of 3 off-runs); on - off -100, "
        "95 % t interval over the 3 seeds where both reached it [-100, -100]")
    assert steps["steps to hierarchy <= -0.80"] == (
        "steps to hierarchy <= -0.80: on 300, off not reached (reached by 3 of 3 on-runs, 0 of 3 off-runs); "
        "no difference: no seed where both arms reached it")
    # freeze + relax count, "kept" changes nothing
    assert "per on-run: seed 0 2, seed 1 2, seed 2 2" in conclusion.numbers[-1]

    ((title, headers, rows),) = findings.tables
    assert "homeostasis on against off" in title
    assert [r[0] for r in rows] == ["0", "1", "2", "mean"]
    row = dict(zip(headers, rows[1]))
    assert row["Q on"] == "1.6000" and row["Q off"] == "1.4000" and row["Q on - off"] == "+0.2000"
    assert row["coverage on"] == "0.9990" and row["hierarchy off"] == "-0.7500"
    assert row["steps to hierarchy <= -0.80 off"] == "not reached"
    assert row["decisions (on)"] == "2 (1 freeze, 0 unfreeze, 1 relax)"
    mean = dict(zip(headers, rows[-1]))
    assert mean["Q on"] == "1.6000" and mean["Q on - off"] == "+0.2000" and mean["decisions (on)"] == "2.0"


def test_an_unfinished_point_is_left_out_and_its_partner_named(tmp_path):
    points = sweep(tmp_path, [1.5, 1.6, 1.5], [1.4, 1.4, 1.4],
                   **{"homeostasis-off-seed-2": {"state": "stopped", "total": 800}})
    (conclusion,) = sweep_findings(points).conclusions
    assert conclusion.left_out == [
        "homeostasis-off-seed-2 stopped at step 400 of 800",
        "homeostasis-on-seed-2: no finished homeostasis-off point with seed 2 to pair with"]
    assert conclusion.numbers[0].startswith("2 seed pairs: seed 0")
    assert conclusion.numbers[-1].startswith("left out: homeostasis-off-seed-2 stopped")
    assert "over 2 seeds" in conclusion.verdict


def test_no_homeostasis_grid_leaves_the_default_rules(tmp_path):
    points = sweep(tmp_path, [1.5, 1.6], [])
    assert sweep_findings(points) is None


# ------------------------------------------------------------------ the timeline

def test_frozen_intervals_from_freeze_and_unfreeze_events():
    events = [decision(100, "freeze", ["encoder_a", "decoder"]), decision(200, "freeze", ["encoder_a"]),  # already
              decision(300, "unfreeze", ["encoder_a"]), decision(400, "relax", []),
              decision(500, "freeze", ["encoder_a"]), decision(600, "kept", ["encoder_b"])]
    assert frozen_intervals(events, 800) == {"encoder_a": [(100, 300), (500, 800)], "encoder_b": [],
                                             "decoder": [(100, 800)]}


def test_a_resume_undoes_the_decisions_logged_after_its_step():
    events = [decision(100, "freeze", ["encoder_b"]), decision(300, "unfreeze", ["encoder_b"]),
              {"kind": "resume", "step": 200}, decision(400, "unfreeze", ["encoder_b"])]
    assert [e["step"] for e in homeostasis_history(events)] == [100, 400]
    assert frozen_intervals(events, 500)["encoder_b"] == [(100, 400)]


def test_jump_alerts_are_labelled_short_and_logged_once():
    message = "jump: coverage 0.41 -> 0.93 (+0.52, 12 noise sigmas) at step 300 after a plateau of 5 values"
    alert = {"kind": "alert", "detector": "jump", "step": 320, "message": message, "evidence": {"any": 1}}
    events = [alert, dict(alert), {"kind": "alert", "detector": "stall", "step": 10, "message": "x"},
              {"kind": "alert", "detector": "grokking", "step": 90, "message": "grokking: " + "a" * 40}]
    assert jump_alerts(events) == [(90, "grokking", "grokking: " + "a" * 40),
                                   (320, "jump: coverage 0.41 -> 0.93", message)]


def test_write_timeline_draws_both_files(tmp_path):
    events = [decision(100, "freeze", ["encoder_a", "decoder"]), decision(300, "unfreeze", ["encoder_a", "decoder"]),
              decision(200, "freeze", ["encoder_b"]),
              {"kind": "alert", "detector": "jump", "step": 200, "message": "jump: coverage 0.5 -> 0.995 (big)",
               "evidence": {}}]
    run = write_run(tmp_path / "run", [(100, 0.5, -0.5, 1.0), (200, 0.995, -0.7, 1.2), (300, 0.97, -0.8, 1.3)],
                    events)
    paths = write_timeline(run)
    assert paths == [run / "plots" / "homeostasis-timeline.svg", run / "plots" / "homeostasis-timeline.png"]
    svg = paths[0].read_text()
    assert paths[1].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "jump: coverage 0.5 -&gt; 0.995" in svg and "hierarchy ceiling -0.83205" in svg
    assert "<title>encoder_b frozen: steps 200-300</title>" in svg  # frozen to the last step
    assert "<title>encoder_a frozen: steps 100-300</title>" in svg
    figure = draw_timeline(run)
    assert [ax.get_xlabel() for ax in figure.axes][-1] == "step"
    assert not math.isnan(figure.get_figheight())


def test_write_timeline_writes_nothing_without_the_columns(tmp_path):
    run = tmp_path / "plain"
    run.mkdir()
    log = MetricsLog(run, ["step", "loss"])
    log.write({"step": 10, "loss": 2.0})
    log.close()
    assert write_timeline(run) == [] and draw_timeline(run) is None
    assert not (run / "plots").exists()
