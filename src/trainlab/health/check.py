"""`trainlab check RUN_DIR`: the live detectors run offline over a run's metrics.csv -- and
`trainlab check LOG` over a log that another loop wrote (health/foreign.py reads it)."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

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
        raise UsageError(f"run directory {run_dir}: needs config.yaml and metrics.csv (not a trainlab run?), or, "
                         "for a TensorBoard log, events.out.tfevents.* files")
    data = read_run_config(run_dir)
    if data is None or not isinstance(data.get("experiment"), str):
        raise UsageError(f"run directory {run_dir}: config.yaml has no 'experiment' key")
    experiment = experiment_for(data, f"run directory {run_dir}: config.yaml")
    cfg = config_mod.build_saved(experiment, data)
    return experiment, cfg, read_run_file(run_dir, METRICS_FILE, read_metrics)


def _needs(h, name: str, columns: set[str]) -> str | None:
    """Why a detector could not look at this run (h: its HealthConfig), or None."""
    if name == "grad_regime" and "grad_norm" not in columns:
        return "no grad_norm logged"
    if name == "collapse" and not (h.collapse_metric or h.rank_metric or h.bounds):
        return "no collapse_metric, rank_metric or bounds configured"
    if name == "grokking" and not {h.grok_train_metric, h.grok_val_metric} <= columns:
        return f"{h.grok_train_metric} and {h.grok_val_metric} not both logged"
    if name == "overfitting" and not ({h.overfit_train_metric, h.overfit_val_metric} <= columns
                                      or (h.overfit_val_loss and h.overfit_val_loss in columns)):
        loss = f", nor {h.overfit_val_loss}" if h.overfit_val_loss else ""
        return f"{h.overfit_train_metric} and {h.overfit_val_metric} not both logged{loss}"
    if name == "milestone" and not h.targets:
        return "health.targets names no goal"
    if name == "jump" and not h.jumps:
        return "health.jumps names no metric"
    if name == "jump" and not set(h.jumps) & columns:
        return f"{', '.join(h.jumps)} not logged"
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
        elif hasattr(detector, "claim_value") and detector.checked:  # events, not faults: what each found
            claims.append(Claim(cls.name, "info", detector.claim_value(), detector.test_text(), where))
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


# ---------------------------------------------------------------------------------------- logs trainlab did not write

CRITICAL_DETECTORS = ("stuck", "divergence", "nonfinite", "collapse")  # the alerts that make a foreign check exit 1
OUT_SUFFIX = ".trainlab"
# what each detector that needs the random-guess loss does without one (judge_rows' claims say it)
WITHOUT_BASELINE = {
    "divergence": "'back above the baseline' not measured: no baseline (--baseline); the rise rule judged "
                  "without its minimum rise",
    "spike": "its minimum rise not applied: no baseline (--baseline)",
}


def is_foreign_log(path: Path) -> bool:
    """Whether `trainlab check PATH` reads PATH as another loop's log: a file, a directory of
    TensorBoard event files that is no trainlab run, or a missing path named like a file (so a
    missing run directory is still refused as one)."""
    from trainlab.health.foreign import event_files

    if path.is_dir():
        return not (path / METRICS_FILE).is_file() and not (path / CONFIG_FILE).is_file() and bool(event_files(path))
    return path.exists() or bool(path.suffix)


def default_out_dir(log: Path) -> Path:
    """Beside the log, named after it (training.log -> training.log.trainlab/): never inside the
    user's own log directory (a TensorBoard directory is theirs, and other tools read it), and
    two logs in one folder do not overwrite each other's verdicts."""
    log = Path(log)
    if log.name in ("", ".", ".."):  # `trainlab check .` inside the log directory: beside it, not in it
        log = log.resolve()
    return log.parent / f"{log.name}{OUT_SUFFIX}"


@dataclass
class LogCheck:
    """What `trainlab check` concluded about a log that trainlab did not write."""

    source: Path
    fmt: str
    roles: dict[str, str]
    rows: list[dict]  # one per step, detector names for the role columns
    raw_rows: int
    baseline: Any  # trainlab.health.foreign.Baseline, or None
    total_steps: int
    alerts: list[dict]
    claims: list[Claim]
    notes: list[str]  # what the reader left out, in words
    out_dir: Path | None = None

    @property
    def critical(self) -> list[dict]:
        return [a for a in self.alerts if a["detector"] in CRITICAL_DETECTORS]


