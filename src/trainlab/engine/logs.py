"""metrics.csv (append-only) and events.jsonl.

metrics.csv is never rewritten.  A resumed run appends rows with a higher `attempt`; steps that
were logged before a crash and computed again after the resume appear twice, and a reader keeping
the last row per step (`read_metrics`) gets the true history.  A half-written last row left by a
kill is cut off before appending (a torn number could otherwise parse as a wrong value); its bytes
go into events.jsonl, so nothing is lost.  Readers skip lines that do not parse.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import time
from pathlib import Path
from typing import Any

METRICS_FILE = "metrics.csv"
EVENTS_FILE = "events.jsonl"
ARRAYS_FILE = "eval_arrays.jsonl"  # non-scalar evaluation outputs (per-bit accuracy maps, ...)
SAMPLES_FILE = "samples.jsonl"  # what a model produced at each evaluation (generated text, ...)


def _close_partial_line(path: Path) -> None:
    """If a kill left a line without its newline, end it so the next row starts cleanly."""
    if path.exists() and path.stat().st_size:
        with open(path, "rb") as fh:
            fh.seek(-1, os.SEEK_END)
            last = fh.read(1)
        if last != b"\n":
            with open(path, "ab") as fh:
                fh.write(b"\n")


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 1e15:
            return str(int(value))
        return repr(value) if not math.isfinite(value) else f"{value:.8g}"
    return str(value)


def _cut_torn_tail(path: Path) -> str:
    """Remove the bytes after the last newline (a row a kill tore); return them."""
    if not path.exists():
        return ""
    with open(path, "rb+") as fh:
        data = fh.read()
        if not data or data.endswith(b"\n"):
            return ""
        keep = data.rfind(b"\n") + 1
        fh.truncate(keep)
        return data[keep:].decode("utf-8", errors="replace")


class MetricsLog:
    def __init__(self, run_dir: Path, columns: list[str]):
        self.path = run_dir / METRICS_FILE
        self.torn_tail = _cut_torn_tail(self.path)
        existing = read_header(self.path)
        self.dropped: set[str] = set()
        if existing:
            self.columns = existing  # a run keeps its header; new columns are reported, not added
            self.dropped = set(columns) - set(existing)
        else:
            self.columns = list(columns)
            with open(self.path, "a", encoding="utf-8", newline="") as fh:
                fh.write(",".join(self.columns) + "\n")
                fh.flush()
                os.fsync(fh.fileno())
        self._fh = open(self.path, "a", encoding="utf-8", newline="")

    def write(self, row: dict[str, Any]) -> None:
        line = ",".join(_fmt(row.get(c)) for c in self.columns) + "\n"
        self._fh.write(line)  # one write() per row, so a kill leaves at most one partial line
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


def read_header(path: Path) -> list[str] | None:
    try:
        with open(path, encoding="utf-8", newline="") as fh:
            first = fh.readline()
    except FileNotFoundError:
        return None
    if not first.endswith("\n"):
        return None
    return next(csv.reader([first.strip()]))


def _num(text: str) -> Any:
    if text == "":
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text


def read_rows(path: Path) -> list[dict[str, Any]]:
    """Every well-formed row in file order (torn or foreign lines skipped)."""
    header = read_header(path)
    if not header:
        return []
    rows = []
    with open(path, encoding="utf-8", newline="") as fh:
        fh.readline()
        for line in fh:
            if not line.endswith("\n"):
                continue  # a line torn by a kill
            values = next(csv.reader(io.StringIO(line)), [])
            if len(values) != len(header):
                continue
            row = {k: _num(v) for k, v in zip(header, values)}
            if not isinstance(row.get("step"), int):
                continue
            rows.append(row)
    return rows


def last_row_per_step(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The true history of rows as written (a resumed run rewrites steps): the last row written for
    each step, in step order."""
    last: dict[int, dict] = {}
    for row in rows:
        last[row["step"]] = row
    return [last[s] for s in sorted(last)]


def read_metrics(path: Path) -> list[dict[str, Any]]:
    """The true history of a metrics.csv (last_row_per_step of its rows)."""
    return last_row_per_step(read_rows(path))


class EventLog:
    """JSON lines, append-only; also used for eval_arrays.jsonl."""

    def __init__(self, run_dir: Path, name: str = EVENTS_FILE):
        self.path = run_dir / name
        _close_partial_line(self.path)
        self._fh = open(self.path, "a", encoding="utf-8")

    def write(self, event: dict[str, Any]) -> None:
        record = {"time": round(time.time(), 3), **event}
        self._fh.write(json.dumps(record, default=str) + "\n")
        self._fh.flush()

    def close(self) -> None:
        self._fh.close()


class NullLog:
    """What a rank other than 0 writes to: nothing (rank 0 keeps the run directory's logs)."""

    def __init__(self, run_dir: Path, name: str = EVENTS_FILE):
        self.path = run_dir / name
        self.torn_tail, self.dropped = "", set()

    def write(self, record: dict[str, Any]) -> None:
        pass

    def close(self) -> None:
        pass


def read_events(path: Path) -> list[dict[str, Any]]:
    out = []
    try:
        with open(path, encoding="utf-8") as fh:
            for line in fh:
                try:
                    record = json.loads(line)
                except ValueError:
                    continue
                if isinstance(record, dict):
                    out.append(record)
    except FileNotFoundError:
        pass
    return out
