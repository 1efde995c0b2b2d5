"""Live health detectors: small objects fed the metrics row at each log step.

Each detector's `update(step, row)` returns alerts -- dicts with kind "alert", the detector's name,
the step, a severity, a message with its numbers, and the evidence -- which the monitor writes to
events.jsonl and acts on by the detector's policy (health.<name>: off | warn | stop | rollback).
A detector fires when its condition begins and re-arms once it clears, so a condition that lasts
is one alert, not one per row.  The same objects run offline over metrics.csv (`trainlab check`).

Statistics come from health/stats.py: Mann-Kendall with the Hamed-Rao autocorrelation correction
for trends, batch means for "is the level at the baseline", a trend-robust jump z for spikes, a
two-segment likelihood ratio for gradient-norm regime changes, and for the jump detector (a phase
transition of any metric named in health.jumps) a robust z against a trend-free plateau's noise.

The baseline (the loss of a random guess) may be None, for a log that trainlab did not write and
was checked without one: the stuck detector then judges nothing ("no baseline"), divergence only
by its rise rule and without its minimum rise, the spike detector without its minimum rise.  A
trainlab run always has one, and behaves as before.
"""

from __future__ import annotations

import math
from collections import deque
from typing import Any, NamedTuple

import numpy as np

from trainlab.config import HealthConfig
from trainlab.formatting import format_number
from trainlab.health import stats


# what a detector that needs the random-guess loss says when it was given none (baseline=None: a
# log that trainlab did not write, checked without --baseline)
NO_BASELINE = "no baseline"


def _num(row: dict, key: str) -> float | None:
    value = row.get(key)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    return float(value)


class Detector:
    name = ""
    severity = "warn"
    reports_clearing = False  # True for a lasting condition whose verdict is the state at the run's end

    def __init__(self, cfg: HealthConfig, baseline: float | None, total_steps: int):
        self.cfg = cfg
        self.baseline = baseline
        self.total_steps = total_steps
        self.active = False  # the condition holds now (fired, not yet cleared)
        self.checked = 0  # rows at which the statistic could be computed (a full window, past warm-up)
        self.needs = "a full window"  # what an unchecked detector lacked, for "not measured"
        self.cleared_at: int | None = None  # the step at which the last condition that fired stopped holding

    def alert(self, step: int, message: str, **evidence: Any) -> dict:
        return {"kind": "alert", "detector": self.name, "step": step, "severity": self.severity,
                "message": message, "evidence": evidence}

    def edge(self, step: int, condition: bool, message: str, clear: bool | None = None, **evidence: Any) -> list[dict]:
        """Fire on the rising edge of `condition`; re-arm when it stops holding -- or, with hysteresis,
        only when `clear` holds (so noise around a threshold does not fire it again and again)."""
        self.checked += 1
        if condition and not self.active:
            self.active, self.cleared_at = True, None
            return [self.alert(step, message, **evidence)]
        if self.active and (not condition if clear is None else clear):
            self.active, self.cleared_at = False, step
        return []

    def unjudged_reason(self, rows: int) -> str:
        """Why this detector judged none of `rows` rows, for its "not measured" claim."""
        return (f"never judged: {rows} rows are too few for its window or warm-up (health.window={self.cfg.window}, "
                f"plateau_window={self.cfg.plateau_window})")

    def past_warmup(self, step: int) -> bool:
        return step >= self.cfg.warmup_fraction * self.total_steps

    def update(self, step: int, row: dict) -> list[dict]:
        return []


