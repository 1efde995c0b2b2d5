"""Learning-rate and loss-weight schedules as pure functions of the step.

Pure functions of (config, step, total) need no state in the checkpoint and cannot drift on resume.

LR phases: within a phase of `n` steps, at offset t (0 <= t < n) the multiplier is
    linear:   start + (end - start) * t / n
    cosine:   end + (start - end) * (1 + cos(pi * t / n)) / 2
    constant: start
so a phase reaches `end` exactly where the next one begins.  Past the last phase the final
multiplier is held.  Without explicit phases: linear warmup 0 -> 1 over `warmup` steps, then
`decay` from 1 to `min_lr_ratio` over the remaining steps.

Two-stage (BitNet b1.58, `two_stage_at` = f > 0; Ma et al. 2024 and Microsoft's "Training Tips,
Code and FAQ"): warmup, the peak LR held until step round(f x total) with weight decay on, then
`decay` from the peak to `min_lr_ratio` with weight decay 0.
"""

from __future__ import annotations

import math

from trainlab.config import LRPhase, ScheduleConfig


def lr_phases(cfg: ScheduleConfig, total_steps: int) -> list[tuple[int, int, LRPhase]]:
    """(first step, length, phase) for each phase; a phase of 0 steps runs to `total_steps`."""
    phases = list(cfg.phases)
    if cfg.two_stage_at > 0:
        return _two_stage_phases(cfg, total_steps)
    if not phases:
        if cfg.warmup:
            phases.append(LRPhase(kind="linear", steps=cfg.warmup, start=0.0, end=1.0))
        end = 1.0 if cfg.decay == "constant" else cfg.min_lr_ratio
        phases.append(LRPhase(kind=cfg.decay, steps=0, start=1.0, end=end))
    out = []
    begin = 0
    for phase in phases:
        length = phase.steps if phase.steps > 0 else max(total_steps - begin, 1)
        out.append((begin, length, phase))
        begin += length
    return out


def stage_two_begins(cfg: ScheduleConfig, total_steps: int) -> int | None:
    """First step of the two-stage recipe's stage 2 (== total_steps: stage 1 only); None when off."""
    if cfg.two_stage_at <= 0:
        return None
    return round(cfg.two_stage_at * total_steps)


def _two_stage_phases(cfg: ScheduleConfig, total_steps: int) -> list[tuple[int, int, LRPhase]]:
    boundary = stage_two_begins(cfg, total_steps)
    warmup = min(cfg.warmup, boundary)
    out = []
    if warmup:
        out.append((0, warmup, LRPhase(kind="linear", steps=warmup, start=0.0, end=1.0)))
    if boundary > warmup:
        out.append((warmup, boundary - warmup, LRPhase(kind="constant", steps=boundary - warmup, start=1.0)))
    end = 1.0 if cfg.decay == "constant" else cfg.min_lr_ratio
    length = max(total_steps - boundary, 1)
    out.append((boundary, length, LRPhase(kind=cfg.decay, steps=length, start=1.0, end=end)))
    return out


def weight_decay_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of optim.weight_decay for the optimizer step `step`: 0 in stage 2 of the
    two-stage recipe, 1 otherwise."""
    boundary = stage_two_begins(cfg, total_steps)
    return 0.0 if boundary is not None and step >= boundary else 1.0


def _phase_value(phase: LRPhase, t: int, n: int) -> float:
    if phase.kind == "constant":
        return phase.start
    frac = min(max(t / n, 0.0), 1.0)
    if phase.kind == "linear":
        return phase.start + (phase.end - phase.start) * frac
    return phase.end + (phase.start - phase.end) * (1.0 + math.cos(math.pi * frac)) / 2.0


def lr_multiplier(cfg: ScheduleConfig, step: int, total_steps: int) -> float:
    """Multiplier of optim.lr used for the optimizer step with 0-based index `step`."""
    phases = lr_phases(cfg, total_steps)
    for begin, length, phase in phases:
        if step < begin + length:
            return _phase_value(phase, step - begin, length)
    _, _, last = phases[-1]
    return last.start if last.kind == "constant" else last.end


def ramp_value(points: list[tuple[float, float]], x: float) -> float:
    """Piecewise-linear interpolation through (x, y) points; constant outside them."""
    if x <= points[0][0]:
        return points[0][1]
    for (x0, y0), (x1, y1) in zip(points, points[1:]):
        if x <= x1:
            if x1 == x0:
                return y1
            return y0 + (y1 - y0) * (x - x0) / (x1 - x0)
    return points[-1][1]


def loss_weights(cfg: ScheduleConfig, step: int, total_steps: int) -> dict[str, float]:
    """The weight of each named loss at `step` (0-based)."""
    x = step / total_steps if cfg.loss_weight_unit == "fraction" else float(step)
    return {name: ramp_value(points, x) for name, points in cfg.loss_weights.items()}
