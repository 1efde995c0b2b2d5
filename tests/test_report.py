"""Run reports: report.md, a self-contained report.html and matplotlib's figures (SVG inlined, PNG
beside it), from real runs of the CLI."""

from __future__ import annotations

import json
import math
import os
import re
import shutil
import struct
import subprocess
import xml.etree.ElementTree as ET
import zlib
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
from matplotlib.collections import QuadMesh
from matplotlib.figure import Figure as MatplotlibFigure

from conftest import trainlab
from trainlab.engine.logs import read_events, read_metrics
from trainlab.engine.rundir import read_run_config
from trainlab.errors import UsageError
from trainlab.formatting import format_duration, format_number
from trainlab.health.claims import Claim
from trainlab.report.figures import line_chart
from trainlab.report.heatmap import draw_heatmap
from trainlab.report.html import inline_svg
from trainlab.report.render import build_report, report_figures, write_report

SVG = "{http://www.w3.org/2000/svg}"
SVG_NS = {"s": "http://www.w3.org/2000/svg"}


# ------------------------------------------------------------------------------ runs (real, through the CLI)

@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("report-runs")
    out = {}
    for name, exp in (("modadd", "modadd"), ("sha", "sha256")):
        trainlab("run", exp, "--preset", "smoke", "--run-dir", str(root / name), cwd=root, check=True)
        out[name] = root / name
    return out


def _copy(run: Path, tmp_path: Path) -> Path:
    target = tmp_path / run.name
    shutil.copytree(run, target, ignore=shutil.ignore_patterns("checkpoints", "report.*"))
    return target


def _svg(text: str) -> ET.Element:
    return ET.fromstring(text)  # raises on malformed XML


def _title(el: ET.Element) -> str:
    t = el.find("s:title", SVG_NS)
    return t.text or "" if t is not None else ""


def _texts(el: ET.Element) -> list[str]:
    return [t.text or "" for t in el.iter(f"{SVG}text")]


def _tooltips(svg: ET.Element) -> list[str]:
    """The <title> of every group of a figure: the tooltips a browser shows."""
    return [_title(g) for g in svg.iter(f"{SVG}g") if g.find("s:title", SVG_NS) is not None]


def _figures(run: Path) -> dict[str, MatplotlibFigure]:
    return dict(report_figures(run))


def _gid(fig: MatplotlibFigure, prefix: str) -> list:
    """The artists of the figure's plot whose gid is `prefix`-K (K = 0, 1, ...), in order."""
    ax = fig.axes[0]
    found = [a for a in ax.get_children() if re.fullmatch(rf"{prefix}-\d+", a.get_gid() or "")]
    return sorted(found, key=lambda a: int(a.get_gid().rsplit("-", 1)[1]))


def _label_of(fig: MatplotlibFigure, artist) -> str:
    """The text drawn for a band or an event marker ('' when it did not fit and is left to the tooltip)."""
    text = next(t for t in fig.axes[0].texts if t.get_gid() == f"{artist.get_gid()}-label")
    return text.get_text() if text.get_visible() else ""


def _legend(fig: MatplotlibFigure) -> list[str]:
    return [t.get_text() for legend in fig.legends for t in legend.get_texts()]


def _x_extent(patch) -> tuple[float, float]:
    """The data x range a shaded band covers."""
    box = patch.get_window_extent()
    inverse = patch.axes.transData.inverted()
    return inverse.transform((box.x0, 0))[0], inverse.transform((box.x1, 0))[0]


def _file_geometry(svg_path: Path) -> tuple[dict[str, float], list[tuple[float, float]]]:
    """From an SVG file as matplotlib wrote it: {gid: y of the first vertex of its path} and the y
    ticks as (value, pixel y), read from the tick marks and their labels."""
    root = ET.fromstring(svg_path.read_text(encoding="utf-8"))
    first_y = {}
    for g in root.iter(f"{SVG}g"):
        path = g.find(f"{SVG}path")
        if g.get("id") and path is not None:
            first_y[g.get("id")] = float(path.get("d").split()[2])
    ticks = []
    for g in root.iter(f"{SVG}g"):
        if re.fullmatch(r"ytick_\d+", g.get("id") or ""):
            use = next(g.iter(f"{SVG}use"))
            label = "".join(_texts(g)).replace("\u2212", "-")
            ticks.append((float(label), float(use.get("y"))))
    return first_y, ticks


def _drawn_shapes(root: ET.Element) -> int:
    """Paths an SVG document draws: those outside <defs> and <clipPath>, and one per <use> (a copy of a
    marker: the tick marks, the dots of a series)."""
    hidden = {id(p) for d in root.iter() if d.tag in (f"{SVG}defs", f"{SVG}clipPath") for p in d.iter(f"{SVG}path")}
    return sum(id(p) not in hidden for p in root.iter(f"{SVG}path")) + len(list(root.iter(f"{SVG}use")))


# ------------------------------------------------------------------------------ files

def test_write_report_creates_report_and_plot_files(runs, tmp_path):
    run = _copy(runs["sha"], tmp_path)
    drawn = {p.name: p.read_bytes() for p in (run / "plots").glob("*.svg")}  # by the run: heatmaps, its report
    assert any(n.startswith("bit_acc_map-") for n in drawn), "the sha256 smoke run should have drawn heatmaps"
    md_path, html_path = write_report(run)
    assert md_path == run / "report.md" and html_path == run / "report.html"
    md = md_path.read_text(encoding="utf-8")
    html = html_path.read_text(encoding="utf-8")
    referenced = re.findall(r"!\[[^\]]*\]\(plots/([^)]+\.svg)\)", md)
    assert "report-loss.svg" in referenced and "report-accuracy.svg" in referenced
    for name in referenced:  # every plot the Markdown shows exists, as an SVG and as a PNG to paste
        text = (run / "plots" / name).read_text(encoding="utf-8")
        assert len(list(_svg(inline_svg(text)).iter(f"{SVG}path"))) == _drawn_shapes(_svg(text))  # all inlined
        png = run / "plots" / name.replace(".svg", ".png")
        width, height, _, _ = _decode_png(png.read_bytes())
        assert width > 300 and height > 150 and f"plots/{png.name}" in md
    for name, data in drawn.items():  # the trainer's heatmaps are kept, unchanged, and shown; the report's
        assert (run / "plots" / name).read_bytes() == data  # own are drawn again byte for byte
        assert f"plots/{name}" in md and f"plots/{name}" in html
    assert "sha256" in md and "smoke" in md and "finished" in md and "30 / 30" in md
    assert "cpu, precision fp32" in md


