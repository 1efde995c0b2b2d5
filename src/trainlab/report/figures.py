"""The reports' figures, drawn by matplotlib: line charts of a run's or a sweep's columns, and
heatmaps of 2-D evaluation arrays.

Import this module only to draw: it loads matplotlib (about a second), which a run that writes no
report never needs.  No pyplot and no global state: each figure is a `matplotlib.figure.Figure` on
an Agg canvas, drawn and saved inside `matplotlib.rc_context(STYLE)`, so a program that calls
write_report keeps its own matplotlib settings.

What a chart shows, and what it says it left out: points that cannot be drawn (NaN, inf, values
<= 0 on a log axis) break the line and are counted in a note under the plot, never silently
dropped; None breaks a line too, rather than being bridged.

    chart = line_chart({"loss": [(5, 3.2), (10, 3.1)], "val_loss": [(20, 3.3)]}, "loss", "step", "loss (nats)",
                       hlines=[(3.135, "random baseline ln 23 = 3.135")],
                       bands=[(0, 5, "phase 0: rounds 1"), (5, 10, "phase 1: rounds 2")],
                       markers=[(5, "promotion", "step 5: promotion (rounds 1 -> 2)")])
    chart.svg()                      # the SVG document, the same bytes for the same input
    chart.write(Path("plots"), "report-loss")   # plots/report-loss.svg and plots/report-loss.png

Artists a reader (or a test) looks for carry a gid: series-K, hline-K, band-K (and band-K-label),
marker-K (and marker-K-label), where K counts from 0 in the order given; the SVG gives each of
those groups a <title> (a tooltip in a browser) from `Chart.tooltips`.
"""

from __future__ import annotations

import io
import math
import textwrap
from dataclasses import dataclass, field
from html import escape
from pathlib import Path
from typing import Iterable, Mapping, Sequence

import matplotlib
from cycler import cycler
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.colors import Normalize
from matplotlib.figure import Figure

# Okabe & Ito's colour-blind-safe palette (yellow last: it is faint on white); after it wraps,
# dashes keep series apart.
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
DASHES = ("-", (0, (6, 3)), (0, (2, 2)), (0, (8, 3, 2, 3)))
BAND_FILLS = ("#eeeeee", "#dcdcdc")
REFERENCE_COLOUR = "#333333"
MARKER_COLOUR = "#7f3f98"
NOTE_COLOUR = "#a0522d"
DOTS_UP_TO = 60  # a series with at most this many points shows each one as a dot
SPARSE_UP_TO = 20  # ... and with fewer than this, as a large dot: a single evaluation at a preflight's end
# beside a hundred training rows is a dot the eye must find, not a speck under the line's end
DOT_SIZE, SPARSE_DOT_SIZE = 3.0, 7.0  # marker diameters in points
MARKER_ROWS = 3  # event labels above the plot stack in up to this many rows; the rest stay tooltips
ROW_HEIGHT, TAB_HEIGHT = 11.0, 12.0  # points: a row of event labels, the band tabs under them
# A chart's layout, in inches (100 px each in the SVG): fixed margins rather than matplotlib's
# constrained layout, which measures every tick label again on each draw (most of a chart's cost)
CHART_WIDTH, PLOT_HEIGHT = 9.0, 1.9
LEFT, RIGHT, TITLE_SPACE, AXIS_SPACE = 0.85, 0.25, 0.32, 0.5  # AXIS_SPACE: tick labels and axis label
LEGEND_ROW, LEGEND_COLUMNS, NOTE_ROW = 0.22, 4, 0.16
PNG_DPI = 150  # a PNG sharp enough to paste into a document

STYLE = {
    "svg.fonttype": "none",  # text stays text: a small file whose labels a browser can search
    "svg.hashsalt": "trainlab",  # ids from the content, not random: the same run draws the same file
    "font.family": "sans-serif",
    "font.sans-serif": ["DejaVu Sans", "Arial", "Helvetica"],  # short: it is repeated on every label
    "font.size": 9.0,
    "axes.titlesize": 11.0,
    "axes.titlelocation": "left",
    "axes.labelsize": 9.0,
    "legend.fontsize": 8.0,
    "legend.frameon": False,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.grid": True,
    "grid.color": "#e3e3e3",
    "axes.prop_cycle": cycler(color=PALETTE),
    "axes.xmargin": 0.01,  # a training curve starts and ends near the plot's edges
    "figure.dpi": 100.0,
}
# No <metadata>: its date would differ on every write, its URLs have no place in a self-contained page.
SVG_METADATA = {"Date": None, "Creator": None, "Format": None, "Type": None}
PNG_METADATA = {"Software": None}


