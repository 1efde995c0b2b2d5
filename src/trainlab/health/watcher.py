"""`trainlab watch --log PATH -- COMMAND ...`: the live detectors on someone else's script.

COMMAND runs as a child process with the watcher's stdin, stdout and stderr (its output passes
through unchanged).  Its log (any format health/foreign.py reads, a TensorBoard directory being
written too) is followed as it grows: every `poll` seconds the rows appended since the last read
are fed to the detectors, one row per step with the last value of each column (a step is fed once
a later step appears, or the child has exited: a logger that writes a step's training and
validation values as two rows, or TensorBoard's one event per tag, gives one row).  A step at or
below one already fed (a restarted script rewriting its log) is not fed again live; the final
check keeps its last value, as `trainlab check` does.

Alerts go to <out>/events.jsonl and to stderr as they happen.  A `stop` policy sends the child
`stop_signal` (SIGINT: a script's Ctrl-C handler saves its checkpoint), then SIGTERM after
`grace` seconds, then SIGKILL after another `grace`, and the watcher exits 1.

The child never outlives the watcher: it runs in its own process group (so a Ctrl-C at the
terminal reaches the watcher once, which passes it on, rather than both at once), signals the
watcher gets (INT, TERM, HUP) are passed to that group, every exit path -- an exception too --
kills what is left of the group, and on Linux the child is started with PR_SET_PDEATHSIG =
SIGKILL, so a watcher killed with SIGKILL takes its direct child along (that belt does not reach
grandchildren; nothing can catch SIGKILL of the watcher itself).
"""

from __future__ import annotations

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from trainlab.errors import EXIT_STOPPED, UsageError, brief

EVENTS_FILE = "events.jsonl"
WATCH_FILE = "watch.json"
WATCH_POLICIES = ("warn", "stop")
STOP_SIGNALS = ("INT", "TERM", "HUP", "QUIT", "USR1", "USR2")
FORWARDED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
PR_SET_PDEATHSIG = 1


def detector_names() -> list[str]:
    from trainlab.health.detectors import DETECTORS

    return [cls.name for cls in DETECTORS]


def _config_policies(name: str) -> tuple[str, ...]:
    """The policies health.<name> accepts (nonfinite, which has no field, always stops)."""
    import typing

    from trainlab.config import HealthConfig

    hint = typing.get_type_hints(HealthConfig).get(name)
    return typing.get_args(hint) if hint is not None else ("stop",)


def parse_policies(items: list[str]) -> dict[str, str]:
    """--policy NAME=warn|stop (repeatable) -> {detector: policy}, every detector warn unless named."""
    names = detector_names()
    policies = dict.fromkeys(names, "warn")
    for item in items:
        name, sep, value = item.partition("=")
        name, value = name.strip(), value.strip()
        if not sep or name not in names:
            raise UsageError(f"--policy {item}: expected NAME=warn|stop with NAME one of: {', '.join(names)}")
        if value not in WATCH_POLICIES:
            raise UsageError(f"--policy {item}: allowed policies: {', '.join(WATCH_POLICIES)} (rollback needs "
                             "trainlab's own trainer)")
        if value == "stop" and "stop" not in _config_policies(name):
            raise UsageError(f"--policy {item}: {name} takes only warn (it reports an event, not a fault)")
        policies[name] = value
    return policies


def parse_stop_signal(text: str) -> signal.Signals:
    name = text.strip().upper().removeprefix("SIG")
    if name not in STOP_SIGNALS:
        raise UsageError(f"--stop-signal {text}: allowed: {', '.join(STOP_SIGNALS)}")
    return signal.Signals[f"SIG{name}"]


def exit_code_of(returncode: int) -> int:
    """A child's exit status as a shell reports it: 128+N for a child killed by signal N."""
    return 128 - returncode if returncode < 0 else returncode


def _pdeathsig_preexec():
    """A preexec_fn that puts the child in its own process group and, on Linux, asks the kernel to
    SIGKILL it when the watcher dies; None where neither is needed beyond start_new_session."""
    parent = os.getpid()
    prctl = None
    if sys.platform.startswith("linux"):
        try:
            import ctypes

            prctl = ctypes.CDLL(None, use_errno=True).prctl  # loaded before the fork: no import in the child
        except (OSError, AttributeError):
            prctl = None

    def preexec() -> None:
        os.setpgid(0, 0)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
            if os.getppid() != parent:  # the watcher died before the prctl: nobody is left to watch
                os.kill(os.getpid(), signal.SIGKILL)

    return preexec


