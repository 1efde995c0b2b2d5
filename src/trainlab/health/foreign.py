"""Logs that trainlab did not write: a CSV file, JSON Lines, a JSON file, a TensorBoard directory.

Read into rows the detectors take (health/detectors.py reads `step`, `loss`, `acc`, `val_acc`,
`val_loss`, `grad_norm`): each role's column is found by its common names (ROLES) or named
explicitly, and renamed to the detectors' name; every other column keeps its own.

    reader = open_log(Path("logs/training.log"))       # format from the name and the first bytes
    raw = reader.read_new(final=True)                   # every row, the writer is done
    roles = resolve_roles(reader.columns, {"loss": "train/loss"})
    rows = merge_steps(to_detector_rows(raw, roles, reader.notes))

The readers are incremental for a log that is still being written (`trainlab watch`): each
`read_new()` returns the rows appended since the previous call and keeps a last line without its
newline for the next one; `read_new(final=True)` says the writer is done, so such a line is torn
(a kill mid-write) and reported, never parsed into a wrong number.  The one-shot check reads
through the same code.

Standard library only at import; tensorboard is imported when a TensorBoard log is opened.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
from abc import ABC, abstractmethod
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from trainlab.errors import UsageError, brief
from trainlab.formatting import format_number

FORMATS = ("csv", "jsonl", "json", "tensorboard")
TB_EVENT_PREFIX = "events.out.tfevents."

# role (the name the detectors read) -> the column names that fill it, most specific first; matched
# exactly, then ignoring case
ROLES: dict[str, tuple[str, ...]] = {
    "step": ("step", "global_step", "iteration", "iter", "epoch"),
    "loss": ("loss", "train_loss", "train/loss", "training_loss", "loss/train", "train_loss_step"),
    "val_loss": ("val_loss", "eval_loss", "val/loss", "validation_loss", "valid_loss", "loss/val", "eval/loss"),
    "acc": ("acc", "accuracy", "train_acc", "train_accuracy", "train/acc", "train/accuracy"),
    "val_acc": ("val_acc", "eval_accuracy", "val/acc", "val_accuracy", "eval_acc", "valid_acc", "eval/accuracy"),
    "grad_norm": ("grad_norm", "train/grad_norm", "gradient_norm"),
    "lr": ("lr", "learning_rate", "train/learning_rate"),
}
# the command-line flag that names each role's column explicitly
ROLE_FLAGS = {"step": "--step-col", "loss": "--loss-col", "val_loss": "--val-loss-col", "acc": "--train-metric",
              "val_acc": "--val-metric", "grad_norm": "--grad-norm-col", "lr": "--lr-col"}
REQUIRED_ROLES = ("step", "loss")  # without a step nothing is ordered; without a loss no detector but nonfinite judges


@dataclass
class ReadNotes:
    """What a reader left out, for the claims: nothing is skipped silently."""

    torn: str = ""  # the bytes of a last line without its newline, once the writer is done
    malformed: int = 0  # lines that did not parse (wrong number of cells, not a JSON object)
    repeated_headers: int = 0  # a CSV header written again (a script restarted and appending)
    text_cells: Counter = field(default_factory=Counter)  # column -> cells that are not numbers
    numeric_cells: Counter = field(default_factory=Counter)  # column -> cells that are numbers
    rows_without_step: int = 0
    rewritten: int = 0  # times the file shrank or was replaced: read again from its start
    dropped: dict[str, str] = field(default_factory=dict)  # column -> why it is not in the rows

    def lines(self) -> list[str]:
        """One line per thing left out, in words."""
        out = []
        if self.torn:
            shown = self.torn if len(self.torn) <= 60 else self.torn[:57] + "..."
            out.append(f"last line torn, ignored: {shown!r} (no newline at the end: the writer was stopped mid-line)")
        if self.malformed:
            out.append(f"{self.malformed} malformed line{'s' if self.malformed != 1 else ''} skipped")
        if self.repeated_headers:
            out.append(f"header written again {self.repeated_headers} time{'s' if self.repeated_headers != 1 else ''} "
                       "(restarts), skipped")
        for col, n in self.text_cells.items():
            if self.numeric_cells[col]:  # a column of text (a phase name, say) is data, not a fault
                out.append(f"{col}: {n} non-numeric cell{'s' if n != 1 else ''} skipped")
        if self.rows_without_step:
            out.append(f"{self.rows_without_step} row{'s' if self.rows_without_step != 1 else ''} without a step "
                       "value skipped")
        if self.rewritten:
            out.append(f"the file was rewritten {self.rewritten} time{'s' if self.rewritten != 1 else ''} while "
                       "read: read again from its start")
        out += [f"column {c} not used: {why}" for c, why in self.dropped.items()]
        return out


def cell(value: Any) -> Any:
    """A cell as the detectors take it: int or float (NaN and inf strings become non-finite floats,
    which the nonfinite detector must see), None for an empty cell, the text otherwise."""
    if value is None or isinstance(value, bool):
        return None if value is None else str(value)
    if isinstance(value, (int, float)):
        return value
    if not isinstance(value, str):
        return str(value)
    text = value.strip()
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        pass
    try:
        return float(text)  # "nan", "inf", "-Infinity", "1e-3"
    except ValueError:
        return text


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


class LogReader(ABC):
    """Rows of a log as its writer wrote them (column names its own), read incrementally."""

    fmt = ""

    def __init__(self, path: Path):
        self.path = path
        self.notes = ReadNotes()
        self.columns: list[str] = []  # every column seen so far, in first-seen order
        self._known: set[str] = set()
        self.rows_read = 0

    def _seen(self, row: dict) -> dict:
        for k in row:
            if k not in self._known:
                self._known.add(k)
                self.columns.append(k)
        self.rows_read += 1
        return row

    @abstractmethod
    def read_new(self, final: bool = False) -> list[dict]:
        """The rows appended since the last call.  final=True: the writer is done, so a last line
        without its newline is torn (reported in notes, not parsed)."""


class _LineReader(LogReader):
    """A text log written line by line: keeps its byte offset and a partial last line."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.offset = 0
        self.pending = b""
        self._identity: tuple | None = None

    def _reset(self) -> None:
        self.offset, self.pending = 0, b""

    def _new_lines(self) -> list[str]:
        try:
            st = os.stat(self.path)
            identity = (st.st_dev, st.st_ino)
            if (self._identity is not None and identity != self._identity) or st.st_size < self.offset:
                self.notes.rewritten += 1  # replaced or truncated (a writer that rewrites its log)
                self._reset()
                self._restart()
            self._identity = identity
            with open(self.path, "rb") as fh:
                fh.seek(self.offset)
                chunk = fh.read()
        except OSError as exc:
            raise UsageError(f"log {self.path}: cannot read it ({exc.strerror or exc})") from None
        if self.offset == 0 and chunk.startswith(b"\xef\xbb\xbf"):  # a byte-order mark (a spreadsheet's CSV)
            chunk, self.offset = chunk[3:], 3
        self.offset += len(chunk)
        data = self.pending + chunk
        *lines, self.pending = data.split(b"\n")
        return [ln.decode("utf-8", errors="replace").rstrip("\r") for ln in lines]

    def _restart(self) -> None:
        """Forget what the format keeps between lines (the CSV header), the file begins again."""

    def _take_pending(self) -> str:
        text = self.pending.decode("utf-8", errors="replace").rstrip("\r")
        self.pending = b""
        return text