class LossWindowDetector(Detector):
    """A detector over the last `size` finite losses; `window(step, row)` gives them once at least
    half the window (and 8 rows) is there -- and, if `after_warmup`, past warm-up -- else None.
    Half a window lets a short run (a few dozen log rows) be judged before it is over; the tests
    used (Mann-Kendall, batch means) are valid at that size, only less powerful."""

    after_warmup = True

    def __init__(self, cfg: HealthConfig, baseline: float, total_steps: int, size: int | None = None):
        super().__init__(cfg, baseline, total_steps)
        self.losses: deque[float] = deque(maxlen=size or cfg.window)
        # never more than the window holds: a 5-row window judges at 5 rows, not never
        self.min_rows = min(self.losses.maxlen, max(8, self.losses.maxlen // 2))

    def window(self, step: int, row: dict) -> list[float] | None:
        loss = _num(row, self.cfg.loss_metric)
        if loss is None or not math.isfinite(loss):
            return None
        self.losses.append(loss)
        if len(self.losses) < self.min_rows or (self.after_warmup and not self.past_warmup(step)):
            return None
        return list(self.losses)


class NonFinite(Detector):
    """A loss or gradient norm that is NaN or infinite (the trainer acts on it first, by train.nonfinite)."""

    name, severity = "nonfinite", "critical"

    def update(self, step, row):
        bad = [k for k in ("loss", "grad_norm") if (v := _num(row, k)) is not None and not math.isfinite(v)]
        return self.edge(step, bool(bad), "non-finite " + ", ".join(f"{k}={row[k]}" for k in bad), columns=bad)


DIVERGENCE_MIN_ROWS = 5  # rows after the best before the trend is tested (six make a monotone rise significant at 0.01)
DIVERGENCE_RECENT_ROWS = 3  # the rise must hold for the median of these, so one spike is no divergence
DIVERGENCE_FAST_RATIO = 1.5  # a climb this far above the best over 3 rising rows needs no trend test
# The rise must also clear the loss's own row-to-row noise by this many sigma (stats.row_noise over
# the rows after the best, a trend-robust estimate): in a log of single-batch losses (another loop's
# CSV, a Lightning fit) the best is a low outlier of a flat, noisy curve, every later row sits above
# it, and both rules used to fire on a healthy run (a plain loop's loss 0.079 at its best, 0.11-0.28
# around it: "divergence" at step 240).  trainlab's own rows are interval means, far less noisy.
DIVERGENCE_NOISE_Z = 4.0


class Divergence(LossWindowDetector):
    """A sustained rise since the best loss, or the loss back above the baseline (significantly)
    after having been significantly below it.

    The rise is judged on the rows from the best loss on (at most `window`), not on the whole
    window: a window that still holds the initial descent has no upward trend to find while the
    loss climbs from its best (the LR-ramp run climbed 1.46 -> 3.96 over four rows before a
    20-row window could see it).  It fires when those rows trend upward (Mann-Kendall at alpha),
    the median of the last 3 rows is above 1.1 x the best, and the rise exceeds
    divergence_min_rise x the baseline -- or, for a fast climb that a trend test at alpha 0.01
    needs six rows to call, when the last 3 rows since the best rise row after row, all above
    1.1 x the best, the last above 1.5 x the best (and above the minimum rise).
    Warm-up: warmup_fraction of the steps.  Latency: a fast climb fires on its third row above
    1.1 x the best; a slow one when Mann-Kendall on the rows after the best turns significant (at
    alpha 0.01, at least six rows after it), later as noise hides it.  Both rules also need the
    rise to clear DIVERGENCE_NOISE_Z x the row-to-row noise of the rows after the best, measured
    from the median level those rows held before the last 3 (from the best while fewer follow it)."""

    name, severity = "divergence", "critical"
    after_warmup = False  # "back above the baseline" needs no warm-up; the rise test checks it itself

    def __init__(self, *args):
        super().__init__(*args)
        self.best = math.inf
        self.best_step: int | None = None
        self.since_best: deque[float] = deque(maxlen=self.losses.maxlen)
        self.was_below = False

    def update(self, step, row):
        window = self.window(step, row)  # keeps the last `window` finite losses
        loss = _num(row, self.cfg.loss_metric)
        if loss is None or not math.isfinite(loss):
            return []
        if loss < self.best:
            self.best, self.best_step = loss, step
            self.since_best.clear()
        self.since_best.append(loss)
        judged = window is not None or (self.past_warmup(step) and len(self.losses) >= DIVERGENCE_MIN_ROWS)
        if not judged:
            return []
        rising, rise_test = self._rise(step, loss)
        back_above, level, trend = False, None, None
        if window is not None:
            if self.baseline is not None:  # without a baseline only the rise rule can judge
                level = stats.mean_below(window, self.baseline, alpha=self.cfg.alpha)
                self.was_below = self.was_below or level.below
                back_above = self.was_below and level.above
            trend = stats.mann_kendall(window, alpha=self.cfg.alpha)
        why = " and ".join(w for w, hit in (("a sustained rise", rising), ("back above the baseline", back_above)) if hit)
        shown = list(self.since_best) if rising or window is None else window
        test = rise_test if rising or trend is None else trend
        # one alert per episode: it re-arms once the loss sets a new best or falls significantly again
        cleared = len(self.since_best) == 1 or (trend is not None and trend.trend == "decreasing")
        return self.edge(step, rising or back_above,
                         f"divergence ({why}): loss {format_number(shown[0])} -> {format_number(shown[-1])} over {len(shown)} rows, "
                         f"best {format_number(self.best)} at step {self.best_step}, "
                         + (f"baseline {format_number(self.baseline)}" if self.baseline is not None else "no baseline"),
                         clear=cleared, p_value=None if test is None else test.p_value,
                         sen_slope=None if test is None else test.sen_slope,
                         window_mean=None if level is None else level.mean,
                         window_ci=None if level is None else list(level.ci), best=self.best,
                         best_step=self.best_step, onset_step=self.best_step if rising else step)

    def _rise(self, step: int, loss: float) -> tuple[bool, stats.TrendTest | None]:
        """Whether the loss has climbed from its best (fast, or by a significant trend), and the
        trend test when there were enough rows for one."""
        # no baseline (another loop's log without --baseline): no minimum rise; the 1.1 x best of the
        # rules below is the only floor
        min_rise = self.cfg.divergence_min_rise * abs(self.baseline) if self.baseline is not None else 0.0
        if not self.past_warmup(step) or loss - self.best <= min_rise:
            return False, None
        rows = list(self.since_best)
        noise_floor = DIVERGENCE_NOISE_Z * stats.row_noise(rows[1:])  # 0 until 3 rows follow the best
        # the rise is measured from the level the loss held after its best, before the last rows (the
        # best alone is a low outlier of a noisy curve); from the best itself while too few rows follow it
        settled = rows[1:-DIVERGENCE_RECENT_ROWS]
        level = float(np.median(settled)) if len(settled) >= DIVERGENCE_RECENT_ROWS else self.best
        climb = rows[1:][-DIVERGENCE_RECENT_ROWS:]  # the last rows after the best
        fast = (len(climb) == DIVERGENCE_RECENT_ROWS and all(a < b for a, b in zip(climb, climb[1:]))
                and climb[0] > 1.1 * self.best and loss > DIVERGENCE_FAST_RATIO * self.best
                and loss - level > noise_floor)
        # the trend is tested on the rows AFTER the best: the best is the minimum by selection, and a
        # flat noisy series starting from its own minimum looks like a rise to Mann-Kendall
        if len(rows) - 1 < DIVERGENCE_MIN_ROWS:
            return fast, None
        trend = stats.mann_kendall(rows[1:], alpha=self.cfg.alpha)
        recent = float(np.median(rows[-DIVERGENCE_RECENT_ROWS:]))
        slow = trend.trend == "increasing" and recent > 1.1 * self.best and recent - level > noise_floor
        return fast or slow, trend


SPIKE_MIN_HISTORY = 5  # finite rows before a row can be judged: the 6th finite row is the first
SPIKE_REFERENCE_ROWS = 5  # the local level a row is compared with: the median of the last 5 rows


class Spike(Detector):
    """A loss far above where the curve is now (stats.jump_z): more than spike_z (OLMo uses 6
    sigma) of the row-to-row noise over the last `window` rows above the median of the last 5
    rows, above spike_ratio x that median (a relative tolerance, as Lightning's SpikeDetection
    has), and up by more than spike_min_rise x the baseline (so 1e-4 -> 3e-4 on a memorised task
    is no spike).  On log scale while every loss is positive: near zero, a cross-entropy loss
    moves by factors (0.0012 -> 0.097 is a spike that a linear MAD over a falling window misses).
    Warm-up: SPIKE_MIN_HISTORY finite rows; latency: none, the spike row itself fires."""

    name = "spike"

    def __init__(self, *args):
        super().__init__(*args)
        self.history: deque[float] = deque(maxlen=self.cfg.window)

    def update(self, step, row):
        loss = _num(row, self.cfg.loss_metric)
        if loss is None or not math.isfinite(loss):
            return []
        out = []
        if len(self.history) >= SPIKE_MIN_HISTORY:
            history = list(self.history)
            log_scale = loss > 0 and min(history) > 0
            if log_scale:
                jump = stats.jump_z(math.log(loss), [math.log(h) for h in history], SPIKE_REFERENCE_ROWS)
                median = math.exp(jump.reference)
            else:
                jump = stats.jump_z(loss, history, SPIKE_REFERENCE_ROWS)
                median = jump.reference
            floor = (self.cfg.spike_min_rise * abs(self.baseline)
                     if self.baseline is not None and math.isfinite(self.baseline) else 0.0)
            spike = (jump.z > self.cfg.spike_z and (median <= 0 or loss > self.cfg.spike_ratio * median)
                     and loss - median > floor)
            ratio = loss / median if median > 0 else math.inf
            out = self.edge(step, spike, f"loss spike: {format_number(loss)} vs recent median {format_number(median)} "
                                         f"(x{format_number(ratio)}, {format_number(jump.z)} sigma of the row-to-row noise"
                                         f"{' on log scale' if log_scale else ''})",
                            z=jump.z, median=median, value=loss, ratio=ratio, noise=jump.scale, log_scale=log_scale)
        self.history.append(loss)
        return out


class Plateau(LossWindowDetector):
    """No significant decrease and less than plateau_min_improvement relative improvement over the
    last plateau_window rows."""

    name, severity = "plateau", "info"

    def __init__(self, cfg: HealthConfig, baseline: float, total_steps: int):
        super().__init__(cfg, baseline, total_steps, size=cfg.plateau_window)

    def update(self, step, row):
        window = self.window(step, row)
        if window is None:
            return []
        trend = stats.mann_kendall(window, alpha=self.cfg.alpha)
        first, last = _ends(window)
        improvement = (first - last) / abs(first) if first else 0.0
        flat = trend.trend != "decreasing" and improvement < self.cfg.plateau_min_improvement
        # a plateau ends with a significant decrease that also improves by the minimum
        moving = trend.trend == "decreasing" and improvement >= self.cfg.plateau_min_improvement
        return self.edge(step, flat, f"plateau: {len(window)} rows without significant improvement "
                                     f"({format_number(100 * improvement)} %, Mann-Kendall p={format_number(trend.p_value)})",
                         clear=moving, improvement=improvement, p_value=trend.p_value, first=first, last=last)


def _ends(window: list[float]) -> tuple[float, float]:
    """Means of the first and the last fifth of a window (at least 3 rows each)."""
    k = max(3, len(window) // 5)
    return sum(window[:k]) / k, sum(window[-k:]) / k


STUCK_TOLERANCE = 0.05  # "at the baseline" means a mean within 5 % below it, or anything above


class StuckAtBaseline(LossWindowDetector):
    """After warm-up, the loss is no better than the random guess: its level over the window is
    not significantly below the baseline, within 5 % of it or above, and without a significant
    trend (the StegaStamp readiness report's "loss stuck at 0.6931"; an untrained network often sits a little above ln V)."""

    name, severity = "stuck", "critical"

    def unjudged_reason(self, rows: int) -> str:
        if self.baseline is None:
            return NO_BASELINE
        return super().unjudged_reason(rows)

    def update(self, step, row):
        if self.baseline is None:  # "no better than the random guess" needs the guess's loss
            return []
        window = self.window(step, row)
        if window is None:
            return []
        level = stats.mean_below(window, self.baseline, alpha=self.cfg.alpha)
        trend = stats.mann_kendall(window, alpha=self.cfg.alpha)
        first, last = _ends(window)
        # flat (a significant rise is the divergence detector's) and close to the guess, not merely
        # a noisy window whose interval happens to reach the baseline; and not visibly falling: a
        # short window of a loss on its way down (2.01 -> 1.65 against ln 7) may not make the trend
        # test significant at alpha 0.01, but it is no "no better than the random guess"
        stuck = (not level.below and trend.trend == "no trend"
                 and level.mean >= (1 - STUCK_TOLERANCE) * self.baseline
                 and first - last <= STUCK_TOLERANCE * abs(self.baseline))
        where = "at" if level.indistinguishable else "above"
        return self.edge(step, stuck,
                         f"no better than the random guess: loss {format_number(level.mean)} CI [{format_number(level.ci[0])}, "
                         f"{format_number(level.ci[1])}] {where} the baseline {format_number(self.baseline)}, not falling "
                         f"(Mann-Kendall p={format_number(trend.p_value)})",
                         clear=level.below, mean=level.mean, ci=list(level.ci), baseline=self.baseline,
                         p_value=trend.p_value)


class Collapse(Detector):
    """Few distinct predictions (collapse_metric < collapse_min, the BitNet size study), an effective rank
    falling below rank_drop x its maximum (RankMe), or a metric leaving its bounds (the StegaStamp readiness report)."""

    name, severity = "collapse", "critical"

    def __init__(self, *args):
        super().__init__(*args)
        self.rank_max = 0.0
        self.states: dict[str, bool] = {}

    def _edge(self, key: str, step: int, condition: bool, message: str, **evidence) -> list[dict]:
        self.checked += 1
        was = self.states.get(key, False)
        self.states[key] = condition
        return [self.alert(step, message, metric=key, **evidence)] if condition and not was else []

    def update(self, step, row):
        out = []
        cfg = self.cfg
        if cfg.collapse_metric and (v := _num(row, cfg.collapse_metric)) is not None:
            out += self._edge(cfg.collapse_metric, step, v < cfg.collapse_min,
                              f"collapse: {cfg.collapse_metric} = {format_number(v)} < {format_number(cfg.collapse_min)}", value=v)
        if cfg.rank_metric and (v := _num(row, cfg.rank_metric)) is not None:
            self.rank_max = max(self.rank_max, v)
            out += self._edge(cfg.rank_metric, step, v < cfg.rank_drop * self.rank_max,
                              f"collapse: {cfg.rank_metric} = {format_number(v)} fell below {cfg.rank_drop:g} x its maximum "
                              f"{format_number(self.rank_max)}", value=v, maximum=self.rank_max)
        for key, (lo, hi) in cfg.bounds.items():
            if (v := _num(row, key)) is not None:
                out += self._edge(key, step, not lo <= v <= hi,
                                  f"out of bounds: {key} = {format_number(v)} outside [{format_number(lo)}, {format_number(hi)}]", value=v,
                                  bounds=[lo, hi])
        return out


class Grokking(Detector):
    """Memorisation (train accuracy >= grok_train_level) while validation lags, then generalisation
    (validation accuracy >= grok_val_level): reports both steps and the gap (the ternary VAE audit asks for this)."""

    name, severity = "grokking", "info"

    def __init__(self, *args):
        super().__init__(*args)
        self.memorised_at: int | None = None
        self.val_at_memorisation: float | None = None
        self.last_val: float | None = None
        self.reported = False

    def update(self, step, row):
        cfg = self.cfg
        train, val = _num(row, cfg.grok_train_metric), _num(row, cfg.grok_val_metric)
        if val is not None:
            self.last_val = val
            self.checked += 1
        if self.memorised_at is None and train is not None and train >= cfg.grok_train_level:
            self.memorised_at = step
            self.val_at_memorisation = self.last_val
        if self.reported or self.memorised_at is None or val is None or val < cfg.grok_val_level:
            return []
        self.reported = True
        lagged = self.val_at_memorisation is None or self.val_at_memorisation < cfg.grok_val_level
        gap = step - self.memorised_at
        kind = "grokking" if lagged and gap > 0 else "generalised with memorisation"
        return [self.alert(step, f"{kind}: {cfg.grok_train_metric} >= {cfg.grok_train_level:g} at step "
                                 f"{self.memorised_at}, {cfg.grok_val_metric} >= {cfg.grok_val_level:g} at step {step} "
                                 f"(gap {gap} steps)",
                           memorisation_step=self.memorised_at, generalisation_step=step, gap=gap,
                           val_at_memorisation=self.val_at_memorisation)]


# The window a jump is measured against is traced back, for the report, over at most this many values
# since the last jump (how long the metric had been flat; the test itself uses the window only).
JUMP_HISTORY_VALUES = 256
# The noise of a perfectly flat plateau (coverage exactly 0.3 eight times) is 0; the threshold uses at
# least this fraction of the plateau's level (plus an absolute 1e-12), the size of rounding, so that a
# float's last bit is no jump while any real change from an exact plateau is.
JUMP_NOISE_FLOOR = 1e-9


def _plateau_noise(residuals: np.ndarray, row_noise: float) -> float:
    """How far a value strays from the window's level by chance: the larger of the row-to-row noise of
    every value since the last jump (stats.row_noise: 1.4826 MAD of successive differences / sqrt 2,
    which a slow trend does not inflate) and the window's own spread about its level (1.4826 MAD of
    the residuals).  Either alone is too small too often: seven differences give a MAD so variable
    that 6 sigma of it fired 43 times in 20 white-noise series of 1000 values, and differences miss
    the wander of an autocorrelated level (AR(1) phi 0.9: 491 times); see docs/health.md for the two
    together."""
    spread = 1.4826 * float(np.median(np.abs(residuals - np.median(residuals))))
    return max(row_noise, spread)


class _Level(NamedTuple):
    """What the window says the next values should be: a plateau (its median, slope 0) or, when
    Mann-Kendall finds a trend, the Theil-Sen line through it; with its noise."""

    intercept: float  # the level at the window's first value
    slope: float  # per value; 0.0 for a plateau
    trend: stats.TrendTest | None  # Mann-Kendall's on the window, once a value came beyond a level
    noise: float
    n: int

    def at(self, index: int) -> float:
        return self.intercept + self.slope * index

    def threshold(self, index: int, z: float) -> float:
        """z x the noise of a new value about the level predicted at `index` (0 = the window's first
        value): the noise scaled by the prediction error of the level -- sqrt(1 + pi / 2n) for a median,
        the least-squares prediction factor sqrt(1 + 1/n + (index - mean)^2 / Sxx) for a line."""
        floor = JUMP_NOISE_FLOOR * abs(self.at(index)) + 1e-12
        if self.slope == 0.0:
            factor = math.sqrt(1.0 + math.pi / (2 * self.n))
        else:
            centre = (self.n - 1) / 2
            sxx = self.n * (self.n * self.n - 1) / 12
            factor = math.sqrt(1.0 + 1.0 / self.n + (index - centre) ** 2 / sxx)
        return z * max(self.noise, floor) * factor


class _Candidate(NamedTuple):
    """The first value beyond its window's level, waiting for the next value to confirm it."""

    step: int
    value: float
    level: _Level
    least: float
    window: list[tuple[int, float]]
    history: list[tuple[int, float]]  # every value since the last jump, before this one

    def beyond(self, value: float, index: int, z: float) -> bool:
        """`value` (the window's `index`-th value) lies beyond the level on this candidate's side by both
        thresholds."""
        up = self.value > self.level.at(len(self.window))
        change = (value - self.level.at(index)) * (1.0 if up else -1.0)
        return change > self.level.threshold(index, z) and change >= self.least


class _JumpSeries:
    """One metric's state: its values since the last jump and what has been reported."""

    def __init__(self) -> None:
        self.values: deque[tuple[int, float]] = deque(maxlen=JUMP_HISTORY_VALUES)
        self.pending: _Candidate | None = None
        self.seen = 0  # finite values
        self.judged = 0  # values compared with a full window
        self.jumps: list[dict] = []  # each reported jump's evidence


class Jump(Detector):
    """A sudden change of a metric after a plateau (a phase transition): for each metric named in
    health.jumps, a value beyond the level of its last jump_window values by more than jump_z x their
    noise and by at least the metric's least change, confirmed by the next value.

    A metric's series is its finite values in the rows that carry it (an evaluation metric's evaluation
    rows).  The level is the window's median when Mann-Kendall finds no trend in it at health.alpha (a
    plateau), else the Theil-Sen line through it, extrapolated: a steady climb is followed, not taken
    for a jump, and a creep that ends in a leap (modadd's val_acc, 0.30 -> 0.36 over eight evaluations,
    then 0.84) is still one.  The noise is _plateau_noise, scaled by the level's own prediction error.
    The next finite value must lie beyond the same level on the same side, so a one-row spike is no
    jump; the alert comes at that row, names the step of the first value beyond, and the window starts
    again from the value reached: one alert per transition, and a later one is reported too.  Warm-up:
    jump_window values of the metric (from the start, or from the last jump); latency: one value."""

    name, severity = "jump", "info"

    def __init__(self, *args):
        super().__init__(*args)
        self.series = {metric: _JumpSeries() for metric in self.cfg.jumps}

    def test_text(self) -> str:
        """The test, in words, for the alert's evidence and the claim."""
        cfg = self.cfg
        return (f"robust z against the window's level (its median without a Mann-Kendall trend at alpha "
                f"{cfg.alpha:g}, else its Theil-Sen line) and noise (the larger of the row-to-row noise since the last "
                f"jump, 1.4826 MAD of successive differences / sqrt 2, and the window's 1.4826 MAD about its level) "
                f"> health.jump_z={cfg.jump_z:g}, and a change of at least health.jumps per metric, confirmed by the "
                f"next value; window: the last health.jump_window={cfg.jump_window} values")

    def unjudged_reason(self, rows: int) -> str:
        counts = ", ".join(f"{m} {s.seen} value{'s' if s.seen != 1 else ''}" for m, s in self.series.items())
        return (f"never judged: {counts} in {rows} rows; a plateau needs health.jump_window={self.cfg.jump_window} "
                "values before the next")

    def update(self, step, row):
        out = []
        z = self.cfg.jump_z
        for metric, least in self.cfg.jumps.items():
            value = _num(row, metric)
            if value is None or not math.isfinite(value):
                continue
            series = self.series[metric]
            series.seen += 1
            candidate, series.pending = series.pending, None
            if candidate is not None:
                if candidate.beyond(value, len(candidate.window) + 1, z):
                    out.append(self._report(metric, series, candidate, step, value))
                    series.values.clear()  # the window starts again from the value reached
                    series.values.append((step, value))
                    continue
                series.values.append((candidate.step, candidate.value))  # a one-value excursion: part of the series
            if len(series.values) >= self.cfg.jump_window:
                self.checked += 1
                series.judged += 1
                series.pending = self._candidate(series, least, step, value)
                if series.pending is not None:
                    continue
            series.values.append((step, value))
        return out

    def _candidate(self, series: _JumpSeries, least: float, step: int, value: float) -> _Candidate | None:
        """`value` as a jump candidate against the window before it, or None.  Mann-Kendall (which
        chooses between the plateau and the line) runs only for a value beyond the median's threshold
        or the line's, so a quiet series costs a median, a MAD and 28 pairwise slopes per value."""
        history = list(series.values)
        window = history[-self.cfg.jump_window:]
        y = np.array([v for _, v in window])
        n, x = len(y), np.arange(len(window), dtype=np.float64)
        i, j = np.triu_indices(n, 1)
        slope = float(np.median((y[j] - y[i]) / (j - i)))  # Theil-Sen
        row_noise = stats.row_noise([v for _, v in history])  # since the last jump: one for both levels

        def level_of(intercept: float, per_value: float) -> _Level:
            return _Level(intercept, per_value, None, _plateau_noise(y - (intercept + per_value * x), row_noise), n)

        def beyond(level: _Level) -> bool:
            change = abs(value - level.at(n))
            return change > level.threshold(n, self.cfg.jump_z) and change >= least

        plateau, line = level_of(float(np.median(y)), 0.0), level_of(float(np.median(y - slope * x)), slope)
        if not (beyond(plateau) or beyond(line)):
            return None
        trend = stats.mann_kendall(y, alpha=self.cfg.alpha)
        level = (line if trend.significant else plateau)._replace(trend=trend)
        if not beyond(level):
            return None
        return _Candidate(step, value, level, least, window, history)

    def _plateau(self, candidate: _Candidate) -> list[tuple[int, float]]:
        """The values a plateau held before the jump: the window, extended back a window at a time
        through the values since the last jump for as long as Mann-Kendall finds no trend in them (the
        window alone when it has a trend)."""
        history, size = candidate.history, len(candidate.window)
        best = candidate.window
        if candidate.level.slope != 0.0:
            return best
        while size < len(history):
            size = min(size + self.cfg.jump_window, len(history))
            longer = history[-size:]
            if stats.mann_kendall([v for _, v in longer], alpha=self.cfg.alpha).significant:
                break
            best = longer
        return best

    def _report(self, metric: str, series: _JumpSeries, candidate: _Candidate, step: int, value: float) -> dict:
        level, n = candidate.level, len(candidate.window)
        plateau = self._plateau(candidate)
        before = level.at(n)  # the level the window predicted at the jump's step
        size = value - before
        flat = level.noise < JUMP_NOISE_FLOOR * abs(before) + 1e-12
        z = None if flat else abs(size) / level.noise
        sigmas = "plateau exactly flat" if z is None else f"{format_number(z, 3)} noise sigmas"
        if level.slope == 0.0:
            over = f" over its last {n}" if len(plateau) > n else ""
            after = (f"after a plateau of {len(plateau)} values (steps {plateau[0][0]}-{plateau[-1][0]}, noise "
                     f"{format_number(level.noise)}{over})")
        else:
            after = (f"after a steady trend of {'+' if level.slope > 0 else ''}{format_number(level.slope)} per value "
                     f"over {n} values (steps {plateau[0][0]}-{plateau[-1][0]}, noise {format_number(level.noise)})")
        evidence = dict(
            metric=metric, jump_step=candidate.step, confirm_step=step, level_before=before,
            first_value=candidate.value, value=value, size=size, z=z, noise=level.noise,
            threshold=max(level.threshold(n, self.cfg.jump_z), candidate.least),
            least_change=candidate.least, window_kind="plateau" if level.slope == 0.0 else "trend",
            slope_per_value=level.slope, trend_p_value=level.trend.p_value,
            plateau_values=len(plateau), plateau_first_step=plateau[0][0], plateau_last_step=plateau[-1][0],
            plateau_steps=plateau[-1][0] - plateau[0][0], window_values=n, test=self.test_text())
        series.jumps.append(evidence)
        sign = "+" if size > 0 else ""
        return self.alert(step, f"jump: {metric} {format_number(before)} -> {format_number(value)} "
                                f"({sign}{format_number(size)}, {sigmas}) at step {candidate.step} {after}", **evidence)

    def claim_value(self) -> str:
        """The jumps found per metric, for the check's claim ("not observed: ..." when none was)."""
        parts = []
        for metric, series in self.series.items():
            if series.jumps:
                found = ", ".join(f"{format_number(j['level_before'])} -> {format_number(j['value'])} at step "
                                  f"{j['jump_step']} ({'+' if j['size'] > 0 else ''}{format_number(j['size'])})"
                                  for j in series.jumps)
                text = f"{metric}: {len(series.jumps)} jump{'s' if len(series.jumps) > 1 else ''}, {found}"
            elif series.judged:
                text = f"{metric}: no jump in {series.judged} judged values"
            else:
                text = f"{metric}: not judged ({series.seen} values, a window needs {self.cfg.jump_window})"
            if series.pending is not None:
                p = series.pending
                text += (f"; its last value {format_number(p.value)} at step {p.step} lies beyond its window's level "
                         f"{format_number(p.level.at(len(p.window)))}, unconfirmed (no later value)")
            parts.append(text)
        found_any = any(s.jumps for s in self.series.values())
        return ("" if found_any else "not observed: ") + "; ".join(parts)


OVERFIT_MIN_VAL_ROWS = 8  # validation rows before the loss rule judges (Mann-Kendall at alpha 0.01 needs 6 or more)
# validation rows in a row past the gap (the docstring says "two"): one evaluation knocked down by a
# spike is no overfitting
OVERFIT_GAP_ROWS = 2


class Overfitting(Detector):
    """Memorising instead of generalising: the training metric (overfit_train_metric) at or above
    overfit_train_level while the validation metric (overfit_val_metric) lies overfit_gap or more
    below it on two validation rows in a row, or the validation loss (overfit_val_loss) rising
    significantly while the training loss does not.

    Both are judged on the rows that carry a validation value, the training value taken from the
    same row.  The loss rule: Mann-Kendall (alpha) finds an upward trend in the last `window`
    validation losses, the mean of their last fifth (at least 3 rows) is above their lowest by
    overfit_min_rise of it, and the training loss at those rows has no upward trend (both rising is
    divergence, not overfitting).  It clears once the gap is under half of overfit_gap and the
    validation loss stops rising (Sen slope <= 0), so a grokking run that generalises clears it,
    and one training row knocked down by a spike does not fire it twice.  Warm-up: the gap rule none, the
    loss rule OVERFIT_MIN_VAL_ROWS validation rows.  Latency: the gap rule one validation row (the
    second past the gap); the loss rule when the trend turns significant (at alpha 0.01, six or
    more rising validation rows)."""

    name = "overfitting"
    reports_clearing = True  # a lasting condition: its claim says whether it still held at the end

    def __init__(self, *args):
        super().__init__(*args)
        self.val_losses: deque[float] = deque(maxlen=max(self.cfg.window, OVERFIT_MIN_VAL_ROWS))
        self.train_losses: deque[float] = deque(maxlen=self.val_losses.maxlen)
        self.gap_rows = 0  # validation rows in a row past the gap
        self.now = ""  # the condition at the last judged row, for the claim at the run's end
        self.now_step: int | None = None

    def unjudged_reason(self, rows: int) -> str:
        cfg = self.cfg
        loss_rule = (f", and fewer than {OVERFIT_MIN_VAL_ROWS} rows with {cfg.overfit_val_loss}"
                     if cfg.overfit_val_loss else "")
        return (f"never judged: no row of {rows} holds both {cfg.overfit_train_metric} and "
                f"{cfg.overfit_val_metric}{loss_rule}")

    def update(self, step, row):
        cfg = self.cfg
        train, val = _num(row, cfg.overfit_train_metric), _num(row, cfg.overfit_val_metric)
        gap_judged = train is not None and val is not None and math.isfinite(train) and math.isfinite(val)
        gap = train - val if gap_judged else None
        if gap_judged:
            past = train >= cfg.overfit_train_level and gap >= cfg.overfit_gap
            self.gap_rows = self.gap_rows + 1 if past else 0
        gap_hit = self.gap_rows >= OVERFIT_GAP_ROWS
        rising, loss_hit, trend, rise = self._loss_rule(row)
        if not gap_judged and trend is None:
            return []
        why = []
        if gap_hit:
            why.append(f"{cfg.overfit_train_metric} {format_number(train)} while {cfg.overfit_val_metric} "
                       f"{format_number(val)} (gap {format_number(gap)} >= {format_number(cfg.overfit_gap)})")
        if loss_hit:
            v = list(self.val_losses)
            why.append(f"{cfg.overfit_val_loss} rising {format_number(min(v))} -> {format_number(v[-1])} "
                       f"(+{format_number(100 * rise)} % over {len(v)} validation rows, Mann-Kendall "
                       f"p={format_number(trend.p_value)}) while the training loss does not rise")
        # hysteresis: the loss rule's episode lasts until the validation loss stops rising at all
        # (Sen slope <= 0), not merely until the trend test dips below significance for a row
        cleared = (not gap_judged or gap < cfg.overfit_gap / 2) and not rising
        self.now, self.now_step = "; ".join(why), step
        return self.edge(step, gap_hit or loss_hit, "overfitting: " + "; ".join(why), clear=cleared,
                         train=train, val=val, gap=gap, val_loss_rise=rise,
                         p_value=None if trend is None else trend.p_value)

    def _loss_rule(self, row: dict) -> tuple[bool, bool, stats.TrendTest | None, float | None]:
        """(validation loss still going up: Sen slope > 0, the loss rule holds, the trend test, the
        relative rise); the test is None until OVERFIT_MIN_VAL_ROWS validation losses are there."""
        cfg = self.cfg
        val_loss, loss = _num(row, cfg.overfit_val_loss) if cfg.overfit_val_loss else None, _num(row, cfg.loss_metric)
        if val_loss is None or loss is None or not (math.isfinite(val_loss) and math.isfinite(loss)):
            return False, False, None, None
        self.val_losses.append(val_loss)
        self.train_losses.append(loss)
        if len(self.val_losses) < OVERFIT_MIN_VAL_ROWS:
            return False, False, None, None
        values = list(self.val_losses)
        trend = stats.mann_kendall(values, alpha=cfg.alpha)
        lowest = min(values)
        _, recent = _ends(values)
        rise = (recent - lowest) / abs(lowest) if lowest else math.inf
        significant = trend.trend == "increasing"
        train_rising = stats.mann_kendall(list(self.train_losses), alpha=cfg.alpha).trend == "increasing"
        hit = significant and not train_rising and rise >= cfg.overfit_min_rise
        return trend.sen_slope > 0, hit, trend, rise


class GradRegime(Detector):
    """A change of the gradient-norm level by grad_regime_ratio or more within the last
    2 x window rows (a two-segment likelihood-ratio split on log grad norm)."""

    name = "grad_regime"

    def __init__(self, *args):
        super().__init__(*args)
        self.norms: deque[float] = deque(maxlen=2 * self.cfg.window)
        self.cooldown = 0

    def update(self, step, row):
        g = _num(row, "grad_norm")
        if g is None or not math.isfinite(g) or g <= 0:
            return []
        self.norms.append(math.log(g))
        if self.cooldown:
            self.cooldown -= 1
            return []
        if len(self.norms) < self.norms.maxlen:
            return []
        cp = stats.change_point(list(self.norms))
        self.checked += 1
        if cp is None or not cp.significant:
            return []
        ratio = math.exp(cp.mean_after - cp.mean_before)
        if max(ratio, 1 / ratio) < self.cfg.grad_regime_ratio:
            return []
        self.cooldown = self.norms.maxlen  # one alert per regime change
        return [self.alert(step, f"gradient-norm regime change: level x{format_number(ratio)} "
                                 f"({format_number(math.exp(cp.mean_before))} -> {format_number(math.exp(cp.mean_after))}) "
                                 f"{len(self.norms) - cp.index} rows ago", ratio=ratio, llr=cp.llr)]


class Milestone(Detector):
    """The first logged value at which each goal of health.targets holds ("hierarchy <= -0.8 first reached
    at step 1064 (-0.8012)"): the level crossings a run is for, as events beside the jumps.  One value
    beyond the level counts (a noisy metric may cross and fall back; the claim gives the last value too);
    each goal is reported once.  An event, no action: preflight projects the same goals forward, this
    says when they were met."""

    name, severity = "milestone", "info"

    def __init__(self, *args):
        super().__init__(*args)
        from trainlab.health.goals import Goal, parse_target  # the syntax is checked already

        # preflight's own Goal: its met() is the comparison both make
        self.goals = {text: Goal(*parse_target(text), "health.targets") for text in self.cfg.targets}
        self.reached: dict[str, tuple[int, float]] = {}  # goal -> (step, value) where it first held
        self.last: dict[str, float] = {}  # goal -> the last finite value of its metric

    def test_text(self) -> str:
        return "the first logged value of each goal's metric on the goal's side of its level (health.targets)"

    def unjudged_reason(self, rows: int) -> str:
        metrics = ", ".join(sorted({goal.metric for goal in self.goals.values()}))
        return f"never judged: no finite value of {metrics} in {rows} rows"

    def claim_value(self) -> str:
        parts = []
        for text, goal in self.goals.items():
            metric, op, level = goal.metric, goal.op, goal.level
            if text in self.reached:
                step, value = self.reached[text]
                parts.append(f"{metric} {op} {level:g}: first at step {step} ({format_number(value)}), last "
                             f"{format_number(self.last[text])}")
            elif text in self.last:
                parts.append(f"{metric} {op} {level:g}: not reached (last {format_number(self.last[text])})")
            else:
                parts.append(f"{metric} {op} {level:g}: not measured ({metric} never logged)")
        return "; ".join(parts)

    def update(self, step, row):
        out, judged = [], False
        for text, goal in self.goals.items():
            metric, op, level = goal.metric, goal.op, goal.level
            value = _num(row, metric)
            if value is None or not math.isfinite(value):
                continue
            judged = True
            self.last[text] = value
            if text not in self.reached and goal.met(value):
                self.reached[text] = (step, value)
                out.append(self.alert(step, f"milestone: {metric} {op} {level:g} first reached at step {step} "
                                            f"({format_number(value)})", goal=text, metric=metric, value=value))
        self.checked += judged
        return out


DETECTORS = (NonFinite, Divergence, Spike, Plateau, StuckAtBaseline, Collapse, Grokking, Overfitting, GradRegime, Jump,
             Milestone)


def policy_of(cfg: HealthConfig, name: str) -> str:
    return "stop" if name == "nonfinite" else getattr(cfg, name)


def build_detectors(cfg: HealthConfig, baseline: float, total_steps: int) -> list[Detector]:
    return [cls(cfg, baseline, total_steps) for cls in DETECTORS if policy_of(cfg, cls.name) != "off"]


def run_offline(cfg: HealthConfig, baseline: float, total_steps: int,
                rows: list[dict]) -> tuple[list[dict], list[Detector]]:
    """Every alert the detectors raise over a finished (or running) run's history, and the
    detectors (their `checked` counts say whether they could judge at all)."""
    detectors = build_detectors(cfg, baseline, total_steps)
    alerts = []
    for row in rows:
        for d in detectors:
            alerts += d.update(row["step"], row)
    return alerts, detectors
