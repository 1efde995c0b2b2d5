"""The Markdown writer of the document model: report.md, sweep_report.md.

Text from files (event details, claims, column names) is escaped so that none of it becomes
emphasis, a link, HTML or a table-cell boundary; figures are image links to their files in plots/."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import quote

from trainlab.report.document import Code, Figure, Heading, Para, Strong, Table

_WS = re.compile(r"\s+")
_SPECIAL = re.compile(r"([\\`*_\[\]<>|&~#])")


def escape(text: str) -> str:
    """Markdown-escaped text on one line."""
    return _SPECIAL.sub(r"\\\1", _WS.sub(" ", str(text)))


def _piece(text: str) -> str:
    if isinstance(text, Code):
        body = _WS.sub(" ", str(text)).strip().replace("|", "\\|")
        if not body:
            return ""
        return f"`` {body} ``" if "`" in body else f"`{body}`"
    if isinstance(text, Strong):
        body = escape(text).strip()
        return f"**{body}**" if body else ""
    return escape(text)


def _rich(x: Any) -> str:
    return "".join(_piece(p) for p in x) if isinstance(x, list) else _piece(x)


def to_markdown(blocks: list) -> str:
    out: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            out += [f"{'#' * b.level} {escape(b.text)}", ""]
        elif isinstance(b, Para):
            out += [_rich(b.text), ""]
        elif isinstance(b, Table):
            out.append("| " + " | ".join(escape(h) for h in b.headers) + " |")
            out.append("|" + "---|" * len(b.headers))
            out += ["| " + " | ".join(_rich(c) for c in row) + " |" for row in b.rows]
            out.append("")
        elif isinstance(b, Figure):
            where = f"`plots/{b.name}`" + (f" (PNG: `plots/{b.png}`)" if b.png else "")
            out += [f"![{escape(b.alt or b.name)}](plots/{quote(b.name)})", "",
                    where + (f": {escape(b.caption)}" if b.caption else ""), ""]
    return "\n".join(out).rstrip() + "\n"
