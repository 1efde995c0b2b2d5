"""`trainlab check RUN_DIR`: the live detectors run offline over a run's metrics.csv."""

from __future__ import annotations

import json
import re
from pathlib import Path

from trainlab import config as config_mod
from trainlab.engine.checkpoint import write_atomic
from trainlab.engine.logs import METRICS_FILE, read_metrics
from trainlab.engine.rundir import CONFIG_FILE, read_run_config
from trainlab.errors import UsageError
from trainlab.experiment import experiment_for
from trainlab.formatting import format_number
from trainlab.health.claims import Claim
from trainlab.health.detectors import DETECTORS, policy_of, run_offline
from trainlab.report.run import read_run_file

SEVERITY_VERDICT = {"critical": "fail", "warn": "warn", "info": "info"}
CHECK_FILE = "check.json"


def load_run(run_dir: Path):
    """(experiment, config, rows) of a run directory, or UsageError naming what is missing."""
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir}: not found")
    if not (run_dir / METRICS_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"run directory {run_dir}: needs config.yaml and metrics.csv (not a trainlab run?)")
    data = read_run_config(run_dir)
    if data is None or not isinstance(data.get("experiment"), str):
        raise UsageError(f"run directory {run_dir}: config.yaml has no 'experiment' key")
    experiment = experiment_for(data, f"run directory {run_dir}: config.yaml")
    cfg = config_mod.build_saved(experiment, data)
    return experiment, cfg, read_run_file(run_dir, METRICS_FILE, read_metrics)


def _needs(h, name: str, columns: set[str]) -> str | None:
    """Why a detector could not look at this run (h: its HealthConfig), or None."""
    if name == "collapse" and not (h.collapse_metric or h.rank_metric or h.bounds):
        return "no collapse_metric, rank_metric or bounds configured"
    if name == "grokking" and not {h.grok_train_metric, h.grok_val_metric} <= columns:
        return f"{h.grok_train_metric} and {h.grok_val_metric} not both logged"
    if name == "overfitting" and not ({h.overfit_train_metric, h.overfit_val_metric} <= columns
                                      or (h.overfit_val_loss and h.overfit_val_loss in columns)):
        loss = f", nor {h.overfit_val_loss}" if h.overfit_val_loss else ""
        return f"{h.overfit_train_metric} and {h.overfit_val_metric} not both logged{loss}"
    return None


def first_sentence(text: str) -> str:
    """The first sentence of a docstring, whole, on one line: a claim's evidence is never cut off
    mid-sentence (a docstring's first line usually is)."""
    flat = " ".join(text.split())
    end = _SENTENCE_END.search(flat)
    return flat[: end.start() + 1] if end else flat


_SENTENCE_END = re.compile(r"\.(?=\s+[A-Z]|$)")


def _alert_claim(detector, mine: list[dict], where: str) -> Claim:
    """The claim of a detector that fired: its first alert -- or, for a lasting condition
    (reports_clearing), the state at the run's end: the episode still holding (warn or fail), or
    the last one with the step at which it cleared (info)."""
    more = f" (+{len(mine) - 1} more)" if len(mine) > 1 else ""
    shown, verdict = mine[0], SEVERITY_VERDICT[mine[0]["severity"]]
    value = f"step {shown['step']}: {shown['message']}{more}"
    if detector is not None and detector.reports_clearing:
        shown = mine[-1]
        earlier = f" ({len(mine) - 1} earlier episode{'s' if len(mine) > 2 else ''})" if len(mine) > 1 else ""
        if detector.active:
            verdict = SEVERITY_VERDICT[shown["severity"]]
            # the condition as it stood at the last judged row, when the detector keeps it
            now, now_step = getattr(detector, "now", ""), getattr(detector, "now_step", None)
            value = (f"since step {shown['step']}: {shown['message']}{earlier}; still at the end"
                     + (f" (step {now_step}: {now})" if now and now_step != shown["step"] else ""))
        else:
            verdict = "info"
            value = f"steps {shown['step']}-{detector.cleared_at}, cleared by the end: {shown['message']}{earlier}"
    evidence = ", ".join(f"{k}={format_number(v)}" for k, v in shown["evidence"].items())
    return Claim(shown["detector"], verdict, value, evidence, where)


def judge(experiment, cfg, rows: list[dict]) -> tuple[list[dict], list[Claim]]:
    """The detectors over a trainlab run's rows (the last row per step): every alert, and one claim
    per detector -- fired, checked and passed, or not measured and why.  The live detectors' state
    is a function of these rows, so this is also what they concluded during the run."""
    return judge_rows(cfg.health, experiment.baseline_loss(cfg), cfg.train.steps, rows)


def judge_rows(health, baseline: float, total_steps: int, rows: list[dict],
               log_name: str = "metrics.csv") -> tuple[list[dict], list[Claim]]:
    """`judge` for any rows with a `step` key -- a trainlab run's or another loop's log -- given the
    health config, the random-guess baseline of the loss and the run's planned length."""
    alerts, detectors = run_offline(health, baseline, total_steps, rows)
    by_name = {d.name: d for d in detectors}
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    where = f"{log_name}, {len(rows)} rows, steps {rows[0]['step']}-{rows[-1]['step']}" if rows else f"{log_name} (empty)"
    claims = []
    for cls in DETECTORS:
        policy = policy_of(health, cls.name)
        mine = [a for a in alerts if a["detector"] == cls.name]
        missing = _needs(health, cls.name, columns)
        detector = by_name.get(cls.name)
        if policy == "off":
            claims.append(Claim(cls.name, "not measured", "detector off", f"health.{cls.name}=off", "config.yaml"))
        elif missing:
            claims.append(Claim(cls.name, "not measured", missing, "-", "config.yaml / metrics.csv"))
        elif mine:
            claims.append(_alert_claim(detector, mine, where))
        elif not detector.checked:
            claims.append(Claim(cls.name, "not measured", detector.unjudged_reason(len(rows)), "-", where))
        elif cls.name == "grokking":
            h = health
            best = {m: max((r[m] for r in rows if isinstance(r.get(m), (int, float))), default=None)
                    for m in (h.grok_train_metric, h.grok_val_metric)}
            claims.append(Claim(cls.name, "info", "not observed: best " + ", ".join(
                f"{m} {format_number(v)}" for m, v in best.items()),
                f"memorisation at {h.grok_train_metric} >= {h.grok_train_level:g}, generalisation at "
                f"{h.grok_val_metric} >= {h.grok_val_level:g}", where))
        else:
            claims.append(Claim(cls.name, "pass", f"no alert in {detector.checked} judged rows of {len(rows)}",
                                first_sentence(cls.__doc__ or cls.name), where))
    return alerts, claims


def save_check(run_dir: Path, alerts: list[dict], claims: list[Claim]) -> None:
    """check.json, through a temporary file: a report reading it meanwhile must never see half of it."""
    try:
        write_atomic(run_dir / CHECK_FILE, json.dumps({"alerts": alerts, "claims": [c.__dict__ for c in claims]},
                                                      indent=1, default=str))
    except OSError as exc:  # a read-only copy of a run, say: the verdicts must still not end in a traceback
        raise UsageError(f"run directory {run_dir}: cannot write {CHECK_FILE} ({exc.strerror or exc})") from None


def check_run(run_dir: Path) -> tuple[list[dict], list[Claim]]:
    """`trainlab check`: the detectors over the run directory's metrics.csv, saved as check.json."""
    experiment, cfg, rows = load_run(run_dir)
    alerts, claims = judge(experiment, cfg, rows)
    save_check(run_dir, alerts, claims)
    return alerts, claims