def test_write_report_creates_plots_dir(runs, tmp_path):
    run = _copy(runs["modadd"], tmp_path)
    shutil.rmtree(run / "plots", ignore_errors=True)  # the run drew its own report; start without plots/
    write_report(run)
    assert (run / "plots" / "report-loss.svg").is_file() and (run / "plots" / "report-loss.png").is_file()


def test_a_report_written_twice_is_the_same_bytes(runs, tmp_path):
    run = _copy(runs["sha"], tmp_path)
    write_report(run)
    first = {p.name: p.read_bytes() for p in sorted((run / "plots").iterdir())} | {
        "report.html": (run / "report.html").read_bytes()}
    write_report(run)
    again = {p.name: p.read_bytes() for p in sorted((run / "plots").iterdir())} | {
        "report.html": (run / "report.html").read_bytes()}
    assert first == again and any(n.endswith(".png") for n in first)


def test_verdict_table_with_claims_and_line_without(runs):
    claims = [Claim("loss below baseline", "pass", "2.879 nats", "last loss vs ln 23 = 3.135",
                    "metrics.csv steps 5-40"),
              Claim("throughput on GPU", "not measured", "-", "no GPU here", "preflight"),
              Claim("grad norm spikes", "warn", "3 spikes > 10x median", "grad_norm_max / median", "metrics.csv")]
    md, html, _ = build_report(runs["modadd"], claims)
    assert "| name | verdict | value | evidence | source |" in md
    assert "| loss below baseline | pass | 2.879 nats | last loss vs ln 23 = 3.135 | metrics.csv steps 5-40 |" in md
    assert "| throughput on GPU | not measured | - | no GPU here | preflight |" in md
    assert "3 spikes \\> 10x median" in md  # text from a caller is escaped for Markdown
    assert "3 spikes &gt; 10x median" in html and 'class="v-warn"' in html
    assert "no verdicts" not in md
    md_none, html_none, _ = build_report(runs["modadd"])
    assert "no verdicts: run `trainlab check` or `trainlab preflight`" in md_none
    assert "| name | verdict |" not in md_none
    with pytest.raises(ValueError, match="verdict must be one of"):
        Claim("x", "ok", "1", "e", "s")


# ------------------------------------------------------------------------------ what the plots show

@pytest.mark.parametrize("name", ["modadd", "sha"])
def test_every_plot_is_a_matplotlib_figure_with_data_and_labelled_axes(runs, name):
    _, _, svgs = build_report(runs[name])
    figures = report_figures(runs[name])
    assert [f"{stem}.svg" for stem, _ in figures] == list(svgs)  # the figures are the report's plots
    assert len(figures) >= 5
    for stem, fig in figures:
        assert isinstance(fig, MatplotlibFigure), stem
        (ax,) = fig.axes
        assert ax.get_xlabel() == "step" and ax.get_ylabel(), stem
        assert ax.get_title(loc="left"), stem
        series = _gid(fig, "series")
        assert series, f"{stem}: no data series drawn"
        for line in series:
            y = np.asarray(line.get_ydata(), dtype=float)
            assert np.isfinite(y).sum() >= 1, f"{stem}: {line.get_label()} has no finite point"
            lo, hi = sorted(ax.get_ylim())
            assert np.all((y[np.isfinite(y)] >= lo) & (y[np.isfinite(y)] <= hi)), f"{stem}: data off the axes"
        assert _legend(fig) == [line.get_label() for line in series + _gid(fig, "hline")]


def test_units_on_the_axes(runs):
    figs = _figures(runs["modadd"])
    units = {stem: fig.axes[0].get_ylabel() for stem, fig in figs.items()}
    assert units["report-loss"] == "loss (nats)"  # cross-entropy of ln 23: natural log
    assert units["report-accuracy"] == "accuracy (fraction correct)"
    assert units["report-memory"] == "GB" and units["report-throughput"] == "samples / s"


@pytest.mark.parametrize("name, ln, value", [("modadd", "ln 23", math.log(23)), ("sha", "ln 2", math.log(2))])
def test_loss_plot_has_the_random_baseline(runs, name, ln, value, tmp_path):
    md, _, svgs = build_report(runs[name])
    fig = _figures(runs[name])["report-loss"]
    (hline,) = _gid(fig, "hline")
    label = f"random baseline {ln} = {value:.4g}"
    assert hline.get_label() == label and label in _legend(fig)
    assert list(hline.get_ydata()) == [value, value]
    lo, hi = fig.axes[0].get_ylim()
    assert lo < value <= hi  # on the plot, not off its edge
    assert label in _tooltips(_svg(svgs["report-loss.svg"]))
    # in the file: the line is drawn at the baseline's height, between the y ticks that bracket it
    run = _copy(runs[name], tmp_path)
    write_report(run)
    first_y, ticks = _file_geometry(run / "plots" / "report-loss.svg")
    below = max((t for t in ticks if t[0] <= value), key=lambda t: t[0])
    above = min((t for t in ticks if t[0] >= value), key=lambda t: t[0], default=None)
    if above is None:  # the baseline is the top of the plot: extrapolate from the two highest ticks
        below, above = sorted(ticks)[-2:]
    expect = below[1] + (value - below[0]) / (above[0] - below[0]) * (above[1] - below[1])
    assert abs(first_y["hline-0"] - expect) < 0.5
    assert f"{ln} = {value:.4g}" in md  # the header says what the baseline is