class CsvReader(_LineReader):
    fmt = "csv"

    def __init__(self, path: Path):
        super().__init__(path)
        self.header: list[str] | None = None
        self.delimiter = ","

    def _restart(self) -> None:
        self.header = None

    def read_new(self, final: bool = False) -> list[dict]:
        rows = []
        for line in self._new_lines():
            row = self._line(line)
            if row is not None:
                rows.append(self._seen(row))
        if final and self.pending.strip():
            # a torn number ("0.69" of "0.6931") would parse as a wrong value: never read it
            self.notes.torn = self._take_pending()
        return rows

    def _line(self, line: str) -> dict | None:
        if not line.strip():
            return None
        if self.header is None:
            if "\t" in line and "," not in line:
                self.delimiter = "\t"
            self.header = [h.strip() for h in next(csv.reader([line], delimiter=self.delimiter))]
            return None
        try:
            values = next(csv.reader(io.StringIO(line), delimiter=self.delimiter), [])
        except csv.Error:
            self.notes.malformed += 1
            return None
        stripped = [v.strip() for v in values]
        if stripped == self.header:
            self.notes.repeated_headers += 1
            return None
        if len(values) != len(self.header):
            if values and all(v and not _is_number(cell(v)) for v in stripped):
                self.header = stripped  # a restarted script that writes a new header with other columns
                self.notes.repeated_headers += 1
                return None
            self.notes.malformed += 1
            return None
        return {k: cell(v) for k, v in zip(self.header, values)}


