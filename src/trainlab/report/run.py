"""A run directory read back for a report: config.yaml, status.json, metrics.csv, events.jsonl and
the heatmaps in plots/, and what follows from them alone (the random-baseline loss, the curriculum
phases, the events worth marking on a plot).

    run = load_run(Path("runs/modadd-quick"))
    run.series("val_loss")          # [(step, value), ...], the last row per step
    baseline(run).value             # ln 23 for modadd, from the experiment's baseline_loss
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainlab.engine.logs import EVENTS_FILE, METRICS_FILE, last_row_per_step, read_events, read_header, read_rows
from trainlab.engine.rundir import CONFIG_FILE, STATUS_FILE, read_run_config, read_status, summarize
from trainlab.errors import UsageError, brief
from trainlab.formatting import format_number
from trainlab.report.document import Code

PLOT_PREFIX = "report-"  # the report's own files in plots/; the other *.svg there (heatmaps) are shown as found
ROUTINE_EVENTS = ("start", "checkpoint", "finish")  # not marked on a plot


@dataclass
class RunData:
    path: Path
    config: dict | None
    config_note: str  # why config is None
    header: list[str]
    rows: list[dict]  # the last row per step
    raw_rows: int  # rows in metrics.csv, a step logged twice (a resume) counted twice
    events: list[dict]
    status: dict
    summary: Any
    experiment: Any = None
    cfg: Any = None
    cfg_note: str = ""  # why cfg is None although config is not
    heatmaps: list[Path] = field(default_factory=list)
    log_name: str = METRICS_FILE  # the log the rows came from, as the report names it (another loop's log)

    def has(self, col: str) -> bool:
        return col in self.header

    def series(self, col: str) -> list[tuple[int, float]]:
        """(step, value) for every row where `col` holds a number (NaN and inf kept)."""
        out = []
        for row in self.rows:
            v = row.get(col)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((row["step"], float(v)))
        return out

    def merged_series(self, cols: list[str]) -> list[tuple[str, list]]:
        """The series of `cols` that hold values; columns holding exactly the same values are one
        series named 'a = b' (acc and its alias accuracy, say)."""
        out: list[tuple[str, list]] = []
        for c in cols:
            s = self.series(c)
            if not s:
                continue
            for i, (name, other) in enumerate(out):
                if other == s and not any(math.isnan(v) for _, v in s):
                    out[i] = (f"{name} = {c}", other)
                    break
            else:
                out.append((c, s))
        return out

    def not_measured(self, cols: list[str]) -> str:
        """'not measured: ...' naming the columns absent from metrics.csv and those without values."""
        parts = []
        absent = [c for c in cols if not self.has(c)]
        empty = [c for c in cols if self.has(c) and not self.series(c)]
        if absent:
            parts.append(f"{', '.join(absent)} not in {self.log_name}")
        if empty:
            parts.append(f"{', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no values in {self.log_name}")
        return "not measured: " + "; ".join(parts)

    @property
    def first_start(self) -> dict:
        return next((e for e in self.events if e.get("kind") == "start"), {})

    @property
    def curriculum_name(self) -> str:
        curriculum = (self.config or {}).get("curriculum")
        return str(curriculum.get("name") or "") if isinstance(curriculum, dict) else ""


def load_run(run_dir: Path) -> RunData:
    """Everything a report shows of `run_dir`; UsageError when it is no run directory, or when a file
    in it is not the text trainlab wrote.  A config.yaml that cannot be read is a note, not an error:
    metrics.csv can still be drawn."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir}: not found")
    if not any((run_dir / n).exists() for n in (CONFIG_FILE, STATUS_FILE, METRICS_FILE, EVENTS_FILE)):
        raise UsageError(f"run directory {run_dir}: no config.yaml, status.json, metrics.csv or events.jsonl "
                         "in it; is it a trainlab run directory?")
    try:
        config = read_run_config(run_dir)
        note = "" if config is not None else \
            "config.yaml not found" if not (run_dir / CONFIG_FILE).exists() else "config.yaml is not a mapping"
    except UsageError as exc:  # the report names the run directory already: keep what is wrong with the file
        config, note = None, str(exc).removeprefix(f"run directory {run_dir}: ")
    header = read_run_file(run_dir, METRICS_FILE, read_header)
    written = read_run_file(run_dir, METRICS_FILE, read_rows)  # read once: the history is derived from it
    run = RunData(path=run_dir, config=config, config_note=note, header=header or [],
                  rows=last_row_per_step(written), raw_rows=len(written),
                  events=read_run_file(run_dir, EVENTS_FILE, read_events),
                  status=read_status(run_dir), summary=summarize(run_dir))
    if config is not None:
        try:
            from trainlab.config import build_saved
            from trainlab.experiment import experiment_for

            exp = run.experiment = experiment_for(config, "config.yaml")
            run.cfg = build_saved(exp, config)
        except Exception as exc:  # an unknown experiment or a config this version refuses
            run.cfg_note = brief(exc, 200)
    plots = run_dir / "plots"
    if plots.is_dir():
        found = [p for p in plots.glob("*.svg") if p.is_file() and not p.name.startswith(PLOT_PREFIX)]
        run.heatmaps = sorted(found, key=_heatmap_order)
    return run


def read_run_file(run_dir: Path, name: str, reader):
    """reader(run_dir / name); bytes that are not the text we wrote end in one line naming the file."""
    try:
        return reader(run_dir / name)
    except (OSError, UnicodeDecodeError, csv.Error) as exc:
        raise UsageError(f"run directory {run_dir}: {name} is unreadable ({brief(exc)})") from None


def _heatmap_order(path: Path) -> tuple:
    m = re.search(r"step(\d+)", path.stem)
    return (int(m.group(1)) if m else math.inf, path.name)


