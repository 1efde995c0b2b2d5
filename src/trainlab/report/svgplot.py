"""A self-contained SVG line chart for run reports (loss curves, learning rates, memory...).

Hand-written SVG, like heatmap.py: it embeds as-is in Markdown and in a self-contained HTML page, and
costs no dependency.  The chart draws only what it is given: points that cannot be drawn (NaN, inf,
non-positive values on a log axis) are skipped and counted in a note on the chart, never silently
dropped; None and NaN break a line rather than being bridged.

    line_chart({"loss": [(5, 3.2), (10, 3.1)], "val_loss": [(20, 3.3)]}, "loss", "step", "loss",
               hlines=[(3.135, "random baseline ln 23 = 3.135")],
               bands=[(0, 5, "rounds 1"), (5, 10, "rounds 2")],
               markers=[(5, "promotion", "promotion: rounds 1 -> 2")])
"""

from __future__ import annotations

import math
from html import escape as _escape
from typing import Iterable, Mapping, Sequence

# Okabe & Ito's colour-blind-safe palette (yellow last: it is faint on white).
PALETTE = ("#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442")
# After the palette wraps, dashes keep series apart.
DASHES = ("", "6 3", "2 2", "8 3 2 3")
BAND_FILLS = ("#eeeeee", "#dcdcdc")
FONT = 11
CHAR_W = 0.58  # a rough width of one sans-serif character, in font sizes

Point = tuple  # (x, y); y may be None or NaN (a gap)


def escape(text: str) -> str:
    """XML-escaped text; '://' is written with an entity so no URL-looking string is in the file."""
    return _escape(str(text), quote=True).replace("://", ":&#47;&#47;")


