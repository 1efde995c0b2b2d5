"""The HTML writer of the document model: a self-contained page (report.html, sweep_report.html)
whose CSS and pictures are inlined -- no script, no external resource, nothing that loads.

`inline_svg` turns an SVG document into a fragment safe to inline; every picture goes through it,
matplotlib's own and any SVG file found in plots/."""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from html import escape as _escape
from typing import Any

from trainlab.report.document import Code, Figure, Heading, Para, Strong, Table

_WS = re.compile(r"\s+")
_NUMERIC = re.compile(r"^-?[\d.]+(e-?\d+)?( \(step \d+\))?$")

CSS = """
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
figure svg * { stroke-linejoin: round; stroke-linecap: butt; }
figcaption { font-size: 12px; color: #555; margin-top: 2px; }
p.missing { color: #8a4b08; font-style: italic; }
p.note { font-size: 13px; color: #555; }
td.v-pass { background: #d9f0e3; } td.v-warn { background: #fbe8c8; } td.v-fail { background: #f8d0d0; }
td.v-info { background: #e6eef8; } td.v-not-measured { color: #777; font-style: italic; }
p.verdict { font-size: 16px; padding: 8px 12px; border-left: 6px solid #999; background: #f2f2f2; }
p.v-ready { border-color: #2e8b57; background: #d9f0e3; } p.v-not-ready { border-color: #c0392b; background: #f8d0d0; }
p.v-uncertain { border-color: #d68910; background: #fbe8c8; }
"""


def escape(text: str) -> str:
    """HTML-escaped text on one line; '://' is written as an entity so no URL-looking string ends up
    in the page."""
    return _escape(_WS.sub(" ", str(text)), quote=True).replace("://", ":&#47;&#47;")


def _piece(text: str) -> str:
    if isinstance(text, Code) and str(text):
        return f"<code>{escape(text)}</code>"
    if isinstance(text, Strong) and str(text):
        return f"<strong>{escape(text)}</strong>"
    return escape(text)


def _rich(x: Any) -> str:
    return "".join(_piece(p) for p in x) if isinstance(x, list) else _piece(x)


def to_html(blocks: list, title: str) -> str:
    out = ["<!DOCTYPE html>", '<html lang="en">', "<head>", '<meta charset="utf-8">',
           f"<title>{escape(title)}</title>", f"<style>{CSS}</style>", "</head>", "<body>"]
    for b in blocks:
        if isinstance(b, Heading):
            out.append(f"<h{b.level}>{escape(b.text)}</h{b.level}>")
        elif isinstance(b, Para):
            css = f' class="{b.css}"' if b.css else ""
            out.append(f"<p{css}>{_rich(b.text)}</p>")
        elif isinstance(b, Table):
            css = f' class="{b.css}"' if b.css else ""
            out.append(f"<table{css}>")
            out.append("<tr>" + "".join(f"<th>{escape(x)}</th>" for x in b.headers) + "</tr>")
            for row in b.rows:
                cells = []
                for j, c in enumerate(row):
                    cls = []
                    if b.css == "verdicts" and j == 1:
                        cls.append("v-" + str(c).replace(" ", "-"))
                    if b.css == "numbers" and j > 0 and isinstance(c, str) and _NUMERIC.match(c):
                        cls.append("num")
                    attr = f' class="{" ".join(cls)}"' if cls else ""
                    cells.append(f"<td{attr}>{_rich(c)}</td>")
                out.append("<tr>" + "".join(cells) + "</tr>")
            out.append("</table>")
        elif isinstance(b, Figure):
            out.append(f'<figure id="{escape(b.name)}">')
            out.append(b.svg.strip())
            where = f"<code>plots/{escape(b.name)}</code>" + (f" (PNG: <code>plots/{escape(b.png)}</code>)"
                                                              if b.png else "")
            caption = f": {escape(b.caption)}" if b.caption else ""
            out.append(f"<figcaption>{where}{caption}</figcaption></figure>")
    out += ["</body>", "</html>"]
    return "\n".join(out) + "\n"


# ---------------------------------------------------------------------------------------- inline SVG
# Our own code, because no library does this: matplotlib writes an SVG *document* -- an XML prolog,
# a DOCTYPE naming a URL, a <style> whose `*` rule would restyle the whole page once inlined, and
# markers and clip paths referenced by id (ids that clash between the figures of one page) -- and a
# file in plots/ may hold anything (a copied or hand-edited run directory).  What is kept: plain
# drawing elements, attributes that reference nothing; a <use> becomes a copy of what it references,
# and clip paths are dropped (every figure here draws inside its axes).  The tests show both: a
# report's page holds no URL, script or reference, and a hostile SVG in plots/ is defused.

_SVG_NS = "http://www.w3.org/2000/svg"
_DRAWING = {"svg", "g", "rect", "text", "tspan", "title", "desc", "line", "polyline", "polygon", "path",
            "circle", "ellipse"}
_NAME = re.compile(r"[A-Za-z_][-A-Za-z0-9_.]*")
_MAX_USE_DEPTH = 1  # a <use> inside what a <use> copies is dropped: matplotlib never nests them, and
# a hostile file could nest them to blow the page up exponentially


def _local(name: str) -> str:
    return name.rsplit("}", 1)[-1]


def _text(text: str | None) -> str:
    """Text of an element, escaped; '://' as entities, like all text of the page (event details in a
    tooltip may quote a URL)."""
    return _escape(text or "", quote=False).replace("://", ":&#47;&#47;")


def inline_svg(text: str) -> str | None:
    """The drawing of an SVG document as a fragment safe to put into an HTML page; None when it is
    not a well-formed SVG document."""
    try:
        root = ET.fromstring(text)
    except ET.ParseError:
        return None
    if _local(root.tag) != "svg":
        return None
    by_id = {el.get("id"): el for el in root.iter() if el.get("id")}

    def attrs(el: ET.Element, skip: tuple[str, ...] = ()) -> str:
        parts = []
        for key, value in el.attrib.items():
            name, low = _local(key), value.lower()
            if (name in skip or name == "id" or name.lower().startswith("on") or "href" in name.lower()
                    or not _NAME.fullmatch(name) or "url(" in low or "://" in low or "javascript:" in low):
                continue
            parts.append(f' {name}="{_escape(value, quote=True)}"')
        return "".join(parts)

    def walk(el: ET.Element, depth: int = 0) -> str:
        tag = _local(el.tag)
        if tag == "use":
            ref = el.get("href") or el.get("{http://www.w3.org/1999/xlink}href") or ""
            target = by_id.get(ref[1:]) if ref.startswith("#") else None
            if target is None or depth >= _MAX_USE_DEPTH:
                return ""
            # a <use>'s x and y translate after its own transform
            shift = f"{el.get('transform', '')} translate({el.get('x', '0')} {el.get('y', '0')})".strip()
            if any(bad in shift.lower() for bad in ("url(", "://", "javascript:")):
                return ""
            return (f'<g transform="{_escape(shift, quote=True)}"'
                    f"{attrs(el, skip=('x', 'y', 'width', 'height', 'transform'))}>{walk(target, depth + 1)}</g>")
        if tag not in _DRAWING:
            return ""
        inner = _text(el.text)
        for child in el:
            inner += walk(child, depth) + _text(child.tail)
        head = f' xmlns="{_SVG_NS}"' if el is root else ""
        return f"<{tag}{head}{attrs(el)}>{inner}</{tag}>"

    return walk(root)
