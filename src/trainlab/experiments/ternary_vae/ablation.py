"""The homeostasis ablation's sweep rules (`--grid model.homeostasis=on,off --grid train.seed=0,1,2`):
does the controller that freezes and unfreezes the parts give a better final Q than training every part
all the time -- or can these seeds not tell?

Points are grouped by their grid values other than model.homeostasis and train.seed; within a group the
on and off points of the same seed are paired.  Only points whose run finished at its planned last
step are judged (a crashed or unfinished point is named, with why, under "left out"), at their last
evaluation.  Per group, for final coverage, hierarchy and Q, and for the steps to coverage >= 0.99 and
to hierarchy <= -0.80 (the first evaluation that reached it; the pairs where either arm never did are
left out of that difference, and counted):
    the mean with homeostasis on, the mean with it off, and the paired difference on - off with its
    95 % Student t interval over seeds (mean +- t(0.975, n - 1) sd / sqrt n; none from one pair).
The verdict is on Q's paired difference (higher Q is better), against RESOLUTION, the smallest
difference of Q that matters (0.05: a twentieth of the distance from the audit's Q of 1.96 to 2):
  1  its interval lies above 0 and the difference is at least RESOLUTION -> "homeostasis helps"
  2  its interval lies below 0 and the difference is at most -RESOLUTION -> "homeostasis hurts"
  3  its interval lies within +-RESOLUTION                               -> "no difference that matters"
     (an equivalence test: an interval of +0.0001 to +0.0004 is a real difference too small to matter,
     not a help)
  4  otherwise: the interval reaches past +-RESOLUTION                   -> "cannot tell: the interval is too wide"
  5  one pair of seeds                                                   -> "cannot tell: fewer than 2 seeds"
  -  no pair with a final Q in both arms (a NaN or inf last value counts as not measured)
Each verdict ends with the numbers it was reached on.  The table also counts, per on-run, the
controller's decisions (freeze, unfreeze and relax events of its true history).
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from trainlab.experiments.ternary_vae.timeline import DECISIONS, homeostasis_history
from trainlab.health.stats import mean_t_interval
from trainlab.sweep.report import Conclusion, PointResult, SweepFindings, is_complete, left_out_text

HOMEOSTASIS_KEY = "model.homeostasis"
SEED_KEY = "train.seed"
COVERAGE_TARGET = 0.99  # the audit's targets (the presets' health.targets)
HIERARCHY_TARGET = -0.80
RESOLUTION = 0.05  # the smallest difference of Q that matters (rules 1-3)
FINALS = ("coverage", "hierarchy", "Q")
REACHES = (("coverage", f"steps to coverage >= {COVERAGE_TARGET:.2f}", lambda v: v >= COVERAGE_TARGET),
           ("hierarchy", f"steps to hierarchy <= {HIERARCHY_TARGET:.2f}", lambda v: v <= HIERARCHY_TARGET))


@dataclass
class Arm:
    """One finished point's final numbers."""
    point: PointResult
    seed: str
    finals: dict[str, float | None]  # last evaluation's coverage, hierarchy, Q
    reached: dict[str, int | None]  # REACHES label -> first evaluation step that reached it
    decisions: dict[str, int] = field(default_factory=dict)  # action -> count


def read_arm(p: PointResult) -> Arm:
    finals = {}
    for name in FINALS:
        series = p.run.series(name)
        finals[name] = series[-1][1] if series and math.isfinite(series[-1][1]) else None
    reached = {}
    for metric, label, hit in REACHES:
        reached[label] = next((step for step, v in p.run.series(metric) if math.isfinite(v) and hit(v)), None)
    decisions = {action: 0 for action in DECISIONS}
    for event in homeostasis_history(p.run.events):
        if event.get("action") in decisions:
            decisions[event["action"]] += 1
    return Arm(p, str(p.values.get(SEED_KEY, "-")), finals, reached, decisions)


def _mean(values: list) -> float | None:
    present = [v for v in values if v is not None]
    return statistics.fmean(present) if present else None


def _fmt(value: float | None, steps: bool = False, sign: bool = False) -> str:
    if value is None:
        return "not reached" if steps else "-"
    if steps:
        return f"{value:+,.0f}" if sign else f"{value:,.0f}"
    return f"{value:+.4f}" if sign else f"{value:.4f}"