@dataclass
class Chart:
    """A figure for a report and the tooltips its SVG carries, keyed by the gid of the artist."""

    figure: Figure
    tooltips: dict[str, str] = field(default_factory=dict)
    _svg: str | None = field(default=None, init=False, repr=False)

    def svg(self) -> str:
        """The figure as a standalone SVG document (drawn once, then kept)."""
        if self._svg is None:
            buffer = io.StringIO()
            with matplotlib.rc_context(STYLE):
                self.figure.savefig(buffer, format="svg", metadata=SVG_METADATA)
            text = buffer.getvalue()
            for gid, tip in self.tooltips.items():
                # matplotlib writes each gid as the id of the group that holds the artist
                text = text.replace(f'<g id="{gid}">', f'<g id="{gid}">\n<title>{escape(tip)}</title>', 1)
            self._svg = text
        return self._svg

    def write(self, plots: Path, stem: str) -> tuple[Path, Path]:
        """plots/<stem>.svg and plots/<stem>.png, each written whole or not at all."""
        svg_path, png_path = plots / f"{stem}.svg", plots / f"{stem}.png"
        _replace(svg_path, self.svg().encode("utf-8"))
        buffer = io.BytesIO()
        with matplotlib.rc_context(STYLE):
            self.figure.savefig(buffer, format="png", dpi=PNG_DPI, metadata=PNG_METADATA)
        _replace(png_path, buffer.getvalue())
        return svg_path, png_path


def _replace(path: Path, data: bytes) -> None:
    """Write through a temporary file and rename, so a reader never sees half a picture."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        tmp.write_bytes(data)
        tmp.replace(path)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def _new_figure(size: tuple[float, float], layout: str | None = None) -> Figure:
    fig = Figure(figsize=size, layout=layout)
    FigureCanvasAgg(fig)  # a canvas that can measure text, and draw PNGs
    return fig


def _plain(text: str) -> str:
    """Text shown as written: a '$' in a column name must not start matplotlib's math mode."""
    return str(text).replace("$", r"\$")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


# ---------------------------------------------------------------------------------------- line charts

def _drawable(points: Iterable, log_x: bool, log_y: bool,
              skipped: dict[str, int]) -> tuple[list[float], list[float]]:
    """x and y lists with NaN where the line must break (None, NaN, inf, <= 0 on a log axis);
    every point that cannot be drawn is counted by kind in `skipped`."""
    xs: list[float] = []
    ys: list[float] = []
    for p in points:
        try:
            x, y = p[0], p[1]
        except (TypeError, IndexError):
            skipped["malformed"] = skipped.get("malformed", 0) + 1
            continue
        why = None
        if x is None or y is None:
            why = ""  # a gap the data itself marks: not counted
        elif not (_finite(x) and _finite(y)):
            bad = x if not _finite(x) else y
            why = "NaN" if isinstance(bad, float) and math.isnan(bad) else \
                "inf" if isinstance(bad, (int, float)) and not isinstance(bad, bool) else "malformed"
        elif (log_y and y <= 0) or (log_x and x <= 0):
            why = "<=0 on log axis"
        if why is None:
            xs.append(float(x))
            ys.append(float(y))
            continue
        if why:
            skipped[why] = skipped.get(why, 0) + 1
        if ys and not math.isnan(ys[-1]):
            xs.append(xs[-1])
            ys.append(math.nan)
    while ys and math.isnan(ys[-1]):
        xs.pop()
        ys.pop()
    return xs, ys


def _isolated(ys: list[float]) -> list[int]:
    """Indices of points with a gap (or an end) on both sides: a line cannot show them, a dot can."""
    return [i for i, y in enumerate(ys) if not math.isnan(y)
            and (i == 0 or math.isnan(ys[i - 1])) and (i == len(ys) - 1 or math.isnan(ys[i + 1]))]


