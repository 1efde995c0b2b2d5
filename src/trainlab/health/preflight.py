"""`trainlab preflight`: a short real training run, measured, and a verdict with every number.

The seeds declared runs "VALIDATED" on a two-point loss comparison and "PROVEN" on a 3-step dry
run.  Here each question is answered by a measurement with its method named:
  0. the run: all its steps, the time budget cut it short, or a stop with the stop's own reason
     (a health policy, the memory guard, a non-finite value);
  1. learning signal: Mann-Kendall trend (autocorrelation-corrected) on the logged loss, and a
     batch-means interval of the loss level against the task's random baseline;
  2. gradients: finite, global-norm stability, layers that never receive a gradient,
     update-to-weight ratios per layer;
  3. numerics: non-finite values, AMP overflow skips;
  4. memory: measured peaks against the device's (or host's) total and the configured ceilings;
  5. speed: throughput after warm-up, ETA for the planned steps;
  6. resume: the checkpoint taken mid-run, reloaded in a fresh trainer, reproduces the next steps'
     losses; and the disk the real run's checkpoints take (one as written x what ckpt.keep retains);
  7. projection: an ensemble curve fit of the loss to the planned step, with an interval, labelled
     as a projection (its floor raised by what the parts at chance cost);
  8. goals (health/goals.py): the curriculum's gate, the user's targets and the experiment's own
     goal, each projected to the planned step; per-part metrics say which parts learn and which
     sit at chance;
  9. detectors: the live detectors' verdicts over the preflight's rows (check.json beside
     preflight.json); a critical alert fails the preflight where no claim above answers the same
     question (stuck, divergence and non-finite values are judged by 1 and 3), a warning is
     reported only.
Verdict READY / NOT READY / UNCERTAIN; exit code 0 / 1 / 1.  READY needs every goal projected to be
reached within the planned steps; a goal projected to be missed is NOT READY, one whose interval
straddles it UNCERTAIN, and that reason comes first.  preflight.json begins with the verdict, a
one-sentence summary (the verdict and its first reason) and the reasons.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Sequence

import psutil
import torch

from trainlab.config import RunConfig
from trainlab.engine.callbacks import Callback
from trainlab.engine.checkpoint import step_dir_name
from trainlab.engine.logs import read_events, read_metrics
from trainlab.engine.memory import format_bytes
from trainlab.engine.trainer import Trainer
from trainlab.errors import TrainingStopped
from trainlab.experiment import Experiment
from trainlab.formatting import format_number
from trainlab.health import stats
from trainlab.health.check import judge, save_check
from trainlab.health.claims import Claim
from trainlab.health.evidence import claims_for
from trainlab.health.goals import GoalJudgement, declared_goals, gate_goal, judge_goal, judge_parts
from trainlab.launch import run_watchers
from trainlab.report.render import write_report

# Update-to-weight ratio per step that counts as sane.  Around 1e-3 is the usual rule of thumb for
# Adam-type optimizers; far below, a layer does not move; far above, it is being rewritten each step.
RATIO_BAND = (1e-6, 1e-1)
WARMUP_FRACTION = 0.2  # rows ignored at the start for trend and speed (warm-up, allocator, LR ramp)
# Detectors whose question one of preflight's own claims answers over the whole run (see step 9):
# their alerts are reported, the claim decides.
ANSWERED_BY_PREFLIGHT = {"stuck": "learning signal", "divergence": "learning signal", "nonfinite": "numerics"}


class StepLossRecorder(Callback):
    """Every step's loss (a host sync per step: preflight only)."""

    def __init__(self):
        self.step_losses: dict[int, float] = {}

    def on_after_update(self, trainer) -> None:
        # the step counter is incremented after the update events: trainer.step is this step's index
        self.step_losses[trainer.step + 1] = float(trainer.last_step_loss)