# ---------------------------------------------------------------------------------------- the baseline

@dataclass
class Baseline:
    value: float | None
    label: str  # for a chart: "random baseline ln 23 = 3.135"
    text: Any  # for the report's header: the value and how it is defined (text, or text and Code)


def _ln_name(value: float) -> str | None:
    """'ln 23' when `value` is the log of a whole number (a uniform guess over that many outcomes)."""
    if not (isinstance(value, float) and math.isfinite(value) and 0 < value < 40):
        return None
    k = round(math.exp(value))
    if k >= 2 and abs(math.log(k) - value) <= 1e-9 * max(1.0, value):
        return f"ln {k}"
    return None


def _baseline_source(experiment: Any) -> str:
    """The `return` line of the experiment's baseline_loss, as written in its source."""
    try:
        lines = inspect.getsource(type(experiment).baseline_loss).splitlines()
    except (OSError, TypeError):
        return ""
    returns = [ln.strip() for ln in lines if ln.strip().startswith("return ")]
    return returns[0] if len(returns) == 1 else ""


def baseline(run: RunData) -> Baseline:
    """The loss of a random guess, from config.yaml through the experiment's baseline_loss."""
    if run.experiment is None or run.cfg is None:
        why = run.config_note or run.cfg_note or "config.yaml could not be turned into a config"
        return Baseline(None, "", f"not available ({why})")
    try:
        value = float(run.experiment.baseline_loss(run.cfg))
    except Exception as exc:
        return Baseline(None, "", f"not available (baseline_loss raised {type(exc).__name__}: {brief(exc)})")
    ln = _ln_name(value)
    shown = f"{ln} = {value:.4g}" if ln else f"{value:.4g}"
    what = (f"cross-entropy of a uniform random guess over {ln[3:]} outcomes" if ln else
            "the loss of a random guess")
    code = _baseline_source(run.experiment)
    text = [f"{shown}: {what}, from ", Code(f"{run.experiment.name}.baseline_loss"), " on config.yaml"]
    if code:
        text += [": ", Code(code)]
    return Baseline(value, f"random baseline {shown}", text)


# ---------------------------------------------------------------------------------------- phases and events

def phase_bands(run: RunData) -> list[tuple[float, float, str]]:
    """Runs of rows in the same curriculum phase: a row at step s covers the steps since the row before."""
    if not run.has("phase"):
        return []
    name = run.curriculum_name
    bands: list[list] = []
    prev_step = 0
    for row in run.rows:
        phase, step = row.get("phase"), row["step"]
        if not isinstance(phase, int):
            prev_step = step
            continue
        value = row.get(name) if name else None
        label = f"phase {phase}" + (f": {name} {format_number(value)}" if isinstance(value, (int, float)) else "")
        if bands and bands[-1][2] == label and bands[-1][1] == prev_step:
            bands[-1][1] = step
        else:
            bands.append([prev_step, step, label])
        prev_step = step
    return [tuple(b) for b in bands]


def event_label(event: dict, curriculum_name: str) -> str:
    kind = str(event.get("kind", "?"))
    if kind == "promotion" and isinstance(event.get("from_value"), (int, float)) \
            and isinstance(event.get("to_value"), (int, float)):
        return f"{curriculum_name or 'level'} {format_number(event['from_value'])}\u2192" \
               f"{format_number(event['to_value'])}"
    if kind == "alert" and isinstance(event.get("detector"), str):
        return f"alert: {event['detector']}"
    return kind


EVENT_FIRST = ("detector", "severity", "message", "detail", "reason")  # shown first, and always whole


def event_detail(event: dict, run_dir: Path, limit: int = 160) -> str:
    """An event's fields on one line, what a reader wants first first, paths relative to the run.
    Never cut inside a field: the fields of EVENT_FIRST are always whole (a message cut off
    mid-sentence says something else), the others while they fit in `limit` characters, the rest
    counted ("+2 more fields in events.jsonl")."""
    parts = []
    ordered = sorted(event.items(), key=lambda kv: EVENT_FIRST.index(kv[0]) if kv[0] in EVENT_FIRST
                     else len(EVENT_FIRST))
    left = 0
    for k, v in ordered:
        if k in ("time", "kind", "step"):
            continue
        if isinstance(v, str) and v.startswith(str(run_dir)):
            v = v[len(str(run_dir)):].lstrip("/") or "."
        if isinstance(v, float):
            v = format_number(v, 6)
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        part = f"{k}={v}"
        if k in EVENT_FIRST or (not left and len(", ".join(parts + [part])) <= limit):
            parts.append(part)
        else:
            left += 1
    if left:
        parts.append(f"+{left} more field{'s' if left != 1 else ''} in events.jsonl")
    return ", ".join(parts)


def event_markers(run: RunData) -> list[tuple[float, str, str]]:
    """(step, label, tooltip) per step with events other than start/checkpoint/finish: labelled by
    the first of them ('+n': n more there), the tooltip naming all."""
    by_step: dict[int, list[dict]] = {}
    for e in run.events:
        step = e.get("step")
        if e.get("kind") in ROUTINE_EVENTS or not isinstance(step, int) or isinstance(step, bool):
            continue
        by_step.setdefault(step, []).append(e)
    out = []
    for step, events in sorted(by_step.items()):
        main = next((e for e in events if e.get("kind") != "phase_end_eval"), events[0])
        label = event_label(main, run.curriculum_name) + (f" +{len(events) - 1}" if len(events) > 1 else "")
        tip = f"step {step}: " + "; ".join(f"{e.get('kind')} ({event_detail(e, run.path, 100)})" for e in events)
        out.append((float(step), label, tip))
    return out