@dataclass
class WatchResult:
    exit_code: int
    child_code: int | None
    rows: int
    alerts: list[dict] = field(default_factory=list)
    stopped_by: dict | None = None
    signals_sent: list[str] = field(default_factory=list)


class LogFollower:
    """The rows a growing log holds, as the detectors take them: one per step, fed once complete."""

    def __init__(self, path: Path, fmt: str | None, columns: dict[str, str | None]):
        self.path, self.fmt, self.explicit = path, fmt, {k: v for k, v in columns.items() if v}
        self.reader = None
        self.roles: dict[str, str] | None = None
        self.buffer: list[dict] = []  # raw rows read before the role columns were known
        self.pending: dict | None = None  # the latest step's row: more of its values may follow
        self.last_fed: int | None = None
        self.skipped = 0  # rows at or below a step already fed
        self.waiting_note = ""  # why no row is fed yet, once said
        self._columns_seen = 0

    def _open(self) -> bool:
        from trainlab.health.foreign import open_log

        if self.reader is not None:
            return True
        try:
            self.reader = open_log(self.path, self.fmt)  # not there yet, or a directory without event files
        except UsageError as exc:
            self.waiting_note = str(exc)
            return False
        return True

    def _resolve(self) -> bool:
        from trainlab.health.foreign import resolve_roles

        try:
            # roles found earlier keep their columns: a column that appears later fills only a free role
            self.roles = resolve_roles(self.reader.columns, {**(self.roles or {}), **self.explicit})
        except UsageError as exc:
            self.waiting_note = str(exc)
            return False
        return True

    def read(self, final: bool = False) -> list[dict]:
        """The rows now complete (all of them when final), in step order."""
        from trainlab.health.foreign import to_detector_rows

        if not self._open():
            return []
        raw = self.reader.read_new(final=final)
        if len(self.reader.columns) != self._columns_seen:  # a new column may fill a role
            self._columns_seen = len(self.reader.columns)
            self._resolve()
        self.buffer += raw
        if self.roles is None:
            return []
        rows, self.buffer = to_detector_rows(self.buffer, self.roles, self.reader.notes), []
        ready = []
        for row in rows:
            step = row["step"]
            if self.pending is not None and step == self.pending["step"]:
                self.pending.update(row)
                continue
            if (self.last_fed is not None and step <= self.last_fed) or \
                    (self.pending is not None and step < self.pending["step"]):
                self.skipped += 1
                continue
            if self.pending is not None:
                ready.append(self.pending)
                self.last_fed = self.pending["step"]
            self.pending = dict(row)
        if final and self.pending is not None:
            ready.append(self.pending)
            self.last_fed, self.pending = self.pending["step"], None
        return ready