def _flatten(obj: dict, prefix: str = "") -> dict:
    """{"train": {"loss": 1}} -> {"train/loss": 1}: nested metrics under one name each."""
    out = {}
    for k, v in obj.items():
        name = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, f"{name}/"))
        elif not isinstance(v, list):
            out[name] = cell(v)
    return out


class JsonLinesReader(_LineReader):
    fmt = "jsonl"

    def read_new(self, final: bool = False) -> list[dict]:
        rows = [r for r in (self._line(ln) for ln in self._new_lines()) if r is not None]
        if final and self.pending.strip():
            text = self._take_pending()
            row = self._parse(text)
            if row is None:  # a JSON object cut short never parses; a whole one without "\n" does
                self.notes.torn = text
            else:
                rows.append(row)
        return [self._seen(r) for r in rows]

    @staticmethod
    def _parse(text: str) -> dict | None:
        try:
            obj = json.loads(text)
        except ValueError:
            return None
        return _flatten(obj) if isinstance(obj, dict) else None

    def _line(self, line: str) -> dict | None:
        if not line.strip():
            return None
        row = self._parse(line)
        if row is None:
            self.notes.malformed += 1
        return row


def json_rows(obj: Any, where: str) -> list[dict]:
    """The rows of a JSON document: a list of row objects, a dict of columns (lists of values), or a
    dict with exactly one list of row objects (a Hugging Face trainer_state.json's log_history)."""
    if isinstance(obj, list):
        rows = [_flatten(r) for r in obj if isinstance(r, dict)]
        if obj and not rows:
            raise UsageError(f"{where}: a JSON list, but none of its items is an object of column values")
        return rows
    if isinstance(obj, dict):
        lists_of_rows = [k for k, v in obj.items() if isinstance(v, list) and v and all(isinstance(r, dict) for r in v)]
        if len(lists_of_rows) == 1:
            return [_flatten(r) for r in obj[lists_of_rows[0]]]
        columns = {k: v for k, v in obj.items()
                   if isinstance(v, list) and all(not isinstance(x, (dict, list)) for x in v)}
        if columns and not lists_of_rows:
            length = max(len(v) for v in columns.values())
            return [{k: cell(v[i]) for k, v in columns.items() if i < len(v)} for i in range(length)]
        keys = ", ".join(list(obj)[:12]) or "none"
        raise UsageError(f"{where}: neither a list of rows, a dict of columns (lists), nor a dict with one list of "
                         f"rows (its keys: {keys})")
    raise UsageError(f"{where}: a JSON {type(obj).__name__}, not a list of rows or a dict of columns")


class JsonReader(LogReader):
    """A JSON document, rewritten whole by its writer: read again when it changes, and the rows past
    those already returned handed out."""

    fmt = "json"

    def __init__(self, path: Path):
        super().__init__(path)
        self.returned = 0
        self._stamp: tuple | None = None

    def read_new(self, final: bool = False) -> list[dict]:
        try:
            st = os.stat(self.path)
            stamp = (st.st_mtime_ns, st.st_size, st.st_ino)
            if stamp == self._stamp and not final:
                return []
            text = self.path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise UsageError(f"log {self.path}: cannot read it ({exc.strerror or exc})") from None
        try:
            obj = json.loads(text)
        except ValueError as exc:
            if not final:  # caught mid-rewrite: the next read sees it whole
                return []
            raise UsageError(f"log {self.path}: unreadable JSON ({brief(exc, 80)})") from None
        self._stamp = stamp
        rows = json_rows(obj, f"log {self.path}")
        if len(rows) < self.returned:
            self.notes.rewritten += 1
            self.returned = 0
        new = rows[self.returned:]
        self.returned = len(rows)
        return [self._seen(r) for r in new]


def event_files(path: Path) -> list[Path]:
    """The TensorBoard event files under a directory, by directory then name (names begin with the time)."""
    found = [p for p in path.rglob(f"{TB_EVENT_PREFIX}*") if p.is_file()]
    return sorted(found, key=lambda p: (str(p.parent.relative_to(path)), p.name))


