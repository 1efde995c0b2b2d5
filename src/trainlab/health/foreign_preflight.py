"""`trainlab preflight --log PATH --max-seconds S -- COMMAND ...`: preflight on someone else's script.

COMMAND runs as `trainlab watch` runs it (health/watcher.py: its own process group, signals passed
on, its log followed live by the detectors, every policy warn).  When --max-seconds have passed it
is stopped as a watch `stop` policy stops it: SIGINT (its own Ctrl-C handler gets --grace seconds),
then SIGTERM, then SIGKILL.  Then the verdict READY / NOT READY / UNCERTAIN, from what its log showed,
with the claims of `trainlab preflight` that a log can answer, each the same implementation:
  run: stopped at the budget, exited by itself (code N), or crashed before the budget (NOT READY);
  learning signal: preflight's Mann-Kendall trend and batch-means level against --baseline (without
    one, the trend alone, and the level said to be not measured);
  projection: stats.project of the loss to --planned-steps;
  speed: steps per second from the step column over the wall time at which the rows appeared, and
    the ETA for --planned-steps;
  numerics: non-finite loss rows;
  detectors: judge_rows over the whole log (check.json, as `trainlab check LOG` writes it);
  gradients, resume, memory, update ratios: "not measured: foreign script" (they need the model).
"""

from __future__ import annotations

import json
import math
import shlex
import time
from pathlib import Path

from trainlab.errors import EXIT_STOPPED, UsageError
from trainlab.health.watcher import Watcher, parse_policies

PREFLIGHT_FILE = "preflight.json"
FOREIGN = "not measured: foreign script"
# what a log cannot show: these need the model, its optimizer or the process's allocator
MODEL_CLAIMS = (("gradients", "needs the model's gradients (a grad_norm column is judged by the detectors)"),
                ("resume", "needs the script's checkpoint and a second trainer to reload it"),
                ("memory", "needs the script's own allocator"),
                ("update-to-weight ratios", "needs the model's parameters before and after a step"))


class BudgetWatcher(Watcher):
    """A Watcher that stops the child when its time budget is spent, and notes when each row came."""

    def __init__(self, *args, max_seconds: float, **kwargs):
        super().__init__(*args, **kwargs)
        self.max_seconds = max_seconds
        self.started: float | None = None
        self.budget_hit = False
        self.arrivals: list[tuple[float, int]] = []  # (monotonic time a row was fed, its step)

    def say(self, text: str) -> None:
        print(f"trainlab preflight: {text}", file=self.stream, flush=True)

    def _feed(self, detectors, rows: list[dict]) -> None:
        now = time.monotonic()
        self.arrivals += [(now, row["step"]) for row in rows]
        super()._feed(detectors, rows)

    def _escalate(self) -> None:
        if self.started is None:
            self.started = time.monotonic()
        if not self.budget_hit and self.stopped_by is None and time.monotonic() - self.started >= self.max_seconds:
            self.budget_hit = True
            self.begin_stop(f"the budget of {self.max_seconds:g} s is spent: sending",
                            f"--max-seconds {self.max_seconds:g} spent")
        super()._escalate()


def _run_claim(watcher: BudgetWatcher, child_code: int | None, last_step):
    from trainlab.health.claims import Claim

    at = f"at step {last_step}" if last_step is not None else "before any row of its log"
    if watcher.budget_hit:
        sent = ", ".join(watcher.signals_sent) or "none (it had just ended)"
        return Claim("run", "info", f"stopped at the budget of {watcher.max_seconds:g} s {at} (exit code {child_code})",
                     f"signals sent: {sent}", "--max-seconds"), None
    if child_code == 0:
        return Claim("run", "pass", f"exited by itself with code 0 {at}", "the child's exit status", "COMMAND"), None
    return (Claim("run", "fail", f"crashed: exit code {child_code} {at}, before the budget of "
                                 f"{watcher.max_seconds:g} s", "the child's exit status", "COMMAND"),
            f"the script crashed: exit code {child_code} {at}")