class Watcher:
    def __init__(self, command: list[str], log: Path, out_dir: Path, *, fmt: str | None = None,
                 columns: dict[str, str | None] | None = None, baseline=None, total_steps: int | None = None,
                 policies: dict[str, str] | None = None, poll: float = 1.0, grace: float = 30.0,
                 stop_signal: signal.Signals = signal.SIGINT, stream=None):
        self.command, self.log, self.out_dir = command, Path(log), Path(out_dir)
        self.follower = LogFollower(self.log, fmt, columns or {})
        self.fmt, self.columns, self.baseline, self.total_steps = fmt, columns or {}, baseline, total_steps
        self.policies = policies or parse_policies([])
        self.poll, self.grace, self.stop_signal = poll, grace, stop_signal
        self.stream = stream or sys.stderr
        self.proc: subprocess.Popen | None = None
        self.alerts: list[dict] = []
        self.rows = 0
        self.stopped_by: dict | None = None
        self.signals_sent: list[str] = []
        self.escalation: list[signal.Signals] = []  # signals still to send if the child outlives the grace
        self.deadline: float | None = None
        self._events = None

    # ------------------------------------------------------------------------------------ output

    def say(self, text: str) -> None:
        print(f"trainlab watch: {text}", file=self.stream, flush=True)

    def event(self, record: dict) -> None:
        self._events.write(json.dumps({"time": round(time.time(), 3), **record}, default=str) + "\n")
        self._events.flush()

    # ------------------------------------------------------------------------------------ the child

    def send(self, sig: signal.Signals, why: str) -> None:
        """Signal the child's process group (as a Ctrl-C at a terminal reaches the whole foreground group)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        try:
            os.killpg(self.proc.pid, sig)
        except ProcessLookupError:
            return
        self.signals_sent.append(sig.name)
        self.event({"kind": "signal", "signal": sig.name, "reason": why})

    def begin_stop(self, headline: str, why: str) -> None:
        """The stop sequence: the stop signal now (the child's own checkpoint handler runs), then
        SIGTERM and SIGKILL, each after the grace, while the child still runs (see _escalate)."""
        self.say(f"{headline} {self.stop_signal.name}, then SIGTERM and SIGKILL {self.grace:g} s apart while it runs")
        self.send(self.stop_signal, why)
        self.escalation = [s for s in (signal.SIGTERM, signal.SIGKILL) if s != self.stop_signal]
        self.deadline = time.monotonic() + self.grace

    def _on_signal(self, signum, _frame) -> None:
        sig = signal.Signals(signum)
        self.say(f"{sig.name} received: passed to the child")
        self.send(sig, f"{sig.name} sent to trainlab watch")
        if sig != signal.SIGINT and not self.escalation:  # asked to end: the child gets its grace, then SIGKILL
            self.escalation, self.deadline = [signal.SIGKILL], time.monotonic() + self.grace

    def _escalate(self) -> None:
        if self.deadline is None or time.monotonic() < self.deadline or not self.escalation:
            return
        sig = self.escalation.pop(0)
        last = self.signals_sent[-1] if self.signals_sent else "the stop"
        self.say(f"the child is still running {self.grace:g} s after {last}: sending {sig.name}")
        self.send(sig, f"still running {self.grace:g} s after {last}")
        self.deadline = time.monotonic() + self.grace if self.escalation else None

    def _kill_group(self) -> None:
        """Whatever is left of the child's process group: never outlives the watcher."""
        if self.proc is None:
            return
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        if self.proc.poll() is None:
            self.proc.wait()

    # ------------------------------------------------------------------------------------ detectors

    def _feed(self, detectors, rows: list[dict]) -> None:
        for row in rows:
            self.rows += 1
            for d in detectors:
                for alert in d.update(row["step"], row):
                    alert["policy"] = self.policies.get(d.name, "warn")
                    self.alerts.append(alert)
                    self.event(alert)
                    self.say(f"step {alert['step']} {alert['detector']} ({alert['severity']}, policy "
                             f"{alert['policy']}): {alert['message']}")
                    if alert["policy"] == "stop" and self.stopped_by is None:
                        self.stopped_by = alert
                        self.begin_stop("stopping the child:", f"policy {d.name}=stop at step {alert['step']}")

    # ------------------------------------------------------------------------------------ the loop

    def run(self) -> WatchResult:
        from trainlab.config import HealthConfig
        from trainlab.health.detectors import build_detectors
        from trainlab.health.foreign import parse_baseline

        base = parse_baseline(self.baseline)
        detectors = build_detectors(HealthConfig(), None if base is None else base.value, self.total_steps or 1)
        if not self.total_steps:  # the planned length is unknown while it runs: no warm-up, none made up
            for d in detectors:
                d.total_steps = 0
        try:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self._events = open(self.out_dir / EVENTS_FILE, "w", encoding="utf-8")
        except OSError as exc:
            raise UsageError(f"--out {self.out_dir}: cannot write {EVENTS_FILE} ({exc.strerror or exc})") from None
        shown = shlex.join(self.command)
        old_handlers = {}
        try:
            self.event({"kind": "watch", "command": self.command, "log": str(self.log), "policies":
                        {k: v for k, v in self.policies.items() if v != "warn"}})
            try:
                self.proc = subprocess.Popen(self.command, preexec_fn=_pdeathsig_preexec())
            except OSError as exc:
                raise UsageError(f"cannot start {shown}: {exc.strerror or brief(exc)}") from None
            for sig in FORWARDED:
                old_handlers[sig] = signal.signal(sig, self._on_signal)
            said_waiting = False
            while True:
                returncode = self.proc.poll()
                self._feed(detectors, self.follower.read(final=returncode is not None))
                if returncode is not None:
                    break
                if self.follower.roles is None and self.follower.waiting_note and not said_waiting:
                    said_waiting = True
                    self.say(f"waiting for the log: {self.follower.waiting_note}")
                self._escalate()
                try:
                    self.proc.wait(timeout=self.poll)
                except subprocess.TimeoutExpired:
                    pass
        finally:
            for sig, handler in old_handlers.items():
                signal.signal(sig, handler)
            self._kill_group()
            child = exit_code_of(self.proc.returncode) if self.proc is not None else None
            if self._events is not None:
                self.event({"kind": "exit", "exit_code": child, "rows": self.rows, "alerts": len(self.alerts),
                            "signals_sent": self.signals_sent})
                self._events.close()
        code = EXIT_STOPPED if self.stopped_by is not None else child
        return WatchResult(code, child, self.rows, self.alerts, self.stopped_by, self.signals_sent)


def run_watch(command: list[str], log: Path, out: Path | None = None, *, fmt=None, columns=None, baseline=None,
              total_steps: int | None = None, policies: list[str] | None = None, poll: float = 1.0,
              grace: float = 30.0, stop_signal: str = "INT") -> int:
    """`trainlab watch`: check the input (UsageError before anything is written or started), run and
    follow COMMAND, then the final claims over the whole log (as `trainlab check LOG`) in the out dir."""
    from trainlab.health.check import check_log, default_out_dir
    from trainlab.health.foreign import FORMATS, parse_baseline

    if not command:
        raise UsageError("no COMMAND: trainlab watch --log PATH [options] -- COMMAND ...")
    if log is None:
        raise UsageError("--log PATH is required: the log COMMAND writes (CSV, JSON Lines, JSON or a TensorBoard "
                         "directory)")
    if fmt is not None and fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: allowed: {', '.join(FORMATS)}")
    if not (poll > 0 and poll <= 3600):  # NaN compares false too
        raise UsageError(f"--poll {poll}: seconds between reads of the log, > 0 and at most 3600")
    if not grace >= 0:
        raise UsageError(f"--grace {grace}: seconds, 0 or more")
    if total_steps is not None and total_steps < 1:
        raise UsageError(f"--steps {total_steps}: the planned length must be 1 or more")
    parse_baseline(baseline)
    parsed_policies = parse_policies(policies or [])
    sig = parse_stop_signal(stop_signal)
    log = Path(log)
    out_dir = Path(out) if out is not None else default_out_dir(log)
    watcher = Watcher(command, log, out_dir, fmt=fmt, columns=columns, baseline=baseline, total_steps=total_steps,
                      policies=parsed_policies, poll=poll, grace=grace, stop_signal=sig)
    result = watcher.run()
    shown = shlex.join(command)
    shown = shown if len(shown) <= 80 else shown[:77] + "..."
    n = len(result.alerts)
    watcher.say(f"{shown} exited {result.child_code} after {result.rows} rows; {n} alert{'s' if n != 1 else ''}"
                + (f" (skipped {watcher.follower.skipped} rows at steps already judged)" if watcher.follower.skipped
                   else ""))
    summary = {"command": command, "log": str(log), "child_exit_code": result.child_code, "exit_code": result.exit_code,
               "rows": result.rows, "alerts": result.alerts, "stopped_by": result.stopped_by,
               "signals_sent": result.signals_sent, "policies": parsed_policies}
    try:
        final = check_log(log, out=out_dir, fmt=fmt, columns=columns, baseline=baseline, total_steps=total_steps,
                          title=f"trainlab watch: {shown}")
    except UsageError as exc:  # the child ran, but its log cannot be judged (never written, no rows)
        watcher.say(f"no final check: {exc}")
        summary["final_check"] = str(exc)
    else:
        summary["final_check"] = str(final.out_dir / "check.json")
        watcher.say(f"final check: {len(final.alerts)} alerts, {len(final.critical)} critical -> "
                    f"{final.out_dir / 'report.html'}")
    (out_dir / WATCH_FILE).write_text(json.dumps(summary, indent=1, default=str) + "\n", encoding="utf-8")
    if result.stopped_by is not None:
        a = result.stopped_by
        watcher.say(f"stopped by policy {a['detector']}=stop: step {a['step']}: {a['message']} (signals sent: "
                    f"{', '.join(result.signals_sent)})")
    return result.exit_code
