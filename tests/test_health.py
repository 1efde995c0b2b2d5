"""Health detectors on small synthetic and real curves, their policies in real runs, `trainlab
check`, and `trainlab preflight` verdicts."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from conftest import trainlab
from trainlab.config import HealthConfig
from trainlab.engine.logs import read_events, read_metrics
from trainlab.health.detectors import (DETECTORS, OVERFIT_MIN_VAL_ROWS, SPIKE_MIN_HISTORY, Collapse, Divergence,
                                       GradRegime, Grokking, NonFinite, Overfitting, Plateau, Spike, StuckAtBaseline,
                                       run_offline)

LN2 = math.log(2)


def _feed(detector, rows):
    alerts = []
    for row in rows:
        alerts += detector.update(row["step"], row)
    return alerts


def _rows(losses, start=10, every=10, **columns):
    out = []
    for i, loss in enumerate(losses):
        row = {"step": start + i * every, "loss": float(loss)}
        for k, values in columns.items():
            row[k] = float(values[i])
        out.append(row)
    return out


def _noise(n, scale, seed=0):
    return np.random.default_rng(seed).normal(0, scale, n)


def test_nonfinite():
    d = NonFinite(HealthConfig(), LN2, 1000)
    alerts = _feed(d, _rows([0.5, 0.4, float("nan"), float("nan")], grad_norm=[1, 1, 1, float("inf")]))
    assert len(alerts) == 1 and alerts[0]["step"] == 30 and alerts[0]["severity"] == "critical"


def test_divergence_on_a_sustained_rise_but_not_on_a_falling_curve():
    cfg = HealthConfig(window=20, warmup_fraction=0.0)
    falling = 2.0 * np.exp(-np.arange(60) / 20) + 0.3 + _noise(60, 0.01)
    assert _feed(Divergence(cfg, LN2, 1000), _rows(falling)) == []
    rising = np.concatenate([falling[:30], falling[29] + 0.03 * np.arange(1, 31)]) + _noise(60, 0.01, 1)
    alerts = _feed(Divergence(cfg, LN2, 1000), _rows(rising))
    assert len(alerts) == 1 and "sustained rise" in alerts[0]["message"]
    best = int(np.argmin(rising[:40]))
    # the first row from which the loss stays above 1.1 x its best: where a person sees the rise
    onset = next(i for i in range(best, 60) if (rising[i:] > 1.1 * rising[best]).all())
    fired = (alerts[0]["step"] - 10) // 10
    assert onset <= fired <= onset + 6, (onset, fired)  # a slow rise: Mann-Kendall needs a few rows
    assert alerts[0]["evidence"]["onset_step"] == 10 + 10 * best


def test_divergence_latency_on_clean_rises():
    """Stated bounds: a fast climb (each row up, >= 1.5 x the best) fires on its third row above
    1.1 x the best; a slow monotone rise when six rows after the best make Mann-Kendall
    significant at alpha 0.01 (the best itself is left out of the test: it is the minimum by
    selection)."""
    cfg = HealthConfig(window=20, warmup_fraction=0.0)
    descent = list(np.linspace(3.0, 1.0, 10))  # best 1.0 at row 9
    fast = descent + [1.2, 1.6, 2.2, 3.0, 3.5]
    alerts = _feed(Divergence(cfg, math.log(97), 1000), _rows(fast))
    assert [a["step"] for a in alerts] == [10 + 10 * 12] and alerts[0]["evidence"]["best_step"] == 100
    slow = descent + [1.15, 1.2, 1.25, 1.3, 1.35, 1.4]
    alerts = _feed(Divergence(cfg, math.log(97), 1000), _rows(slow))
    assert [a["step"] for a in alerts] == [10 + 10 * 15]
    two_rows_up = descent + [1.6, 2.0, 1.0, 1.0]  # falls back: no divergence
    assert _feed(Divergence(cfg, math.log(97), 1000), _rows(two_rows_up)) == []


# The losses a Hugging Face Trainer logged (means over 10 steps) of a healthy 4-class fit, as read by
# bench/foreign_labelled_logs.py: down to ~0.16 by row 10, then flat with noise, a low outlier 0.1153
# at row 40.  A person sees no divergence.  Before the rise was measured from the level after the best
# and against the rows' own noise (and the trend test left the best out), it fired at row 50.
HF_HEALTHY = [0.9804, 0.4914, 0.318, 0.2782, 0.213, 0.2461, 0.2174, 0.2022, 0.1801, 0.1613, 0.1684, 0.1922,
              0.1786, 0.1642, 0.1554, 0.1678, 0.1582, 0.1619, 0.1792, 0.1484, 0.1427, 0.1764, 0.1505, 0.1643,
              0.179, 0.1723, 0.1647, 0.1638, 0.1255, 0.1704, 0.162, 0.1769, 0.1879, 0.148, 0.1793, 0.1526,
              0.1722, 0.1608, 0.1377, 0.1153, 0.1623, 0.1841, 0.1437, 0.1333, 0.1223, 0.139, 0.1276, 0.1652,
              0.1689, 0.1879, 0.1514, 0.1508, 0.1369, 0.155, 0.1349, 0.1551, 0.1408, 0.1808, 0.1674, 0.1973]


def test_divergence_is_not_a_noisy_flat_loss_above_its_lowest_row():
    cfg = HealthConfig(window=20)
    assert _feed(Divergence(cfg, math.log(4), 600), _rows(HF_HEALTHY)) == []
    # the same curve climbing for real after its outlier best is still caught: +0.05 a row from row 50
    climbing = HF_HEALTHY[:50] + [0.19 + 0.05 * i for i in range(1, 8)]
    alerts = _feed(Divergence(cfg, math.log(4), 600), _rows(climbing))
    assert alerts and alerts[0]["evidence"]["best"] == 0.1153


def test_divergence_back_above_the_baseline():
    # the rise test waits for warm-up (90 % of 1000 steps here); "back above" does not
    cfg = HealthConfig(window=20, warmup_fraction=0.9)
    losses = np.concatenate([np.full(30, 0.55), np.full(30, 0.80)]) + _noise(60, 0.01)
    alerts = _feed(Divergence(cfg, LN2, 1000), _rows(losses))
    assert alerts and "back above the baseline" in alerts[0]["message"]


def test_spike_fires_once_on_a_jump_and_rearms():
    cfg = HealthConfig(window=20)
    losses = 1.0 + _noise(70, 0.02)
    losses[40] = 5.0  # a one-row spike: fires, then clears on the next row
    losses[50] = 4.0  # a second spike after the first cleared: fires again
    losses[60:62] = 6.0  # two rows up: one episode, one alert
    alerts = _feed(Spike(cfg, LN2, 1000), _rows(losses))
    assert [a["step"] for a in alerts] == [410, 510, 610]
    assert all(a["evidence"]["z"] > 6 for a in alerts)
    assert _feed(Spike(cfg, LN2, 1000), _rows(1.0 + _noise(70, 0.02))) == []


@pytest.mark.parametrize("seed", range(5))
def test_spike_warm_up_is_five_rows_and_latency_none(seed: int):
    """Stated bounds: a row can be judged once SPIKE_MIN_HISTORY finite rows precede it, and a
    spike fires on its own row."""
    losses = 2.0 + _noise(30, 0.02, seed)
    early = losses.copy()
    early[SPIKE_MIN_HISTORY] = 8.0  # the first judgeable row
    alerts = _feed(Spike(HealthConfig(), LN2, 1000), _rows(early))
    assert [a["step"] for a in alerts] == [10 + 10 * SPIKE_MIN_HISTORY]
    blind = losses.copy()
    blind[SPIKE_MIN_HISTORY - 1] = 8.0  # too little history: not judged, and said so by `checked`
    detector = Spike(HealthConfig(), LN2, 1000)
    assert _feed(detector, _rows(blind)) == []
    assert detector.checked == len(blind) - SPIKE_MIN_HISTORY


@pytest.mark.parametrize("seed", range(5))
def test_spike_on_a_falling_curve_near_zero(seed: int):
    """The README's main job: the loss falls by factors (4.38 at step 50 ... 0.0012 at step 550),
    then jumps to 0.17.  Judged against a window whose median and MAD span the whole descent, that
    jump scored 5.2 robust sigma and was missed; against where the curve is now it is a spike."""
    rng = np.random.default_rng(seed)
    losses = 4.4 * 0.55 ** np.arange(30) * np.exp(rng.normal(0, 0.15, 30))
    assert _feed(Spike(HealthConfig(), math.log(97), 1500), _rows(losses, start=50, every=50)) == []
    jumped = losses.copy()
    jumped[11] = 50 * np.median(losses[6:11])  # the 12th row, as at step 600 of the main job
    alerts = _feed(Spike(HealthConfig(), math.log(97), 1500), _rows(jumped, start=50, every=50))
    assert [a["step"] for a in alerts] == [600] and alerts[0]["evidence"]["log_scale"]


def test_spike_must_rise_above_a_floor_of_the_baseline():
    """1e-5 -> 1e-4 on a memorised task is 10x but a rise of 9e-5 against a baseline of 4.57."""
    losses = 1e-5 * np.exp(_noise(30, 0.05))
    losses[20] = 1e-4
    assert _feed(Spike(HealthConfig(), math.log(97), 4000), _rows(losses)) == []
    assert len(_feed(Spike(HealthConfig(spike_min_rise=0.0), math.log(97), 4000), _rows(losses))) == 1


def test_plateau_on_a_flat_curve_only():
    cfg = HealthConfig(plateau_window=30, warmup_fraction=0.0)
    alerts = _feed(Plateau(cfg, LN2, 1000), _rows(0.9 + _noise(50, 0.01)))
    assert len(alerts) == 1 and alerts[0]["severity"] == "info"
    falling = np.linspace(2.0, 0.5, 50) + _noise(50, 0.01)
    assert _feed(Plateau(cfg, LN2, 1000), _rows(falling)) == []


def test_stuck_at_the_baseline_like_the_stegastamp_report():
    cfg = HealthConfig(window=20, warmup_fraction=0.1)
    stuck = LN2 + _noise(40, 0.003)  # "loss stuck at 0.6931"
    alerts = _feed(StuckAtBaseline(cfg, LN2, 400), _rows(stuck))
    assert len(alerts) == 1 and "0.6931" in alerts[0]["message"] and "at the baseline" in alerts[0]["message"]
    learning = 0.60 + _noise(40, 0.003)
    assert _feed(StuckAtBaseline(cfg, LN2, 400), _rows(learning)) == []


def test_stuck_does_not_fire_on_a_loss_still_falling_from_the_baseline():
    """Ten rows falling 2.01 -> 1.65 against ln 7 = 1.95 (a real smoke run's start): the window's
    mean is within 5 % of the guess and a trend test at alpha 0.01 does not always call 10 noisy
    rows, but the loss is falling: over 20 noise draws, no alert.  The same noise at the guess is
    stuck in nearly every draw."""
    cfg = HealthConfig(window=20, warmup_fraction=0.0)
    falling_alerts = flat_alerts = 0
    for seed in range(20):
        falling = np.linspace(2.01, 1.65, 10) + _noise(10, 0.06, seed)
        falling_alerts += len(_feed(StuckAtBaseline(cfg, math.log(7), 100), _rows(falling, start=1, every=1)))
        flat = math.log(7) + _noise(10, 0.06, seed)
        flat_alerts += len(_feed(StuckAtBaseline(cfg, math.log(7), 100), _rows(flat, start=1, every=1)))
    assert falling_alerts == 0 and flat_alerts >= 18


@pytest.mark.parametrize("window", [5, 6, 7])
def test_a_short_window_still_judges(window: int):
    """health.window >= 5 is allowed: the window detectors judge once the window is full, not never."""
    cfg = HealthConfig(window=window, warmup_fraction=0.0)
    detector = StuckAtBaseline(cfg, LN2, 1000)
    alerts = _feed(detector, _rows(LN2 + _noise(12, 0.003)))
    assert detector.checked == 12 - window + 1 and len(alerts) == 1


def test_collapse_distinct_predictions_rank_and_bounds():
    cfg = HealthConfig(collapse_metric="distinct_preds", collapse_min=10, rank_metric="rank_me", rank_drop=0.5,
                       bounds={"residual": (0.01, 10.0)})
    n = 12
    rows = _rows(np.ones(n), distinct_preds=[200, 150, 90, 40, 12, 8, 3, 2, 2, 2, 2, 2],
                 rank_me=[30, 32, 31, 28, 25, 20, 14, 12, 12, 12, 12, 12],
                 residual=[0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.2, 0.005, 0.005, 0.2, 0.2, 0.2])
    alerts = _feed(Collapse(cfg, LN2, 1000), rows)
    by_metric = {a["evidence"]["metric"]: a["step"] for a in alerts}
    assert by_metric == {"distinct_preds": 60, "rank_me": 70, "residual": 80}


def test_grokking_reports_memorisation_generalisation_and_gap():
    cfg = HealthConfig()
    steps = list(range(100, 3100, 100))
    acc = [min(1.0, 0.2 + s / 500) for s in steps]  # train accuracy 1.0 from step 400
    val = [0.05 if s < 2000 else 0.97 for s in steps]  # validation jumps at step 2000
    rows = [{"step": s, "loss": 1.0, "acc": a, "val_acc": v} for s, a, v in zip(steps, acc, val)]
    alerts = _feed(Grokking(cfg, LN2, 3000), rows)
    assert len(alerts) == 1
    ev = alerts[0]["evidence"]
    assert (ev["memorisation_step"], ev["generalisation_step"], ev["gap"]) == (400, 2000, 1600)
    assert alerts[0]["message"].startswith("grokking")


def _evaluated(n: int, every: int = 5, **columns) -> list[dict]:
    """n log rows (steps 10, 20, ...), held-out columns (val_*) on every `every`-th row only, as a
    run with eval.every = every x log.every logs them."""
    rows = _rows(columns.pop("loss"), **{k: v for k, v in columns.items() if not k.startswith("val_")})
    for i, row in enumerate(rows):
        if (i + 1) % every == 0:
            row.update({k: float(v[i]) for k, v in columns.items() if k.startswith("val_")})
    return rows


@pytest.mark.parametrize("seed", range(4))
def test_overfitting_stays_quiet_on_a_healthy_generalising_curve(seed: int):
    """Training and validation accuracy rise together (validation a little behind), the
    validation loss falls: no alert, whatever the noise -- and every validation row was judged."""
    n = 200
    t = np.arange(n)
    acc = np.clip(1 - 0.95 * np.exp(-t / 30) + _noise(n, 0.01, seed), 0, 1)
    val_acc = np.clip(acc - 0.06 + _noise(n, 0.02, seed + 10), 0, 1)
    loss = 3 * np.exp(-t / 30) + 0.05 + np.abs(_noise(n, 0.01, seed + 20))
    val_loss = loss + 0.2 + np.abs(_noise(n, 0.05, seed + 30))
    d = Overfitting(HealthConfig(), math.log(97), 2000)
    assert _feed(d, _evaluated(n, loss=loss, acc=acc, val_acc=val_acc, val_loss=val_loss)) == []
    assert d.checked == n // 5


def test_overfitting_fires_on_memorisation_one_validation_row_late_and_clears_on_generalisation():
    """acc 1.0 from row 20 on, val_acc 0.3 until row 100, then 0.97 (grokking).  Stated latency:
    the second validation row past the gap; it clears at the first validation row within half the
    gap, and a single validation row knocked down (row 135) is no new episode."""
    n = 160
    t = np.arange(n)
    acc = np.minimum(1.0, 0.05 * t)
    val_acc = np.where(t < 100, 0.3, 0.97)
    val_acc[134] = 0.6  # one evaluation knocked down by a spike
    loss = np.maximum(3 - 0.15 * t, 0.01)
    rows = _evaluated(n, every=5, loss=loss, acc=acc, val_acc=val_acc, val_loss=np.full(n, 4.0))
    d = Overfitting(HealthConfig(), math.log(97), 2000)
    alerts = _feed(d, rows)
    val_steps = [r["step"] for r in rows if "val_acc" in r]
    past = [r["step"] for r in rows if "val_acc" in r and r["acc"] >= 0.95 and r["acc"] - r["val_acc"] >= 0.2]
    assert [a["step"] for a in alerts] == [past[1]]  # the second validation row past the gap
    assert "acc 1 while val_acc 0.3 (gap 0.7 >= 0.2)" in alerts[0]["message"]
    generalised = next(s for s in val_steps if s > 1000)
    assert not d.active and d.cleared_at == generalised


def test_overfitting_on_a_rising_validation_loss_but_not_when_both_losses_rise():
    """No accuracy logged: the validation loss climbing 20 % while the training loss falls is
    overfitting; both rising is divergence, not this detector's business.  Warm-up: eight
    validation rows."""
    n = 150
    t = np.arange(n)
    rise = np.concatenate([np.full(50, 2.0), 2.0 + 0.004 * np.arange(n - 50)]) + _noise(n, 0.01)
    falling = 2.0 * np.exp(-t / 40) + 0.1 + np.abs(_noise(n, 0.005, 1))
    d = Overfitting(HealthConfig(), math.log(97), 2000)
    alerts = _feed(d, _evaluated(n, loss=falling, val_loss=rise))
    assert len(alerts) == 1 and "val_loss rising" in alerts[0]["message"]
    assert alerts[0]["evidence"]["val_loss_rise"] >= 0.05 and alerts[0]["evidence"]["p_value"] < 0.01
    assert alerts[0]["step"] > 10 * 50  # after the rise began
    assert _feed(Overfitting(HealthConfig(), math.log(97), 2000),
                 _evaluated(n, loss=rise + 0.5, val_loss=rise)) == []
    k = 5 * (OVERFIT_MIN_VAL_ROWS - 1)
    short = _evaluated(k, loss=falling[:k], val_loss=2.0 + 0.05 * np.arange(k))
    d = Overfitting(HealthConfig(), math.log(97), 2000)
    assert _feed(d, short) == [] and d.checked == 0  # fewer validation rows than its warm-up: not judged


def test_grad_norm_regime_change():
    cfg = HealthConfig(window=20)
    norms = np.exp(np.concatenate([np.zeros(25), np.full(25, math.log(6.0))]) + _noise(50, 0.1))
    alerts = _feed(GradRegime(cfg, LN2, 1000), _rows(np.ones(50), grad_norm=norms))
    assert len(alerts) == 1 and alerts[0]["evidence"]["ratio"] > 3
    steady = np.exp(_noise(50, 0.1))
    assert _feed(GradRegime(cfg, LN2, 1000), _rows(np.ones(50), grad_norm=steady)) == []


def test_run_offline_counts_what_was_judged():
    alerts, detectors = run_offline(HealthConfig(), LN2, 100, _rows([0.5] * 3))
    assert alerts == [] and {d.name: d.checked for d in detectors}["divergence"] == 0
    # 30 rows, steps 10..300 of 100 planned (warm-up over from step 10): divergence judges from its
    # 5th finite row, spike from its 6th, stuck and plateau once half their window is there
    rows = _rows(0.5 + _noise(30, 0.01))
    alerts, detectors = run_offline(HealthConfig(window=20, plateau_window=20), LN2, 100, rows)
    checked = {d.name: d.checked for d in detectors}
    assert checked["divergence"] == 26 and checked["spike"] == 25
    assert checked["stuck"] == 21 and checked["plateau"] == 21


# ---- real runs ------------------------------------------------------------------------------

SMOKE = ["run", "modadd", "--preset", "smoke"]


def test_stuck_run_is_caught_live_and_offline(tmp_path: Path):
    """A learning rate too small to move the weights: the loss stays at ln(23)."""
    out = trainlab(*SMOKE, "--steps", "150", "--set", "optim.lr=1e-9", "--set", "train.clip=0",
                   "--set", "health.window=10", "--run-dir", "stuck", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    alerts = [e for e in read_events(tmp_path / "stuck" / "events.jsonl") if e["kind"] == "alert"]
    assert [a["detector"] for a in alerts if a["detector"] == "stuck"] == ["stuck"]
    check = trainlab("check", "stuck", cwd=tmp_path)
    assert check.returncode == 1
    assert "stuck" in check.stdout and "FAIL" in check.stdout
    saved = json.loads((tmp_path / "stuck" / "check.json").read_text())
    assert any(a["detector"] == "stuck" for a in saved["alerts"])


def test_stop_policy_checkpoints_and_exits_1(tmp_path: Path):
    out = trainlab(*SMOKE, "--set", "health.collapse=stop", "--set", "health.bounds={acc: [0, 0.08]}",
                   "--run-dir", "r", cwd=tmp_path)
    assert out.returncode == 1, out.stderr
    assert "health policy" in out.stderr and "health.collapse=stop" in out.stderr
    events = read_events(tmp_path / "r" / "events.jsonl")
    alert = [e for e in events if e["kind"] == "alert"][0]
    assert alert["policy"] == "stop"
    assert any(e["kind"] == "checkpoint" and e["reason"] == "health policy" for e in events)
    assert json.loads((tmp_path / "r" / "status.json").read_text())["state"] == "stopped"
    # the report written at the stop carries the verdict that stopped it, as `trainlab check` makes it
    claims = {c["name"]: c for c in json.loads((tmp_path / "r" / "check.json").read_text())["claims"]}
    assert claims["collapse"]["verdict"] == "fail" and claims["collapse"]["value"].startswith(f"step {alert['step']}: ")
    report = (tmp_path / "r" / "report.md").read_text()
    assert f"| collapse | fail | step {alert['step']}: out of bounds: acc = " in report


@pytest.mark.parametrize("case,expected", [("healthy", "READY"), ("stuck", "NOT READY")])
def test_preflight_verdicts(tmp_path: Path, case: str, expected: str):
    extra = [] if case == "healthy" else ["--set", "optim.lr=1e-9"]
    out = trainlab("preflight", "modadd", "--preset", "smoke", "--steps", "120", *extra, "--run-dir", "pf",
                   cwd=tmp_path, timeout=300)
    assert f"preflight {expected}" in out.stdout, out.stdout + out.stderr
    assert out.returncode == (0 if expected == "READY" else 1)
    report = json.loads((tmp_path / "pf" / "preflight.json").read_text())
    names = {c["name"]: c for c in report["claims"]}
    assert {"learning signal", "gradients finite", "numerics", "host memory", "speed", "resume"} <= set(names)
    assert names["resume"]["verdict"] == "pass" and "bitwise identical" in names["resume"]["value"]
    if case == "stuck":
        assert names["learning signal"]["verdict"] == "fail" and "not learning" in names["learning signal"]["value"]
    else:
        assert names["learning signal"]["value"].startswith("learning")
    assert (tmp_path / "pf" / "report.md").exists() and (tmp_path / "pf" / "report.html").exists()
    first = (tmp_path / "pf" / "report.md").read_text().splitlines()
    assert first[0].startswith(f"# Preflight {expected}: ") and first[2].startswith(f"**{expected}**: ")
    if case == "stuck":  # the first reason, in words
        assert first[2].split(": ", 1)[1].startswith("not learning")


RECORDED = Path(__file__).parent / "data"


def _recorded_rows(name: str) -> list[dict]:
    """A recorded run's metrics as a person reads them: the last row per step, in step order."""
    by_step = {r["step"]: r for r in read_metrics(RECORDED / name / "metrics.csv")}
    return [by_step[k] for k in sorted(by_step)]


def test_recorded_grokking_run_reports_the_generalisation_step(tmp_path: Path):
    """A real `trainlab run modadd --preset grok` (tests/data/README.md): the detector reports the
    first logged step with acc >= 0.99 and the first with val_acc >= 0.9 -- exactly, since its
    resolution is one log row -- both read here from the CSV."""
    import shutil

    rows = _recorded_rows("modadd_grok")
    memorised = next(r["step"] for r in rows if r["acc"] >= 0.99)
    generalised = next(r["step"] for r in rows if r.get("val_acc", 0) >= 0.9)
    assert memorised < generalised
    shutil.copytree(RECORDED / "modadd_grok", tmp_path / "grok")
    out = trainlab("check", "grok", cwd=tmp_path)
    alerts = json.loads((tmp_path / "grok" / "check.json").read_text())["alerts"]
    grok = [a for a in alerts if a["detector"] == "grokking"]
    assert len(grok) == 1, out.stdout
    ev = grok[0]["evidence"]
    assert (ev["memorisation_step"], ev["generalisation_step"]) == (memorised, generalised)
    assert ev["gap"] == generalised - memorised
    assert not [a for a in alerts if a["detector"] in ("divergence", "stuck")]


def test_the_readmes_main_job_is_reported_as_overfitting(tmp_path: Path):
    """tests/data/modadd_quick: acc 1.0, val_acc 0.29 and a val_loss climbing from 4.79 to 6.87:
    `trainlab check` says overfitting, still at the end, with the rising validation loss."""
    rows = _recorded_rows("modadd_quick")
    assert max(r["acc"] for r in rows) == 1.0 and max(r.get("val_acc") or 0 for r in rows) < 0.3
    alerts = [a for a in _check_recorded("modadd_quick", tmp_path) if a["detector"] == "overfitting"]
    val_rows = [r for r in rows if r.get("val_acc") is not None]
    past = [r["step"] for r in val_rows if r["acc"] >= 0.95 and r["acc"] - r["val_acc"] >= 0.2]
    assert [a["step"] for a in alerts] == [past[1]]
    claim = {c["name"]: c for c in json.loads((tmp_path / "modadd_quick" / "check.json").read_text())["claims"]}
    over = claim["overfitting"]
    assert over["verdict"] == "warn" and over["value"].startswith(f"since step {past[1]}: overfitting: acc 1")
    assert "still at the end (step 1500: " in over["value"] and "val_loss rising 4.787 -> 6.865" in over["value"]


def test_recorded_grokking_run_overfits_then_clears_when_it_generalises(tmp_path: Path):
    rows = _recorded_rows("modadd_grok")
    generalised = next(r["step"] for r in rows if r.get("val_acc", 0) >= 0.9)
    alerts = [a for a in _check_recorded("modadd_grok", tmp_path) if a["detector"] == "overfitting"]
    assert len(alerts) == 1 and alerts[0]["step"] < generalised
    claim = {c["name"]: c for c in json.loads((tmp_path / "modadd_grok" / "check.json").read_text())["claims"]}
    over = claim["overfitting"]
    cleared = int(over["value"].split("-", 1)[1].split(",", 1)[0])
    assert over["verdict"] == "info" and "cleared by the end" in over["value"]
    assert alerts[0]["step"] < cleared <= generalised  # not later than the generalisation a person sees


def test_recorded_run_without_weight_decay_never_groks(tmp_path: Path):
    import shutil

    shutil.copytree(RECORDED / "modadd_grok_no_wd", tmp_path / "nowd")
    trainlab("check", "nowd", cwd=tmp_path)
    data = json.loads((tmp_path / "nowd" / "check.json").read_text())
    assert not [a for a in data["alerts"] if a["detector"] in ("grokking", "divergence", "stuck")]
    claim = [c for c in data["claims"] if c["name"] == "grokking"][0]
    assert claim["value"].startswith("not observed") and "val_acc 0.2962" in claim["value"]
    over = [c for c in data["claims"] if c["name"] == "overfitting"][0]
    assert over["verdict"] == "warn" and "still at the end" in over["value"]  # it memorised and stayed there


def test_preflight_resume_check_keeps_schedules_over_the_run_length(tmp_path: Path):
    """A schedule that depends on train.steps (cosine decay to the end) must not make the resume
    check fail: the check stops early instead of shortening the run."""
    out = trainlab("preflight", "modadd", "--preset", "smoke", "--steps", "60", "--set", "schedule.decay=cosine",
                   "--set", "schedule.min_lr_ratio=0", "--run-dir", "pf", cwd=tmp_path, timeout=300)
    claims = {c["name"]: c for c in json.loads((tmp_path / "pf" / "preflight.json").read_text())["claims"]}
    assert claims["resume"]["verdict"] == "pass", claims["resume"]


def _check_recorded(name: str, tmp_path: Path) -> list[dict]:
    import shutil

    shutil.copytree(RECORDED / name, tmp_path / name)
    trainlab("check", name, cwd=tmp_path)
    return json.loads((tmp_path / name / "check.json").read_text())["alerts"]


def _spikes_a_person_sees(losses: list[float], history: int = 5, factor: float = 20.0) -> list[int]:
    """Rows whose loss is more than `factor` x the median of the `history` rows before the
    episode; consecutive such rows are one spike, named by its first row."""
    first_rows, episode_base = [], None
    for i in range(history, len(losses)):
        base = episode_base if episode_base is not None else float(np.median(losses[i - history:i]))
        if losses[i] > factor * base:
            if episode_base is None:
                first_rows.append(i)
            episode_base = base
        else:
            episode_base = None
    return first_rows


@pytest.mark.parametrize("name,first_spike_before", [("modadd_grok", 500), ("modadd_quick", 650)])
def test_recorded_runs_report_the_spikes_a_person_sees(tmp_path: Path, name: str, first_spike_before: int):
    """Every row more than 20x above the rows before it is a spike, and no other row: Adam's
    periodic spikes at lr 3e-3 in the grokking run (docs/experiments/modadd.md), the first at step
    450 with only 8 rows of history; the README's main job's jump 0.0012 -> 0.17 at step 600."""
    rows = _recorded_rows(name)
    expected = [rows[i]["step"] for i in _spikes_a_person_sees([r["loss"] for r in rows])]
    assert expected and expected[0] < first_spike_before  # the data has what this test is about
    alerts = _check_recorded(name, tmp_path)
    assert [a["step"] for a in alerts if a["detector"] == "spike"] == expected
    assert not [a for a in alerts if a["detector"] in ("divergence", "stuck")]


def test_recorded_grokking_run_grad_regime(tmp_path: Path):
    """The gradient norm's level falls after the generalisation."""
    rows = _recorded_rows("modadd_grok")
    generalised = next(r["step"] for r in rows if r.get("val_acc", 0) >= 0.9)
    regime = [a for a in _check_recorded("modadd_grok", tmp_path) if a["detector"] == "grad_regime"]
    assert regime and regime[0]["evidence"]["ratio"] < 1 / 3 and regime[0]["step"] > generalised


def test_recorded_lr_ramp_divergence(tmp_path: Path):
    """The LR ramp run learns to its best loss, then climbs back to the baseline.  A person sees
    the divergence begin at the first row from which the loss stays above 1.1 x the best; the
    detector's stated latency for a fast climb is two rows after that, and it must not fire before."""
    rows = _recorded_rows("modadd_lr_ramp_diverging")
    losses = [r["loss"] for r in rows]
    best = int(np.argmin(losses))
    onset = next(i for i in range(best + 1, len(losses)) if min(losses[i:]) > 1.1 * losses[best])
    assert max(losses[onset:]) > 2 * losses[best]  # the data has what this test is about
    alerts = _check_recorded("modadd_lr_ramp_diverging", tmp_path)
    div = [a for a in alerts if a["detector"] == "divergence"]
    assert len(div) == 1
    fired = [r["step"] for r in rows].index(div[0]["step"])
    assert onset <= fired <= onset + 2, (rows[onset]["step"], div[0]["step"])
    assert div[0]["evidence"]["best"] == losses[best] and div[0]["evidence"]["onset_step"] == rows[best]["step"]
    assert not [a for a in alerts if a["detector"] in ("stuck", "spike", "overfitting")]  # val_loss rises with the loss


def test_recorded_sha256_multi_at_64_rounds_is_stuck_at_ln2(tmp_path: Path):
    alerts = _check_recorded("sha256_multi_64_rounds", tmp_path)
    stuck = [a for a in alerts if a["detector"] == "stuck"]
    assert len(stuck) == 1 and abs(stuck[0]["evidence"]["baseline"] - LN2) < 1e-12
    assert not [a for a in alerts if a["detector"] in ("divergence", "grokking", "overfitting")]


class _EventSink:
    """What HealthMonitor.on_log_row needs of a trainer: an events log and the two requests."""

    def __init__(self):
        self.written: list[dict] = []
        self.events = self

    def write(self, event: dict) -> None:
        self.written.append(event)

    def request_stop(self, reason: str, checkpoint: bool = True, source: str = "stop request") -> None:
        pass

    def request_rollback(self, alert: dict) -> None:
        pass


@pytest.mark.parametrize("name", ["modadd_grok", "modadd_lr_ramp_diverging", "sha256_multi_64_rounds"])
def test_monitor_replay_makes_a_resumed_run_alert_as_the_uninterrupted_one(name: str):
    """A run resumed at any logged step (the monitor rebuilt, the history before it replayed
    silently) raises exactly the alerts the uninterrupted run raised after that step."""
    from trainlab.health.check import load_run
    from trainlab.health.monitor import HealthMonitor

    experiment, cfg, _ = load_run(RECORDED / name)
    baseline = experiment.baseline_loss(cfg)
    rows = _recorded_rows(name)
    whole = HealthMonitor(cfg, baseline)
    sink = _EventSink()
    for row in rows:
        whole.on_log_row(sink, row)
    uninterrupted = sink.written
    assert uninterrupted, "the recorded run must raise alerts for the replay to reproduce"
    for cut in range(1, len(rows)):
        resumed = HealthMonitor(cfg, baseline)
        resumed.on_resume(sink, rows[:cut], "resume")
        sink = _EventSink()
        for row in rows[cut:]:
            resumed.on_log_row(sink, row)
        after = [a for a in uninterrupted if a["step"] > rows[cut - 1]["step"]]
        assert sink.written == after, f"resumed after step {rows[cut - 1]['step']}"
