"""A run's report: report.md and a self-contained report.html, built only from the run directory.

Everything a reader sees is read from the run directory (config.yaml, status.json, metrics.csv,
events.jsonl, plots/*.svg) or computed from it (the random-baseline loss, from the config through
the experiment's `baseline_loss`); verdicts come from the caller (`trainlab check`, `trainlab
preflight`) as `Claim`s.  A plot whose column is absent says "not measured" instead of showing an
empty chart.  report.html inlines every SVG and its CSS: no script, no external resource.

    from trainlab.report.render import Claim, write_report
    md_path, html_path = write_report(Path("runs/modadd-quick"))
"""

from __future__ import annotations

import csv
import inspect
import json
import math
import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from html import escape as _html_escape
from pathlib import Path
from typing import Any
from urllib.parse import quote

import yaml

from trainlab.engine.logs import (EVENTS_FILE, METRICS_FILE, SAMPLES_FILE, last_row_per_step, read_events,
                                  read_header, read_rows)
from trainlab.engine.rundir import CONFIG_FILE, STATUS_FILE, read_status, summarize
from trainlab.errors import UsageError, brief
from trainlab.report.svgplot import line_chart

VERDICTS = ("pass", "warn", "fail", "info", "not measured")
PLOT_PREFIX = "report-"  # our plot files in plots/; the other *.svg there (heatmaps) are embedded as-is
ROUTINE_EVENTS = ("start", "checkpoint", "finish")  # not marked on the loss plot
MAX_EVENT_ROWS = 50
CHART_WIDTH, CHART_HEIGHT = 900, 280


@dataclass
class Claim:
    """One verdict about a run, with the number behind it and where the number came from."""

    name: str
    verdict: str  # pass | warn | fail | info | not measured
    value: str  # the number with its unit, e.g. "0.41 s/step"
    evidence: str  # how it was measured
    source: str  # e.g. "metrics.csv steps 100-500" or "preflight"

    def __post_init__(self) -> None:
        if self.verdict not in VERDICTS:
            raise ValueError(f"Claim {self.name!r}: verdict must be one of {', '.join(VERDICTS)}; "
                             f"got {self.verdict!r}")


# ============================================================================ reading the run

@dataclass
class _Run:
    path: Path
    config: dict | None
    config_note: str
    header: list[str]
    rows: list[dict]
    raw_rows: int
    events: list[dict]
    status: dict
    summary: Any
    experiment: Any = None
    cfg: Any = None
    cfg_note: str = ""
    heatmaps: list[Path] = field(default_factory=list)

    def has(self, col: str) -> bool:
        return col in self.header

    def series(self, col: str) -> list[tuple[int, float]]:
        """(step, value) for every row (last per step) where `col` holds a number (NaN/inf kept)."""
        out = []
        for row in self.rows:
            v = row.get(col)
            if isinstance(v, (int, float)) and not isinstance(v, bool):
                out.append((row["step"], float(v)))
        return out

    @property
    def first_start(self) -> dict:
        return next((e for e in self.events if e.get("kind") == "start"), {})


def _load_run(run_dir: Path) -> _Run:
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir}: not found")
    if not any((run_dir / n).exists() for n in (CONFIG_FILE, STATUS_FILE, METRICS_FILE, EVENTS_FILE)):
        raise UsageError(f"run directory {run_dir}: no config.yaml, status.json, metrics.csv or events.jsonl "
                         "in it; is it a trainlab run directory?")
    config, note = None, ""
    try:
        data = yaml.safe_load((run_dir / CONFIG_FILE).read_text(encoding="utf-8"))
        config = data if isinstance(data, dict) else None
        note = "" if config is not None else "config.yaml is not a mapping"
    except FileNotFoundError:
        note = "config.yaml not found"
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as exc:
        note = f"config.yaml unreadable: {' '.join(str(exc).split())[:160]}"
    header = read_run_file(run_dir, METRICS_FILE, read_header)
    written = read_run_file(run_dir, METRICS_FILE, read_rows)  # read once: the history is derived from it
    run = _Run(path=run_dir, config=config, config_note=note, header=header or [],
               rows=last_row_per_step(written), raw_rows=len(written),
               events=read_run_file(run_dir, EVENTS_FILE, read_events),
               status=read_status(run_dir), summary=summarize(run_dir))
    if config is not None:
        try:
            from trainlab.config import build_saved
            from trainlab.experiment import get_experiment

            exp = run.experiment = get_experiment(str(config.get("experiment")))
            run.cfg = build_saved(exp, config)
        except Exception as exc:  # an unknown experiment or a config this version refuses
            run.cfg_note = " ".join(str(exc).split())[:200]
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


