"""A self-contained SVG heatmap for 2-D evaluation arrays (per-bit accuracy maps and the like).

SVG rather than a plotting library: the picture is a grid of coloured cells with labels, it embeds
as-is in Markdown and HTML reports, and it costs no dependency."""

from __future__ import annotations

from html import escape


def _colour(value: float, lo: float, hi: float) -> str:
    """White at `lo` to dark blue at `hi` (readable in print and for colour-blind readers)."""
    t = 0.0 if hi <= lo else min(max((value - lo) / (hi - lo), 0.0), 1.0)
    r, g, b = (int(round(255 + (c - 255) * t)) for c in (8, 48, 107))
    return f"#{r:02x}{g:02x}{b:02x}"


def svg_heatmap(values: list[list[float]], title: str, row_labels: list[str] | None = None,
                col_labels: list[str] | None = None, lo: float = 0.5, hi: float = 1.0, cell: int = 18) -> str:
    rows, cols = len(values), len(values[0]) if values else 0
    row_labels = row_labels or [str(i) for i in range(rows)]
    col_labels = col_labels or [str(j) for j in range(cols)]
    left, top = 40, 44
    width, height = left + cols * cell + 70, top + rows * cell + 30
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'font-family="sans-serif" font-size="10">',
             f'<text x="{left}" y="16" font-size="13">{escape(title)}</text>']
    for j, label in enumerate(col_labels):
        if j % 4 == 0 or j == cols - 1:
            parts.append(f'<text x="{left + j * cell + cell / 2}" y="{top - 6}" text-anchor="middle">{escape(label)}</text>')
    for i, row in enumerate(values):
        y = top + i * cell
        parts.append(f'<text x="{left - 6}" y="{y + cell * 0.7}" text-anchor="end">{escape(row_labels[i])}</text>')
        for j, v in enumerate(row):
            parts.append(f'<rect x="{left + j * cell}" y="{y}" width="{cell}" height="{cell}" '
                         f'fill="{_colour(v, lo, hi)}"><title>{escape(row_labels[i])}[{escape(col_labels[j])}] = '
                         f'{v:.4f}</title></rect>')
    # the legend: lo .. hi
    lx = left + cols * cell + 12
    for k in range(10):
        v = lo + (hi - lo) * (9 - k) / 9
        parts.append(f'<rect x="{lx}" y="{top + k * rows * cell / 10}" width="12" height="{rows * cell / 10 + 0.5}" '
                     f'fill="{_colour(v, lo, hi)}"/>')
    parts.append(f'<text x="{lx + 16}" y="{top + 8}">{hi:g}</text>')
    parts.append(f'<text x="{lx + 16}" y="{top + rows * cell}">{lo:g}</text>')
    parts.append("</svg>")
    return "\n".join(parts) + "\n"