class GradientProbe(StepLossRecorder):
    """A callback: per-parameter gradient presence and update-to-weight ratios, every
    `every`-th step, and every step's loss (preflight only: it syncs with the host each step,
    which a normal run never does)."""

    def __init__(self, every: int):
        super().__init__()
        self.every = max(1, every)
        self.names: dict[int, str] = {}
        self.steps_seen = 0
        self.grad_seen: dict[str, int] = {}
        self.ratios: dict[str, list[float]] = {}
        self._before: dict[str, torch.Tensor] = {}

    def _params(self, trainer):
        return [(self.names[id(p)], p) for p in trainer.model.parameters() if id(p) in self.names]

    def on_before_update(self, trainer) -> None:
        if not self.names:  # the model exists once the trainer has set up
            # the main optimizer's parameters: an ExtraUpdate's (a critic) get their gradients and their
            # updates in its own step, after this one, and would read as dead layers here
            self.names = {id(p): n for n, p in trainer.model.named_parameters()
                          if p.requires_grad and id(p) not in trainer.extra_params}
            self.grad_seen = {n: 0 for n in self.names.values()}
            self.ratios = {n: [] for n in self.names.values()}
        if trainer.step % self.every:
            return
        self.steps_seen += 1
        for name, p in self._params(trainer):
            if p.grad is not None and bool(p.grad.detach().abs().max() > 0):
                self.grad_seen[name] += 1
            self._before[name] = p.detach().clone()

    def on_after_update(self, trainer) -> None:
        super().on_after_update(trainer)
        if not self._before:
            return
        for name, p in self._params(trainer):
            before = self._before[name]
            norm = float(before.float().norm())
            # matrices only: a vector's value is its meaning (a norm gain at 1, a gate or a decay logit at
            # 0 or 8), not a scale an update could be measured against (a gate from 0 reads as infinite)
            if norm > 0 and p.dim() >= 2:
                self.ratios[name].append(float((p.detach().float() - before.float()).norm()) / norm)
        self._before = {}


@dataclass
class PreflightResult:
    verdict: str
    claims: list[Claim]
    reasons: list[str]
    run_dir: Path
    details: dict = field(default_factory=dict)
    detector_claims: list[Claim] = field(default_factory=list)  # the live detectors' (check.json)


GOAL_EVALUATIONS = 20  # evaluations in a preflight whose goal is on a held-out metric


