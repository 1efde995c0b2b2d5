"""A run's goals, and how `trainlab preflight` judges them from a short run.

A falling loss is not a reached goal: the SHA-256 round study's quick preset learns six of the eight
state words within 250 steps and then sits at bit accuracy 0.877-0.888, below its curriculum gate of
0.95, for the 1750 steps that follow (docs/experiments/sha256.md) -- its loss falls all the while.  So preflight judges the run's goals as well:

- the curriculum's gate: the running mean of `curriculum.metric` over `curriculum.window` steps
  must reach the gate of the phase the run is in (a phase passed during the preflight is measured,
  the current one projected; the last phase never ends, so its gate is no goal);
- the user's targets: `--target 'val_acc>=0.9'` (repeatable) and `health.targets` in the config;
- the experiment's own `goal` (Experiment.goal), if it declares one.

Each is projected to the planned step from the preflight's rows of its metric and judged: reached
(with the step it is reached at, and that step's interval), not reached (a plateau below it, or a
ceiling the parts at chance leave), uncertain (the interval straddles it) or not measured.  When the
experiment declares per-part metrics (Experiment.parts), the parts that sit at chance are named and
no projection counts on them: the loss's floor is raised by what they cost, and a metric that is
their mean cannot rise above what they leave.

Parsing is plain standard library (the config check imports it); the statistics are imported where
they are used.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Any, Sequence

from trainlab.formatting import format_number
from trainlab.health.claims import Claim

OPS = (">=", "<=", ">", "<")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_TARGET = re.compile(rf"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(>=|<=|>|<)\s*({_NUMBER})\s*$")
SKIP_FRACTION = 0.2  # rows left out at the start, as preflight's learning claim does (warm-up)
# A part whose late level is within this fraction of the way from chance to perfect (0.525 for a bit)
# and does not rise sits at chance in practice.  Why a margin besides the interval: a logged row of
# a part averages 10^4-10^5 bits, so the interval resolves departures of a few thousandths from
# chance (the SHA-256 study's word e at 0.5026 [0.5019, 0.5033] after 600 steps) that no gate of
# interest can be reached on.
CHANCE_MARGIN = 0.05
MIN_ROWS = 10  # rows of a metric, after the warm-up, below which it is not judged (as the learning claim)
ALPHA = 0.05


def parse_target(text: str) -> tuple[str, str, float]:
    """'val_acc>=0.9' -> ('val_acc', '>=', 0.9); ValueError with what is expected otherwise."""
    match = _TARGET.match(str(text))
    if not match:
        hint = ("; quote it ('val_acc>=0.9'): unquoted, the shell reads > and < as redirections"
                if not any(c in str(text) for c in "<>") else "")
        raise ValueError(f"expected METRIC OP LEVEL with OP one of {', '.join(OPS)}, e.g. 'val_acc>=0.9'{hint}")
    level = float(match[3])
    if not math.isfinite(level):
        raise ValueError(f"the level must be a finite number, got {match[3]}")
    return match[1], match[2], level


def logged_metrics(experiment: Any) -> tuple[str, ...]:
    """The metrics a target may name: the loss and the experiment's train and eval metrics."""
    return ("loss",) + tuple(experiment.train_metrics) + tuple(experiment.eval_metrics)


@dataclass(frozen=True)
class Goal:
    """One goal: `metric op level`.  window: steps of the running mean the goal compares (the
    curriculum's window; 0 = the logged rows as they are); earliest_step: it cannot count before
    this step (the phase's start plus its min_steps); phase: the curriculum phase, for a gate."""

    metric: str
    op: str
    level: float
    source: str
    window: int = 0
    earliest_step: int = 0
    phase: int | None = None

    @property
    def text(self) -> str:
        return f"{self.metric} {self.op} {format_number(self.level)}"

    @property
    def name(self) -> str:
        """How claims and reasons call it: "gate 0.95 on acc" or "target val_acc >= 0.9"."""
        if self.phase is not None:
            return f"gate {format_number(self.level)} on {self.metric}"
        return f"target {self.text}"

    @property
    def higher_is_better(self) -> bool:
        return self.op in (">=", ">")

    def met(self, value: float) -> bool:
        return {">=": value >= self.level, ">": value > self.level,
                "<=": value <= self.level, "<": value < self.level}[self.op]