def test_sha256_report_shades_phases_and_marks_promotions(runs):
    run = runs["sha"]
    _, _, svgs = build_report(run)
    figs = _figures(run)
    loss = figs["report-loss"]
    bands = _gid(loss, "band")
    labels = [_label_of(loss, b) for b in bands]
    assert labels == ["phase 0: rounds 1", "phase 1: rounds 2", "phase 2: rounds 4"]
    promotions = [e for e in read_events(run / "events.jsonl") if e["kind"] == "promotion"]
    assert [e["step"] for e in promotions] == [5, 10]
    markers = _gid(loss, "marker")
    marker_x = {int(m.get_xdata()[0]): m for m in markers}
    assert sorted(marker_x) == [5, 10]
    assert any("rounds 1\u21922" in _label_of(loss, m) for m in markers)
    tips = [t for t in _tooltips(_svg(svgs["report-loss.svg"])) if t.startswith("step ")]
    assert [t.split(":")[0] for t in tips] == ["step 5", "step 10"] and all("promotion" in t for t in tips)
    # each phase after the first starts where its promotion is marked
    band_x = [_x_extent(b) for b in bands]
    assert abs(band_x[1][0] - 5) < 0.05 and abs(band_x[2][0] - 10) < 0.05
    assert abs(band_x[0][1] - band_x[1][0]) < 0.05 and abs(band_x[1][1] - band_x[2][0]) < 0.05
    # the accuracy plot is shaded the same way; acc and its alias accuracy are drawn once
    acc = figs["report-accuracy"]
    assert [_label_of(acc, b) for b in _gid(acc, "band")] == labels
    assert "acc = accuracy" in _legend(acc)
    assert "acc = accuracy" in _texts(_svg(svgs["report-accuracy.svg"]))


def test_resume_is_marked(tmp_path):
    run = tmp_path / "r"
    trainlab("run", "modadd", "--preset", "smoke", "--steps", "20", "--run-dir", str(run), cwd=tmp_path, check=True)
    trainlab("run", "modadd", "--preset", "smoke", "--steps", "30", "--run-dir", str(run), cwd=tmp_path, check=True)
    md, _, svgs = build_report(run)
    loss = _figures(run)["report-loss"]
    markers = _gid(loss, "marker")
    assert [m.get_xdata()[0] for m in markers] == [20]
    assert _label_of(loss, markers[0]) == "resume +1"  # the resume, and one more event at that step:
    (tip,) = [t for t in _tooltips(_svg(svgs["report-loss.svg"])) if t.startswith("step ")]
    assert tip.startswith("step 20:") and "config_changed" in tip  # the extension of train.steps, in the tooltip
    assert "| 2 (1 resume) |" in md and "| `resume` | 20 |" in md
    assert "| step | 30 / 30 |" in md


def test_a_quantity_spanning_decades_is_drawn_on_a_log_axis(runs, tmp_path):
    run = _copy(runs["modadd"], tmp_path)
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    col = header.index("grad_norm")
    rows = [line.split(",") for line in lines[1:]]
    for k, row in enumerate(rows):  # 1e-3 .. 1e4: seven decades
        if row[col]:
            row[col] = f"{10.0 ** (-3 + 7 * k / max(len(rows) - 1, 1)):.6g}"
    (run / "metrics.csv").write_text("\n".join([lines[0]] + [",".join(r) for r in rows]) + "\n", encoding="utf-8")
    figs = _figures(run)
    grad = figs["report-grad-norm"].axes[0]
    assert grad.get_yscale() == "log" and grad.get_ylabel().endswith("(log scale)")
    assert figs["report-loss"].axes[0].get_yscale() == "linear"  # the loss spans less than a decade


def test_absent_columns_are_reported_not_measured(runs, tmp_path):
    md, html, svgs = build_report(runs["modadd"])
    assert "not measured: w_* not in metrics.csv" in html
    assert "not measured: w\\_\\* not in metrics.csv" in md
    assert "report-loss-weights.svg" not in svgs
    # the same run with val_loss and both gradient-norm columns taken out of metrics.csv
    run = _copy(runs["modadd"], tmp_path)
    lines = (run / "metrics.csv").read_text(encoding="utf-8").splitlines()
    header = lines[0].split(",")
    drop = [header.index(c) for c in ("val_loss", "grad_norm", "grad_norm_max")]
    rows = [",".join(v for i, v in enumerate(line.split(",")) if i not in drop) for line in lines]
    (run / "metrics.csv").write_text("\n".join(rows) + "\n", encoding="utf-8")
    md, html, svgs = build_report(run)
    assert "report-grad-norm.svg" not in svgs  # no empty chart presented as data
    assert "not measured: grad_norm, grad_norm_max not in metrics.csv" in html
    assert "report-loss.svg" in svgs and "val_loss not in metrics.csv" in html  # said under the loss plot
    assert "val_loss" not in "".join(_texts(_svg(svgs["report-loss.svg"])))
    assert "val_loss" not in _legend(_figures(run)["report-loss"])
    numbers = md[md.index("## Numbers"):md.index("## Events")]
    assert re.search(r"\| `val_loss` \| not measured: val\\_loss not in metrics.csv", numbers)