def preflight_config(cfg: RunConfig, steps: int, eval_every: int = 0) -> RunConfig:
    """The run's own config with preflight's logging: ~100 rows, a checkpoint half-way for the
    resume check, an evaluation at the end -- and every `eval_every` steps when a goal is on a
    held-out metric, so that it has a trend to project (0: no periodic evaluation)."""
    pre = copy.deepcopy(cfg)
    pre.train.steps = steps
    pre.log.every = max(1, steps // 100)
    pre.ckpt.every = max(1, steps // 2)
    pre.ckpt.keep = 10
    pre.ckpt.best_metric = ""
    pre.eval.every = eval_every
    pre.eval.at_end = True
    return pre


def _learning_claim(rows: list[dict], baseline: float, alpha: float = 0.05,
                    metric: str = "loss", context_free: float | None = None) -> tuple[Claim, str, dict]:
    """Is the loss falling, or at least below a random guess?  Outcome: learning, flat below
    baseline, diverging, not learning, too noisy, or unknown (too few rows).  Non-finite losses are
    left out here (the numerics claim reports them): the statistics need finite numbers, and a run
    that blew up must still get its verdict, not a traceback.  `metric`: the loss column judged
    (health.loss_metric).  `context_free`: the loss of the best prediction that ignores the input
    (Experiment.context_free_loss); a loss falling from the random baseline but not yet below it is
    learning the output frequencies, which any network does in its first steps -- a warning, not
    evidence that the model uses its input."""
    points = [(r["step"], float(r[metric])) for r in rows
              if isinstance(r.get(metric), (int, float)) and math.isfinite(r[metric])]
    skip = int(len(points) * WARMUP_FRACTION)
    series = [loss for _, loss in points[skip:]]
    if len(series) < 10:
        return (Claim("learning signal", "not measured", f"{len(series)} finite {metric} rows after warm-up",
                      "needs at least 10 logged rows; run more steps", "metrics.csv"), "unknown", {})
    trend = stats.mann_kendall(series, alpha=alpha)
    half = series[len(series) // 2:]
    level = stats.mean_below(half, baseline, alpha=alpha)
    first_q = statistics.fmean(series[: max(1, len(series) // 4)])
    last_q = statistics.fmean(series[-max(1, len(series) // 4):])
    first_step, last_step = points[skip][0], points[-1][0]
    where = f"metrics.csv rows {first_step}-{last_step} ({len(series)} rows)"
    evidence = (f"Mann-Kendall (Hamed-Rao corrected) p={format_number(trend.p_value, 3)}, Sen slope "
                f"{format_number(trend.sen_slope, 3)}/row, CI [{format_number(trend.slope_ci[0], 3)}, {format_number(trend.slope_ci[1], 3)}]; "
                f"late-half mean {format_number(level.mean)} CI [{format_number(level.ci[0])}, {format_number(level.ci[1])}] vs baseline "
                f"{format_number(baseline)} (batch means, {level.n_batches} batches)")
    details = {"p_value": trend.p_value, "sen_slope": trend.sen_slope, "slope_ci": list(trend.slope_ci),
               "mean": level.mean, "mean_ci": list(level.ci), "baseline": baseline,
               "first_quarter_mean": first_q, "last_quarter_mean": last_q}
    if trend.trend == "increasing" and last_q > first_q:
        return Claim("learning signal", "fail", f"diverging: {metric} {format_number(first_q)} -> {format_number(last_q)}", evidence, where), \
            "diverging", details
    if trend.trend == "decreasing":
        note = "below the baseline" if level.below else ("at the baseline" if level.indistinguishable else "above the baseline")
        if context_free is not None:
            frequencies = stats.mean_below(half, context_free, alpha=alpha)
            details["context_free"] = context_free
            evidence += f"; context-free level {format_number(context_free)} (the output frequencies alone)"
            if not frequencies.below:
                return Claim("learning signal", "warn", f"falling only toward the output frequencies: {metric} "
                             f"{format_number(first_q)} -> {format_number(last_q)}, late-half mean not below "
                             f"{format_number(context_free)}, the loss of predicting the frequencies alone: no "
                             "evidence yet that the model uses its input", evidence, where), "frequencies only", details
        return Claim("learning signal", "pass", f"learning: {metric} {format_number(first_q)} -> {format_number(last_q)}, {note}",
                     evidence, where), "learning", details
    if level.below:
        return Claim("learning signal", "pass", f"flat below the baseline: {metric} {format_number(level.mean)} < {format_number(baseline)}",
                     evidence, where), "flat below baseline", details
    more = stats.steps_to_resolve(trend, len(series), alpha=alpha)
    step_per_row = (last_step - first_step) / max(len(series) - 1, 1)
    details["steps_to_resolve"] = None if more is None else int(more * step_per_row)
    hint = f"; about {int(more * step_per_row)} more steps could show a slow trend" if more else ""
    if not level.below and (trend.sen_slope >= 0 or level.above):
        # no significant fall, and no better than a random guess: nothing is being learned
        where_level = "at" if level.indistinguishable else "above"
        return Claim("learning signal", "fail", f"not learning: {metric} {format_number(level.mean)} {where_level} the baseline "
                     f"{format_number(baseline)}, no significant trend{hint}", evidence, where), "not learning", details
    extra = f"about {int(more * step_per_row)} more steps would tell" if more else "no trend at all"
    return Claim("learning signal", "warn", f"too noisy to tell ({extra})", evidence, where), "too noisy", details


def run_preflight(experiment: Experiment, cfg: RunConfig, device: torch.device, run_dir: Path,
                  steps: int, planned_steps: int, max_seconds: float, targets: Sequence[str] = ()) -> PreflightResult:
    """`targets`: the user's goals, 'METRIC OP LEVEL' (--target); with health.targets, the
    experiment's own goal and the curriculum's gate they are judged in claim 8."""
    goals = declared_goals(experiment, cfg, targets)
    # A goal on a held-out metric needs a trend of it: evaluate GOAL_EVALUATIONS times instead of
    # once at the end.  Cost: that many evaluations (sha256 quick: 2048 samples each; measured in
    # docs/health.md).
    on_eval = any(g.metric in experiment.eval_metrics for g in goals)
    pre = preflight_config(cfg, steps, max(1, steps // GOAL_EVALUATIONS) if on_eval else 0)
    claims: list[Claim] = []
    fails: list[str] = []
    warns: list[str] = []

    # ---- the run -------------------------------------------------------------------------
    probe = GradientProbe(max(1, steps // 20))
    # the schedules are the planned run's (its first `steps` steps), not squeezed into the preflight
    trainer = Trainer(pre, experiment, run_dir, device, callbacks=[probe, *run_watchers(pre, experiment, run_dir)],
                      max_seconds=max_seconds, schedule_steps=planned_steps)
    stopped = None
    t0 = time.monotonic()
    try:
        trainer.fit()
    except TrainingStopped as exc:
        stopped = str(exc)
    wall = time.monotonic() - t0
    rows = read_metrics(run_dir / "metrics.csv")
    baseline = experiment.baseline_loss(cfg)
    done_steps = trainer.step
    claim, reason = _run_claim(stopped, done_steps, steps, max_seconds)
    claims.append(claim)
    if reason:
        fails.append(reason)

    # ---- 1. learning signal -------------------------------------------------------------------
    context_free = experiment.context_free_loss(cfg) if cfg.health.loss_metric == "loss" else None
    claim, outcome, learn = _learning_claim(rows, baseline, metric=cfg.health.loss_metric, context_free=context_free)
    claims.append(claim)
    learn["outcome"] = outcome
    if claim.verdict == "fail":  # diverging, not learning
        fails.append(claim.value)
    elif claim.verdict in ("warn", "not measured"):  # too noisy, too few rows to tell
        warns.append(claim.value)

    # ---- 8. goals (right after the learning signal: they decide whether learning is enough) ------
    parts_claim, parts = judge_parts(experiment.parts, rows)
    if parts_claim is not None:
        claims.append(parts_claim)
    curriculum_claim, gate = _curriculum(cfg, trainer, run_dir)
    if curriculum_claim is not None:
        claims.append(curriculum_claim)
    judged: list[GoalJudgement] = [judge_goal(g, rows, planned_steps, experiment, parts)
                                   for g in ([gate] if gate else []) + goals]
    claims += [j.claim for j in judged]
    goal_fails = [j.reason for j in judged if j.status == "not reached"]
    goal_warns = [j.reason for j in judged if j.status in ("uncertain", "not measured")]

    # ---- 2. gradients --------------------------------------------------------------------------
    norms = [r["grad_norm"] for r in rows if isinstance(r.get("grad_norm"), (int, float))]
    finite = [g for g in norms if math.isfinite(g)]
    if len(finite) != len(norms):
        claims.append(Claim("gradients finite", "fail", f"{len(norms) - len(finite)} of {len(norms)} rows non-finite",
                            "grad_norm column", "metrics.csv"))
        fails.append("non-finite gradients")
    elif norms:
        claims.append(Claim("gradients finite", "pass", f"all {len(norms)} logged grad norms finite",
                            "grad_norm column (mean per log interval)", "metrics.csv"))
    late = finite[int(len(finite) * WARMUP_FRACTION):]
    if len(late) >= 5:
        med = statistics.median(late)
        spread = max(late) / med if med > 0 else float("inf")
        cv = statistics.pstdev(late) / statistics.fmean(late) if statistics.fmean(late) > 0 else float("inf")
        verdict = "pass" if spread < 10 else "warn"
        claims.append(Claim("gradient norm stable", verdict, f"median {format_number(med)}, max/median {format_number(spread, 3)}, "
                            f"CV {format_number(cv, 3)}", "grad_norm after warm-up; warn when max/median >= 10",
                            "metrics.csv"))
        if verdict == "warn":
            warns.append("unstable gradient norm")
    if probe.steps_seen:
        claim, problem = _dead_layer_claim(probe.grad_seen, probe.steps_seen)
        claims.append(claim)
        if problem:
            fails.append(problem)
        claim, problem = _update_ratio_claim(probe.ratios)
        if claim is not None:
            claims.append(claim)
        if problem:
            warns.append(problem)

    # ---- 3. numerics ------------------------------------------------------------------------
    losses = [r.get("loss") for r in rows]
    bad = sum(1 for v in losses if isinstance(v, float) and not math.isfinite(v))
    skipped = rows[-1].get("amp_skipped") if rows else None
    numerics = f"{bad} non-finite loss rows" + (f", {int(skipped)} AMP overflow skips" if skipped is not None else
                                                   ", no GradScaler (AMP skips not applicable)")
    claims.append(Claim("numerics", "fail" if bad else "pass", numerics, "loss and amp_skipped columns", "metrics.csv"))
    if bad:
        fails.append("non-finite loss")

    # ---- 4. memory ---------------------------------------------------------------------------
    peak_host = max((r.get("peak_ram_gb") or 0) for r in rows) if rows else 0.0
    claim = _host_memory_claim(peak_host, cfg.memory, psutil.virtual_memory().total / 1024**3, cfg.train.micro_batch)
    claims.append(claim)
    if claim.verdict == "fail":
        fails.append("host memory does not fit")
    if device.type == "cuda":
        peak_dev = max((r.get("peak_dev_mem_gb") or 0) for r in rows) if rows else 0.0
        total_dev = torch.cuda.get_device_properties(device).total_memory / 1024**3
        dev_limit = cfg.memory.device_ceiling_gb or total_dev
        ok = peak_dev < 0.9 * dev_limit
        claims.append(Claim("device memory", "pass" if ok else "fail",
                            f"peak {format_number(peak_dev, 3)} GB of {format_number(dev_limit, 3)} GB, headroom "
                            f"{format_number(100 * (1 - peak_dev / dev_limit), 3)} %", "torch.cuda.max_memory_allocated",
                            "metrics.csv peak_dev_mem_gb"))
        if not ok:
            fails.append("device memory does not fit")
    else:
        claims.append(Claim("device memory", "not measured", f"device is {device.type}",
                            "only CUDA reports device memory", "-"))

    # ---- 5. speed -----------------------------------------------------------------------------
    unit = f"{experiment.throughput_unit}_per_s"
    rates = [r[unit] for r in rows[int(len(rows) * WARMUP_FRACTION):] if isinstance(r.get(unit), (int, float))]
    per_step = experiment.items_per_sample(cfg) * cfg.train.micro_batch * cfg.train.accum
    if rates:
        rate = statistics.median(rates)
        steps_per_s = rate / per_step
        eta_h = planned_steps / steps_per_s / 3600 if steps_per_s > 0 else float("inf")
        claims.append(Claim("speed", "info", f"{format_number(steps_per_s, 3)} steps/s, {format_number(rate, 3)} "
                            f"{experiment.throughput_unit}/s; ETA for {planned_steps} steps: {format_number(eta_h, 3)} h",
                            f"median over log intervals after the first {int(WARMUP_FRACTION * 100)} % of rows, "
                            f"on {device.type}", "metrics.csv " + unit))
        learn["steps_per_s"] = steps_per_s
    else:
        claims.append(Claim("speed", "not measured", "no throughput rows", "-", "-"))

    # ---- 6. resume -------------------------------------------------------------------------------
    claims.append(_resume_claim(experiment, pre, device, run_dir, probe, fails, planned_steps))
    claim = _checkpoint_disk_claim(run_dir, cfg, planned_steps)
    claims.append(claim)
    if claim.verdict == "fail":
        fails.append("checkpoints do not fit on the disk")

    # ---- 7. projection ---------------------------------------------------------------------------
    task_loss = cfg.health.loss_metric
    pts = [(r["step"], r[task_loss]) for r in rows if isinstance(r.get(task_loss), float) and math.isfinite(r[task_loss])]
    if len(pts) >= 10 and planned_steps > done_steps:
        # no projection may count on the parts at chance: their loss is added to the floor
        floor = experiment.loss_lower_bound
        raised = parts.loss_floor() if parts is not None and floor is not None else 0.0
        if raised:
            floor += raised
        floor_note = (f"; floor {format_number(floor)} = the loss's lower bound {format_number(experiment.loss_lower_bound)}"
                      f" + {format_number(raised)}, as {parts.why_capped()}" if raised else "")
        claim, learn["projection"] = projection_claim(
            pts, planned_steps, floor, f"metrics.csv {task_loss}", metric=task_loss,
            value_note=f", floor {format_number(floor)} (parts at chance)" if raised else "", evidence_note=floor_note)
        learn["projection"]["lower_bound"] = floor
        claims.append(claim)
    else:
        claims.append(Claim("projection (not a measurement)", "not measured",
                            "too few rows or planned steps not beyond the preflight", "-", "-"))

    # ---- 9. the live detectors' verdicts over the preflight's rows (saved as check.json, so the
    # report lists them after preflight's own claims).  A critical alert fails the preflight unless
    # one of preflight's own claims answers the same question over the whole short run: stuck and
    # divergence fire on a window (a 120-step run can sit at the baseline for its first 16 steps and
    # learn after), the learning signal judges every row after the warm-up; non-finite values are
    # the numerics claim.  A warning (a spike, a gap between training and validation) is reported,
    # not decisive: 200 steps of a healthy run may well hold one.
    alerts, detector_claims = judge(experiment, pre, rows)
    save_check(run_dir, alerts, detector_claims)
    fails += detector_fails(detector_claims)

    # a goal that will be missed is the reason a person needs first: the run may be healthy otherwise
    fails, warns = goal_fails + fails, goal_warns + warns
    verdict, reasons = verdict_of(fails, warns, lambda: _ready_reason(claims, judged))
    details = {"verdict": verdict, "summary": f"{verdict}: {reasons[0]}", "reasons": reasons,
               "steps_run": done_steps, "wall_s": round(wall, 2),
               "planned_steps": planned_steps, "baseline_loss": baseline, "learning": learn,
               "goals": [j.details for j in judged],
               "parts": None if parts is None else {"at_chance": parts.at_chance, "learning": parts.learning,
                                                    "not_measured": parts.unmeasured, "levels": parts.levels},
               "claims": [c.__dict__ for c in claims]}
    (run_dir / "preflight.json").write_text(json.dumps(details, indent=1, default=str), encoding="utf-8")
    write_report(run_dir, claims_for(run_dir))
    return PreflightResult(verdict, claims, reasons, run_dir, details, detector_claims)


def projection_claim(pts: list[tuple[int, float]], planned_steps: int, lower_bound: float | None, source: str,
                     value_note: str = "", evidence_note: str = "", metric: str = "loss") -> tuple[Claim, dict]:
    """The loss projected to `planned_steps` from (step, loss) points, as a claim labelled a
    projection, and its figures for preflight.json."""
    proj = stats.project([p[0] for p in pts], [p[1] for p in pts], planned_steps, lower_bound=lower_bound)
    best = max(proj.families, key=lambda k: proj.families[k][3])
    claim = Claim("projection (not a measurement)", "info",
                  f"{metric} at step {planned_steps}: {format_number(proj.value)} [{format_number(proj.interval[0])}, "
                  f"{format_number(proj.interval[1])}] (90 % bootstrap interval){value_note}",
                  f"AIC-weighted ensemble of power/exp/log fits, heaviest {best}; extrapolates "
                  f"{format_number(proj.extrapolation_ratio, 3)}x beyond the last measured step{evidence_note}", source)
    return claim, {"value": proj.value, "interval": list(proj.interval)}


def detector_fails(detector_claims: list[Claim]) -> list[str]:
    """The reasons the detectors' verdicts fail a preflight: a critical alert, unless one of
    preflight's own claims answers the same question over the whole run (ANSWERED_BY_PREFLIGHT)."""
    return [f"detector {c.name}: {c.value}" for c in detector_claims
            if c.verdict == "fail" and c.name not in ANSWERED_BY_PREFLIGHT]


def verdict_of(fails: list[str], warns: list[str], ready_reason) -> tuple[str, list[str]]:
    """(verdict, reasons): NOT READY on a failure, UNCERTAIN on a doubt, else READY with
    `ready_reason()` as its one reason; the failures come first."""
    if fails:
        return "NOT READY", fails + warns
    if warns:
        return "UNCERTAIN", warns
    return "READY", [ready_reason()]


def _ready_reason(claims: list[Claim], judged: list[GoalJudgement]) -> str:
    """Why a READY run is READY, in words: its goals reached (or that it has none) and its loss."""
    learning = next((c.value for c in claims if c.name == "learning signal"), "")
    checks = f"{learning}; no check failed or was uncertain" if learning else "no check failed or was uncertain"
    if judged:
        return "; ".join(j.claim.value for j in judged) + f"; {checks}"
    return f"{checks} (no goal to judge: no curriculum gate, --target, health.targets or experiment goal)"


def _curriculum(cfg: RunConfig, trainer: Trainer, run_dir: Path):
    """(a claim on the curriculum's phases in the preflight, the current phase's gate as a Goal);
    (None, None) without a curriculum.  A promotion during the preflight is a gate reached,
    measured; the gate of the phase the run ends in is judged as a goal, unless it is the last."""
    cur = cfg.curriculum
    if not cur.values:
        return None, None
    phase = trainer.curriculum.phase
    start = trainer.step - trainer.curriculum.steps_in_phase
    promotions = [e for e in read_events(run_dir / "events.jsonl") if e.get("kind") == "promotion"]
    done = "; ".join(f"gate {format_number(e['gate'])} of phase {e['from_phase']} reached at step {e['step']} "
                     f"(running mean {format_number(e['running_mean'])}, measured)" for e in promotions)
    last = phase >= len(cur.values) - 1
    now = (f"in phase {phase} of {len(cur.values)} ({cur.name} {format_number(cur.values[phase])})"
           + (", the last: it never ends, so its gate is no goal" if last else
              f" since step {start}: its gate {format_number(cur.gates[phase])} on {cur.metric} is judged below"))
    claim = Claim("curriculum", "pass" if promotions else "info", (done + "; " if done else "") + now,
                  f"promotion events; a phase ends after min_steps in it and a full window of {cur.window} steps "
                  f"whose mean {cur.metric} passes its gate", "events.jsonl")
    return claim, gate_goal(cfg, phase, start)


def _run_claim(stopped: str | None, done_steps: int, steps: int, max_seconds: float) -> tuple[Claim, str | None]:
    """How the preflight run ended, and the reason to refuse it when it did not end by itself.  A
    stop names its own cause (a health policy, the memory guard, a non-finite value, running out of
    device memory): its message's first clause, the part before the checkpoint path."""
    if stopped:
        headline = _headline(stopped)
        return (Claim("run", "fail", f"stopped at step {done_steps} of {steps}: {headline}", stopped,
                      "events.jsonl"), f"run stopped at step {done_steps}: {headline}")
    if done_steps < steps:
        # the measurements below say what they could measure in the steps that ran
        return (Claim("run", "info", f"{done_steps} of {steps} steps: the time budget of {max_seconds:g} s ran out",
                      "--max-seconds", "preflight"), None)
    return Claim("run", "pass", f"all {steps} steps", "the trainer's step counter", "preflight"), None


def _headline(stop_message: str) -> str:
    """A stop message's first clause: its cause, without the checkpoint path that follows."""
    return stop_message.split("; ")[0]


def _dead_layer_claim(grad_seen: dict[str, int], steps_seen: int) -> tuple[Claim, str | None]:
    """Parameters whose gradient was None or all zero at every probed step: they never learn."""
    dead = [n for n, k in grad_seen.items() if k == 0]
    claim = Claim("layers without gradient", "fail" if dead else "pass",
                  f"{len(dead)} of {len(grad_seen)}" + (f": {', '.join(dead[:6])}" if dead else ""),
                  f"parameters whose gradient was None or all zero at all {steps_seen} probed steps",
                  "preflight probe")
    return claim, (f"{len(dead)} parameters never receive a gradient" if dead else None)


def _update_ratio_claim(ratios: dict[str, list[float]]) -> tuple[Claim | None, str | None]:
    """The median update-to-weight ratio of each parameter against RATIO_BAND; None without any
    measured ratio (every probed weight was zero)."""
    medians = {n: statistics.median(v) for n, v in ratios.items() if v}
    if not medians:
        return None, None
    outside = {n: r for n, r in medians.items() if not RATIO_BAND[0] <= r <= RATIO_BAND[1]}
    lo_name = min(medians, key=medians.get)
    hi_name = max(medians, key=medians.get)
    value = (f"median per layer from {format_number(medians[lo_name], 2)} ({lo_name}) to {format_number(medians[hi_name], 2)} "
             f"({hi_name}); {len(outside)} of {len(medians)} outside [{RATIO_BAND[0]:g}, {RATIO_BAND[1]:g}]")
    claim = Claim("update/weight ratio", "warn" if outside else "pass", value,
                  "||w_after - w_before|| / ||w_before|| per weight matrix (2-D and up; vectors -- norm gains, biases, "
                  "gates -- are not judged), median over probed steps", "preflight probe")
    return claim, (f"{len(outside)} layers with update/weight ratio outside the band" if outside else None)


def _checkpoint_disk_claim(run_dir: Path, cfg: RunConfig, planned_steps: int) -> Claim:
    """The disk the real run's checkpoints take: one checkpoint as the preflight wrote it (weights,
    optimizer state, RNG and data state), times what ckpt.keep (and the best checkpoint) retains; and
    what keeping every periodic checkpoint would take, against the free space where the run directory is."""
    saved = sorted((p for p in (run_dir / "checkpoints").glob("step_*") if p.is_dir()), key=lambda p: p.name)
    if not saved:
        return Claim("checkpoint disk", "not measured", "the preflight wrote no checkpoint", "-", "-")
    size = sum(f.stat().st_size for f in saved[-1].rglob("*") if f.is_file())
    kept = cfg.ckpt.keep + (1 if cfg.ckpt.best_metric else 0)
    periodic = planned_steps // cfg.ckpt.every if cfg.ckpt.every else 0
    free = shutil.disk_usage(run_dir).free
    value = (f"{format_bytes(size)} per checkpoint; ckpt.keep {cfg.ckpt.keep}"
             + (" + the best" if cfg.ckpt.best_metric else "") + f" retains at most {kept}: "
             f"{format_bytes(kept * size)} of {format_bytes(free)} free")
    if periodic > kept:
        value += (f" (keeping all {periodic} of a checkpoint every {cfg.ckpt.every} steps would take "
                  f"{format_bytes(periodic * size)})")
    fits = kept * size < free
    return Claim("checkpoint disk", "pass" if fits else "fail", value,
                 f"bytes of {saved[-1].name} as written (weights, optimizer, RNG and data state) x the checkpoints "
                 "retained; shutil.disk_usage of the run directory's file system", f"{saved[-1]}")


def _host_memory_claim(peak_gb: float, memory, machine_total_gb: float, micro_batch: int) -> Claim:
    """The measured host peak against the configured ceiling (or the machine's total without one):
    it fits when it stays under 90 % of it, leaving room for what a longer run adds."""
    limit = memory.host_ceiling_gb or machine_total_gb
    fits = peak_gb < 0.9 * limit
    return Claim("host memory", "pass" if fits else "fail",
                 f"peak {format_number(peak_gb, 3)} GB of {format_number(limit, 3)} GB "
                 f"({'ceiling' if memory.host_ceiling_gb else 'machine total'}), headroom "
                 f"{format_number(100 * (1 - peak_gb / limit), 3)} %",
                 f"RSS ({memory.host_measure}) polled every {memory.every} steps and at log steps, "
                 f"at the planned micro-batch {micro_batch}", "metrics.csv peak_ram_gb")


def _resume_claim(experiment: Experiment, pre: RunConfig, device: torch.device, run_dir: Path,
                  probe: GradientProbe, fails: list[str], schedule_steps: int) -> Claim:
    """Reload the half-way checkpoint in a fresh trainer and compare the next two steps' losses."""
    mid = pre.ckpt.every
    source = run_dir / "checkpoints" / step_dir_name(mid)
    if not source.is_dir() or (mid + 2) not in probe.step_losses:
        return Claim("resume", "not measured", f"no checkpoint at step {mid} or too few steps after it", "-", "-")
    check_dir = run_dir / "resume-check"
    if check_dir.exists():
        shutil.rmtree(check_dir)
    (check_dir / "checkpoints").mkdir(parents=True)
    shutil.copytree(source, check_dir / "checkpoints" / source.name)
    again = copy.deepcopy(pre)  # train.steps unchanged: schedules over the run's length stay the same
    again.log.every = 1
    again.eval.at_end = False
    again.log.progress = "off"
    recorder = StepLossRecorder()
    stopped = ""
    try:
        Trainer(again, experiment, check_dir, device, callbacks=[recorder, *run_watchers(again, experiment, check_dir)],
                stop_at=mid + 2, schedule_steps=schedule_steps).fit()
    except TrainingStopped as exc:
        # the reloaded run meets the same stop as the run when a policy fires at step mid + 2; the
        # stop comes after that step's loss is recorded, so the comparison still stands
        stopped = f"; the reloaded run was stopped: {_headline(str(exc))}"
    pairs = [(probe.step_losses[s], recorder.step_losses.get(s)) for s in (mid + 1, mid + 2)]
    exact = all(a == b for a, b in pairs)
    close = all(b is not None and math.isclose(a, b, rel_tol=1e-5, abs_tol=1e-7) for a, b in pairs)
    shown = "; ".join(f"step {mid + i + 1}: {a!r} vs {b!r}" for i, (a, b) in enumerate(pairs))
    shutil.rmtree(check_dir)
    if not close:
        fails.append("resume does not reproduce the run")
    return Claim("resume", "pass" if close else "fail",
                 ("bitwise identical" if exact else "equal within 1e-5" if close else "differs") + f" ({shown})",
                 f"checkpoint of step {mid} reloaded in a fresh trainer; losses of the next two steps compared "
                 f"with the uninterrupted run{stopped}", "preflight")