def declared_goals(experiment: Any, cfg: Any, targets: Sequence[str] = ()) -> list[Goal]:
    """The goals named before the run: --target (one line naming it and the allowed metrics on a
    bad one: UsageError), health.targets (checked with the config already) and Experiment.goal."""
    from trainlab.errors import UsageError

    allowed = logged_metrics(experiment)
    goals: list[Goal] = []
    named = [(t, "--target", f"--target {t!r}") for t in targets]
    named += [(t, "health.targets", f"health.targets {t!r}") for t in getattr(cfg.health, "targets", [])]
    if experiment.goal:
        named.append((experiment.goal, "the experiment's goal",
                      f"experiment {experiment.name}: goal {experiment.goal!r}"))
    for text, source, where in named:
        try:
            metric, op, level = parse_target(text)
        except ValueError as exc:
            raise UsageError(f"{where}: {exc}") from None
        if metric not in allowed:
            raise UsageError(f"{where}: {metric!r} is not a logged metric of {experiment.name}; "
                             f"allowed: {', '.join(allowed)}")
        goals.append(Goal(metric, op, level, source))
    return goals


def gate_goal(cfg: Any, phase: int, phase_start: int) -> Goal | None:
    """The curriculum gate of `phase` as a goal; None without a curriculum or in its last phase
    (which never ends, so its gate decides nothing)."""
    cur = cfg.curriculum
    if not cur.values or phase >= len(cur.values) - 1:
        return None
    return Goal(cur.metric, ">=", float(cur.gates[phase]),
                f"curriculum phase {phase} of {len(cur.values)}, {cur.name} {format_number(cur.values[phase])}",
                window=cur.window, earliest_step=phase_start + cur.min_steps[phase], phase=phase)


def _series(rows: list[dict], metric: str, phase: int | None = None) -> list[tuple[int, float]]:
    """(step, value) of the finite logged values of `metric` (in `phase` only, for a gate)."""
    out = []
    for r in rows:
        v = r.get(metric)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            continue
        if phase is not None and r.get("phase") != phase:
            continue
        out.append((int(r["step"]), float(v)))
    return out


# ------------------------------------------------------------------------------------------------
# parts
# ------------------------------------------------------------------------------------------------

@dataclass
class PartsReading:
    """Which declared parts learn and which sit at chance, from the preflight's rows."""

    spec: dict
    at_chance: list[str] = field(default_factory=list)
    learning: list[str] = field(default_factory=list)
    unmeasured: list[str] = field(default_factory=list)
    levels: dict[str, dict] = field(default_factory=dict)

    @property
    def n_parts(self) -> int:
        return len(self.spec["metrics"])

    def loss_floor(self) -> float:
        """What the parts at chance add to the loss, whatever the rest learns."""
        return len(self.at_chance) * float(self.spec.get("loss_at_chance", 0.0))

    def ceiling(self, metric: str) -> float | None:
        """The best value a metric that is the parts' mean can reach while the parts at chance stay
        where they were measured (each at the end of its interval towards `perfect`, and the
        others at `perfect`); None for a metric that is not their mean."""
        if metric not in self.spec.get("mean_of", ()):
            return None
        chance, perfect = float(self.spec["chance"]), float(self.spec.get("perfect", 1.0))
        total = 0.0
        for name in self.spec["metrics"]:
            if name not in self.at_chance:
                total += perfect
                continue
            lo, hi = self.levels[name]["ci"]
            best = max(hi, chance) if perfect > chance else min(lo, chance)
            total += best
        return total / self.n_parts

    def why_capped(self) -> str:
        # an assumption, said as one: parts at chance over a short run may learn a little later (the
        # SHA-256 quick run's words a and e crept from 0.50 to 0.55 over 2000 steps: docs/health.md)
        return (f"{len(self.at_chance)} of {self.n_parts} parts {_sit(len(self.at_chance))} at chance "
                f"{format_number(float(self.spec['chance']))} ({', '.join(self.at_chance)}), if they stay there")