def test_numbers_table_matches_metrics_csv(runs):
    md, _, _ = build_report(runs["modadd"])
    rows = read_metrics(runs["modadd"] / "metrics.csv")
    loss = [(r["step"], r["loss"]) for r in rows]
    lo = min(loss, key=lambda p: p[1])
    expect = (f"| `loss` | {loss[0][1]:.4g} (step {loss[0][0]}) | {loss[-1][1]:.4g} (step {loss[-1][0]}) | "
              f"{lo[1]:.4g} (step {lo[0]}) |")
    assert expect in md
    val = [(r["step"], r["val_loss"]) for r in rows if r["val_loss"] is not None]
    assert f"| `val_loss` | {val[0][1]:.4g} (step {val[0][0]}) | {val[-1][1]:.4g} (step {val[-1][0]}) |" in md


def test_events_table_is_capped_and_says_what_was_left_out(runs, tmp_path):
    run = _copy(runs["modadd"], tmp_path)
    with open(run / "events.jsonl", "a", encoding="utf-8") as fh:
        for i in range(120):
            fh.write(json.dumps({"time": 1.0, "kind": "checkpoint", "step": 100 + i, "path": "x",
                                 "reason": "periodic"}) + "\n")
        fh.write(json.dumps({"time": 2.0, "kind": "memory_warning", "step": 999, "detail": "host RAM high"}) + "\n")
    total = len(read_events(run / "events.jsonl"))
    md, _, _ = build_report(run)
    events = md[md.index("## Events"):md.index("## Sources")]
    table_rows = [ln for ln in events.splitlines() if ln.startswith("| `")]
    assert len(table_rows) == 50
    assert "| `memory_warning` | 999 |" in events  # an unusual event is never the one left out
    assert f"{total - 50} of {total} events left out" in events


# ------------------------------------------------------------------------------ heatmaps

def test_the_trainers_heatmaps_are_vector_figures_of_the_array(runs):
    plots = runs["sha"] / "plots"
    for tag in ("phase_end_0-step5", "phase_end_1-step10", "final-step30"):
        svg = plots / f"bit_acc_map-{tag}.svg"
        assert svg.is_file() and _decode_png((plots / f"bit_acc_map-{tag}.png").read_bytes())[0] > 300
        inline = _svg(inline_svg(svg.read_text(encoding="utf-8")))
        assert len(inline.findall(".//s:path", SVG_NS)) >= 8 * 32  # a shape per cell, no embedded bitmap
        assert any(t.startswith("per-bit accuracy") for t in _texts(inline))
    values = [[0.5 + 0.5 * ((i + j) % 3) / 2 for j in range(32)] for i in range(8)]
    values[2][5] = float("nan")  # a cell not measured is left blank, not drawn as a value
    fig = draw_heatmap(values, "per-bit accuracy", list("abcdefgh"), [str(31 - j) for j in range(32)],
                       0.5, 1.0, x_label="bit", y_label="word", value_label="accuracy").figure
    ax, bar = fig.axes
    (mesh,) = [c for c in ax.collections if isinstance(c, QuadMesh)]
    cells, expect = np.ma.asarray(mesh.get_array()).reshape(8, 32), np.ma.masked_invalid(np.array(values))
    assert (np.ma.getmaskarray(cells) == expect.mask).all() and np.allclose(cells.compressed(), expect.compressed())
    assert mesh.norm.vmin == 0.5 and mesh.norm.vmax == 1.0
    assert (ax.get_xlabel(), ax.get_ylabel(), bar.get_ylabel()) == ("bit", "word", "accuracy")
    assert [t.get_text() for t in ax.get_yticklabels()] == list("abcdefgh")
    assert ax.get_ylim()[0] > ax.get_ylim()[1]  # row 0 (a) at the top


# ------------------------------------------------------------------------------ the HTML page

class _Balance(HTMLParser):
    VOID = {"meta", "br", "hr", "img", "input", "link", "col", "area", "base", "wbr", "source"}

    def __init__(self):
        super().__init__()
        self.stack: list[str] = []
        self.errors: list[str] = []
        self.tags: list[str] = []
        self.attrs: list[tuple[str, str | None]] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs
        if tag not in self.VOID:
            self.stack.append(tag)

    def handle_startendtag(self, tag, attrs):
        self.tags.append(tag)
        self.attrs += attrs

    def handle_endtag(self, tag):
        if not self.stack or self.stack[-1] != tag:
            self.errors.append(f"</{tag}> closes <{self.stack[-1] if self.stack else None}>")
            if tag in self.stack:
                while self.stack.pop() != tag:
                    pass
        else:
            self.stack.pop()


@pytest.mark.parametrize("name", ["modadd", "sha"])
def test_html_is_self_contained_and_well_formed(runs, name):
    claims = [Claim("c", "info", "1 s", "timer", "preflight")]
    md, html, svgs = build_report(runs[name], claims)
    without_ns = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "http://" not in without_ns and "https://" not in without_ns
    assert "<script" not in html.lower() and "javascript:" not in html.lower()
    parser = _Balance()
    parser.feed(html)
    parser.close()
    assert parser.errors == [] and parser.stack == []
    assert parser.tags.count("html") == 1 and parser.tags.count("style") == 1
    assert not any(k in ("src", "href") or k.startswith("on") for k, _ in parser.attrs)  # nothing loads, nothing runs
    assert "url(" not in html
    heatmaps = sorted((runs[name] / "plots").glob("bit_acc_map-*.svg")) if (runs[name] / "plots").exists() else []
    assert html.count("<svg") == len(svgs) + len(heatmaps)  # every plot is inlined, nothing else is
    for svg in svgs.values():
        assert svg.strip() in html
    for path in heatmaps:
        assert f'id="{path.name}"' in html
    assert len(re.findall(r"!\[[^\]]*\]\(plots/", md)) == html.count("<svg")