# ============================================================================ formatting

def _g(v: Any, digits: int = 4) -> str:
    if isinstance(v, bool) or not isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if not math.isfinite(v):
        return str(v)
    return f"{v:.{digits}g}"


def _duration(seconds: float) -> str:
    m, s = divmod(int(round(seconds)), 60)
    h, m = divmod(m, 60)
    return f"{h}h{m:02d}m{s:02d}s" if h else f"{m}m{s:02d}s"


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


@dataclass
class _Baseline:
    value: float | None
    label: str  # for the chart: "random baseline ln 23 = 3.135"
    text: Any  # for the header: the value and how it is defined (text, or a list of text and Code)


def _baseline(run: _Run) -> _Baseline:
    if run.experiment is None or run.cfg is None:
        why = run.config_note or run.cfg_note or "config.yaml could not be turned into a config"
        return _Baseline(None, "", f"not available ({why})")
    try:
        value = float(run.experiment.baseline_loss(run.cfg))
    except Exception as exc:
        return _Baseline(None, "", f"not available (baseline_loss raised {type(exc).__name__}: {exc})")
    ln = _ln_name(value)
    shown = f"{ln} = {value:.4g}" if ln else f"{value:.4g}"
    what = (f"cross-entropy of a uniform random guess over {ln[3:]} outcomes" if ln else
            "the loss of a random guess")
    code = _baseline_source(run.experiment)
    text = [f"{shown}: {what}, from ", Code(f"{run.experiment.name}.baseline_loss"), " on config.yaml"]
    if code:
        text += [": ", Code(code)]
    return _Baseline(value, f"random baseline {shown}", text)


# ============================================================================ the document model
# The report is a list of blocks rendered twice, to Markdown and to HTML, so the two never differ.

class Code(str):
    """Text shown as code (column names, event kinds, paths)."""


@dataclass
class _Heading:
    level: int
    text: str


@dataclass
class _Para:
    text: str | list  # a list mixes plain text and Code pieces
    css: str = ""


@dataclass
class _Table:
    headers: list[str]
    rows: list[list[str]]
    css: str = ""


@dataclass
class _Figure:
    name: str  # file name under plots/
    svg: str
    caption: str
    alt: str = ""


_WS = re.compile(r"\s+")
_IDENT = re.compile(r"[\w.\-]+")
_MD_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")


def _md(text: str) -> str:
    """Markdown-escaped text on one line: no emphasis, link, HTML or table cell boundary from file text."""
    return _MD_SPECIAL.sub(r"\\\1", _WS.sub(" ", str(text)))


def _md_cell(text: str) -> str:
    if isinstance(text, Code):
        body = _WS.sub(" ", str(text)).strip().replace("|", "\\|")
        fence = "``" if "`" in body else "`"
        return f"{fence}{' ' if fence == '``' else ''}{body}{' ' if fence == '``' else ''}{fence}" if body else ""
    return _md(text)


def _md_rich(x: Any) -> str:
    return "".join(_md_cell(p) for p in x) if isinstance(x, list) else _md_cell(x)


def _h_rich(x: Any) -> str:
    return "".join(_h_cell(p) for p in x) if isinstance(x, list) else _h_cell(x)


def _h(text: str) -> str:
    """HTML-escaped text; '://' is written as an entity so no URL-looking string ends up in the page."""
    return _html_escape(_WS.sub(" ", str(text)), quote=True).replace("://", ":&#47;&#47;")


