#!/usr/bin/env python3
"""Write the bitnet_lm experiment's embedded corpus: English prose that ships with CPython.

Why this text: trainlab must never download data at run time, and the language-model experiment
needs real natural language by default.  Every Python carries two large bodies of English prose --
the reference manual's topics (pydoc_data.topics, the text `help("if")` prints) and the docstrings of
the standard library.  Their wording differs between Python versions, so the corpus is a snapshot
taken once (by this script) and committed, which makes a run reproducible on any Python.

Kept: every pydoc topic, and every module/class/function docstring of the standard library longer
than 200 characters (tests, idlelib and lib2to3 left out), in sorted order, separated by blank lines.
Licence: Python Software Foundation License (the CPython sources); see corpus/NOTICE.

Usage: python3 scripts/make_corpus.py   (rewrites the .txt.gz and prints its sha256)
"""

from __future__ import annotations

import ast
import gzip
import hashlib
import sys
import sysconfig
from pathlib import Path

OUT = Path(__file__).resolve().parent.parent / "src/trainlab/experiments/bitnet_lm/corpus/python_docs.txt.gz"
SKIP_PARTS = {"test", "tests", "idlelib", "lib2to3", "site-packages", "dist-packages"}
MIN_DOCSTRING = 200


def stdlib_docstrings() -> list[str]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out = []
    for path in sorted(root.rglob("*.py")):
        if SKIP_PARTS & set(path.relative_to(root).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > MIN_DOCSTRING:
                    out.append(doc.strip())
    return out


def main() -> int:
    import pydoc_data.topics

    topics = [pydoc_data.topics.topics[k].strip() for k in sorted(pydoc_data.topics.topics)]
    text = "\n\n".join(topics + stdlib_docstrings()) + "\n"
    data = text.encode("utf-8")
    # mtime=0: the same text gives the same bytes, so the committed file only changes with its text
    OUT.write_bytes(gzip.compress(data, compresslevel=9, mtime=0))
    print(f"{OUT}: {len(data)} bytes of text from Python {sys.version.split()[0]}, "
          f"sha256 {hashlib.sha256(data).hexdigest()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