def read_log(path: Path, fmt: str | None = None, columns: dict[str, str | None] | None = None):
    """(reader, roles, rows one per step) of a finished log; UsageError for a log with no rows."""
    from trainlab.health.foreign import merge_steps, open_log, resolve_roles, to_detector_rows

    reader = open_log(path, fmt)
    raw = reader.read_new(final=True)
    if not raw:
        torn = f" (its only line is torn: {reader.notes.torn[:40]!r})" if reader.notes.torn else ""
        raise UsageError(f"log {path}: no rows{torn}")
    roles = resolve_roles(reader.columns, columns)
    rows = merge_steps(to_detector_rows(raw, roles, reader.notes))
    if not rows:
        raise UsageError(f"log {path}: no row has a number in its step column {roles['step']}")
    return reader, roles, rows, len(raw)


def judge_log(path: Path, *, fmt: str | None = None, columns: dict[str, str | None] | None = None,
              baseline: str | float | None = None, total_steps: int | None = None) -> LogCheck:
    """The detectors over a log another loop wrote (CSV, JSON Lines, JSON, TensorBoard), through
    judge_rows with trainlab's default health config; writes nothing."""
    from trainlab.config import HealthConfig
    from trainlab.health.foreign import parse_baseline

    base = parse_baseline(baseline)
    if total_steps is not None and total_steps < 1:
        raise UsageError(f"--steps {total_steps}: the planned length must be 1 or more")
    path = Path(path)
    reader, roles, rows, raw_rows = read_log(path, fmt, columns)
    planned = total_steps if total_steps is not None else max(rows[-1]["step"], 1)
    alerts, claims = judge_rows(HealthConfig(), None if base is None else base.value, planned, rows, path.name)
    where = f"{path.name}, {len(rows)} steps"
    for c in claims:
        if c.source in ("config.yaml", "config.yaml / metrics.csv"):
            c.source = where  # no config here: trainlab's defaults over the log
        if c.name in ("divergence", "spike", "stuck"):
            if base is not None:
                c.evidence = f"{c.evidence}; baseline {base.text}" if c.evidence != "-" else f"baseline {base.text}"
            elif c.name == "stuck" and c.verdict == "not measured":
                c.value = f"{c.value} (--baseline)"
            elif c.name in WITHOUT_BASELINE:
                c.evidence = f"{c.evidence}; {WITHOUT_BASELINE[c.name]}" if c.evidence != "-" else WITHOUT_BASELINE[c.name]
    notes = reader.notes.lines()
    mapped = ", ".join(f"{role}={src}" if role != src else role for role, src in roles.items())
    repeated = raw_rows - len(rows)
    head = [Claim("log", "info", f"{reader.fmt}: {raw_rows} rows, {len(rows)} steps "
                                 f"{rows[0]['step']}-{rows[-1]['step']}"
                                 + (f" ({repeated} rows repeat a step: the last value per step kept)" if repeated else ""),
                  f"columns: {mapped}", str(path)),
            Claim("baseline", "info" if base is not None else "not measured",
                  base.text if base is not None else "no baseline (--baseline): stuck not measured, divergence "
                                                     "and spike judged without it",
                  "the loss of a random guess, as given", "--baseline"),
            Claim("planned steps", "info", str(planned),
                  "--steps" if total_steps is not None else "the last step in the log (--steps N for the planned "
                                                             "length: warm-up is a fraction of it)", "--steps")]
    if notes:
        head.append(Claim("log read", "info", "; ".join(notes), "left out, never parsed into a wrong number", str(path)))
    return LogCheck(path, reader.fmt, roles, rows, raw_rows, base, planned, alerts, head + claims, notes)


def check_log(path: Path, *, out: Path | None = None, title: str | None = None, **kwargs) -> LogCheck:
    """`trainlab check LOG`: judge_log, then check.json, report.md and report.html in `out`
    (default: default_out_dir(path)).  Nothing is written when the log cannot be judged."""
    from trainlab.report.render import write_log_report

    result = judge_log(path, **kwargs)
    out_dir = Path(out) if out is not None else default_out_dir(Path(path))
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(out_dir / CHECK_FILE, json.dumps(
            {"source": str(result.source), "format": result.fmt, "roles": result.roles,
             "baseline": None if result.baseline is None else result.baseline.value,
             "planned_steps": result.total_steps, "notes": result.notes, "alerts": result.alerts,
             "claims": [c.__dict__ for c in result.claims]}, indent=1, default=str))
        write_log_report(out_dir, result.rows, result.claims, title or f"{result.source.name} ({result.fmt})",
                         result.source, baseline=None if result.baseline is None else result.baseline.value,
                         baseline_text=None if result.baseline is None else result.baseline.text,
                         raw_rows=result.raw_rows)
    except OSError as exc:
        raise UsageError(f"--out {out_dir}: cannot write the verdicts ({exc.strerror or exc})") from None
    result.out_dir = out_dir
    return result