def _h_cell(text: str) -> str:
    return f"<code>{_h(text)}</code>" if isinstance(text, Code) and str(text) else _h(text)


def _to_markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, _Heading):
            out += [f"{'#' * b.level} {_md(b.text)}", ""]
        elif isinstance(b, _Para):
            out += [_md_rich(b.text), ""]
        elif isinstance(b, _Table):
            out.append("| " + " | ".join(_md(h) for h in b.headers) + " |")
            out.append("|" + "---|" * len(b.headers))
            for row in b.rows:
                out.append("| " + " | ".join(_md_rich(c) for c in row) + " |")
            out.append("")
        elif isinstance(b, _Figure):
            caption = f"`plots/{b.name}`" + (f": {_md(b.caption)}" if b.caption else "")
            out += [f"![{_md(b.alt or b.name)}](plots/{quote(b.name)})", "", caption, ""]
    return "\n".join(out).rstrip() + "\n"


_CSS = """
body { font-family: sans-serif; margin: 24px auto; max-width: 1100px; padding: 0 16px; color: #222; }
h1 { font-size: 22px; } h2 { font-size: 18px; margin-top: 32px; border-bottom: 1px solid #ccc; }
h3 { font-size: 15px; margin-bottom: 4px; }
table { border-collapse: collapse; margin: 8px 0 16px; font-size: 13px; }
th, td { border: 1px solid #ccc; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
code { font-size: 12px; background: #f5f5f5; padding: 0 2px; }
figure { margin: 8px 0 20px; }
figure svg { max-width: 100%; height: auto; border: 1px solid #e5e5e5; }
figcaption { font-size: 12px; color: #555; margin-top: 2px; }
p.missing { color: #8a4b08; font-style: italic; }
p.note { font-size: 13px; color: #555; }
td.v-pass { background: #d9f0e3; } td.v-warn { background: #fbe8c8; } td.v-fail { background: #f8d0d0; }
td.v-info { background: #e6eef8; } td.v-not-measured { color: #777; font-style: italic; }
"""

_NUMERIC = re.compile(r"^-?[\d.]+(e-?\d+)?( \(step \d+\))?$")


