"""The run directory: its lock, its status file, moving old contents aside, and reading a run back.

status.json says running / finished / stopped / crashed.  A run killed with SIGKILL cannot write
"crashed", so a reader treats "running" whose process is gone (pid and start time checked, so a
reused pid does not fool it) as crashed.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import yaml

from trainlab.engine.checkpoint import unused_sibling, write_atomic
from trainlab.engine.logs import EVENTS_FILE, METRICS_FILE, read_metrics
from trainlab.errors import UsageError, brief

STATUS_FILE = "status.json"
LOCK_FILE = "run.lock"
CONFIG_FILE = "config.yaml"


def check_usable(path: Path) -> None:
    """Refuse a run directory we could not create or write, before anything is written."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"run directory {path}: exists and is not a directory")
    probe = path
    while not probe.exists():
        if probe.parent == probe:
            break
        probe = probe.parent
    if not probe.is_dir():
        raise UsageError(f"run directory {path}: {probe} is not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise UsageError(f"run directory {path}: {probe} is not writable")
    _try_create(path)


def _try_create(path: Path) -> None:
    """Create the missing levels of `path` and remove them again: only the filesystem knows whether
    they can be made (os.access says yes to root under /proc, where mkdir fails), and a refusal
    must leave nothing behind."""
    missing = []
    probe = path
    while not probe.exists() and probe.parent != probe:
        missing.append(probe)
        probe = probe.parent
    created = []
    try:
        for level in reversed(missing):
            try:
                level.mkdir()
            except FileExistsError:  # another process made it meanwhile (sweep points starting together)
                continue
            created.append(level)
    except OSError as exc:
        raise UsageError(f"run directory {path}: cannot be created ({exc.strerror or type(exc).__name__}: "
                         f"{exc.filename or path})") from None
    finally:
        for level in reversed(created):
            try:
                level.rmdir()
            except OSError:  # no longer empty: another process is using it
                pass


def has_run(path: Path) -> bool:
    return path.is_dir() and any((path / n).exists() for n in (CONFIG_FILE, METRICS_FILE, "checkpoints"))


def move_aside(path: Path) -> Path:
    """Rename an old run directory to a sibling <name>.old-<time>; nothing is deleted."""
    target = unused_sibling(path, f"{path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
    os.rename(path, target)
    return target


class RunLock:
    """An exclusive flock on run.lock for the life of the process; the kernel drops it when the
    process dies, so a stale lock from a killed run never blocks the resume."""

    def __init__(self, run_dir: Path):
        self.path = run_dir / LOCK_FILE
        self._fh = None

    def acquire(self) -> None:
        fh = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            owner = fh.read().strip() or "another process"
            fh.close()
            raise UsageError(f"run directory {self.path.parent} is in use by {owner}; "
                             "wait for it, stop it, or pass --run-dir for a new run") from None
        fh.seek(0)
        fh.truncate()
        fh.write(f"pid {os.getpid()} on {os.uname().nodename}\n")
        fh.flush()
        self._fh = fh

    def acquire_and_release(self) -> None:
        """Only check that no live process owns the directory (before moving it aside)."""
        self.acquire()
        self.release()

    def release(self) -> None:
        if self._fh is not None:
            fcntl.flock(self._fh.fileno(), fcntl.LOCK_UN)
            self._fh.close()
            self._fh = None


def write_status(run_dir: Path, state: str, step: int, **extra) -> None:
    proc = psutil.Process()
    record = {"state": state, "step": step, "pid": os.getpid(), "pid_started": proc.create_time(),
              "host": os.uname().nodename, "updated": time.time(), **extra}
    write_atomic(run_dir / STATUS_FILE, json.dumps(record, indent=1))


def read_status(run_dir: Path) -> dict:
    try:
        record = json.loads((run_dir / STATUS_FILE).read_text(encoding="utf-8"))
        return record if isinstance(record, dict) else {}
    except (OSError, ValueError):
        return {}


def read_run_config(run_dir: Path) -> dict | None:
    """A run directory's config.yaml as a dict; None when there is none, or when it holds no mapping
    (an empty file, say, from a kill while it was written: each caller decides what that means).
    A file that cannot be read or parsed is a UsageError of one line naming it."""
    path = Path(run_dir) / CONFIG_FILE
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"run directory {run_dir}: {CONFIG_FILE} is unreadable ({brief(exc)})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UsageError(f"run directory {run_dir}: {CONFIG_FILE} is malformed ({brief(exc)})") from None
    return data if isinstance(data, dict) else None


def _alive(pid: int, started: float | None) -> bool:
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        return started is None or abs(proc.create_time() - started) < 1.0
    except (psutil.Error, ValueError, TypeError):
        return False


@dataclass
class RunSummary:
    path: Path
    state: str
    step: int | None
    total: int | None
    loss: float | None
    updated: float | None
    reason: str


def summarize(run_dir: Path) -> RunSummary:
    status = read_status(run_dir)
    state = status.get("state", "unknown")
    reason = str(status.get("reason", ""))
    if state == "running" and not _alive(status.get("pid", -1), status.get("pid_started")):
        state, reason = "crashed", "process gone without a final status (killed?)"
    rows = read_metrics(run_dir / METRICS_FILE)
    last = rows[-1] if rows else {}
    step = last.get("step", status.get("step"))
    loss = last.get("loss")
    mtimes = [p.stat().st_mtime for p in (run_dir / METRICS_FILE, run_dir / EVENTS_FILE, run_dir / STATUS_FILE)
              if p.exists()]
    return RunSummary(run_dir, state, step, status.get("total_steps"), loss if isinstance(loss, float) else None,
                      max(mtimes) if mtimes else None, reason)


def find_runs(root: Path) -> list[Path]:
    """Run directories at or below `root` (a run directory holds config.yaml or status.json)."""
    if (root / CONFIG_FILE).exists() or (root / STATUS_FILE).exists():
        return [root]
    found = []
    for dirpath, dirnames, filenames in os.walk(root):
        if CONFIG_FILE in filenames or STATUS_FILE in filenames:
            found.append(Path(dirpath))
            dirnames[:] = []  # do not descend into a run (checkpoints, tensorboard)
        else:
            dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
    return sorted(found)
