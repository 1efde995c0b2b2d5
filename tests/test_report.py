"""Run reports: report.md, a self-contained report.html and SVG plots, from real runs of the CLI."""

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

import pytest

from conftest import trainlab
from trainlab.engine.logs import read_events, read_metrics
from trainlab.errors import UsageError
from trainlab.report.render import Claim, build_report, write_report
from trainlab.report.svgplot import line_chart, nice_ticks

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


def _groups(svg: ET.Element, cls: str) -> list[ET.Element]:
    return [g for g in svg.iter("{http://www.w3.org/2000/svg}g") if g.get("class") == cls]


def _title(el: ET.Element) -> str:
    t = el.find("s:title", SVG_NS)
    return t.text or "" if t is not None else ""


def _texts(el: ET.Element) -> list[str]:
    return [t.text or "" for t in el.iter("{http://www.w3.org/2000/svg}text")]


# ------------------------------------------------------------------------------ files

def test_write_report_creates_report_and_plot_files(runs, tmp_path):
    run = _copy(runs["sha"], tmp_path)
    heatmaps = {p.name: p.read_bytes() for p in (run / "plots").glob("*.svg")}
    assert heatmaps, "the sha256 smoke run should have drawn heatmaps"
    md_path, html_path = write_report(run)
    assert md_path == run / "report.md" and html_path == run / "report.html"
    md = md_path.read_text(encoding="utf-8")
    html = html_path.read_text(encoding="utf-8")
    referenced = re.findall(r"!\[[^\]]*\]\(plots/([^)]+\.svg)\)", md)
    assert "report-loss.svg" in referenced and "report-accuracy.svg" in referenced
    for name in referenced:  # every plot the Markdown shows exists and is a well-formed SVG
        _svg((run / "plots" / name).read_text(encoding="utf-8"))
    for name, data in heatmaps.items():  # the trainer's heatmaps are kept, unchanged, and shown
        assert (run / "plots" / name).read_bytes() == data
        assert f"plots/{name}" in md and f"plots/{name}" in html
    assert "sha256" in md and "smoke" in md and "finished" in md and "30 / 30" in md
    assert "cpu, precision fp32" in md


def test_write_report_creates_plots_dir(runs, tmp_path):
    run = _copy(runs["modadd"], tmp_path)
    shutil.rmtree(run / "plots", ignore_errors=True)  # the run drew its own report; start without plots/
    write_report(run)
    assert (run / "plots" / "report-loss.svg").is_file()


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

@pytest.mark.parametrize("name, ln, value", [("modadd", "ln 23", math.log(23)), ("sha", "ln 2", math.log(2))])
def test_loss_plot_has_the_random_baseline(runs, name, ln, value):
    md, _, svgs = build_report(runs[name])
    svg = _svg(svgs["report-loss.svg"])
    hlines = _groups(svg, "hline")
    assert len(hlines) == 1
    label = f"random baseline {ln} = {value:.4g}"
    assert _title(hlines[0]) == label and label in _texts(hlines[0])
    # the line is drawn at the baseline's height: between the y ticks that bracket it
    y_line = float(hlines[0].find("s:line", SVG_NS).get("y1"))
    ticks = {}
    for t in svg.iter("{http://www.w3.org/2000/svg}text"):
        if t.get("text-anchor") == "end" and re.fullmatch(r"-?[\d.]+", t.text or ""):
            ticks[float(t.text)] = float(t.get("y")) - 3.5
    lo = max(v for v in ticks if v <= value)
    hi = min(v for v in ticks if v >= value)
    if hi > lo:
        expect = ticks[lo] + (value - lo) / (hi - lo) * (ticks[hi] - ticks[lo])
        assert abs(y_line - expect) < 1.0
    assert f"{ln} = {value:.4g}" in md  # the header says what the baseline is


def test_sha256_report_shades_phases_and_marks_promotions(runs):
    run = runs["sha"]
    _, _, svgs = build_report(run)
    svg = _svg(svgs["report-loss.svg"])
    bands = _groups(svg, "band")
    labels = [_texts(b)[0] for b in bands]
    assert labels == ["phase 0: rounds 1", "phase 1: rounds 2", "phase 2: rounds 4"]
    promotions = [e for e in read_events(run / "events.jsonl") if e["kind"] == "promotion"]
    assert [e["step"] for e in promotions] == [5, 10]
    markers = _groups(svg, "marker")
    marker_x = {}
    for m in markers:
        step = int(re.match(r"step (\d+):", _title(m)).group(1))
        marker_x[step] = float(m.find("s:line", SVG_NS).get("x1"))
        assert "promotion" in _title(m)
    assert sorted(marker_x) == [5, 10]
    assert any("rounds 1\u21922" in t for m in markers for t in _texts(m))
    # each phase after the first starts where its promotion is marked
    band_x = [float(b.find("s:rect", SVG_NS).get("x")) for b in bands]
    assert abs(band_x[1] - marker_x[5]) < 0.2 and abs(band_x[2] - marker_x[10]) < 0.2
    # the accuracy plot is shaded the same way; acc and its alias accuracy are drawn once
    acc = _svg(svgs["report-accuracy.svg"])
    assert [_texts(b)[0] for b in _groups(acc, "band")] == labels
    assert "acc = accuracy" in _texts(acc)