def line_chart(series: Mapping[str, Sequence] | Sequence[tuple[str, Sequence]], title: str, x_label: str,
               y_label: str, *, hlines: Iterable = (), bands: Iterable = (), markers: Iterable = (),
               log_x: bool = False, log_y: bool = False, y_range: tuple[float | None, float | None] | None = None,
               width: float = CHART_WIDTH) -> Chart:
    """A line chart of (x, y) series.

    series   name -> [(x, y), ...] (or a list of (name, points)); None, NaN and inf break the line
    hlines   (y, label) reference lines, dashed across the plot and named in the legend
    bands    (x0, x1, label) shaded x ranges (curriculum phases), labelled on tabs above the plot
    markers  (x, label) or (x, label, tooltip) event lines, labelled above the plot
    log_x, log_y  log axes (values <= 0 are not drawn, and counted)
    y_range  (lo, hi): the y axis starts at lo / ends at hi when the data allow (None: free)
    """
    items = [(str(k), list(v or [])) for k, v in (series.items() if isinstance(series, Mapping) else series)]
    hlines = [(float(y), str(label)) for y, label in hlines if _finite(y) and (not log_y or y > 0)]
    bands = [(float(b[0]), float(b[1]), str(b[2]) if len(b) > 2 else "") for b in bands
             if _finite(b[0]) and _finite(b[1]) and (not log_x or min(b[0], b[1]) > 0)]
    markers = [(float(m[0]), str(m[1]) if len(m) > 1 else "", str(m[2]) if len(m) > 2 else
                (str(m[1]) if len(m) > 1 else "")) for m in markers if _finite(m[0]) and (not log_x or m[0] > 0)]
    skipped: dict[str, int] = {}
    drawn_y: list[float] = []
    empty = []
    with matplotlib.rc_context(STYLE):  # the axes read their style when they are made
        fig = _new_figure((width, 3 * PLOT_HEIGHT))
        ax = fig.add_subplot()
        _place(fig, ax, 0.0, 0.0)  # the final width already: event labels are measured against it
        chart = Chart(fig)
        for k, (name, points) in enumerate(items):
            xs, ys = _drawable(points, log_x, log_y, skipped)
            finite = [y for y in ys if not math.isnan(y)]
            drawn_y += finite
            if not finite:
                empty.append(name)
            dots = None if len(finite) > DOTS_UP_TO else slice(None)
            lonely = _isolated(ys) if dots is None else []
            label = name + (" (1 point)" if len(finite) == 1 else "")
            line, = ax.plot(xs, ys, color=PALETTE[k % len(PALETTE)], lw=1.6,
                            linestyle=DASHES[(k // len(PALETTE)) % len(DASHES)], label=_plain(label),
                            marker="o" if dots is not None or lonely else None,
                            markersize=SPARSE_DOT_SIZE if len(finite) < SPARSE_UP_TO else DOT_SIZE,
                            markeredgecolor="white" if len(finite) < SPARSE_UP_TO else None, markeredgewidth=0.8,
                            markevery=dots if dots is not None else (lonely or None), gid=f"series-{k}")
            chart.tooltips[line.get_gid()] = name
        for k, (y, label) in enumerate(hlines):
            ax.axhline(y, color=REFERENCE_COLOUR, lw=1.2, linestyle=(0, (7, 4)), label=_plain(label),
                       gid=f"hline-{k}")
            chart.tooltips[f"hline-{k}"] = label
        for k, (x0, x1, label) in enumerate(bands):
            ax.axvspan(x0, x1, color=BAND_FILLS[k % 2], lw=0, zorder=0, gid=f"band-{k}")
            # a tab of the band's colour just above the plot: a label never covers the data
            ax.annotate(_plain(label), xy=(x0, 1), xycoords=("data", "axes fraction"), xytext=(2, 2),
                        textcoords="offset points", ha="left", va="bottom", fontsize=7.5, color="#444444",
                        annotation_clip=False, bbox={"fc": BAND_FILLS[k % 2], "ec": "none", "pad": 1.5},
                        gid=f"band-{k}-label")
            chart.tooltips[f"band-{k}"] = f"{label} (x {x0:g} to {x1:g})"
        for k, (x, label, tip) in enumerate(markers):
            ax.axvline(x, color=MARKER_COLOUR, lw=1.2, linestyle=(0, (3, 3)), gid=f"marker-{k}")
            ax.annotate(_plain(label), xy=(x, 1), xycoords=("data", "axes fraction"), xytext=(3, 3),
                        textcoords="offset points", ha="left", va="bottom", fontsize=7.5, color=MARKER_COLOUR,
                        annotation_clip=False, gid=f"marker-{k}-label")
            chart.tooltips[f"marker-{k}"] = tip or label
        if log_x:
            ax.set_xscale("log")
        if log_y:
            ax.set_yscale("log")
        if y_range is not None and not log_y and drawn_y:
            values = drawn_y + [h for h, _ in hlines]
            ends = [end if end is not None and (min(values) >= end if k == 0 else max(values) <= end) else None
                    for k, end in enumerate(y_range)]
            for end in ends:  # the other end keeps its margin, measured from this one
                if end is not None:
                    ax.update_datalim([(0.0, end)], updatex=False)
            ax.autoscale_view(scalex=False)
            ax.set_ylim(*ends)
        ax.set_xlabel(_plain(x_label + (" (log scale)" if log_x else "")))
        ax.set_ylabel(_plain(y_label + (" (log scale)" if log_y else "")))
        notes = []
        if skipped:
            n = sum(skipped.values())
            notes.append(f"{n} point{'s' if n != 1 else ''} not drawn: "
                         + ", ".join(f"{count} {kind}" for kind, count in sorted(skipped.items())))
        if drawn_y and empty:
            notes.append("no drawable points: " + ", ".join(empty))
        if not drawn_y:
            ax.text(0.5, 0.5, "no data to draw", transform=ax.transAxes, ha="center", va="center",
                    color="#888888", fontsize=11)
        tabs = TAB_HEIGHT if bands else 0.0
        rows = _fit_labels(fig, ax, tabs)
        ax.set_title(_plain(title), pad=6 + tabs + ROW_HEIGHT * rows)  # above the tabs and event labels
        entries = len(items) + len(hlines)
        legend_rows = -(-entries // LEGEND_COLUMNS)
        below = AXIS_SPACE + LEGEND_ROW * legend_rows + NOTE_ROW * len(notes)
        height = _place(fig, ax, TITLE_SPACE + (tabs + ROW_HEIGHT * rows) / 72, below)
        if entries:  # under the plot, which keeps the figure's whole width
            fig.legend(loc="upper center", bbox_to_anchor=(0.5, (below - AXIS_SPACE + 0.04) / height),
                       ncols=min(entries, LEGEND_COLUMNS), borderaxespad=0.0)
        for k, note in enumerate(notes):
            fig.text(LEFT / width, (NOTE_ROW * (len(notes) - 1 - k) + 0.05) / height, _plain(f"note: {note}"),
                     fontsize=8, color=NOTE_COLOUR)
    return chart


def _place(fig: Figure, ax, above: float, below: float) -> float:
    """The plot PLOT_HEIGHT inches high with `above` and `below` inches around it; returns the
    figure's height."""
    width = fig.get_figwidth()
    height = PLOT_HEIGHT + above + below
    fig.set_size_inches(width, height)
    ax.set_position([LEFT / width, below / height, 1 - (LEFT + RIGHT) / width, PLOT_HEIGHT / height])
    return height


def _freeze_layout(fig: Figure) -> None:
    """Lay the figure out once and keep it: the SVG and the PNG are drawn from the same layout, and
    neither pays for laying it out again (measuring every tick label is most of a draw's cost)."""
    fig.get_layout_engine().execute(fig)
    fig.set_layout_engine("none")


def _fit_labels(fig: Figure, ax, tabs: float) -> int:
    """Band labels wider than their band, and event labels that would overlap one another, are
    measured with matplotlib's own text extents: a band label that does not fit is cut to the part
    before its colon, or left to its tooltip; event labels take the first of MARKER_ROWS rows above
    the band tabs (`tabs` points high) where they fit, or stay tooltips.  Returns the number of rows
    of event labels."""
    renderer = fig.canvas.get_renderer()
    to_px = ax.transData.transform
    for text in ax.texts:
        gid = text.get_gid() or ""
        if gid.startswith("band-"):
            band = next(p for p in ax.patches if p.get_gid() == gid[: -len("-label")])
            room = band.get_window_extent(renderer).width - 8
            if text.get_window_extent(renderer).width > room:
                text.set_text(text.get_text().split(":")[0])  # "phase 2: rounds 4" -> "phase 2"
            if text.get_window_extent(renderer).width > room:
                text.set_visible(False)
    row_ends: list[float] = [-math.inf] * MARKER_ROWS
    right = ax.get_window_extent(renderer).x1
    labels = sorted((t for t in ax.texts if (t.get_gid() or "").startswith("marker-")),
                    key=lambda t: to_px((t.xy[0], 0))[0])
    for text in labels:
        px = to_px((text.xy[0], 0))[0]
        width = text.get_window_extent(renderer).width
        if px + 3 + width > right:  # near the right edge: the label ends at its line instead
            text.set_ha("right")
            text.set_position((-3, 0))
            span = (px - 3 - width, px)
        else:
            span = (px, px + 3 + width)
        row = next((r for r in range(MARKER_ROWS) if span[0] > row_ends[r] + 6), None)
        if row is None or not text.get_text():
            text.set_visible(False)
            continue
        row_ends[row] = span[1]
        text.set_position((text.get_position()[0], 3 + tabs + ROW_HEIGHT * row))
    return sum(end > -math.inf for end in row_ends)


# ---------------------------------------------------------------------------------------- heatmaps

def heatmap_chart(values: Sequence[Sequence[float]], title: str, row_labels: Sequence[str] | None = None,
                  col_labels: Sequence[str] | None = None, lo: float = 0.0, hi: float = 1.0, *,
                  x_label: str = "column", y_label: str = "row", value_label: str = "value") -> Chart:
    """A grid of cells, white at `lo` to dark blue at `hi` (readable in print and for colour-blind
    readers), row 0 at the top, with a colour bar.  Cells are vector shapes (pcolormesh, not imshow):
    the SVG inlined into report.html holds no embedded bitmap."""
    import numpy as np

    grid = np.asarray(values, dtype=float)
    if grid.ndim != 2 or 0 in grid.shape:
        raise ValueError(f"heatmap {title!r}: needs a non-empty 2-D array, got shape {grid.shape}")
    rows, cols = grid.shape
    row_labels = [str(r) for r in row_labels] if row_labels else [str(i) for i in range(rows)]
    col_labels = [str(c) for c in col_labels] if col_labels else [str(j) for j in range(cols)]
    with matplotlib.rc_context(STYLE):
        width = max(4.0, 1.8 + 0.19 * cols)
        fig = _new_figure((width, max(2.2, 1.2 + 0.19 * rows)), layout="constrained")
        ax = fig.add_subplot()
        mesh = ax.pcolormesh(np.ma.masked_invalid(grid), cmap="Blues", norm=Normalize(vmin=lo, vmax=hi),
                             edgecolors="none", gid="cells")
        ax.set_aspect("equal")
        ax.invert_yaxis()
        ax.grid(False)
        shown = [j for j in range(cols) if j % 4 == 0 or j == cols - 1]
        ax.set_xticks([j + 0.5 for j in shown], [_plain(col_labels[j]) for j in shown])
        ax.set_yticks([i + 0.5 for i in range(rows)], [_plain(r) for r in row_labels])
        ax.tick_params(length=0)
        # over the whole figure, wrapped to its width: a few columns make a narrow axes that clipped the title
        fig.suptitle("\n".join(textwrap.wrap(_plain(title), max(20, int(width * 13)))), fontsize=10)
        ax.set_xlabel(_plain(x_label))
        ax.set_ylabel(_plain(y_label))
        # 32 steps of colour: smooth to the eye, and few shapes (matplotlib would embed a long bar as a bitmap)
        bar = fig.colorbar(mesh, ax=ax, label=_plain(value_label), shrink=0.9,
                           boundaries=np.linspace(lo, hi, 33) if hi > lo else None)
        bar.solids.set_rasterized(False)
        _freeze_layout(fig)
    return Chart(fig, {"cells": title})
