"""A run's report: report.md and a self-contained report.html, built only from the run directory.

Everything a reader sees is read from the run directory (trainlab.report.run) or computed from it
(the random-baseline loss, from the config through the experiment's `baseline_loss`); verdicts come
from the caller (`trainlab check`, `trainlab preflight`) as trainlab.health.claims.Claim.  A plot
whose column is absent says "not measured" instead of showing an empty chart.  The figures are
matplotlib's (trainlab.report.figures): plots/report-*.svg, inlined into report.html, and a PNG of
each beside it.

    from trainlab.report.render import write_report
    md_path, html_path = write_report(Path("runs/modadd-quick"), claims)
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from trainlab.engine.logs import SAMPLES_FILE, read_events
from trainlab.formatting import format_duration, format_number
from trainlab.health.claims import Claim
from trainlab.report.document import Code, Figure, Heading, Para, Strong, Table
from trainlab.report.html import inline_svg, to_html
from trainlab.report.markdown import to_markdown
from trainlab.report.run import (PLOT_PREFIX, ROUTINE_EVENTS, Baseline, RunData, baseline, event_detail,
                                 event_markers, load_run, phase_bands, read_run_file)

if TYPE_CHECKING:  # matplotlib is imported only when a figure is drawn
    from matplotlib.figure import Figure as MatplotlibFigure

    from trainlab.report.figures import Chart

MAX_EVENT_ROWS = 50
SAMPLE_CHARS = 600
LOG_SCALE_SPAN = 300  # a quantity spanning more than this ratio is drawn on a log axis
_IDENT = re.compile(r"[\w.\-]+")  # an event kind shown as code; anything else as plain (escaped) text


# ============================================================================ plots

@dataclass
class _Plot:
    key: str  # the file name without prefix and extension
    title: str
    chart: "Chart | None"  # None: not measured
    caption: str
    missing: str = ""  # "not measured: ..." when chart is None


def _spans_decades(series: list[tuple[str, list]]) -> bool:
    ys = [y for _, s in series for _, y in s if math.isfinite(y)]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > LOG_SCALE_SPAN


def _plots(run: RunData, base: Baseline) -> list[_Plot]:
    plots: list[_Plot] = []
    rows_note = f"{run.log_name}, last row per step ({len(run.rows)} steps)"
    bands = phase_bands(run)
    device = str(run.first_start.get("device", ""))

    def chart(key: str, title: str, cols: list[str], y_label: str, caption: str, *, hlines=(), bands=(),
              markers=(), y_range=None, missing_cols: list[str] | None = None) -> None:
        series = run.merged_series(cols)
        if not series:
            plots.append(_Plot(key, title, None, "", run.not_measured(missing_cols or cols)))
            return
        from trainlab.report.figures import line_chart

        log_y = _spans_decades(series)
        drawn = line_chart(series, title, "step", y_label, hlines=hlines, bands=bands, markers=markers,
                           log_y=log_y, y_range=None if log_y else y_range)
        lacking = [c for c in (missing_cols or cols) if not run.series(c)]
        full = f"{caption} Source: {rows_note}."
        if lacking:
            full += f" {run.not_measured(lacking)}."
        plots.append(_Plot(key, title, drawn, full))

    # (a) loss
    loss_cols = ["loss", "val_loss"] + [c for c in run.header if c.endswith("_loss") and c not in ("loss", "val_loss")]
    hl = [(base.value, base.label)] if base.value is not None else []
    markers = event_markers(run)
    cap = "Training loss (mean over each log interval) and held-out loss."
    if hl:
        cap += f" Dashed: {base.label} (computed from config.yaml)."
    if bands:
        cap += " Shaded: curriculum phases (metrics.csv phase column)."
    if markers:
        cap += (" Dotted verticals: events from events.jsonl other than start/checkpoint/finish, labelled by the "
                "first event at that step (+n: n more events there; hover for details, all are in the Events "
                "table).")
    nats = " (nats)" if base.label.startswith("random baseline ln ") else ""  # a cross-entropy in natural log
    chart("loss", "loss", loss_cols, f"loss{nats}", cap, hlines=hl, bands=bands, markers=markers)

    # (b) accuracy-like metrics
    acc_cols = [c for c in run.header if c in ("acc", "accuracy") or c.endswith(("_acc", "_accuracy"))]
    chart("accuracy", "accuracy", acc_cols or ["acc", "val_acc"], "accuracy (fraction correct)",
          "Accuracy-like metrics (training: mean over each log interval; val_*: held-out)."
          + (" Shaded: curriculum phases." if bands else ""), bands=bands, y_range=(0.0, 1.0))

    # (c) learning rate and loss weights
    chart("lr", "learning rate", ["lr"], "learning rate", "The learning rate at each log row.", y_range=(0.0, None))
    w_cols = [c for c in run.header if c.startswith("w_")]
    if w_cols:
        chart("loss-weights", "loss weights", w_cols, "weight", "Loss weights from schedule.loss_weights.")
    else:
        plots.append(_Plot("loss-weights", "loss weights", None, "", "not measured: w_* not in metrics.csv"))

    # (d) gradient norm
    clip = run.cfg.train.clip if run.cfg is not None else None
    chart("grad-norm", "gradient norm", ["grad_norm", "grad_norm_max"], "global L2 norm",
          "Global gradient norm before clipping: mean and max over each log interval."
          + (f" Dashed: the clip threshold train.clip = {clip:g} from config.yaml." if clip else ""),
          hlines=[(clip, f"train.clip = {clip:g}")] if clip else [])

    # (e) memory
    mem_cols = ["ram_gb", "peak_ram_gb"]
    mem_note = ""
    if device.startswith("cpu"):
        mem_note = (" dev_mem_gb and peak_dev_mem_gb are not drawn: the run's device is cpu (first start event), "
                    "which has no device-memory counter (the columns hold 0).")
    else:
        mem_cols += ["dev_mem_gb", "peak_dev_mem_gb"]
    ceilings = []
    measure = ""
    if run.cfg is not None:
        measure = run.cfg.memory.host_measure
        if run.cfg.memory.host_ceiling_gb:
            ceiling = run.cfg.memory.host_ceiling_gb
            ceilings.append((ceiling, f"memory.host_ceiling_gb = {ceiling:g}"))
        if run.cfg.memory.device_ceiling_gb and not device.startswith("cpu"):
            ceilings.append((run.cfg.memory.device_ceiling_gb,
                             f"memory.device_ceiling_gb = {run.cfg.memory.device_ceiling_gb:g}"))
    chart("memory", "memory", mem_cols, "GB",
          "Host RAM" + (f" (memory.host_measure = {measure})" if measure else "") + " and device memory "
          "allocated by torch, at each log row, with their peaks." + mem_note
          + (" Dashed: the ceilings from config.yaml." if ceilings else ""),
          hlines=ceilings, y_range=(0.0, None),
          missing_cols=["ram_gb"] if device.startswith("cpu") else ["ram_gb", "dev_mem_gb"])

    # (f) throughput
    tp_cols = [c for c in run.header if c.endswith("_per_s")]
    unit = tp_cols[0][: -len("_per_s")] if tp_cols else "items"
    chart("throughput", "throughput", tp_cols or ["<unit>_per_s"], f"{unit} / s",
          "Throughput over each log interval (wall clock, includes evaluation and checkpoint time).",
          y_range=(0.0, None))
    return plots


# ============================================================================ tables

NOT_METRICS = ("step", "attempt", "elapsed_s")  # bookkeeping of the log, not measurements of the run
DEVICE_MEMORY = ("dev_mem_gb", "peak_dev_mem_gb")


def _numbers(run: RunData) -> Table | None:
    """Every metric the run logged: the loss, the experiment's training and held-out metrics (those
    it declares are listed even when absent, as not measured), then every other column."""
    metrics = ["loss"]
    if run.experiment is not None:
        metrics += list(run.experiment.train_metrics) + list(run.experiment.eval_metrics)
    metrics += [c for c in run.header if c not in NOT_METRICS and c not in metrics]
    on_cpu = str(run.first_start.get("device", "")).startswith("cpu")
    rows = []
    for m in dict.fromkeys(metrics):
        if on_cpu and m in DEVICE_MEMORY:
            rows.append([Code(m), "not measured: the run's device is cpu, which has no device-memory counter "
                         "(the column holds 0)", "", "", "", "", ""])
            continue
        s = run.series(m)
        finite = [(st, v) for st, v in s if math.isfinite(v)]
        bad = len(s) - len(finite)
        if not finite:
            rows.append([Code(m), run.not_measured([m]) if not s else f"no finite values ({bad} non-finite)",
                         "", "", "", "", str(bad)])
            continue
        lo = min(finite, key=lambda p: p[1])
        hi = max(finite, key=lambda p: p[1])
        cell = lambda p: f"{format_number(p[1])} (step {p[0]})"  # noqa: E731
        rows.append([Code(m), cell(finite[0]), cell(finite[-1]), cell(lo), cell(hi), str(len(finite)), str(bad)])
    if not rows:
        return None
    return Table(["metric", "first", "last", "min", "max", "rows", "non-finite rows"], rows, css="numbers")


def _events_table(run: RunData) -> tuple[Table | None, str]:
    events = run.events
    if not events:
        return None, "no events: events.jsonl is empty or absent"
    keep = list(range(len(events)))
    left_note = ""
    if len(events) > MAX_EVENT_ROWS:
        # the unusual events first, then the routine ones, first and last kept
        order = sorted(range(len(events)), key=lambda i: (events[i].get("kind") in ROUTINE_EVENTS
                                                           and i not in (0, len(events) - 1), i))
        keep = sorted(order[:MAX_EVENT_ROWS])
        dropped: dict[str, int] = {}
        kept = set(keep)
        for i, e in enumerate(events):
            if i not in kept:
                dropped[str(e.get("kind"))] = dropped.get(str(e.get("kind")), 0) + 1
        left_note = (f"{len(events) - len(keep)} of {len(events)} events left out of this table "
                     f"({', '.join(f'{k}: {n}' for k, n in sorted(dropped.items()))}); all are in events.jsonl.")
    rows = []
    for i in keep:
        e = events[i]
        step = e.get("step")
        kind = str(e.get("kind", "?"))
        rows.append([Code(kind) if _IDENT.fullmatch(kind) else kind, str(step) if step is not None else "-",
                     event_detail(e, run.path)])
    return Table(["kind", "step", "detail"], rows), left_note


def _header(run: RunData, base: Baseline, experiment: str, preset: str) -> Table:
    s = run.summary
    status = s.state + (f": {s.reason}" if s.reason else "")
    step = "not recorded" if s.step is None else (f"{s.step} / {s.total}" if s.total else f"{s.step}")
    status_step = run.status.get("step")
    if run.rows and isinstance(status_step, int) and status_step != s.step:
        step += f" (the last row of metrics.csv; status.json says step {status_step})"
    ends = [e for e in run.events if e.get("kind") in ("finish", "stopped", "crashed")
            and isinstance(e.get("elapsed_s"), (int, float))]
    if ends:
        seconds = ends[-1]["elapsed_s"]
        elapsed = f"{format_duration(seconds)} ({format_number(seconds)} s of training, last " \
                  f"{ends[-1].get('kind')} event)"
    elif run.rows and isinstance(run.rows[-1].get("elapsed_s"), (int, float)):
        seconds = run.rows[-1]["elapsed_s"]
        elapsed = f"{format_duration(seconds)} ({format_number(seconds)} s at the last metrics row)"
    else:
        elapsed = "not recorded"
    n_starts = sum(e.get("kind") in ("start", "resume") for e in run.events)
    n_resumes = sum(e.get("kind") == "resume" for e in run.events)
    attempts = f"{n_starts} ({n_resumes} resume{'s' if n_resumes != 1 else ''})" if n_starts else "not recorded"
    start = run.first_start
    if start:
        device = f"{start.get('device', '?')}, precision {start.get('precision', '?')} (first start event)"
        others = sorted({str(e.get("device")) for e in run.events if e.get("kind") == "resume"
                         and e.get("device") and e.get("device") != start.get("device")})
        if others:
            device += f"; resumed on {', '.join(others)}"
    else:
        device = "not recorded (no start event in events.jsonl)"
    return Table(["run", "value"], [["experiment", experiment], ["preset", preset], ["status", status],
                                    ["step", step], ["elapsed", elapsed], ["attempts", attempts],
                                    ["device", device], ["baseline loss", base.text],
                                    ["run directory", Code(str(run.path))]], css="header")


def _verdict_counts(claims: list[Claim]) -> str:
    """'In short: 1 warn (spike); 5 pass; 2 not measured (collapse, grad_regime).' -- the worst first,
    each named but the passes."""
    parts = []
    for verdict in ("fail", "warn", "info", "pass", "not measured"):
        names = [c.name for c in claims if c.verdict == verdict]
        if names:
            parts.append(f"{len(names)} {verdict}" + ("" if verdict == "pass" else f" ({', '.join(names)})"))
    return "In short: " + "; ".join(parts) + "."


VERDICT_CSS = {"READY": "v-ready", "NOT READY": "v-not-ready", "UNCERTAIN": "v-uncertain"}


def _preflight_blocks(run_dir: Path) -> tuple[str | None, list]:
    """(the verdict, the paragraphs that say it) from preflight.json: a preflight's report begins
    with the verdict and its first reason, in words.  (None, []) for a run that is no preflight."""
    from trainlab.health.evidence import preflight_verdict

    try:
        found = preflight_verdict(run_dir)
    except ValueError as exc:  # the report still shows everything else
        return None, [Para(f"preflight verdict not shown: {exc}", css="missing")]
    if found is None:
        return None, []
    css = f"verdict {VERDICT_CSS.get(found.verdict, '')}".strip()
    summary = found.summary
    if summary.startswith(found.verdict):  # "NOT READY: ..." -- the verdict is shown once, in bold
        summary = summary[len(found.verdict):].lstrip(" :")
    why = summary or (found.reasons[0] if found.reasons else "")
    if not why:
        why = ("no measurement failed or was uncertain (the verdicts below)" if found.verdict == "READY"
               else "preflight.json gives no reason")
    first = [Strong(found.verdict), f": {why}"]
    blocks = [Para(first, css=css)]
    if len(found.reasons) > 1 or (found.reasons and found.reasons[0] != why):
        reasons = "; ".join(r.rstrip(".") for r in found.reasons)
        blocks.append(Para(f"Reasons, most important first: {reasons}.", css="note"))
    return found.verdict, blocks


# ============================================================================ the report

@dataclass
class _Report:
    markdown: str
    html: str
    charts: dict[str, "Chart"]  # file stem in plots/ -> the chart
    inline: dict[str, str]  # file name in plots/ -> the SVG as report.html inlines it


def _assemble(run_dir: Path, claims: list[Claim] | None, title: str | None) -> _Report:
    run = load_run(Path(run_dir))
    cfg = run.config or {}
    experiment = str(cfg.get("experiment", "")) or "not recorded"
    preset = str(cfg.get("preset", "")) or "(none)"
    title = title or f"{experiment} {preset}: {run.path.name}"
    base = baseline(run)
    verdict, verdict_blocks = _preflight_blocks(run.path)
    heading = f"Preflight {verdict}: {title}" if verdict else f"Run report: {title}"
    blocks: list = [Heading(1, heading), *verdict_blocks, _header(run, base, experiment, preset)]

    blocks.append(Heading(2, "Verdicts"))
    if claims is None:
        blocks.append(Para(["no verdicts: run ", Code("trainlab check"), " or ", Code("trainlab preflight")],
                           css="missing"))
    elif not claims:
        blocks.append(Para("no verdicts: the list of claims given is empty", css="missing"))
    else:
        blocks += _claim_blocks(claims)

    blocks.append(Heading(2, "Plots"))
    charts, inline = _plot_blocks(run, base, blocks)
    blocks.append(Heading(3, "heatmaps and the experiment's figures"))
    if not run.heatmaps:
        blocks.append(Para("not measured: no heatmaps or figures of the experiment in plots/ (the trainer draws "
                           "heatmaps for experiments that name 2-D evaluation arrays; an experiment's callbacks may "
                           "draw figures of their own)", css="missing"))
    for path in run.heatmaps:
        try:
            safe = inline_svg(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            safe = None
        if safe is None:
            blocks.append(Para(f"plots/{path.name}: not shown (not a readable SVG file)", css="missing"))
            continue
        png = path.with_suffix(".png")
        blocks.append(Figure(path.name, safe, "", path.stem, png=png.name if png.is_file() else ""))

    samples = read_run_file(run.path, SAMPLES_FILE, read_events)
    if samples:
        blocks.append(Heading(2, "Samples"))
        shown = [samples[0], samples[-1]] if len(samples) > 1 else samples
        rows = [[str(s.get("step", "-")), key, Code(value[:SAMPLE_CHARS])] for s in shown
                for key, value in s.items() if isinstance(value, str)]
        blocks.append(Para(f"What the model produced at its first and last evaluation ({len(samples)} in "
                           f"{SAMPLES_FILE}; at most {SAMPLE_CHARS} characters each shown).", css="note"))
        blocks.append(Table(["step", "what", "text"], rows))

    blocks.append(Heading(2, "Numbers"))
    numbers = _numbers(run)
    if numbers is None or not run.rows:
        blocks.append(Para("not measured: metrics.csv has no rows", css="missing"))
    else:
        blocks.append(Para(f"From metrics.csv, keeping the last row per step ({len(run.rows)} steps from "
                           f"{run.raw_rows} rows); min and max over finite values.", css="note"))
        blocks.append(numbers)
    blocks.append(Heading(2, "Events"))
    table, note = _events_table(run)
    if table is None:
        blocks.append(Para(note, css="missing"))
    else:
        blocks.append(table)
        if note:
            blocks.append(Para(note, css="note"))

    blocks.append(Heading(2, "Sources"))
    sources = [f"config.yaml ({'read' if run.config is not None else run.config_note})",
               f"status.json ({'read' if run.status else 'absent or unreadable'})",
               f"metrics.csv ({run.raw_rows} rows, {len(run.rows)} steps, {len(run.header)} columns)",
               f"events.jsonl ({len(run.events)} events)",
               f"plots/ ({len(run.heatmaps)} heatmap{'s' if len(run.heatmaps) != 1 else ''})"]
    blocks.append(Para("Everything above is read from the run directory: " + "; ".join(sources) + ".", css="note"))
    return _Report(to_markdown(blocks), to_html(blocks, title), charts, inline)


def build_report(run_dir: Path, claims: list[Claim] | None = None,
                 title: str | None = None) -> tuple[str, str, dict[str, str]]:
    """(markdown, html, {plot file name: the SVG as inlined}) for the run in `run_dir`; writes nothing."""
    report = _assemble(run_dir, claims, title)
    return report.markdown, report.html, report.inline


def report_figures(run_dir: Path) -> list[tuple[str, "MatplotlibFigure"]]:
    """(file stem in plots/, matplotlib Figure) of every plot the report of `run_dir` draws."""
    return [(stem, chart.figure) for stem, chart in _assemble(run_dir, None, None).charts.items()]



def _claim_blocks(claims: list[Claim]) -> list:
    """The verdict table with its one-line count above it."""
    return [Para(_verdict_counts(claims), css="note"),
            Table(["name", "verdict", "value", "evidence", "source"],
                  [[c.name, c.verdict, c.value, c.evidence, c.source] for c in claims], css="verdicts")]


def _plot_blocks(run: RunData, base: Baseline, blocks: list,
                 caption=lambda text: text) -> tuple[dict[str, Chart], dict[str, str]]:
    """Each plot of the run as a figure appended to `blocks` (or why it is missing).  Returns the
    charts by file stem (for the caller to write as SVG and PNG under plots/) and each SVG as
    report.html inlines it, by file name."""
    charts: dict[str, Chart] = {}
    inline: dict[str, str] = {}
    for p in _plots(run, base):
        blocks.append(Heading(3, p.title))
        if p.chart is None:
            blocks.append(Para(p.missing, css="missing"))
            continue
        stem = f"{PLOT_PREFIX}{p.key}"
        charts[stem] = p.chart
        inline[f"{stem}.svg"] = inline_svg(p.chart.svg())
        blocks.append(Figure(f"{stem}.svg", inline[f"{stem}.svg"], caption(p.caption), p.title, png=f"{stem}.png"))
    return charts, inline

def write_report(run_dir: Path, claims: list[Claim] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Write run_dir/report.md, run_dir/report.html and run_dir/plots/report-*.svg and .png; return
    the two paths.  Other files in plots/ (the trainer's heatmaps) are left as they are."""
    run_dir = Path(run_dir)
    report = _assemble(run_dir, claims, title)
    plots = run_dir / "plots"
    if report.charts:
        plots.mkdir(exist_ok=True)
    for stem, chart in report.charts.items():
        chart.write(plots, stem)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write(md_path, report.markdown)
    _write(html_path, report.html)
    return md_path, html_path