def test_resume_is_marked(tmp_path):
    run = tmp_path / "r"
    trainlab("run", "modadd", "--preset", "smoke", "--steps", "20", "--run-dir", str(run), cwd=tmp_path, check=True)
    trainlab("run", "modadd", "--preset", "smoke", "--steps", "30", "--run-dir", str(run), cwd=tmp_path, check=True)
    md, _, svgs = build_report(run)
    markers = _groups(_svg(svgs["report-loss.svg"]), "marker")
    assert [_title(m).split(":")[0] for m in markers] == ["step 20"]
    assert _texts(markers[0]) == ["resume +1"]  # the resume, and one more event at that step:
    assert "config_changed" in _title(markers[0])  # the extension of train.steps, in the tooltip
    assert "| 2 (1 resume) |" in md and "| `resume` | 20 |" in md
    assert "| step | 30 / 30 |" in md


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


# ------------------------------------------------------------------------------ svgplot on awkward input

def _drawn_numbers(svg: str) -> list[float]:
    values = []
    for attr in re.findall(r'\s(?:x|y|x1|x2|y1|y2|cx|cy|width|height|points)="([^"]*)"', svg):
        values += [float(v) for v in re.split(r"[ ,]+", attr.strip()) if v]
    return values


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
    svg = line_chart(series, "t <&>", "x", "y", hlines=[(float("nan"), "bad"), (2.0, "two")],
                     bands=[(0, 1, "b0")], markers=[(1, "m"), (float("inf"), "bad")])
    root = _svg(svg)
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    assert all(math.isfinite(v) for v in _drawn_numbers(svg))
    if note:
        assert note in svg
    else:
        assert "not drawn" not in svg
    if series.get("a"):
        points = [p for p in series["a"] if p[1] is not None and math.isfinite(p[1])]
        shown = len(root.findall(".//s:polyline", SVG_NS)) + len(root.findall(".//s:circle", SVG_NS))
        assert shown >= 1 if points else shown == 0


def test_line_chart_log_axis_skips_non_positive_and_says_so():
    svg = line_chart({"g": [(0, 0.0), (1, -2.0), (2, 1e-3), (3, 10.0), (4, 1e4)]}, "g", "step", "norm", log_y=True)
    assert "2 points not drawn: 2 <=0 on log axis" in svg.replace("&lt;", "<")
    assert "(log scale)" in svg
    _svg(svg)


def test_line_chart_gaps_break_lines_and_many_points_are_thinned():
    svg = line_chart({"a": [(0, 1.0), (1, 2.0), (2, None), (3, 2.0), (4, 1.0)]}, "t", "x", "y")
    assert len(_svg(svg).findall(".//s:polyline", SVG_NS)) == 2
    big = [(i, math.sin(i / 50.0)) for i in range(200_000)]
    svg = line_chart({"big": big}, "t", "x", "y")
    assert len(svg) < 400_000  # thinned to the pixel columns, min and max kept
    ys = [float(p.split(",")[1]) for p in _svg(svg).find(".//s:polyline", SVG_NS).get("points").split()]
    assert max(ys) - min(ys) > 100  # the envelope (-1..1) still spans the plot


def test_nice_ticks():
    assert nice_ticks(0, 40, 5)[2] == [0, 10, 20, 30, 40]
    lo, hi, ticks = nice_ticks(3.1, 3.56)
    assert lo <= 3.1 and hi >= 3.56 and 3 <= len(ticks) <= 8
    lo, hi, ticks = nice_ticks(5, 5)
    assert lo < 5 < hi


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
    assert dom.stdout.count("<polyline") >= html.count("<polyline") > 0
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
    assert "config.yaml (config.yaml unreadable: 'utf-8' codec can't decode byte 0xff" in md
    assert "report-loss.svg" in svgs  # metrics.csv is still read and drawn