def test_text_from_files_is_escaped_and_foreign_svg_is_defused(runs, tmp_path):
    run = _copy(runs["sha"], tmp_path)
    with open(run / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"time": 3.0, "kind": "<b>alert</b>", "step": 20,
                             "detail": "see https://example.com/x | <script>alert(1)</script>"}) + "\n")
    evil = ('<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" width="20" '
            'height="20" onload="alert(1)"><script>alert(2)</script><image xlink:href="https://example.com/a.png"/>'
            '<rect width="5" height="5" fill="url(https://example.com/f)" onclick="x()"/>'
            '<text x="1" y="9">ok &amp; kept</text></svg>')
    (run / "plots" / "zz_evil-step99.svg").write_text(evil, encoding="utf-8")
    (run / "plots" / "broken-step98.svg").write_text("<svg><rect></svg", encoding="utf-8")
    claims = [Claim("<img src=x>", "fail", "1 | 2", "`rm -rf` *now*", "metrics.csv")]
    md, html, _ = build_report(run, claims)
    without_ns = html.replace('xmlns="http://www.w3.org/2000/svg"', "")
    assert "https://" not in without_ns and "http://" not in without_ns
    assert "<script" not in html and "onload" not in html and "onclick" not in html and "<image" not in html
    assert "<b>" not in html and "&lt;b&gt;alert&lt;/b&gt;" in html and "&lt;img src=x&gt;" in html
    assert "ok &amp; kept" in html  # the harmless part of the foreign SVG is still shown
    assert "plots/broken-step98.svg: not shown (not a readable SVG file)" in html
    assert "| \\<img src=x\\> | fail | 1 \\| 2 |" in md
    assert "<script>" not in md and "<b>" not in md


# ------------------------------------------------------------------------------ line_chart on awkward input

def _drawn_numbers(svg: str) -> list[float]:
    values = []
    for attr in re.findall(r'\s(?:x|y|x1|x2|y1|y2|cx|cy|width|height|points|d)="([^"]*)"', svg):
        values += [float(v) for v in re.findall(r"-?(?:\d+\.?\d*|\.\d+)(?:e[-+]?\d+)?|nan|inf", attr)]
    return values


def _series_paths(svg: str, k: int = 0) -> list[str]:
    """The d of each path matplotlib drew for series k (its markers excepted)."""
    group = next(g for g in _svg(svg).iter(f"{SVG}g") if g.get("id") == f"series-{k}")
    return [p.get("d") for p in group.findall(f"{SVG}path")]


@pytest.mark.parametrize("series, note", [
    ({"a": [(0, 1.0), (1, float("nan")), (2, 2.0), (3, float("inf")), (4, float("-inf")), (5, 1.5)]},
     "3 points not drawn: 1 NaN, 2 inf"),
    ({"a": []}, "no data to draw"),
    ({}, "no data to draw"),
    ({"a": [(7, 2.5)]}, None),
    ({"a": [(0, 4.0), (1, 4.0), (2, 4.0)]}, None),
    ({"a": [(0, 0.0), (1, 0.0)]}, None),
    ({"a": [(0, -1e300), (1, 1e300), (2, 5.0)]}, None),
    ({"a": [(0, 1e-12), (1, 1e12)], "b": [(0, float("nan"))]}, "no drawable points: b"),
    ({"a": [(0, None), (1, 2.0), (2, None), (3, 3.0)]}, None),
    ({"a": [(-5, 1.0), (1e15, 2.0)]}, None),
])
def test_line_chart_handles_awkward_values(series, note):
    chart = line_chart(series, "t <&>", "x", "y", hlines=[(float("nan"), "bad"), (2.0, "two")],
                       bands=[(0, 1, "b0")], markers=[(1, "m"), (float("inf"), "bad")])
    svg = chart.svg()
    root = _svg(svg)
    assert root.tag == f"{SVG}svg" and "t <&>" in _texts(root)
    assert all(math.isfinite(v) for v in _drawn_numbers(svg))
    if note:
        assert note in svg
    else:
        assert "not drawn" not in svg
    assert [h.get_label() for h in _gid(chart.figure, "hline")] == ["two"]  # the NaN line is left out
    assert [m.get_xdata()[0] for m in _gid(chart.figure, "marker")] == [1]
    if series.get("a"):
        points = [(float(x), float(y)) for x, y in series["a"] if y is not None and math.isfinite(y)]
        (line, *_) = _gid(chart.figure, "series")
        x, y = np.asarray(line.get_xdata(), float), np.asarray(line.get_ydata(), float)
        assert list(zip(x[np.isfinite(y)], y[np.isfinite(y)])) == points  # every drawable point, as given
        if len(points) == 1:  # a lone point is a dot: a line of one point shows nothing
            assert line.get_marker() == "o"


def test_line_chart_log_axis_skips_non_positive_and_says_so():
    chart = line_chart({"g": [(0, 0.0), (1, -2.0), (2, 1e-3), (3, 10.0), (4, 1e4)]}, "g", "step", "norm", log_y=True)
    svg = chart.svg()
    assert "2 points not drawn: 2 <=0 on log axis" in svg.replace("&lt;", "<")
    assert "(log scale)" in svg and chart.figure.axes[0].get_yscale() == "log"
    _svg(svg)


def test_line_chart_gaps_break_lines_and_many_points_stay_small():
    svg = line_chart({"a": [(0, 1.0), (1, 2.0), (2, None), (3, 2.0), (4, 1.0)]}, "t", "x", "y").svg()
    (d,) = _series_paths(svg)
    assert d.count("M") == 2  # two pieces, not bridged
    big = [(i, math.sin(i / 50.0)) for i in range(200_000)]
    svg = line_chart({"big": big}, "t", "x", "y").svg()
    assert len(svg) < 400_000  # matplotlib's path simplification: far fewer vertices than points
    (d,) = _series_paths(svg)
    ys = [float(v) for v in d.split()[2::3]]
    assert max(ys) - min(ys) > 100  # the envelope (-1..1) still spans the plot


