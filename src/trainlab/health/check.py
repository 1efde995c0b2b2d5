"""`trainlab check RUN_DIR`: the live detectors run offline over a run's metrics.csv."""

from __future__ import annotations

import json
from pathlib import Path

from trainlab import config as config_mod
from trainlab.engine.checkpoint import write_atomic
from trainlab.engine.logs import METRICS_FILE, read_metrics
from trainlab.engine.rundir import CONFIG_FILE, read_run_config
from trainlab.errors import UsageError
from trainlab.experiment import get_experiment
from trainlab.formatting import format_number
from trainlab.health.claims import Claim
from trainlab.health.detectors import DETECTORS, policy_of, run_offline
from trainlab.report.run import read_run_file

SEVERITY_VERDICT = {"critical": "fail", "warn": "warn", "info": "info"}


def load_run(run_dir: Path):
    """(experiment, config, rows) of a run directory, or UsageError naming what is missing."""
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir}: not found")
    if not (run_dir / METRICS_FILE).is_file() or not (run_dir / CONFIG_FILE).is_file():
        raise UsageError(f"run directory {run_dir}: needs config.yaml and metrics.csv (not a trainlab run?)")
    data = read_run_config(run_dir)
    if data is None or not isinstance(data.get("experiment"), str):
        raise UsageError(f"run directory {run_dir}: config.yaml has no 'experiment' key")
    experiment = get_experiment(data["experiment"])
    cfg = config_mod.build_saved(experiment, data)
    return experiment, cfg, read_run_file(run_dir, METRICS_FILE, read_metrics)


def _needs(cfg, name: str, columns: set[str]) -> str | None:
    """Why a detector could not look at this run, or None."""
    h = cfg.health
    if name == "collapse" and not (h.collapse_metric or h.rank_metric or h.bounds):
        return "no collapse_metric, rank_metric or bounds configured"
    if name == "grokking" and not {h.grok_train_metric, h.grok_val_metric} <= columns:
        return f"{h.grok_train_metric} and {h.grok_val_metric} not both logged"
    return None


def check_run(run_dir: Path) -> tuple[list[dict], list[Claim]]:
    experiment, cfg, rows = load_run(run_dir)
    baseline = experiment.baseline_loss(cfg)
    alerts, detectors = run_offline(cfg.health, baseline, cfg.train.steps, rows)
    checked = {d.name: d.checked for d in detectors}
    columns = set().union(*(r.keys() for r in rows)) if rows else set()
    where = f"metrics.csv, {len(rows)} rows, steps {rows[0]['step']}-{rows[-1]['step']}" if rows else "metrics.csv (empty)"
    claims = []
    for cls in DETECTORS:
        policy = policy_of(cfg.health, cls.name)
        mine = [a for a in alerts if a["detector"] == cls.name]
        missing = _needs(cfg, cls.name, columns)
        if policy == "off":
            claims.append(Claim(cls.name, "not measured", "detector off", f"health.{cls.name}=off", "config.yaml"))
        elif missing:
            claims.append(Claim(cls.name, "not measured", missing, "-", "config.yaml / metrics.csv"))
        elif mine:
            first = mine[0]
            more = f" (+{len(mine) - 1} more)" if len(mine) > 1 else ""
            evidence = ", ".join(f"{k}={format_number(v)}" for k, v in first["evidence"].items())
            claims.append(Claim(cls.name, SEVERITY_VERDICT[first["severity"]], f"step {first['step']}: "
                                f"{first['message']}{more}", evidence, where))
        elif not checked.get(cls.name):
            claims.append(Claim(cls.name, "not measured", f"never judged: {len(rows)} rows are too few for its "
                                f"window or warm-up (health.window={cfg.health.window}, "
                                f"plateau_window={cfg.health.plateau_window})", "-", where))
        elif cls.name == "grokking":
            h = cfg.health
            best = {m: max((r[m] for r in rows if isinstance(r.get(m), (int, float))), default=None)
                    for m in (h.grok_train_metric, h.grok_val_metric)}
            claims.append(Claim(cls.name, "info", "not observed: best " + ", ".join(
                f"{m} {format_number(v)}" for m, v in best.items()),
                f"memorisation at {h.grok_train_metric} >= {h.grok_train_level:g}, generalisation at "
                f"{h.grok_val_metric} >= {h.grok_val_level:g}", where))
        else:
            claims.append(Claim(cls.name, "pass", f"no alert in {checked[cls.name]} judged rows of {len(rows)}",
                                (cls.__doc__ or cls.name).split("\n")[0], where))
    try:
        # through a temporary file: a report reading check.json meanwhile must never see half of it
        write_atomic(run_dir / "check.json", json.dumps({"alerts": alerts, "claims": [c.__dict__ for c in claims]},
                                                        indent=1, default=str))
    except OSError as exc:  # a read-only copy of a run, say: the verdicts must still not end in a traceback
        raise UsageError(f"run directory {run_dir}: cannot write check.json ({exc.strerror or exc})") from None
    return alerts, claims