def _to_html(blocks: list, title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{_h(title)}</title>", f"<style>{_CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, _Heading):
            out.append(f"<h{b.level}>{_h(b.text)}</h{b.level}>")
        elif isinstance(b, _Para):
            css = f' class="{b.css}"' if b.css else ""
            out.append(f"<p{css}>{_h_rich(b.text)}</p>")
        elif isinstance(b, _Table):
            css = f' class="{b.css}"' if b.css else ""
            out.append(f"<table{css}>")
            out.append("<tr>" + "".join(f"<th>{_h(x)}</th>" for x in b.headers) + "</tr>")
            for row in b.rows:
                cells = []
                for j, c in enumerate(row):
                    cls = []
                    if b.css == "verdicts" and j == 1:
                        cls.append("v-" + str(c).replace(" ", "-"))
                    if b.css == "numbers" and j > 0 and isinstance(c, str) and _NUMERIC.match(c):
                        cls.append("num")
                    attr = f' class="{" ".join(cls)}"' if cls else ""
                    cells.append(f"<td{attr}>{_h_rich(c)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        elif isinstance(b, _Figure):
            out.append(f'<figure id="{_h(b.name)}">')
            out.append(b.svg.strip())
            caption = f": {_h(b.caption)}" if b.caption else ""
            out.append(f"<figcaption><code>plots/{_h(b.name)}</code>{caption}</figcaption></figure>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ============================================================================ SVG from files, made safe to inline

_SVG_NS = "http://www.w3.org/2000/svg"
_SVG_ELEMENTS = {"svg", "g", "rect", "text", "tspan", "title", "desc", "line", "polyline", "polygon", "path",
                 "circle", "ellipse"}


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _safe_svg(text: str) -> str | None:
    """An SVG file's drawing re-serialised with only plain drawing elements and attributes: no
    script, no links, no external reference.  None when it is not a well-formed SVG."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    if _local(root.tag) != "svg":
        return None

    def attrs(el: ET.Element, top: bool) -> str:
        parts = [f'xmlns="{_SVG_NS}"'] if top else []
        for k, v in el.attrib.items():
            name = _local(k)
            low = v.lower()
            if (name.lower().startswith("on") or "href" in name.lower() or "url(" in low or "://" in low
                    or "javascript:" in low or name == "xmlns"):
                continue
            if not re.fullmatch(r"[A-Za-z_:][-A-Za-z0-9_:.]*", name):
                continue
            parts.append(f'{name}="{_html_escape(v, quote=True)}"')
        return (" " + " ".join(parts)) if parts else ""

    def walk(el: ET.Element, top: bool = False) -> str:
        tag = _local(el.tag)
        if tag not in _SVG_ELEMENTS:
            return ""
        inner = _html_escape(el.text or "", quote=False)
        for child in el:
            inner += walk(child) + _html_escape(child.tail or "", quote=False)
        return f"<{tag}{attrs(el, top)}>{inner}</{tag}>"

    return walk(root, top=True)


# ============================================================================ plots

@dataclass
class _Plot:
    key: str  # file name without .svg and prefix
    title: str
    svg: str | None  # None: not measured
    caption: str
    missing: str = ""  # "not measured: ..." when svg is None


def _not_measured(run: _Run, cols: list[str]) -> str:
    parts = []
    absent = [c for c in cols if not run.has(c)]
    empty = [c for c in cols if run.has(c) and not run.series(c)]
    if absent:
        parts.append(f"{', '.join(absent)} not in metrics.csv")
    if empty:
        parts.append(f"{', '.join(empty)} {'has' if len(empty) == 1 else 'have'} no values in metrics.csv")
    return "not measured: " + "; ".join(parts)


def _merge_identical(run: _Run, cols: list[str]) -> list[tuple[str, list]]:
    """Series by name; columns holding exactly the same values are drawn once as 'a = b'."""
    out: list[tuple[str, list]] = []
    for c in cols:
        s = run.series(c)
        if not s:
            continue
        for i, (name, other) in enumerate(out):
            if other == s and not any(isinstance(v, float) and math.isnan(v) for _, v in s):
                out[i] = (f"{name} = {c}", other)
                break
        else:
            out.append((c, s))
    return out


def _auto_log(series: list[tuple[str, list]]) -> bool:
    ys = [y for _, s in series for _, y in s if math.isfinite(y)]
    return bool(ys) and min(ys) > 0 and max(ys) / min(ys) > 300


def _phase_bands(run: _Run) -> list[tuple[float, float, str]]:
    """Runs of rows in the same curriculum phase: a row at step s covers the steps since the row before."""
    if not run.has("phase"):
        return []
    name = ""
    if run.config and isinstance(run.config.get("curriculum"), dict):
        name = str(run.config["curriculum"].get("name") or "")
    bands: list[list] = []
    prev_step = 0
    for row in run.rows:
        phase, step = row.get("phase"), row["step"]
        if not isinstance(phase, int):
            prev_step = step
            continue
        value = row.get(name) if name else None
        label = f"phase {phase}" + (f": {name} {_g(value)}" if isinstance(value, (int, float)) else "")
        if bands and bands[-1][2] == label and bands[-1][1] == prev_step:
            bands[-1][1] = step
        else:
            bands.append([prev_step, step, label])
        prev_step = step
    return [tuple(b) for b in bands]


def _event_label(event: dict, curriculum_name: str) -> str:
    kind = str(event.get("kind", "?"))
    if kind == "promotion" and isinstance(event.get("from_value"), (int, float)) \
            and isinstance(event.get("to_value"), (int, float)):
        return f"{curriculum_name or 'level'} {_g(event['from_value'])}\u2192{_g(event['to_value'])}"
    if kind == "alert" and isinstance(event.get("detector"), str):
        return f"alert: {event['detector']}"
    return kind


def _event_detail(event: dict, run_dir: Path, limit: int = 160) -> str:
    parts = []
    first = ("detector", "severity", "message", "detail", "reason")  # what a reader wants first
    ordered = sorted(event.items(), key=lambda kv: first.index(kv[0]) if kv[0] in first else len(first))
    for k, v in ordered:
        if k in ("time", "kind", "step"):
            continue
        if isinstance(v, str) and v.startswith(str(run_dir)):
            v = v[len(str(run_dir)):].lstrip("/") or "."
        if isinstance(v, float):
            v = _g(v, 6)
        elif isinstance(v, (dict, list)):
            v = json.dumps(v, default=str)
        parts.append(f"{k}={v}")
    text = ", ".join(parts)
    return text if len(text) <= limit else text[: limit - 1] + "\u2026"


def _markers(run: _Run) -> list[tuple[float, str, str]]:
    name = ""
    if run.config and isinstance(run.config.get("curriculum"), dict):
        name = str(run.config["curriculum"].get("name") or "")
    by_step: dict[int, list[dict]] = {}
    for e in run.events:
        step = e.get("step")
        if e.get("kind") in ROUTINE_EVENTS or not isinstance(step, int) or isinstance(step, bool):
            continue
        by_step.setdefault(step, []).append(e)
    out = []
    for step, events in sorted(by_step.items()):
        main = next((e for e in events if e.get("kind") != "phase_end_eval"), events[0])
        label = _event_label(main, name) + (f" +{len(events) - 1}" if len(events) > 1 else "")
        tip = f"step {step}: " + "; ".join(f"{e.get('kind')} ({_event_detail(e, run.path, 100)})" for e in events)
        out.append((float(step), label, tip))
    return out


def _plots(run: _Run, baseline: _Baseline) -> list[_Plot]:
    plots: list[_Plot] = []
    rows_note = f"metrics.csv, last row per step ({len(run.rows)} steps)"
    bands = _phase_bands(run)
    device = str(run.first_start.get("device", ""))

    def chart(key: str, title: str, cols: list[str], y_label: str, caption: str, *, hlines=(), bands=(),
              markers=(), y_range=None, missing_cols: list[str] | None = None) -> None:
        series = _merge_identical(run, cols)
        if not series:
            plots.append(_Plot(key, title, None, "", _not_measured(run, missing_cols or cols)))
            return
        log_y = _auto_log(series)
        if log_y and y_range is not None:
            y_range = None
        svg = line_chart(series, title, "step", y_label, hlines=hlines, bands=bands, markers=markers,
                         log_y=log_y, y_range=y_range, width=CHART_WIDTH, height=CHART_HEIGHT)
        lacking = [c for c in (missing_cols or cols) if not run.series(c)]
        full = f"{caption} Source: {rows_note}."
        if lacking:
            full += f" {_not_measured(run, lacking)}."
        plots.append(_Plot(key, title, svg, full))

    # (a) loss
    loss_cols = ["loss", "val_loss"] + [c for c in run.header
                                        if c.endswith("_loss") and c not in ("loss", "val_loss")]
    hl = [(baseline.value, baseline.label)] if baseline.value is not None else []
    markers = _markers(run)
    cap = "Training loss (mean over each log interval) and held-out loss."
    if hl:
        cap += f" Dashed: {baseline.label} (computed from config.yaml)."
    if bands:
        cap += " Shaded: curriculum phases (metrics.csv phase column)."
    if markers:
        cap += (" Dotted verticals: events from events.jsonl other than start/checkpoint/finish, labelled by the "
                "first event at that step (+n: n more events there; hover for details).")
    chart("loss", "loss", loss_cols, "loss", cap, hlines=hl, bands=bands, markers=markers)

    # (b) accuracy-like metrics
    acc_cols = [c for c in run.header if c in ("acc", "accuracy") or c.endswith(("_acc", "_accuracy"))]
    acc_series = [y for c in acc_cols for _, y in run.series(c) if math.isfinite(y)]
    unit_range = (0.0, 1.0) if acc_series and 0 <= min(acc_series) and max(acc_series) <= 1 else None
    chart("accuracy", "accuracy", acc_cols or ["acc", "val_acc"], "accuracy",
          "Accuracy-like metrics (training: mean over each log interval; val_*: held-out)."
          + (" Shaded: curriculum phases." if bands else ""), bands=bands, y_range=unit_range)

    # (c) learning rate and loss weights
    chart("lr", "learning rate", ["lr"], "lr", "The learning rate at each log row.", y_range=(0.0, None))
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

def _numbers(run: _Run) -> _Table | None:
    metrics = ["loss"]
    if run.experiment is not None:
        metrics += list(run.experiment.eval_metrics)
    else:
        metrics += [c for c in run.header if c.startswith("val_")]
    rows = []
    for m in metrics:
        s = run.series(m)
        finite = [(st, v) for st, v in s if math.isfinite(v)]
        bad = len(s) - len(finite)
        if not finite:
            rows.append([Code(m), _not_measured(run, [m]) if not s else f"no finite values ({bad} non-finite)",
                         "", "", "", "", str(bad)])
            continue
        lo = min(finite, key=lambda p: p[1])
        hi = max(finite, key=lambda p: p[1])
        cell = lambda p: f"{_g(p[1])} (step {p[0]})"  # noqa: E731
        rows.append([Code(m), cell(finite[0]), cell(finite[-1]), cell(lo), cell(hi), str(len(finite)), str(bad)])
    if not rows:
        return None
    return _Table(["metric", "first", "last", "min", "max", "rows", "non-finite rows"], rows, css="numbers")


def _events_table(run: _Run) -> tuple[_Table | None, str]:
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
                     _event_detail(e, run.path)])
    return _Table(["kind", "step", "detail"], rows), left_note


# ============================================================================ the report

def build_report(run_dir: Path, claims: list[Claim] | None = None,
                 title: str | None = None) -> tuple[str, str, dict[str, str]]:
    """(markdown, html, {plot file name: svg}) for the run in `run_dir`; writes nothing."""
    run_dir = Path(run_dir)
    run = _load_run(run_dir)
    cfg = run.config or {}
    experiment = str(cfg.get("experiment", "")) or "not recorded"
    preset = str(cfg.get("preset", "")) or "(none)"
    title = title or f"{experiment} {preset}: {run_dir.name}"
    baseline = _baseline(run)
    blocks: list = [_Heading(1, f"Run report: {title}")]

    # ------------------------------------------------------------------ header
    s = run.summary
    status = s.state + (f": {s.reason}" if s.reason else "")
    step = "not recorded" if s.step is None else (f"{s.step} / {s.total}" if s.total else f"{s.step}")
    status_step = run.status.get("step")
    if run.rows and isinstance(status_step, int) and status_step != s.step:
        step += f" (the last row of metrics.csv; status.json says step {status_step})"
    ends = [e for e in run.events if e.get("kind") in ("finish", "stopped", "crashed")
            and isinstance(e.get("elapsed_s"), (int, float))]
    if ends:
        elapsed = f"{_duration(ends[-1]['elapsed_s'])} ({_g(ends[-1]['elapsed_s'])} s of training, last " \
                  f"{ends[-1].get('kind')} event)"
    elif run.rows and isinstance(run.rows[-1].get("elapsed_s"), (int, float)):
        elapsed = f"{_duration(run.rows[-1]['elapsed_s'])} ({_g(run.rows[-1]['elapsed_s'])} s at the last metrics row)"
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
    header = [["experiment", experiment], ["preset", preset], ["status", status], ["step", step],
              ["elapsed", elapsed], ["attempts", attempts], ["device", device],
              ["baseline loss", baseline.text], ["run directory", Code(str(run_dir))]]
    blocks.append(_Table(["run", "value"], header, css="header"))

    # ------------------------------------------------------------------ verdicts
    blocks.append(_Heading(2, "Verdicts"))
    if claims is None:
        blocks.append(_Para(["no verdicts: run ", Code("trainlab check"), " or ", Code("trainlab preflight")],
                            css="missing"))
    elif not claims:
        blocks.append(_Para("no verdicts: the list of claims given is empty", css="missing"))
    else:
        blocks.append(_Table(["name", "verdict", "value", "evidence", "source"],
                             [[c.name, c.verdict, c.value, c.evidence, c.source] for c in claims], css="verdicts"))

    # ------------------------------------------------------------------ plots
    blocks.append(_Heading(2, "Plots"))
    svgs: dict[str, str] = {}
    for p in _plots(run, baseline):
        blocks.append(_Heading(3, p.title))
        if p.svg is None:
            blocks.append(_Para(p.missing, css="missing"))
            continue
        name = f"{PLOT_PREFIX}{p.key}.svg"
        svgs[name] = p.svg
        blocks.append(_Figure(name, p.svg, p.caption, p.title))
    blocks.append(_Heading(3, "heatmaps"))
    if not run.heatmaps:
        blocks.append(_Para("not measured: no heatmaps in plots/ (the trainer draws them for experiments that "
                            "name 2-D evaluation arrays)", css="missing"))
    for path in run.heatmaps:
        try:
            safe = _safe_svg(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError):
            safe = None
        if safe is None:
            blocks.append(_Para(f"plots/{path.name}: not shown (not a readable SVG file)", css="missing"))
            continue
        blocks.append(_Figure(path.name, safe, "", path.stem))

    samples = read_run_file(run.path, SAMPLES_FILE, read_events)
    if samples:
        blocks.append(_Heading(2, "Samples"))
        shown = [samples[0], samples[-1]] if len(samples) > 1 else samples
        rows = [[str(s.get("step", "-")), key, Code(value[:SAMPLE_CHARS])] for s in shown
                for key, value in s.items() if isinstance(value, str)]
        blocks.append(_Para(f"What the model produced at its first and last evaluation ({len(samples)} in "
                            f"{SAMPLES_FILE}; at most {SAMPLE_CHARS} characters each shown).", css="note"))
        blocks.append(_Table(["step", "what", "text"], rows))

    # ------------------------------------------------------------------ numbers and events
    blocks.append(_Heading(2, "Numbers"))
    numbers = _numbers(run)
    if numbers is None or not run.rows:
        blocks.append(_Para("not measured: metrics.csv has no rows", css="missing"))
    else:
        blocks.append(_Para(f"From metrics.csv, keeping the last row per step ({len(run.rows)} steps from "
                            f"{run.raw_rows} rows); min and max over finite values.", css="note"))
        blocks.append(numbers)
    blocks.append(_Heading(2, "Events"))
    table, note = _events_table(run)
    if table is None:
        blocks.append(_Para(note, css="missing"))
    else:
        blocks.append(table)
        if note:
            blocks.append(_Para(note, css="note"))

    blocks.append(_Heading(2, "Sources"))
    sources = [f"config.yaml ({'read' if run.config is not None else run.config_note})",
               f"status.json ({'read' if run.status else 'absent or unreadable'})",
               f"metrics.csv ({run.raw_rows} rows, {len(run.rows)} steps, {len(run.header)} columns)",
               f"events.jsonl ({len(run.events)} events)",
               f"plots/ ({len(run.heatmaps)} heatmap{'s' if len(run.heatmaps) != 1 else ''})"]
    blocks.append(_Para("Everything above is read from the run directory: " + "; ".join(sources) + ".", css="note"))
    return _to_markdown(blocks), _to_html(blocks, title), svgs


SAMPLE_CHARS = 600


def write_report(run_dir: Path, claims: list[Claim] | None = None, title: str | None = None) -> tuple[Path, Path]:
    """Write run_dir/report.md, run_dir/report.html and run_dir/plots/report-*.svg; return the two paths.
    Other files in plots/ (the trainer's heatmaps) are left as they are."""
    run_dir = Path(run_dir)
    markdown, html, svgs = build_report(run_dir, claims, title)
    plots = run_dir / "plots"
    if svgs:
        plots.mkdir(exist_ok=True)
    for name, svg in svgs.items():
        _write(plots / name, svg)
    md_path, html_path = run_dir / "report.md", run_dir / "report.html"
    _write(md_path, markdown)
    _write(html_path, html)
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