def test_axis_ticks_are_round_numbers_that_cover_the_data():
    def ticks(lo, hi):
        ax = line_chart({"a": [(0, lo), (1, hi)]}, "t", "x", "y").figure.axes[0]
        bottom, top = ax.get_ylim()
        return bottom, top, [t for t in ax.get_yticks() if bottom <= t <= top]

    assert ticks(0, 40)[2] == [0, 10, 20, 30, 40]
    bottom, top, shown = ticks(3.1, 3.56)
    assert bottom <= 3.1 and top >= 3.56 and 3 <= len(shown) <= 8
    assert all(abs(t * 10 - round(t * 10)) < 1e-9 for t in shown)  # 3.1, 3.2, ...: round numbers
    bottom, top, _ = ticks(5, 5)
    assert bottom < 5 < top


# ------------------------------------------------------------------------------ one formatter, one config loader

def test_numbers_and_durations_have_one_format():
    assert [format_number(v) for v in (0.123456, 40, 3.0, float("nan"), float("inf"), None, True, "x")] == \
        ["0.1235", "40", "3", "nan", "inf", "-", "True", "x"]
    assert format_number(2 / 3, 6) == "0.666667" and format_number(None, missing="") == ""
    assert [format_duration(s) for s in (0, 59.6, 65, 3599, 7385.2, float("nan"), float("inf"))] == \
        ["0m00s", "1m00s", "1m05s", "59m59s", "2h03m05s", "?", "?"]


def test_a_run_directorys_config_is_read_in_one_place(runs, tmp_path):
    assert read_run_config(runs["modadd"])["experiment"] == "modadd"
    assert read_run_config(tmp_path) is None  # none there
    (tmp_path / "config.yaml").write_text("", encoding="utf-8")
    assert read_run_config(tmp_path) is None  # empty: no mapping (a kill while it was written)
    for text, says in ((b"a: [1\n", "config.yaml is malformed"), (b"a: \xff\n", "config.yaml is unreadable")):
        (tmp_path / "config.yaml").write_bytes(text)
        with pytest.raises(UsageError, match=f"run directory {re.escape(str(tmp_path))}: {says} \\(") as err:
            read_run_config(tmp_path)
        assert "\n" not in str(err.value)


# ------------------------------------------------------------------------------ rendered by a real browser