def _write(path: Path, text: str) -> None:
    """Write through a temporary file and rename, so a reader never sees half a report."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_text(text, encoding="utf-8")
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)  # no half report left behind under a hidden name
        raise


# ============================================================================ a log trainlab did not write

def write_log_report(out_dir: Path, rows: list[dict], claims: list[Claim] | None, title: str, source: Path | str,
                     *, baseline: float | None = None, baseline_text: str | None = None,
                     raw_rows: int | None = None) -> tuple[Path, Path]:
    """report.md, report.html and plots/report-*.svg/.png in `out_dir` for rows that are no trainlab
    run directory (another loop's log, the Python API's rows): the same verdict table, plots and
    numbers as a run's report, from `rows` (one per step, the detectors' column names) alone.
    `source` names where the rows came from; `baseline` is the random-guess loss, if known."""
    out_dir = Path(out_dir)
    header = list(dict.fromkeys(k for r in rows for k in r))
    name = Path(str(source)).name or str(source)
    run = RunData(path=out_dir, config=None, config_note="not a trainlab run", header=header, rows=rows,
                  raw_rows=len(rows) if raw_rows is None else raw_rows, events=[], status={}, summary=None,
                  log_name=name)
    base_label = (f"random baseline {baseline_text}" if baseline_text else f"baseline {format_number(baseline)}") \
        if baseline is not None else ""
    base = Baseline(baseline, base_label, baseline_text or ("not given" if baseline is None else format_number(baseline)))
    steps = f"{rows[0]['step']}-{rows[-1]['step']}" if rows else "none"
    blocks: list = [Heading(1, f"Log report: {title}"),
                    Table(["log", "value"], [["source", Code(str(source))], ["steps", f"{len(rows)} ({steps})"],
                                             ["rows read", str(run.raw_rows)],
                                             ["baseline loss", base.text]], css="header"),
                    Heading(2, "Verdicts")]
    if not claims:
        blocks.append(Para("no verdicts given", css="missing"))
    else:
        blocks += _claim_blocks(claims)
    blocks.append(Heading(2, "Plots"))
    # no config.yaml here: a caption that names it would point at a file that is not there
    charts, _ = _plot_blocks(run, base, blocks, caption=lambda text: text.replace(" (computed from config.yaml)", ""))
    blocks.append(Heading(2, "Numbers"))
    numbers = _numbers(run) if rows else None
    if numbers is None:
        blocks.append(Para(f"not measured: {name} has no rows", css="missing"))
    else:
        blocks.append(Para(f"From {name}, keeping the last value per step ({len(rows)} steps from {run.raw_rows} "
                           "rows); min and max over finite values.", css="note"))
        blocks.append(numbers)
    blocks.append(Para(f"Everything above is read from {name}, a log that trainlab did not write; the role columns "
                       "carry the detectors' names (the log read claim says which column is which).", css="note"))
    plots = out_dir / "plots"
    if charts:
        plots.mkdir(parents=True, exist_ok=True)
    for stem, chart in charts.items():
        chart.write(plots, stem)
    md_path, html_path = out_dir / "report.md", out_dir / "report.html"
    _write(md_path, to_markdown(blocks))
    _write(html_path, to_html(blocks, title))
    return md_path, html_path