def _difference(name: str, on: list, off: list, steps: bool = False) -> tuple[str, tuple | None, int]:
    """The numbers line of one quantity: means per arm and the paired difference with its interval;
    returns the line, (mean, lo, hi) or None, and how many pairs the difference is over."""
    diffs = [a - b for a, b in zip(on, off) if a is not None and b is not None]
    reached = ""
    if steps:
        reached = (f" (reached by {sum(v is not None for v in on)} of {len(on)} on-runs, "
                   f"{sum(v is not None for v in off)} of {len(off)} off-runs)")
    line = f"{name}: on {_fmt(_mean(on), steps)}, off {_fmt(_mean(off), steps)}{reached}"
    interval = mean_t_interval(diffs)
    over = f"over the {len(diffs)} seeds where both reached it" if steps else f"over {len(diffs)} seeds"
    if interval is not None:
        m, lo, hi = interval
        line += (f"; on - off {_fmt(m, steps, True)}, 95 % t interval {over} "
                 f"[{_fmt(lo, steps, True)}, {_fmt(hi, steps, True)}]")
    elif diffs:
        line += f"; on - off {_fmt(diffs[0], steps, True)} (one seed: the interval cannot be computed)"
    elif steps:
        line += "; no difference: no seed where both arms reached it"
    else:
        line += "; no difference: no seed with a value in both arms"
    return line, interval, len(diffs)


def _compare(label: str, pairs: list[tuple[Arm, Arm]]) -> Conclusion:
    ons, offs = [on for on, _ in pairs], [off for _, off in pairs]
    numbers = [f"{len(pairs)} seed pair{'s' if len(pairs) != 1 else ''}: "
               + ", ".join(f"seed {on.seed} ({on.point.name} / {off.point.name})" for on, off in pairs)]
    for name in FINALS:
        numbers.append(_difference(f"final {name}", [a.finals[name] for a in ons], [a.finals[name] for a in offs])[0])
    for _, name, _ in REACHES:
        numbers.append(_difference(name, [a.reached[name] for a in ons], [a.reached[name] for a in offs], True)[0])
    per_run = ", ".join(f"seed {a.seed} {sum(a.decisions.values())}" for a in ons)
    numbers.append(f"homeostasis decisions (freeze, unfreeze, relax) per on-run: {per_run}")

    diffs = _q_differences(pairs)
    n, interval = len(diffs), mean_t_interval(diffs)
    if n == 0:
        return Conclusion(label, "-", "cannot tell: no seed pair has a final Q in both arms", numbers)
    if interval is None:
        return Conclusion(label, "5", f"cannot tell: fewer than 2 seeds (--grid train.seed=0,1,2 would tell): Q on - off "
                                      f"{diffs[0]:+.4f} from one seed pair, no interval", numbers)
    m, lo, hi = interval
    shown = f"Q on - off {m:+.4f}, 95 % t interval over {n} seeds [{lo:+.4f}, {hi:+.4f}]"
    if lo > 0 and m >= RESOLUTION:
        return Conclusion(label, "1", f"homeostasis helps: {shown}, the difference at least {RESOLUTION:g}", numbers)
    if hi < 0 and m <= -RESOLUTION:
        return Conclusion(label, "2", f"homeostasis hurts: {shown}, the difference at least {RESOLUTION:g}", numbers)
    if -RESOLUTION <= lo and hi <= RESOLUTION:
        significant = " (not 0, but smaller than what matters)" if lo > 0 or hi < 0 else ""
        return Conclusion(label, "3", f"no difference that matters: {shown}{significant}, within "
                                      f"+-{RESOLUTION:g}", numbers)
    return Conclusion(label, "4", f"cannot tell: the interval is too wide (more seeds would narrow it): {shown}, "
                                  f"reaching past +-{RESOLUTION:g}", numbers)


def _q_differences(pairs: list[tuple[Arm, Arm]]) -> list[float]:
    """Q on - off of each pair with a final Q in both arms."""
    return [on.finals["Q"] - off.finals["Q"] for on, off in pairs
            if on.finals["Q"] is not None and off.finals["Q"] is not None]


