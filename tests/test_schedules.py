"""LR and loss-weight schedule values at phase boundaries."""

from __future__ import annotations

import math

import pytest

from trainlab.config import LRPhase, ScheduleConfig
from trainlab.engine.schedules import loss_weights, lr_multiplier


def test_warmup_then_cosine_boundaries():
    cfg = ScheduleConfig(warmup=10, decay="cosine", min_lr_ratio=0.1)
    total = 110
    assert lr_multiplier(cfg, 0, total) == 0.0
    assert lr_multiplier(cfg, 5, total) == pytest.approx(0.5)
    assert lr_multiplier(cfg, 10, total) == pytest.approx(1.0)  # warmup ends where decay begins
    assert lr_multiplier(cfg, 60, total) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_multiplier(cfg, 109, total) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 99 / 100)) / 2)
    assert lr_multiplier(cfg, 110, total) == pytest.approx(0.1)  # past the end: held
    assert lr_multiplier(cfg, 500, total) == pytest.approx(0.1)


def test_linear_decay_and_constant():
    lin = ScheduleConfig(warmup=0, decay="linear", min_lr_ratio=0.0)
    assert [lr_multiplier(lin, s, 4) for s in range(5)] == pytest.approx([1.0, 0.75, 0.5, 0.25, 0.0])
    const = ScheduleConfig(warmup=2, decay="constant")
    assert [lr_multiplier(const, s, 6) for s in range(6)] == pytest.approx([0.0, 0.5, 1, 1, 1, 1])


def test_explicit_multi_phase_cosine_like_the_ternary_vae_schedule():
    # exploration at 1.0 with cosine to 0.1, then a constant search phase, then a linear decay to 0
    cfg = ScheduleConfig(phases=[LRPhase("cosine", 100, 1.0, 0.1), LRPhase("constant", 200, 0.1, 0.1),
                                 LRPhase("linear", 0, 0.01, 0.0)])
    total = 500
    assert lr_multiplier(cfg, 0, total) == pytest.approx(1.0)
    assert lr_multiplier(cfg, 50, total) == pytest.approx(0.55)
    assert lr_multiplier(cfg, 99, total) == pytest.approx(0.1 + 0.9 * (1 + math.cos(math.pi * 0.99)) / 2)
    assert lr_multiplier(cfg, 100, total) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 299, total) == pytest.approx(0.1)
    assert lr_multiplier(cfg, 300, total) == pytest.approx(0.01)
    assert lr_multiplier(cfg, 400, total) == pytest.approx(0.005)
    assert lr_multiplier(cfg, 500, total) == pytest.approx(0.0)


def test_stegastamp_l2_weight_ramp():
    """L2 weight 0 -> 0.5 over the first 10 %, 0.5 -> 2.0 until 40 %, then 2.0."""
    cfg = ScheduleConfig(loss_weights={"l2": [(0.0, 0.0), (0.1, 0.5), (0.4, 2.0)]})
    total = 1000
    expected = {0: 0.0, 50: 0.25, 100: 0.5, 250: 1.25, 400: 2.0, 401: 2.0, 999: 2.0}
    for step, weight in expected.items():
        assert loss_weights(cfg, step, total)["l2"] == pytest.approx(weight), step


def test_loss_weight_ramp_in_steps():
    cfg = ScheduleConfig(loss_weights={"kl": [(10, 0.0), (20, 1.0)]}, loss_weight_unit="steps")
    assert [loss_weights(cfg, s, 1000)["kl"] for s in (0, 10, 15, 20, 30)] == pytest.approx([0, 0, 0.5, 1, 1])


def test_preflight_runs_the_first_steps_of_the_planned_schedule(tmp_path):
    """A preflight of 20 steps of a 1000-step plan sees the plan's LR and loss weights at steps 1-20,
    not the whole schedule squeezed into 20 steps (a fraction-unit L2 ramp would otherwise reach its
    end weight, a cosine decay its floor, inside the preflight)."""
    from conftest import trainlab
    from trainlab.engine.logs import read_rows

    out = trainlab("preflight", "modadd", "--preset", "smoke", "--steps", "20", "--planned-steps", "1000",
                   "--set", "schedule.warmup=0", "--set", "schedule.decay=linear", "--set", "schedule.min_lr_ratio=0",
                   "--set", "optim.lr=0.001", "--run-dir", "pf", cwd=tmp_path)
    assert out.returncode in (0, 1), out.stderr  # its verdict does not matter here
    rows = [r for r in read_rows(tmp_path / "pf" / "metrics.csv") if r["attempt"] == 1]
    last = rows[-1]
    # the LR of step 20 of a linear decay over 1000 steps (0-based step 19), not of one over 20
    assert last["lr"] == pytest.approx(0.001 * (1 - 19 / 1000))