def _decode_png(data: bytes) -> tuple[int, int, int, list[bytearray]]:
    """(width, height, bytes per pixel, rows) of a non-interlaced 8-bit PNG, with zlib and struct only."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG file"
    pos, idat, ihdr = 8, [], None
    while pos < len(data):
        n, kind = struct.unpack(">I4s", data[pos:pos + 8])
        body = data[pos + 8:pos + 8 + n]
        pos += 12 + n
        if kind == b"IHDR":
            ihdr = struct.unpack(">IIBBBBB", body)
        elif kind == b"IDAT":
            idat.append(body)
        elif kind == b"IEND":
            break
    width, height, depth, colour, _, _, interlace = ihdr
    assert depth == 8 and interlace == 0 and colour in (0, 2, 4, 6), f"unsupported PNG {ihdr}"
    bpp = {0: 1, 2: 3, 4: 2, 6: 4}[colour]
    raw = zlib.decompress(b"".join(idat))
    stride = width * bpp
    prev = bytearray(stride)
    rows = []
    for y in range(height):
        start = y * (stride + 1)
        ftype, line = raw[start], bytearray(raw[start + 1:start + 1 + stride])
        if ftype == 1:  # Sub
            for i in range(bpp, stride):
                line[i] = (line[i] + line[i - bpp]) & 255
        elif ftype == 2:  # Up
            line = bytearray((a + b) & 255 for a, b in zip(line, prev))
        elif ftype == 3:  # Average
            for i in range(stride):
                left = line[i - bpp] if i >= bpp else 0
                line[i] = (line[i] + ((left + prev[i]) >> 1)) & 255
        elif ftype == 4:  # Paeth
            for i in range(stride):
                a, c = (line[i - bpp], prev[i - bpp]) if i >= bpp else (0, 0)
                b = prev[i]
                p = a + b - c
                pa, pb, pc = abs(p - a), abs(p - b), abs(p - c)
                line[i] = (line[i] + (a if pa <= pb and pa <= pc else b if pb <= pc else c)) & 255
        rows.append(line)
        prev = line
    return width, height, bpp, rows


def test_png_decoder_on_a_known_image():
    # 2x2 RGB: red, white / white, blue; rows filtered with None and Sub
    raw = b"\x00" + bytes([255, 0, 0, 255, 255, 255]) + b"\x01" + bytes([255, 255, 255, 0, 0, 0])
    def chunk(k, b):
        return struct.pack(">I", len(b)) + k + b + struct.pack(">I", zlib.crc32(k + b))
    png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 2, 2, 8, 2, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
    w, h, bpp, rows = _decode_png(png)
    assert (w, h, bpp) == (2, 2, 3)
    assert rows == [bytearray([255, 0, 0, 255, 255, 255]), bytearray([255, 255, 255, 255, 255, 255])]


def test_report_renders_in_headless_chromium(runs, tmp_path):
    chromium = shutil.which("chromium")
    if chromium is None:
        # .ci/run says what it managed: a browser it installed must be found here, not skipped over
        if os.environ.get("TRAINLAB_CI_CHROMIUM") == "installed":
            pytest.fail(".ci/run installed chromium, yet it is not on this test's PATH")
        pytest.skip("chromium is not installed (Debian package 'chromium'); the report is not rendered by a browser")
    run = _copy(runs["sha"], tmp_path)
    _, html_path = write_report(run, [Claim("c", "pass", "1", "e", "s")])
    png = tmp_path / "report.png"
    common = [chromium, "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
              "--disable-background-networking", "--disable-component-update", "--disable-sync",
              f"--user-data-dir={tmp_path / 'profile'}"]
    url = html_path.resolve().as_uri()
    dom = subprocess.run(common + ["--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    html = html_path.read_text(encoding="utf-8")
    assert dom.stdout.count("<svg") == html.count("<svg") >= 7
    assert dom.stdout.count("<path") >= html.count("<path") > 0  # matplotlib draws every line as a path
    assert "random baseline ln 2 = 0.6931" in dom.stdout and "phase 1: rounds 2" in dom.stdout
    shot = subprocess.run(common + [f"--screenshot={png}", "--window-size=1200,3000", url],
                          capture_output=True, text=True, timeout=120)
    assert shot.returncode == 0 and png.is_file(), shot.stderr[-2000:]
    width, height, bpp, rows = _decode_png(png.read_bytes())
    assert (width, height) == (1200, 3000)
    non_white = sum(1 for row in rows for i in range(0, len(row), bpp)
                    if min(row[i], row[i + 1 if bpp > 2 else i], row[i + 2 if bpp > 2 else i]) < 235)
    assert non_white / (width * height) > 0.02, f"the screenshot is nearly blank ({non_white} non-white pixels)"
    # the charts themselves are painted: coloured (not grey) pixels of the palette's blue line exist
    blue = sum(1 for row in rows for i in range(0, len(row), bpp)
               if bpp > 2 and row[i + 2] > 150 and row[i] < 60 and row[i + 1] < 150)
    assert blue > 200


def test_a_run_without_metrics_is_all_not_measured(runs, tmp_path):
    run = tmp_path / "empty"
    run.mkdir()
    shutil.copy(runs["modadd"] / "config.yaml", run / "config.yaml")
    md, html, svgs = build_report(run)
    assert svgs == {}
    assert "not measured: loss, val_loss not in metrics.csv" in html
    assert "not measured: metrics.csv has no rows" in html
    assert "no events: events.jsonl is empty or absent" in html
    assert "ln 23 = 3.135" in md  # the baseline needs only config.yaml
    with pytest.raises(UsageError, match="not found"):
        build_report(tmp_path / "nowhere")
    (tmp_path / "plain").mkdir()
    with pytest.raises(UsageError, match="trainlab run directory"):
        build_report(tmp_path / "plain")


def test_a_config_that_is_not_utf8_is_named_and_the_report_goes_on(runs, tmp_path):
    run = _copy(runs["modadd"], tmp_path)
    (run / "config.yaml").write_bytes(b"experiment: modadd\n# \xff\n")
    md, html, svgs = build_report(run)
    assert "config.yaml (config.yaml is unreadable ('utf-8' codec can't decode byte 0xff" in md
    assert "report-loss.svg" in svgs  # metrics.csv is still read and drawn


# ------------------------------------------------------------------------------ verdicts where people look

def _verdict_rows(md: str) -> list[list[str]]:
    """The Verdicts table of a report.md as cells, Markdown's backslash escapes undone."""
    section = md.split("## Verdicts", 1)[1].split("\n## ", 1)[0]
    table = [ln for ln in section.splitlines() if ln.startswith("| ")][1:]
    return [[re.sub(r"\\(.)", r"\1", c.strip()) for c in re.split(r"(?<!\\)\|", ln)[1:-1]] for ln in table]


def _claim_rows(path: Path) -> list[list[str]]:
    return [[c["name"], c["verdict"], c["value"], c["evidence"], c["source"]]
            for c in json.loads(path.read_text(encoding="utf-8"))["claims"]]