def _group_label(p: PointResult) -> str:
    kept = {k: v for k, v in p.values.items() if k not in (HOMEOSTASIS_KEY, SEED_KEY)}
    return ", ".join(f"{k}={v}" for k, v in kept.items()) or "all points"


def _table(label: str, pairs: list[tuple[Arm, Arm]]) -> tuple[str, list[str], list[list[str]]]:
    headers = ["seed"]
    for name in FINALS:
        headers += [f"{name} on", f"{name} off"]
    headers.append("Q on - off")
    for _, name, _ in REACHES:
        headers += [f"{name} on", f"{name} off"]
    headers.append("decisions (on)")

    def cells(ons: list, offs: list, steps: bool = False) -> list[str]:
        return [_fmt(_mean(ons), steps), _fmt(_mean(offs), steps)]

    rows = []
    for on, off in pairs:
        row = [on.seed]
        for name in FINALS:
            row += cells([on.finals[name]], [off.finals[name]])
        row.append(_fmt(_mean(_q_differences([(on, off)])), sign=True))
        for _, name, _ in REACHES:
            row += cells([on.reached[name]], [off.reached[name]], True)
        d = on.decisions
        row.append(f"{sum(d.values())} ({', '.join(f'{d[a]} {a}' for a in DECISIONS)})")
        rows.append(row)
    if pairs:
        ons, offs = [on for on, _ in pairs], [off for _, off in pairs]
        mean = ["mean"]
        for name in FINALS:
            mean += cells([a.finals[name] for a in ons], [a.finals[name] for a in offs])
        mean.append(_fmt(_mean(_q_differences(pairs)), sign=True))
        for _, name, _ in REACHES:
            on_steps, off_steps = [a.reached[name] for a in ons], [a.reached[name] for a in offs]
            # a mean over the runs that reached it, saying how many did
            mean += [_fmt(_mean(v), True) + (f" ({sum(s is not None for s in v)} of {len(v)})"
                                             if None in v and any(s is not None for s in v) else "")
                     for v in (on_steps, off_steps)]
        mean.append(f"{statistics.fmean(sum(a.decisions.values()) for a in ons):.1f}")
        rows.append(mean)
    return (f"homeostasis on against off ({label}): last evaluation, steps to the targets, and the "
            "controller's decisions", headers, rows)


def sweep_findings(points: list[PointResult]) -> SweepFindings | None:
    """The ablation's conclusions and tables; None when no two points differ in model.homeostasis (the
    default sweep rules apply then)."""
    if len({p.values.get(HOMEOSTASIS_KEY) for p in points}) < 2:
        return None
    left_out: dict[str, list[str]] = {}  # group -> the points not judged there, and why
    arms: dict[str, dict[tuple[str, str], Arm]] = {}  # group -> (seed, on/off) -> arm
    for p in points:
        group = _group_label(p)
        left_out.setdefault(group, [])
        arms.setdefault(group, {})
        if not is_complete(p):
            left_out[group].append(left_out_text(p))
            continue
        arm = read_arm(p)
        arms[group].setdefault((arm.seed, str(p.values.get(HOMEOSTASIS_KEY))), arm)

    conclusions, tables = [], []
    for group, by_key in arms.items():
        pairs = []
        for (seed, setting), arm in sorted(by_key.items(), key=lambda kv: _seed_order(kv[0][0])):
            other = "off" if setting == "on" else "on"
            partner = by_key.get((seed, other))
            if partner is None:
                left_out[group].append(f"{arm.point.name}: no finished homeostasis-{other} point with seed {seed} "
                                       "to pair with")
            elif setting == "on":
                pairs.append((arm, partner))
        if pairs:
            conclusion = _compare(group, pairs)
            tables.append(_table(group, pairs))
        else:
            conclusion = Conclusion(group, "-", "cannot tell: no seed has a finished run both with homeostasis on "
                                                "and with it off", [])
        if left_out[group]:
            conclusion.numbers.append(f"left out: {'; '.join(left_out[group])}")
        conclusion.left_out = left_out[group]
        conclusions.append(conclusion)
    return SweepFindings(conclusions, tables)


def _seed_order(seed: str) -> tuple:
    """Seeds in numeric order where they are numbers (10 after 9)."""
    return (0, int(seed), "") if seed.lstrip("-").isdigit() else (1, 0, seed)
