"""The document model of the reports: a list of blocks that trainlab.report.markdown and
trainlab.report.html each render, so report.md and report.html never say different things.

Text in a block is plain text (the writers escape it) or a list mixing plain text, `Code` and
`Strong`."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Union


class Code(str):
    """Text shown as code (column names, event kinds, paths)."""


class Strong(str):
    """Text shown in bold (a verdict that a reader must see first)."""


Text = Union[str, list]  # plain text, Code, Strong, or a list of them


@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Para:
    text: Text
    css: str = ""  # "missing" (something not measured), "note" (how a number was read), "verdict v-..."


@dataclass
class Table:
    headers: list[str]
    rows: list[list[Text]]
    css: str = ""  # "header", "verdicts" or "numbers": how report.html styles it


@dataclass
class Figure:
    """A picture in plots/: Markdown links to the file, HTML inlines `svg` (already safe to inline)."""

    name: str  # file name under plots/
    svg: str
    caption: str
    alt: str = ""
    png: str = ""  # the PNG beside it, for pasting elsewhere, when there is one