def test_the_report_at_the_end_of_a_run_carries_the_detectors_verdicts(runs, tmp_path):
    """`trainlab run` ends with the claims `trainlab check` makes -- in report.md and in check.json
    -- and an extension of the run replaces a check.json left from before, which would be stale."""
    from trainlab.health.detectors import DETECTORS

    run = runs["modadd"]
    md = (run / "report.md").read_text(encoding="utf-8")
    assert "no verdicts" not in md
    assert [r[0] for r in _verdict_rows(md)] == [cls.name for cls in DETECTORS]
    short = next(ln for ln in md.splitlines() if ln.startswith("In short: "))  # above the table: the counts
    assert sum(int(n) for n in re.findall(r"(\d+) (?:fail|warn|info|pass|not measured)", short)) == len(DETECTORS)
    assert _verdict_rows(md) == _claim_rows(run / "check.json")
    again = tmp_path / "again"
    shutil.copytree(run, again)
    (again / "check.json").write_text(json.dumps({"claims": [{"name": "stale", "verdict": "fail", "value": "x",
                                                              "evidence": "x", "source": "x"}]}))
    out = trainlab("run", "modadd", "--preset", "smoke", "--steps", "45", "--run-dir", "again", cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    at_end = _claim_rows(again / "check.json")
    assert at_end == _verdict_rows((again / "report.md").read_text(encoding="utf-8"))
    assert "stale" not in [r[0] for r in at_end] and at_end[0][4].endswith("steps 5-45")
    check = trainlab("check", "again", cwd=tmp_path)
    assert check.returncode == 0, check.stdout
    assert _claim_rows(again / "check.json") == at_end  # what `trainlab check` says, exactly


def test_evidence_is_never_cut_mid_sentence(runs, tmp_path):
    """A passing detector's evidence is its whole first sentence (it was the docstring's first line,
    cut mid-sentence); a long evidence text and a long alert message reach both files whole."""
    claims = {r[0]: r for r in _claim_rows(runs["modadd"] / "check.json")}
    divergence = claims["divergence"]
    assert divergence[1] == "pass" and divergence[3].endswith("after having been significantly below it.")
    assert all(r[3].endswith(".") for r in claims.values() if r[1] == "pass")
    long_text = "the interval " + " ".join(f"[{i}, {i + 1}]" for i in range(80)) + " ends here."
    run = _copy(runs["modadd"], tmp_path)
    with open(run / "events.jsonl", "a", encoding="utf-8") as fh:
        fh.write(json.dumps({"kind": "alert", "detector": "spike", "step": 7, "severity": "warn",
                             "message": long_text, "evidence": {"z": 9.5}}) + "\n")
    md, html, _ = build_report(run, [Claim("long", "warn", "v", long_text, "s")])
    assert f"| long | warn | v | {escape_md(long_text)} | s |" in md
    assert f"<td>{long_text}</td>" in html
    events = md[md.index("## Events"):md.index("## Sources")]
    assert escape_md(long_text) in events  # the message whole; the fields after it counted instead
    assert "+1 more field in events.jsonl" in events


def escape_md(text: str) -> str:
    from trainlab.report.markdown import escape

    return escape(text)


def test_numbers_table_has_every_logged_metric(runs):
    md, _, _ = build_report(runs["modadd"])
    numbers = md[md.index("## Numbers"):md.index("## Events")]
    rows = read_metrics(runs["modadd"] / "metrics.csv")
    acc = [(r["step"], r["acc"]) for r in rows]
    assert f"| `acc` | {format_number(acc[0][1])} (step {acc[0][0]}) | {format_number(acc[-1][1])} (step {acc[-1][0]}) |" \
        in numbers  # training accuracy, missing before
    for column in ("loss", "val_loss", "val_acc", "grad_norm", "grad_norm_max", "lr", "samples_per_s", "ram_gb"):
        assert f"| `{column}` | " in numbers, column
    assert "| `dev_mem_gb` | not measured: the run's device is cpu" in numbers
    assert "| `step` |" not in numbers and "| `elapsed_s` |" not in numbers
    shown = re.findall(r"^\| `(\w+)` \|", numbers, re.M)
    assert shown[:4] == ["loss", "acc", "val_loss", "val_acc"]  # the experiment's metrics first, training before held-out


def _preflight_copy(runs, tmp_path, data: dict | str) -> Path:
    run = _copy(runs["modadd"], tmp_path)
    (run / "preflight.json").write_text(data if isinstance(data, str) else json.dumps(data), encoding="utf-8")
    return run


def test_a_preflight_report_begins_with_its_verdict_and_first_reason(runs, tmp_path):
    run = _preflight_copy(runs, tmp_path, {"verdict": "NOT READY", "reasons": ["gate not reached: plateau at 0.888",
                                                                                "unstable gradient norm"],
                                           "claims": []})
    md, html, _ = build_report(run)
    lines = md.splitlines()
    assert lines[0] == f"# Preflight NOT READY: modadd smoke: {run.name}"
    assert lines[2] == "**NOT READY**: gate not reached: plateau at 0.888"
    assert "Reasons, most important first: gate not reached: plateau at 0.888; unstable gradient norm." in md
    body = html[html.index("<body>"):]
    assert body.index('<p class="verdict v-not-ready"><strong>NOT READY</strong>: gate not reached') < body.index("<table")
    summary = {"verdict": "UNCERTAIN", "summary": "UNCERTAIN: the gate is projected at step 9000 [4000, never].",
               "reasons": ["gate interval straddles the planned steps"]}
    # the first lines alone (drawing the figures again would only cost time)
    from trainlab.report.markdown import to_markdown
    from trainlab.report.render import _preflight_blocks

    summary_dir = tmp_path / "s"
    summary_dir.mkdir()
    (summary_dir / "preflight.json").write_text(json.dumps(summary))
    verdict, blocks = _preflight_blocks(summary_dir)
    assert verdict == "UNCERTAIN"
    assert to_markdown(blocks).splitlines()[0] == "**UNCERTAIN**: the gate is projected at step 9000 \\[4000, never\\]."
    (summary_dir / "preflight.json").write_text("{\"reasons\": []}")
    verdict, blocks = _preflight_blocks(summary_dir)
    assert verdict is None and "preflight verdict not shown: preflight.json: has no 'verdict'" in to_markdown(blocks)


def test_a_series_of_one_point_is_a_large_marker_named_in_the_legend():
    """A short preflight evaluates once, at its end: beside 100 training rows that one validation
    loss must be seen (a marker at least 6 units across, the SVG's points; a dense series' dots
    stay under 3) and the legend says so."""
    loss = [(2 * i, 3.0 - i / 100) for i in range(1, 51)]  # 50 rows: each a small dot
    chart = line_chart({"loss": loss, "val_loss": [(100, 3.2)]}, "loss", "step", "loss")
    root = _svg(chart.svg())
    defs = {p.get("id"): p for p in root.iter(f"{SVG}path") if p.get("id")}
    group = next(g for g in root.iter(f"{SVG}g") if g.get("id") == "series-1")
    (use,) = list(group.iter(f"{SVG}use"))
    marker = defs[use.get("{http://www.w3.org/1999/xlink}href")[1:]]
    xs = [float(v) for v in re.findall(r"-?\d+\.?\d*", marker.get("d"))[::2]]
    assert max(xs) - min(xs) >= 6
    assert "val_loss (1 point)" in _legend(chart.figure) and "loss" in _legend(chart.figure)
    (dense_use, *_) = [u for g in root.iter(f"{SVG}g") if g.get("id") == "series-0" for u in g.iter(f"{SVG}use")]
    dense = defs[dense_use.get("{http://www.w3.org/1999/xlink}href")[1:]]
    assert max(float(v) for v in re.findall(r"-?\d+\.?\d*", dense.get("d"))) < 3