def _finite(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _text_w(text: str, size: float = FONT) -> float:
    return len(text) * size * CHAR_W


def _clip_text(text: str, width: float, size: float = FONT) -> str:
    """`text` cut (with an ellipsis) to fit in `width` pixels; '' when not even 2 characters fit."""
    n = int(width / (size * CHAR_W))
    if len(text) <= n:
        return text
    return text[: n - 1] + "\u2026" if n >= 3 else ""


# ---------------------------------------------------------------------------------------- ticks

def _nice(x: float, round_: bool) -> float:
    """Heckbert's nice number: 1, 2, 5 or 10 times a power of ten, near `x` (> 0)."""
    exp = math.floor(math.log10(x))
    f = x / 10.0 ** exp
    if round_:
        nf = 1 if f < 1.5 else 2 if f < 3 else 5 if f < 7 else 10
    else:
        nf = 1 if f <= 1 else 2 if f <= 2 else 5 if f <= 5 else 10
    return nf * 10.0 ** exp


def nice_ticks(lo: float, hi: float, n: int = 5) -> tuple[float, float, list[float]]:
    """An axis (lo', hi', ticks) covering [lo, hi] with about n ticks at nice numbers."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("nice_ticks needs finite bounds")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        pad = abs(lo) * 0.1 or 1.0
        lo, hi = lo - pad, hi + pad
    half_span = hi * 0.5 - lo * 0.5  # never overflows, unlike hi - lo
    if half_span <= 0 or not math.isfinite(half_span):  # lo and hi a float apart
        return lo, hi, [lo, hi]
    step = _nice(_nice(half_span * 2, False) / max(n - 1, 1), True) if math.isfinite(half_span * 2) \
        else _nice(half_span / max((n - 1) / 2, 1), True)
    first, last = math.floor(lo / step), math.ceil(hi / step)
    if last - first > 50 or not (math.isfinite(first * step) and math.isfinite(last * step)):
        return lo, hi, [lo, hi]
    ticks = [k * step for k in range(int(first), int(last) + 1)]
    ticks = [0.0 if abs(t) < step * 1e-9 else t for t in ticks]
    return ticks[0], ticks[-1], ticks


def log_ticks(lo: float, hi: float) -> tuple[float, float, list[float]]:
    """A log axis over [lo, hi] (both > 0): decades, with 2 and 5 between when there are few."""
    a, b = math.floor(math.log10(lo)), math.ceil(math.log10(hi))
    if a == b:
        b += 1
    decades = b - a
    stride = max(1, math.ceil(decades / 8))
    ticks = [10.0 ** e for e in range(a, b + 1, stride)]
    if decades <= 2:
        ticks = sorted(t * m for t in ticks for m in (1, 2, 5) if t * m <= 10.0 ** b)
    return 10.0 ** a, 10.0 ** b, ticks


def fmt_num(v: float, step: float | None = None) -> str:
    """A short label (0.003, 2.5k, 1e-5, 3.142) with the precision a tick step needs."""
    if v == 0:
        return "0"
    if not math.isfinite(v):
        return str(v)
    a = abs(v)
    digits = 4
    if step is not None and step > 0 and math.isfinite(step):
        digits = min(15, max(1, math.floor(math.log10(a)) - math.floor(math.log10(step) + 1e-9) + 1))
    if a >= 1e5 or a < 1e-3:
        mant, _, exp = f"{v:.{digits - 1}e}".partition("e")
        if "." in mant:
            mant = mant.rstrip("0").rstrip(".")
        return f"{mant}e{int(exp)}"
    if step is not None and step > 0:
        if a >= 1000 and step >= 100:
            decimals = max(0, -math.floor(math.log10(step / 1000) + 1e-9))
            return f"{v / 1000:.{decimals}f}k"
        decimals = max(0, -math.floor(math.log10(step) + 1e-9))
        return f"{v:.{min(decimals, 9)}f}"
    if a >= 1000:
        return f"{v:.0f}"
    return f"{v:.4g}"


# ---------------------------------------------------------------------------------------- the chart

def _segments(points: Iterable, log_y: bool, counts: dict) -> list[list[tuple[float, float]]]:
    """Split a series at gaps (None / NaN); count what cannot be drawn."""
    segs: list[list[tuple[float, float]]] = [[]]
    for p in points:
        try:
            x, y = p[0], p[1]
        except (TypeError, IndexError):
            counts["malformed"] = counts.get("malformed", 0) + 1
            continue
        if y is None or x is None:
            if segs[-1]:
                segs.append([])
            continue
        if not (_finite(x) and _finite(y)):
            bad = x if not _finite(x) else y
            key = "NaN" if isinstance(bad, float) and math.isnan(bad) else \
                "inf" if isinstance(bad, (int, float)) and not isinstance(bad, bool) else "malformed"
            counts[key] = counts.get(key, 0) + 1
            if segs[-1]:
                segs.append([])
            continue
        if log_y and y <= 0:
            counts["<=0 on log axis"] = counts.get("<=0 on log axis", 0) + 1
            if segs[-1]:
                segs.append([])
            continue
        segs[-1].append((float(x), float(y)))
    return [s for s in segs if s]


def _thin(seg: list[tuple[float, float]], xmap, budget: int) -> list[tuple[float, float]]:
    """Keep the first, min, max and last point of each pixel column when a segment has far more
    points than pixels: the drawn envelope is the same, the file stays small."""
    if len(seg) <= budget:
        return seg
    out: list[tuple[float, float]] = []
    bucket: list[tuple[float, float]] = []
    col = None
    for p in seg:
        c = int(xmap(p[0]))
        if c != col and bucket:
            lo, hi = min(bucket, key=lambda q: q[1]), max(bucket, key=lambda q: q[1])
            keep = [bucket[0], lo, hi, bucket[-1]]
            for q in sorted(set(keep), key=bucket.index):
                out.append(q)
            bucket = []
        col = c
        bucket.append(p)
    if bucket:
        lo, hi = min(bucket, key=lambda q: q[1]), max(bucket, key=lambda q: q[1])
        for q in sorted(set([bucket[0], lo, hi, bucket[-1]]), key=bucket.index):
            out.append(q)
    return out


def _as_items(series) -> list[tuple[str, list]]:
    if isinstance(series, Mapping):
        return [(str(k), list(v or [])) for k, v in series.items()]
    return [(str(k), list(v or [])) for k, v in series]


def line_chart(series: Mapping[str, Sequence[Point]] | Sequence[tuple[str, Sequence[Point]]], title: str,
               x_label: str, y_label: str, *, hlines: Iterable = (), bands: Iterable = (),
               markers: Iterable = (), log_y: bool = False, width: int = 720, height: int = 260,
               y_range: tuple[float, float] | None = None) -> str:
    """A self-contained SVG line chart.

    series   name -> [(x, y), ...] (or a list of (name, points)); None/NaN in y breaks the line,
             inf/NaN are skipped and counted in a note on the chart
    hlines   (y, label) reference lines, dashed across the plot, named in the legend and labelled
             beside the line where the data leaves room
    bands    (x0, x1, label) shaded x ranges (curriculum phases, say), labelled on tabs above the plot
    markers  (x, label) or (x, label, tooltip) vertical event lines, labelled above the plot in up to
             three rows (a label that fits in none stays a tooltip, <title>)
    log_y    a log10 y axis (values <= 0 are skipped and counted)
    y_range  (lo, hi) that the y axis covers at least (0..1 for accuracies, say)
    """
    items = _as_items(series)
    counts: dict[str, int] = {}
    segs = {name: _segments(points, log_y, counts) for name, points in items}
    hlines = [(float(y), str(label)) for y, label in hlines if _finite(y) and (not log_y or y > 0)]
    bands = [(float(b[0]), float(b[1]), str(b[2]) if len(b) > 2 else "") for b in bands
             if _finite(b[0]) and _finite(b[1])]
    markers = [(float(m[0]), str(m[1]) if len(m) > 1 else "", str(m[2]) if len(m) > 2 else
                (str(m[1]) if len(m) > 1 else "")) for m in markers if _finite(m[0])]

    xs = [p[0] for ss in segs.values() for s in ss for p in s]
    ys = [p[1] for ss in segs.values() for s in ss for p in s]
    has_data = bool(xs)

    # ------------------------------------------------------------------ ranges
    x_all = xs + [b[0] for b in bands] + [b[1] for b in bands] + [m[0] for m in markers]
    if not x_all:
        x_all = [0.0, 1.0]
    y_all = ys + [h[0] for h in hlines]
    if y_range is not None and not log_y:
        y_all += [float(v) for v in y_range if _finite(v)]
    if not y_all:
        y_all = [1.0, 10.0] if log_y else [0.0, 1.0]
    if log_y:
        y0, y1, yticks = log_ticks(min(y_all), max(y_all))
    else:
        y0, y1, yticks = nice_ticks(min(y_all), max(y_all))
    x0, x1, xticks = nice_ticks(min(x_all), max(x_all), 7)
    if xs and min(xs) >= 0 and x0 < 0:
        x0 = 0.0
        xticks = [t for t in xticks if t >= 0]

    # ------------------------------------------------------------------ layout
    ytick_labels = [fmt_num(t, None if log_y else (yticks[1] - yticks[0] if len(yticks) > 1 else None))
                    for t in yticks]
    left = max(44.0, 22 + max(_text_w(t, 10) for t in ytick_labels) + 8)
    right = 16.0
    plot_w = max(width - left - right, 40.0)
    # the legend: the series, then the reference lines (index -1 - k), in rows under the title
    legend_rows: list[list[tuple[int, str, float]]] = [[]]
    cursor = 0.0
    entries = [(i, name) for i, (name, _) in enumerate(items)]
    entries += [(-1 - k, label) for k, (_, label) in enumerate(hlines)]
    for i, name in entries:
        name = _clip_text(name, plot_w - 40)
        w = 26 + _text_w(name) + 14
        if cursor + w > plot_w and legend_rows[-1]:
            legend_rows.append([])
            cursor = 0.0
        legend_rows[-1].append((i, name, cursor))
        cursor += w
    if not entries:
        legend_rows = []
    legend_at = {i: (24 + 15 * r + 8, left + dx, name) for r, row in enumerate(legend_rows) for i, name, dx in row}

    def X(x: float) -> float:
        return left + (x * 0.5 - x0 * 0.5) / (x1 * 0.5 - x0 * 0.5) * plot_w if x1 > x0 else left + plot_w / 2

    # event-marker labels sit in rows above the plot (never over the data), a label that fits in no
    # row stays a tooltip; the band labels sit in one row just above the plot, on tabs of the band colour
    marker_layout: list[tuple[float, str, str, str, int]] = []  # (px, label, tooltip, anchor, row or -1)
    row_ends: list[float] = []
    for x, label, tip in sorted(markers, key=lambda m: m[0]):
        if not x0 <= x <= x1:
            continue
        px = X(x)
        shown = _clip_text(label, 140, 10)
        w = _text_w(shown, 10)
        anchor = "start" if px + 3 + w <= left + plot_w else "end"
        span = (px, px + 3 + w) if anchor == "start" else (px - 3 - w, px)
        row = -1
        if shown and span[0] >= left - 30:
            for r in range(3):
                if r == len(row_ends):
                    row_ends.append(-1e9)
                if span[0] > row_ends[r] + 6:
                    row, row_ends[r] = r, span[1]
                    break
        marker_layout.append((px, shown if row >= 0 else "", tip or label, anchor, row))
    n_marker_rows = max((m[4] + 1 for m in marker_layout), default=0)
    legend_h = 15 * len(legend_rows)
    marker_top = 24 + legend_h + 4
    band_row = 14 if bands else 0
    top = marker_top + 12 * n_marker_rows + band_row + 4
    skipped = sum(counts.values())
    notes = []
    if skipped:
        notes.append(f"{skipped} point{'s' if skipped != 1 else ''} not drawn: " +
                     ", ".join(f"{n} {k}" for k, n in sorted(counts.items())))
    empty = [name for name, ss in segs.items() if not ss]
    if has_data and empty:
        notes.append("no drawable points: " + ", ".join(empty))
    bottom = 44 + 13 * len(notes)
    plot_h = max(height - top - bottom, 40.0)
    height = int(round(top + plot_h + bottom))

    if log_y:
        ly0, ly1 = math.log10(y0), math.log10(y1)

        def Y(y: float) -> float:
            return top + plot_h - (math.log10(y) - ly0) / (ly1 - ly0) * plot_h
    else:
        def Y(y: float) -> float:
            return top + plot_h - (y * 0.5 - y0 * 0.5) / (y1 * 0.5 - y0 * 0.5) * plot_h if y1 > y0 \
                else top + plot_h / 2

    def f(v: float) -> str:
        return f"{v:.1f}"

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="{FONT}" role="img">',
           f"<title>{escape(title)}</title>",
           f'<rect x="0" y="0" width="{width}" height="{height}" fill="#ffffff"/>',
           f'<text x="{f(left)}" y="16" font-size="13" font-weight="bold">'
           f'{escape(_clip_text(title, width - left, 13))}</text>']

    # bands under everything, each with a tab above the plot holding its label
    for k, (b0, b1, label) in enumerate(bands):
        a, b = sorted((X(min(max(b0, x0), x1)), X(min(max(b1, x0), x1))))
        if b - a <= 0:
            continue
        fill = BAND_FILLS[k % 2]
        out.append(f'<g class="band"><title>{escape(label)} (x {fmt_num(b0)} to {fmt_num(b1)})</title>'
                   f'<rect x="{f(a)}" y="{f(top - band_row)}" width="{f(b - a)}" height="{f(plot_h + band_row)}" '
                   f'fill="{fill}"/>')
        shown = _clip_text(label, b - a - 5, 10)
        if shown:
            out.append(f'<text x="{f(a + 3)}" y="{f(top - 4)}" font-size="10" fill="#444444">{escape(shown)}</text>')
        out.append("</g>")

    # grid and axes
    for t, label in zip(yticks, ytick_labels):
        y = Y(t)
        out.append(f'<line x1="{f(left)}" x2="{f(left + plot_w)}" y1="{f(y)}" y2="{f(y)}" stroke="#e3e3e3"/>')
        out.append(f'<text x="{f(left - 5)}" y="{f(y + 3.5)}" text-anchor="end" font-size="10">{escape(label)}</text>')
    xstep = xticks[1] - xticks[0] if len(xticks) > 1 else None
    last_right = -1e9
    for t in xticks:
        x = X(t)
        label = fmt_num(t, xstep)
        w = _text_w(label, 10)
        out.append(f'<line x1="{f(x)}" x2="{f(x)}" y1="{f(top + plot_h)}" y2="{f(top + plot_h + 4)}" '
                   f'stroke="#444444"/>')
        if x - w / 2 > last_right + 4:  # never print two tick labels on top of each other
            out.append(f'<text x="{f(x)}" y="{f(top + plot_h + 15)}" text-anchor="middle" font-size="10">'
                       f'{escape(label)}</text>')
            last_right = x + w / 2
    out.append(f'<rect x="{f(left)}" y="{f(top)}" width="{f(plot_w)}" height="{f(plot_h)}" fill="none" '
               f'stroke="#444444"/>')
    out.append(f'<text x="{f(left + plot_w / 2)}" y="{f(top + plot_h + 31)}" text-anchor="middle">'
               f'{escape(x_label)}</text>')
    yl = y_label + (" (log scale)" if log_y else "")
    out.append(f'<text transform="translate(13 {f(top + plot_h / 2)}) rotate(-90)" text-anchor="middle">'
               f'{escape(_clip_text(yl, plot_h + 20))}</text>')

    # where the data is drawn, on a grid of 4-px cells: reference-line labels go where it is not
    thinned = {name: [_thin(seg, X, int(plot_w) * 4) for seg in segs[name]] for name, _ in items}
    busy: set[tuple[int, int]] = set()
    for pieces in thinned.values():
        for pts in pieces:
            pix = [(X(x), Y(y)) for x, y in pts]
            busy.update((int(px // 4), int(py // 4)) for px, py in pix)
            for (ax, ay), (bx, by) in zip(pix, pix[1:]):
                n = int(max(abs(bx - ax), abs(by - ay)) // 3)
                for k in range(1, n):
                    busy.add((int((ax + (bx - ax) * k / n) // 4), int((ay + (by - ay) * k / n) // 4)))

    def crowd(x_a: float, x_b: float, y_a: float, y_b: float) -> int:
        return sum((cx, cy) in busy for cx in range(int(x_a // 4), int(x_b // 4) + 1)
                   for cy in range(int(y_a // 4), int(y_b // 4) + 1))

    # reference lines: each is named in the legend, and labelled on the plot too where a spot at its
    # right end, left end or middle (above or below the line) is free of data
    placed: list[tuple[float, float, float, float]] = []
    for k, (y, label) in enumerate(hlines):
        py = Y(y)
        out.append(f'<g class="hline"><title>{escape(label)}</title>'
                   f'<line x1="{f(left)}" x2="{f(left + plot_w)}" y1="{f(py)}" y2="{f(py)}" stroke="#333333" '
                   f'stroke-width="1.2" stroke-dasharray="7 4"/>')
        ly, lx, legend_name = legend_at[-1 - k]
        out.append(f'<line x1="{f(lx)}" x2="{f(lx + 20)}" y1="{f(ly - 4)}" y2="{f(ly - 4)}" stroke="#333333" '
                   f'stroke-width="1.2" stroke-dasharray="7 4"/>')
        out.append(f'<text x="{f(lx + 25)}" y="{f(ly)}">{escape(legend_name)}</text>')
        shown = _clip_text(label, plot_w - 8)
        w = _text_w(shown)
        best = None
        for xa, anchor in ((left + plot_w - 4 - w, "end"), (left + 4, "start"), (left + (plot_w - w) / 2, "middle")):
            for ty in (py - 4, py + 12):
                if ty - 10 < top or ty + 2 > top + plot_h:
                    continue
                box = (xa, xa + w, ty - 10, ty + 2)
                if any(box[0] < p[1] and p[0] < box[1] and box[2] < p[3] and p[2] < box[3] for p in placed):
                    continue
                score = crowd(*box)
                if best is None or score < best[0]:
                    best = (score, xa, anchor, ty, box)
        if best is not None and best[0] <= 2:
            _, xa, anchor, ty, box = best
            placed.append(box)
            tx = {"end": xa + w, "start": xa, "middle": xa + w / 2}[anchor]
            out.append(f'<text x="{f(tx)}" y="{f(ty)}" text-anchor="{anchor}" fill="#333333" '
                       f'stroke="#ffffff" stroke-width="3" paint-order="stroke">{escape(shown)}</text>')
        out.append("</g>")

    # event markers
    for px, shown, tip, anchor, row in marker_layout:
        ty = marker_top + 10 + 12 * row
        y_start = ty - 9 if row >= 0 else top
        out.append(f'<g class="marker"><title>{escape(tip)}</title>'
                   f'<line x1="{f(px)}" x2="{f(px)}" y1="{f(y_start)}" y2="{f(top + plot_h)}" stroke="#7f3f98" '
                   f'stroke-width="1.2" stroke-dasharray="3 3"/>')
        if shown:
            tx = px + 3 if anchor == "start" else px - 3
            out.append(f'<text x="{f(tx)}" y="{f(ty)}" font-size="10" fill="#7f3f98" text-anchor="{anchor}">'
                       f'{escape(shown)}</text>')
        out.append("</g>")

    # the series
    for i, (name, _) in enumerate(items):
        colour = PALETTE[i % len(PALETTE)]
        dash = DASHES[(i // len(PALETTE)) % len(DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        n_points = sum(len(s) for s in segs[name])
        out.append(f'<g class="series"><title>{escape(name)}</title>')
        for pts in thinned[name]:
            if len(pts) > 1:
                coords = " ".join(f"{f(X(x))},{f(Y(y))}" for x, y in pts)
                out.append(f'<polyline points="{coords}" fill="none" stroke="{colour}" stroke-width="1.6" '
                           f'stroke-linejoin="round"{dash_attr}/>')
            if len(pts) == 1 or n_points <= 60:  # few points: show each one (an isolated one is a dot)
                for x, y in pts:
                    out.append(f'<circle cx="{f(X(x))}" cy="{f(Y(y))}" r="2.4" fill="{colour}">'
                               f'<title>{escape(name)}: x {fmt_num(x)}, y {y:.6g}</title></circle>')
        out.append("</g>")

    if not has_data:
        out.append(f'<text x="{f(left + plot_w / 2)}" y="{f(top + plot_h / 2)}" text-anchor="middle" '
                   f'fill="#888888" font-size="13">no data to draw</text>')

    # legend of the series (the reference lines' entries are drawn in their own group above)
    for i, (name, _) in enumerate(items):
        y, lx, shown = legend_at[i]
        colour = PALETTE[i % len(PALETTE)]
        dash = DASHES[(i // len(PALETTE)) % len(DASHES)]
        dash_attr = f' stroke-dasharray="{dash}"' if dash else ""
        out.append(f'<line x1="{f(lx)}" x2="{f(lx + 20)}" y1="{f(y - 4)}" y2="{f(y - 4)}" stroke="{colour}" '
                   f'stroke-width="2.5"{dash_attr}/>')
        out.append(f'<text x="{f(lx + 25)}" y="{f(y)}">{escape(shown)}</text>')

    for k, note in enumerate(notes):
        out.append(f'<text x="{f(left)}" y="{f(top + plot_h + 44 + 13 * k)}" font-size="10" fill="#a0522d">'
                   f'note: {escape(note)}</text>')
    out.append("</svg>")
    return "\n".join(out) + "\n"