def _sit(k: int) -> str:
    return "sits" if k == 1 else "sit"


def judge_parts(spec: dict, rows: list[dict], alpha: float = ALPHA) -> tuple[Claim | None, PartsReading | None]:
    """Each declared part's late rows against its chance level: at chance when the batch-means
    interval of its late half holds the chance level, or lies within CHANCE_MARGIN of it, and the
    part shows no significant rise towards `perfect` (Mann-Kendall); learning otherwise.
    (None, None) without declared parts."""
    if not spec or not spec.get("metrics"):
        return None, None
    from trainlab.health import stats

    reading = PartsReading(spec)
    chance, perfect = float(spec["chance"]), float(spec.get("perfect", 1.0))
    toward = "increasing" if perfect > chance else "decreasing"
    where = []
    for metric in spec["metrics"]:
        points = _series(rows, metric)
        values = [v for _, v in points[int(len(points) * SKIP_FRACTION):]]
        if len(values) < MIN_ROWS:
            reading.unmeasured.append(metric)
            continue
        late = values[len(values) // 2:]
        level = stats.mean_below(late, chance, alpha=alpha)
        trend = stats.mann_kendall(late, alpha=alpha)
        margin = CHANCE_MARGIN * abs(perfect - chance)
        near = chance - margin <= level.ci[0] and level.ci[1] <= chance + margin
        at_chance = (level.indistinguishable or near) and trend.trend != toward
        (reading.at_chance if at_chance else reading.learning).append(metric)
        reading.levels[metric] = {"mean": level.mean, "ci": list(level.ci), "trend": trend.trend,
                                  "p_value": trend.p_value, "at_chance": at_chance}
        if not where:
            where = [points[int(len(points) * SKIP_FRACTION) + len(values) // 2][0], points[-1][0]]

    def shown(names: list[str]) -> str:
        return ", ".join(f"{m} {format_number(reading.levels[m]['mean'])} [{format_number(reading.levels[m]['ci'][0])}, "
                         f"{format_number(reading.levels[m]['ci'][1])}]" for m in names)

    measured = len(reading.at_chance) + len(reading.learning)
    evidence = (f"the late half of each part's rows after the first {int(SKIP_FRACTION * 100)} %: batch-means "
                f"{int(100 * (1 - alpha))} % interval against chance {format_number(chance)} and Mann-Kendall "
                f"(Hamed-Rao) at alpha {alpha:g}; at chance = the interval holds chance or lies within "
                f"{format_number(100 * CHANCE_MARGIN)} % of the way to {format_number(perfect)}, and no significant rise"
                + (f"; learning: {shown(reading.learning)}" if reading.learning else ""))
    source = f"metrics.csv {', '.join(spec['metrics'][:2])}, ..." + (f" steps {where[0]}-{where[1]}" if where else "")
    if not measured:
        return (Claim("parts", "not measured", f"no part has {MIN_ROWS} logged rows after the warm-up "
                      f"({', '.join(reading.unmeasured)})", evidence, "metrics.csv"), reading)
    value = f"{len(reading.learning)} of {reading.n_parts} learn"
    if reading.learning:  # the slowest learner: a part barely above chance is worth seeing at once
        slowest = max(reading.learning, key=lambda m: abs(reading.levels[m]["mean"] - perfect))
        if abs(reading.levels[slowest]["mean"] - perfect) > 0.5 * abs(perfect - chance):
            value += f" (the slowest: {shown([slowest])}, {reading.levels[slowest]['trend']})"
    if reading.at_chance:
        value += f"; {len(reading.at_chance)} {_sit(len(reading.at_chance))} at chance: {shown(reading.at_chance)}"
    if reading.unmeasured:
        value += f"; {len(reading.unmeasured)} not measured ({', '.join(reading.unmeasured)})"
    return Claim("parts", "info" if reading.at_chance or reading.unmeasured else "pass", value, evidence,
                 source), reading


# ------------------------------------------------------------------------------------------------
# goals
# ------------------------------------------------------------------------------------------------

@dataclass
class GoalJudgement:
    goal: Goal
    status: str  # reached | not reached | uncertain | not measured
    claim: Claim
    reason: str  # the sentence that goes into the verdict's reasons
    details: dict = field(default_factory=dict)


def _bound(goal: Goal, values: list[float], experiment: Any, parts: PartsReading | None) -> tuple[float | None, str]:
    """The best value the goal's metric can take (a ceiling for higher-is-better, a floor for
    lower-is-better), and where it comes from."""
    declared = (getattr(experiment, "metric_ranges", None) or {}).get(goal.metric)
    if declared is not None:  # the experiment knows the metric's range (a correlation's [-1, 1])
        value = declared[1] if goal.higher_is_better else declared[0]
        if value is not None:
            return float(value), (f"its range is [{format_number(declared[0])}, {format_number(declared[1])}] "
                                  "(the experiment's metric_ranges)")
    if goal.higher_is_better:
        ceiling = parts.ceiling(goal.metric) if parts is not None else None
        if ceiling is not None:
            return ceiling, (parts.why_capped() if parts.at_chance else "the mean of the parts")
        if values and all(0.0 <= v <= 1.0 for v in values):
            return 1.0, "a fraction: every logged value in [0, 1]"
        return None, ""
    if goal.metric == "loss" and experiment.loss_lower_bound is not None:
        extra = parts.loss_floor() if parts is not None else 0.0
        why = f"the loss's lower bound {format_number(experiment.loss_lower_bound)}"
        if extra:
            why += f" + {format_number(extra)}, as {parts.why_capped()}"
        return float(experiment.loss_lower_bound) + extra, why
    if values and all(v >= 0.0 for v in values):
        return 0.0, "every logged value >= 0"
    return None, ""


def _projected_steps(last_step: float, planned: int, n: int = 200) -> list[float]:
    """Steps from just after the preflight to the planned step, log-spaced (crossings early on
    get the same relative resolution as late ones), the planned step last."""
    import numpy as np

    grid = np.unique(np.round(np.geomspace(last_step + 1.0, float(planned), n)))
    return [float(s) for s in grid if s < planned] + [float(planned)]


def judge_goal(goal: Goal, rows: list[dict], planned_steps: int, experiment: Any,
               parts: PartsReading | None = None, alpha: float = ALPHA) -> GoalJudgement:
    """Project one goal's metric to the planned step and judge it (see the module docstring).

    How it is projected: the metric's logged rows after the warm-up -- from the start of its
    plateau (stats.plateau) if it has one, else from its steepest improvement (`_steepest`) -- go
    to stats.project_path (the AICc-weighted power/exp/log ensemble of the loss projection, with
    its block-bootstrap 90 % interval at every projected step up to the planned one).  Those
    families are decaying curves with a floor, so a goal that a higher value meets is projected as
    -metric, its floor the metric's ceiling: 1 - acc with floor 1 - ceiling is the same fit (a
    shift changes no fit and no AICc).  The ceiling is what the parts at chance leave
    (Experiment.parts), else 1 for a fraction; the floor of the loss is loss_lower_bound plus what
    the parts at chance cost.  A gate compares a running mean over `window` steps, which trails
    the curve by about window / 2 steps: that lag is added to the crossing step, and no gate
    counts before the phase's min_steps are done."""
    from trainlab.health import stats

    label = "projection (not a measurement)"
    points = _series(rows, goal.metric, goal.phase)
    points = points[int(len(points) * SKIP_FRACTION):]
    cname = f"goal: {goal.name}"
    details: dict[str, Any] = {"metric": goal.metric, "op": goal.op, "level": goal.level, "source": goal.source,
                               "rows": len(points)}
    if goal.phase is not None:
        details.update(phase=goal.phase, window=goal.window, earliest_step=goal.earliest_step)

    def out(status: str, verdict: str, value: str, evidence: str, reason: str) -> GoalJudgement:
        details["status"] = status
        where = (f"metrics.csv {goal.metric} steps {points[0][0]}-{points[-1][0]} ({len(points)} rows)" if points
                 else f"metrics.csv {goal.metric}")
        return GoalJudgement(goal, status, Claim(cname, verdict, value, evidence, where), reason, details)

    steps = [s for s, _ in points]
    values = [v for _, v in points]
    if len(points) < MIN_ROWS:
        only = ("no logged rows" if not points else
                f"only {len(points)} logged row{'s' if len(points) != 1 else ''} after the warm-up")
        why = (f"{goal.name} not measured: {only} of {goal.metric} (needs {MIN_ROWS} for a trend; "
               "run more preflight steps)")
        return out("not measured", "not measured", why, f"{goal.source}; {goal.metric} rows in metrics.csv", why)

    # ---- reached already: the goal's own statistic at the end of the preflight (measured) ----
    last_row = rows[-1] if rows else {}
    if goal.phase is not None and isinstance(last_row.get("gate_mean"), (int, float)):
        now, now_what = float(last_row["gate_mean"]), f"running mean over {goal.window} steps (gate_mean)"
    else:
        tail = values[-max(1, len(values) // 10):]
        now, now_what = sum(tail) / len(tail), f"mean of the last {len(tail)} rows"
    details["now"] = now
    bound, bound_why = _bound(goal, values, experiment, parts)
    details["bound"] = bound
    if goal.met(now):
        at = max(steps[-1], goal.earliest_step)
        later = (f"; the phase can end at step {goal.earliest_step}, when its min_steps are done"
                 if goal.earliest_step > steps[-1] else "")
        if at > planned_steps:
            why = (f"{goal.name} reached, but the phase cannot end before step {goal.earliest_step} > "
                   f"the planned {planned_steps} (min_steps)")
            return out("not reached", "fail", why, f"{goal.source}; {now_what}", why)
        value = f"{goal.name} reached (measured): {now_what} {format_number(now)} at step {steps[-1]}{later}"
        return out("reached", "pass", value, f"{goal.source}; {now_what}", value)

    if planned_steps <= steps[-1]:
        why = (f"{goal.name} not reached by the planned step {planned_steps}: {now_what} "
               f"{format_number(now)} (measured)")
        return out("not reached", "fail", why, f"{goal.source}; {now_what}", why)

    # ---- projected ----
    sign = -1.0 if goal.higher_is_better else 1.0  # fitted as a decaying curve: -metric for a higher-is-better goal
    lag = goal.window // 2
    flat = stats.plateau(values, alpha=alpha)
    if flat is not None:
        details["plateau"] = {"mean": flat.mean, "half_width": flat.half_width, "since_step": steps[flat.start]}
        first = flat.start  # the flat part is what a projection can go on; the rise before it is over
    else:
        first = _steepest(values, sign)
    capped = bound is not None and not goal.met(bound)
    fitted = None if first is None else slice(first, None)
    bound_note = f"; bound {format_number(bound)} ({bound_why})" if bound is not None else ""
    if fitted is None:
        at_planned, evidence = "", (f"{goal.source}; the steepest rise of {goal.metric} is in its last {MIN_FIT} rows "
                                    f"(3-row moving average){bound_note}")
    else:
        grid = _projected_steps(steps[-1], planned_steps)
        path = stats.project_path(steps[fitted], [sign * v for v in values[fitted]], grid, alpha=0.1,
                                  skip_fraction=0.0, lower_bound=None if bound is None else sign * bound)
        central = [sign * v for v in path.values]
        ends = sorted([sign * path.lo[-1], sign * path.hi[-1]])
        crossing = path.first_step_where(lambda y: goal.met(sign * y))

        def when(step: float | None) -> int | None:
            return None if step is None else int(max(step + lag, goal.earliest_step))

        at_value, early, late = when(crossing["value"]), when(crossing["early"]), when(crossing["late"])
        details.update(projected=central[-1], interval=ends, reached_at=at_value, reached_interval=[early, late],
                       lag=lag, fitted_from_step=steps[first], families=path.weights)
        at_planned = (f"projected {format_number(central[-1])} [{format_number(ends[0])}, "
                      f"{format_number(ends[1])}] at step {planned_steps}")
        evidence = (f"{goal.source}; stats.project_path on {'-' if sign < 0 else ''}{goal.metric}, rows from step "
                    f"{steps[first]} ({'the plateau' if flat is not None else 'the steepest rise'}; "
                    f"{len(values) - first} rows): AICc-weighted power/exp/log ensemble, 90 % block-bootstrap interval, "
                    f"extrapolated {format_number(planned_steps / steps[-1], 3)}x beyond the last measured step"
                    + bound_note + (f"; + {lag} steps for the running mean's lag" if lag else ""))

    if capped:
        limit = "at most" if goal.higher_is_better else "no lower than"
        why = (f"{goal.name} not reached: {goal.metric} can reach {limit} {format_number(bound)} while "
               f"{bound_why}" + (f"; {at_planned}" if at_planned else "") + f" -- {label}")
        details["capped"] = True
        return out("not reached", "fail", why, evidence, why)
    if fitted is None:
        why = (f"{goal.name} uncertain: {goal.metric} still rises faster and faster at the end of the preflight "
               f"({format_number(now)} at step {steps[-1]}), so no fit can place where it levels off; a longer "
               f"preflight (--steps) would tell")
        return out("uncertain", "warn", why, evidence, why)
    if late is not None and late <= planned_steps:
        value = (f"{goal.name} reached at about step {at_value} [{early}, {late}] of {planned_steps}; "
                 f"{at_planned} -- {label}")
        return out("reached", "pass", value, evidence, value)
    if early is None or early > planned_steps:
        if flat is not None:
            why = (f"{goal.name} not reached: plateau at {format_number(flat.mean)} +- "
                   f"{format_number(flat.half_width, 2)} since step {steps[flat.start]}; {at_planned} -- {label}")
        else:
            why = f"{goal.name} not reached: {at_planned} -- {label}"
        return out("not reached", "fail", why, evidence, why)
    why = (f"{goal.name} uncertain: {at_planned}, an interval that holds {format_number(goal.level)}"
           + (f" (reached at about step {at_value} by the central curve)" if at_value is not None else "")
           + f" -- {label}")
    return out("uncertain", "warn", why, evidence, why)


MIN_FIT = 6  # rows a projection needs (the power family's 4 parameters and the AICc's n > K + 1)


def _steepest(values: list[float], sign: float) -> int | None:
    """Where the metric improves fastest (3-row moving average): the fit starts there.  Why: the
    families are decelerating curves (convex decays), and a learning curve often first speeds up
    -- an S shape, as modadd's val_acc from 0.01 to 0.28 in 200 steps -- which they cannot follow:
    fitted over the whole S they overshoot (that val_acc: 0.97 projected, 0.29 measured at step
    1500 of the full run).  None when the steepest part is within the last MIN_FIT rows: still
    speeding up, so the data cannot say where it levels off."""
    import numpy as np

    a = -sign * np.asarray(values, dtype=np.float64)  # improvement is upwards
    k = min(3, len(a))
    smooth = np.convolve(a, np.ones(k) / k, mode="valid")
    if len(smooth) < 2:
        return None
    i = int(np.argmax(np.diff(smooth))) + k // 2  # the steepest step, as a row of `values`
    return i if len(values) - i >= MIN_FIT else None