def _trend_only_claim(rows: list[dict], where: str):
    """Without a baseline: the loss's trend alone (preflight's Mann-Kendall); the level not measured."""
    from trainlab.formatting import format_number
    from trainlab.health import stats
    from trainlab.health.claims import Claim
    from trainlab.health.preflight import WARMUP_FRACTION

    series = [float(r["loss"]) for r in rows if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
    series = series[int(len(series) * WARMUP_FRACTION):]
    note = "the level against a random guess not measured (--baseline)"
    if len(series) < 10:
        return Claim("learning signal", "not measured", f"{len(series)} finite loss rows after warm-up",
                     "needs at least 10 logged rows; run longer", where), "unknown", {}
    trend = stats.mann_kendall(series)
    evidence = (f"Mann-Kendall (Hamed-Rao corrected) p={format_number(trend.p_value, 3)}, Sen slope "
                f"{format_number(trend.sen_slope, 3)}/row; {note}")
    details = {"p_value": trend.p_value, "sen_slope": trend.sen_slope, "baseline": None}
    if trend.trend == "decreasing":
        return Claim("learning signal", "pass", f"loss falling; {note}", evidence, where), "learning", details
    if trend.trend == "increasing":
        return Claim("learning signal", "fail", "diverging: the loss rises", evidence, where), "diverging", details
    return Claim("learning signal", "warn", f"no significant trend; {note}", evidence, where), "too noisy", details


def run_foreign_preflight(command: list[str], log: Path | None, out: Path | None = None, *, max_seconds: float = 300.0,
                          planned_steps: int | None = None, fmt=None, columns=None, baseline=None, poll: float = 0.5,
                          grace: float = 30.0) -> int:
    """Check the input (UsageError before anything is written or started), run COMMAND for at most
    `max_seconds`, then the verdict; preflight.json, check.json and the report in the out dir."""
    from trainlab.health.check import check_log, default_out_dir
    from trainlab.health.foreign import FORMATS, parse_baseline

    if not command:
        raise UsageError("no COMMAND: trainlab preflight --log PATH --max-seconds S [options] -- COMMAND ...")
    if log is None:
        raise UsageError("COMMAND needs --log PATH: the log it writes (CSV, JSON Lines, JSON or a TensorBoard directory)")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: allowed: {', '.join(FORMATS)}")
    if not (max_seconds > 0 and math.isfinite(max_seconds)):
        raise UsageError(f"--max-seconds {max_seconds}: must be > 0 and finite")
    if planned_steps is not None and planned_steps < 1:
        raise UsageError(f"--planned-steps {planned_steps}: the planned length must be 1 or more")
    base = parse_baseline(baseline)
    log = Path(log)
    out_dir = Path(out) if out is not None else default_out_dir(log)
    watcher = BudgetWatcher(command, log, out_dir, fmt=fmt, columns=columns, baseline=baseline,
                            total_steps=planned_steps, policies=parse_policies([]), poll=poll, grace=grace,
                            max_seconds=max_seconds)
    t0 = time.monotonic()
    result = watcher.run()
    wall = time.monotonic() - t0
    return _judge(watcher, result.child_code, wall, command, log, out_dir, fmt, columns, baseline, base, planned_steps,
                  check_log)


def _judge(watcher, child_code, wall, command, log, out_dir, fmt, columns, baseline, base, planned_steps,
           check_log) -> int:
    from trainlab.formatting import format_number
    from trainlab.health.claims import Claim
    from trainlab.health.preflight import (WARMUP_FRACTION, _learning_claim, _ready_reason, detector_fails,
                                           projection_claim, verdict_of)
    from trainlab.report.render import write_log_report

    shown = shlex.join(command)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    fails: list[str] = []
    warns: list[str] = []
    try:
        checked = check_log(log, out=out_dir, fmt=fmt, columns=columns, baseline=baseline, total_steps=planned_steps,
                            title=f"trainlab preflight: {shown}")
    except UsageError as exc:  # the child ran, but its log holds nothing to judge
        checked, no_log = None, str(exc)
    rows = checked.rows if checked is not None else []
    last_step = rows[-1]["step"] if rows else None
    claims: list[Claim] = []
    claim, reason = _run_claim(watcher, child_code, last_step)
    claims.append(claim)
    if reason:
        fails.append(reason)
    learn: dict = {}
    if checked is None:
        claims.append(Claim("log", "fail", no_log, "read after the script ended", str(log)))
        fails.append(f"no log to judge: {no_log}")
    else:
        where = f"{log.name} steps {rows[0]['step']}-{last_step} ({len(rows)} steps)"
        # ---- learning signal (preflight's own claim; the level needs the baseline)
        if base is not None:
            claim, outcome, learn = _learning_claim(rows, base.value)
            claim.source = where
            claim.evidence = claim.evidence.replace(f"vs baseline {format_number(base.value)}", f"vs baseline {base.text}")
        else:
            claim, outcome, learn = _trend_only_claim(rows, where)
        learn["outcome"] = outcome
        claims.append(claim)
        if claim.verdict == "fail":
            fails.append(claim.value)
        elif claim.verdict in ("warn", "not measured"):
            warns.append(claim.value)
        # ---- projection
        pts = [(r["step"], float(r["loss"])) for r in rows
               if isinstance(r.get("loss"), (int, float)) and math.isfinite(r["loss"])]
        if planned_steps is None:
            claims.append(Claim("projection (not a measurement)", "not measured", "not measured: --planned-steps not "
                                "given", "-", "--planned-steps"))
        elif len(pts) >= 10 and planned_steps > pts[-1][0]:
            claim, learn["projection"] = projection_claim(pts, planned_steps, None, where)
            claims.append(claim)
        else:
            claims.append(Claim("projection (not a measurement)", "not measured",
                                f"{len(pts)} finite loss rows (needs 10) or --planned-steps {planned_steps} not beyond "
                                f"step {last_step}", "-", where))
        # ---- speed: the step column over the wall time at which its rows appeared (after warm-up)
        arrivals = watcher.arrivals[int(len(watcher.arrivals) * WARMUP_FRACTION):]
        if len(arrivals) >= 2 and arrivals[-1][0] > arrivals[0][0] and arrivals[-1][1] > arrivals[0][1]:
            steps_per_s = (arrivals[-1][1] - arrivals[0][1]) / (arrivals[-1][0] - arrivals[0][0])
            eta = ""
            if planned_steps is not None:
                left = max(planned_steps - last_step, 0)
                eta = f"; ETA for {planned_steps} steps: {format_number(left / steps_per_s / 3600, 3)} h ({left} to go)"
                learn["eta_h"] = left / steps_per_s / 3600
            claims.append(Claim("speed", "info", f"{format_number(steps_per_s, 3)} steps/s{eta}",
                                f"steps {arrivals[0][1]}-{arrivals[-1][1]} over the {format_number(arrivals[-1][0] - arrivals[0][0], 3)} s "
                                f"between their appearance in the log (read every {watcher.poll:g} s), after the first "
                                f"{int(WARMUP_FRACTION * 100)} % of rows", where))
            learn["steps_per_s"] = steps_per_s
        else:
            claims.append(Claim("speed", "not measured", "fewer than two steps appeared in the log while it ran",
                                "-", where))
        # ---- numerics
        bad = sum(1 for r in rows if isinstance(r.get("loss"), float) and not math.isfinite(r["loss"]))
        claims.append(Claim("numerics", "fail" if bad else "pass", f"{bad} non-finite loss rows of {len(rows)}",
                            "loss column", where))
        if bad:
            fails.append("non-finite loss")
    for name, why in MODEL_CLAIMS:
        claims.append(Claim(name, "not measured", FOREIGN, why, "-"))
    # ---- the detectors (check.json): a critical alert fails unless a claim above answers the question
    detector_claims = [c for c in (checked.claims if checked is not None else [])
                       if c.name not in ("log", "baseline", "planned steps", "log read")]
    fails += detector_fails(detector_claims)
    verdict, reasons = verdict_of(fails, warns, lambda: _ready_reason(claims, []).split(" (no goal")[0])
    details = {"verdict": verdict, "summary": f"{verdict}: {reasons[0]}", "reasons": reasons,
               "command": command, "log": str(log), "child_exit_code": child_code,
               "stopped_at_budget": watcher.budget_hit, "max_seconds": watcher.max_seconds,
               "last_step": last_step, "wall_s": round(wall, 2), "planned_steps": planned_steps,
               "baseline": None if base is None else base.value, "learning": learn,
               "claims": [c.__dict__ for c in claims]}
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / PREFLIGHT_FILE).write_text(json.dumps(details, indent=1, default=str) + "\n", encoding="utf-8")
        if checked is not None:  # the report: preflight's claims, then the detectors' (check.json holds them alone)
            write_log_report(out_dir, rows, claims + checked.claims, f"trainlab preflight: {shown}", log,
                             baseline=None if base is None else base.value,
                             baseline_text=None if base is None else base.text, raw_rows=checked.raw_rows)
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot write the verdict ({exc.strerror or exc})") from None
    width = max(len(c.name) for c in claims)
    for c in claims:
        print(f"  {c.name.ljust(width)}  {c.verdict.upper():12s} {c.value}")
    for c in detector_claims:
        if c.verdict in ("warn", "fail"):
            print(f"  detector {c.name}: {c.verdict.upper()} {c.value}")
    print(f"trainlab: preflight {verdict}: {'; '.join(reasons)} -> {out_dir / 'report.md'}")
    return 0 if verdict == "READY" else EXIT_STOPPED