class TensorBoardReader(LogReader):
    """A TensorBoard log directory, read with tensorboard's own event-file loader: one row per event
    with scalar summaries ({"step": event.step, tag: value}); tags of event files in a subdirectory
    are named "<subdirectory>/<tag>" (SummaryWriter.add_scalars writes one per series).  A record
    cut short by a kill is left for the next read by the loader itself."""

    fmt = "tensorboard"

    def __init__(self, path: Path):
        super().__init__(path)
        self.loaders: dict[Path, Any] = {}

    def _loader(self, file: Path):
        from tensorboard.backend.event_processing.event_file_loader import EventFileLoader

        return EventFileLoader(str(file))

    def read_new(self, final: bool = False) -> list[dict]:
        from tensorboard.util import tensor_util

        rows = []
        for file in event_files(self.path):
            if file not in self.loaders:
                self.loaders[file] = self._loader(file)
            sub = str(file.parent.relative_to(self.path))
            prefix = "" if sub == "." else f"{sub}/"
            try:
                events = list(self.loaders[file].Load())
            except Exception as exc:  # a file that is no event file: its events so far are kept
                self.notes.malformed += 1
                events = []
                self.loaders[file] = _Exhausted(brief(exc, 80))
            for event in events:
                row: dict[str, Any] = {}
                for v in event.summary.value:
                    value = self._scalar(v, tensor_util)
                    if value is not None:
                        row[prefix + v.tag] = value
                if row:
                    rows.append(self._seen({"step": int(event.step), **row}))
        return rows

    @staticmethod
    def _scalar(v, tensor_util) -> float | None:
        if v.HasField("simple_value"):
            return float(v.simple_value)
        if v.HasField("tensor"):
            try:
                array = tensor_util.make_ndarray(v.tensor)
            except Exception:
                return None
            if array.size == 1 and array.dtype.kind in "fiu":
                return float(array.reshape(-1)[0])
        return None


class _Exhausted:
    def __init__(self, why: str):
        self.why = why

    def Load(self):  # noqa: N802 -- the loader's own method name
        return iter(())


def detect_format(path: Path) -> str:
    """csv, jsonl, json or tensorboard, from the name and the first bytes (a CSV named training.log)."""
    if path.is_dir():
        return "tensorboard"
    suffix = path.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        return "jsonl"
    if suffix in (".csv", ".tsv"):
        return "csv"
    try:
        with open(path, "rb") as fh:
            head = fh.read(65536).decode("utf-8", errors="replace")
    except OSError as exc:
        raise UsageError(f"log {path}: cannot read it ({exc.strerror or exc})") from None
    lines = [ln for ln in head.splitlines() if ln.strip()]
    first = lines[0].lstrip() if lines else ""
    if first.startswith("{"):
        # one object per line, or one JSON document: spread over lines, or on one line holding
        # columns or a list of rows (a row of JSON Lines holds scalars)
        try:
            whole_line = json.loads(lines[0])
        except ValueError:
            return "json"
        if len(lines) == 1 and isinstance(whole_line, dict) and any(isinstance(v, list) for v in whole_line.values()):
            return "json"
        return "jsonl"
    if first.startswith("[") or suffix == ".json":
        return "json"
    return "csv"


READERS = {"csv": CsvReader, "jsonl": JsonLinesReader, "json": JsonReader, "tensorboard": TensorBoardReader}


def open_log(path: Path, fmt: str | None = None) -> LogReader:
    """A reader for the log at `path`; UsageError when there is none, or a directory without event files."""
    path = Path(path)
    if not path.exists():
        raise UsageError(f"log {path}: not found")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: allowed: {', '.join(FORMATS)}")
    fmt = fmt or detect_format(path)
    if (fmt == "tensorboard") != path.is_dir():
        raise UsageError(f"log {path}: a TensorBoard log is a directory of {TB_EVENT_PREFIX}* files; "
                         f"a {fmt} log is a file")
    if fmt == "tensorboard" and not event_files(path):
        raise UsageError(f"log {path}: a directory, but neither a trainlab run directory (config.yaml and "
                         f"metrics.csv) nor a TensorBoard log ({TB_EVENT_PREFIX}* files)")
    return READERS[fmt](path)


# ---------------------------------------------------------------------------------------- column roles

def resolve_roles(columns: list[str], explicit: dict[str, str | None] | None = None) -> dict[str, str]:
    """role -> the log's column that fills it.  An explicit name must exist (UsageError listing the
    columns that do); the others are found by ROLES; step and loss are required."""
    explicit = {k: v for k, v in (explicit or {}).items() if v}
    shown = ", ".join(columns) if columns else "none"
    roles: dict[str, str] = {}
    for role, name in explicit.items():
        if role not in ROLES:
            raise UsageError(f"unknown column role {role!r}: allowed: {', '.join(ROLES)}")
        if name not in columns:
            raise UsageError(f"{ROLE_FLAGS[role]} {name}: no such column in the log; its columns: {shown}")
        roles[role] = name
    taken = set(roles.values())
    lower = {c.lower(): c for c in reversed(columns)}  # the first column of a name, ignoring case
    for role, names in ROLES.items():
        if role in roles:
            continue
        found = next((n for n in names if n in columns and n not in taken), None)
        if found is None:
            found = next((lower[n.lower()] for n in names if n.lower() in lower and lower[n.lower()] not in taken), None)
        if found is not None:
            roles[role] = found
            taken.add(found)
    for role in REQUIRED_ROLES:
        if role not in roles:
            raise UsageError(f"no {role} column (looked for {', '.join(ROLES[role])}): name it with "
                             f"{ROLE_FLAGS[role]}; the log's columns: {shown}")
    return roles


def to_detector_rows(raw: list[dict], roles: dict[str, str], notes: ReadNotes) -> list[dict]:
    """The rows renamed for the detectors: each role's column under the role's name, an integer
    step; a cell that is no number is dropped from a role column and counted (a column of text,
    such as a phase name, is kept under its own name).  A column whose name is a role that another
    column fills is left out, and noted."""
    source_of = {src: role for role, src in roles.items()}
    step_col = roles["step"]
    out = []
    for r in raw:
        row: dict[str, Any] = {}
        for col, value in r.items():
            if value is None:
                continue
            numeric = _is_number(value)
            notes.numeric_cells[col] += numeric
            if not numeric:
                notes.text_cells[col] += 1
            role = source_of.get(col)
            if role is not None:
                if numeric:
                    row[role] = value
            elif col in ROLES:
                filler = roles.get(col)
                notes.dropped.setdefault(col, f"the {col} role is column {filler}" if filler
                                         else f"its name is a role's, and the column is used as another role")
            else:
                row[col] = value
        step = row.get("step")
        if step is None or not math.isfinite(step):
            notes.rows_without_step += 1
            continue
        if step != int(step):
            raise UsageError(f"step column {step_col}: holds {format_number(step)}, not a whole step number; name "
                             f"the step column with --step-col (columns: {', '.join(dict.fromkeys(k for x in raw for k in x))})")
        row["step"] = int(step)
        out.append(row)
    return out


def merge_steps(rows: list[dict]) -> list[dict]:
    """One row per step, in step order: the last value written for each column at that step.  A
    log appended across restarts repeats steps (the rewritten ones win, as trainlab's own
    read_metrics keeps the last row per step); loggers that write the training and the validation
    values of one step as two rows (Lightning's CSVLogger, a trainer_state.json) get both."""
    merged: dict[int, dict] = {}
    for row in rows:
        merged.setdefault(row["step"], {}).update(row)
    return [merged[s] for s in sorted(merged)]


# ---------------------------------------------------------------------------------------- the baseline

@dataclass
class Baseline:
    value: float
    text: str  # how the claims name it: "ln 2 = 0.6931 (--baseline bce)"


def parse_baseline(text: str | float | None) -> Baseline | None:
    """--baseline: a number, bce (ln 2: a coin flip's binary cross-entropy) or ce:V (ln V: a
    uniform guess over V classes); None when not given."""
    if text is None:
        return None
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        text = repr(float(text))
    raw = str(text).strip()
    word = raw.lower()
    allowed = "allowed: a positive number (the loss of a random guess), bce (ln 2) or ce:V (ln V, V >= 2 classes)"
    if word == "bce":
        return Baseline(math.log(2), f"ln 2 = {math.log(2):.4g} (--baseline bce)")
    if word.startswith("ce:"):
        try:
            classes = int(word[3:])
        except ValueError:
            raise UsageError(f"--baseline {raw}: V must be a whole number of classes; {allowed}") from None
        if classes < 2:
            raise UsageError(f"--baseline {raw}: V must be 2 or more; {allowed}")
        return Baseline(math.log(classes), f"ln {classes} = {math.log(classes):.4g} (--baseline {raw})")
    try:
        value = float(raw)
    except ValueError:
        raise UsageError(f"--baseline {raw}: {allowed}") from None
    if not (math.isfinite(value) and value > 0):
        raise UsageError(f"--baseline {raw}: {allowed}")
    return Baseline(value, f"{format_number(value)} (--baseline {raw})")
