"""`Watch`: trainlab's live detectors inside someone else's training loop.

    watch = Watch(baseline=math.log(2), policies={"divergence": "stop"}, run_dir="health/")
    for step, batch in enumerate(loader):
        loss = ...
        for alert in watch.log(step, loss=loss, acc=acc):
            print(alert["message"])
        if watch.should_stop:
            break
    watch.report()  # check.json (and report.html where trainlab can write one) in run_dir

The detectors, their policies and their claims are the ones `trainlab run` and `trainlab check`
use (health.detectors, health.check.judge_rows): one implementation.  Values may be floats or 0-d
tensors.  A tensor is never read on its own: rows wait in a buffer, and every `every`-th log()
call (and report()/flush()) converts all tensors of the buffered rows with one stack and one
`.tolist()` per device -- the only host-device sync -- and then feeds the rows to the detectors.
"""

from __future__ import annotations

import dataclasses
import json
import numbers
import typing
from pathlib import Path
from typing import Any

from trainlab import config as config_mod
from trainlab.config import HealthConfig
from trainlab.errors import ConfigError, UsageError
from trainlab.health.check import judge_rows, save_check
from trainlab.health.detectors import DETECTORS, build_detectors, policy_of

EVENTS_FILE = "events.jsonl"
# Rollback needs trainlab's trainer (reload a checkpoint, scale the LR): a Watch only observes.
WATCH_POLICIES = ("off", "warn", "stop")


class WatchError(UsageError, ValueError):
    """A bad argument to Watch or a framework callback: one line naming what is allowed.  A
    ValueError too, so that Python code catching the usual exception for bad arguments catches it."""


def _allowed_policies(name: str) -> tuple[str, ...]:
    hint = typing.get_type_hints(HealthConfig)[name]
    return tuple(v for v in typing.get_args(hint) if v in WATCH_POLICIES)


def _policy_names() -> list[str]:
    fields = {f.name for f in dataclasses.fields(HealthConfig)}
    return [cls.name for cls in DETECTORS if cls.name in fields]


def health_config(policies: dict[str, str] | None, overrides: dict[str, Any]) -> HealthConfig:
    """The HealthConfig of a Watch, checked: an unknown detector, a policy it does not take, or an
    unknown / out-of-range knob raises WatchError listing what is allowed."""
    names = _policy_names()
    policies = dict(policies or {})
    for name, value in policies.items():
        if name == "nonfinite":
            raise WatchError(f"policies: nonfinite is always 'stop' (a NaN loss cannot train on); "
                             f"detectors with a policy: {', '.join(names)}")
        if name not in names:
            raise WatchError(f"policies: unknown detector {name!r}; allowed: {', '.join(names)}")
        allowed = _allowed_policies(name)
        if value not in allowed:
            raise WatchError(f"policies: {name}={value!r} not allowed; {name} takes: {', '.join(allowed)}"
                             + (" (rollback needs trainlab's own trainer)" if value == "rollback" else ""))
    data = {**overrides, **policies}
    for name in names:  # a policy given as a keyword (divergence="rollback") is checked the same way
        if name in overrides and overrides[name] not in _allowed_policies(name):
            raise WatchError(f"{name}={overrides[name]!r} not allowed; {name} takes: {', '.join(_allowed_policies(name))}")
    try:
        return config_mod.from_dict(HealthConfig, data, "health")
    except ConfigError as exc:
        raise WatchError(str(exc)) from None


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") and hasattr(value, "tolist")


def _plain(value: Any, key: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):  # numpy scalars are Real too
        raise WatchError(f"log: {key}={value!r} is neither a number nor a 0-d tensor")
    return float(value)


class Watch:
    """trainlab's live detectors fed by one's own loop.

    baseline: the loss of a random guess: a number, "bce" (ln 2, a coin flip) or "ce:V" (ln V, a
      uniform guess over V classes); None (the default: never guessed): stuck is not measured,
      divergence judges its rise rule alone.
    policies: {detector: "off" | "warn" | "stop"}; `should_stop` turns True when a "stop" alert
      fires (nonfinite always stops).  The other keywords are HealthConfig knobs (window, alpha, ...).
    total_steps: the planned length, for the warm-up (health.warmup_fraction of it); None: no warm-up.
      It may be set until the first row is judged.
    every: rows are judged every `every` log() calls (and at flush()/report()); the alerts of the
      rows judged by a call are what it returns.
    """

    def __init__(self, baseline: float | str | None = None, policies: dict[str, str] | None = None,
                 run_dir: str | Path = "health", total_steps: int | None = None, every: int = 10,
                 log_name: str = "Watch.log", **health_overrides: Any):
        from trainlab.health.foreign import parse_baseline  # the one parser, as `trainlab check --baseline`

        try:
            parsed = parse_baseline(baseline)
        except UsageError as exc:
            raise WatchError(str(exc).replace("--baseline ", "baseline=", 1)) from None
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise WatchError(f"every: expected a whole number >= 1, got {every!r}")
        if total_steps is not None and (isinstance(total_steps, bool) or not isinstance(total_steps, int)
                                        or total_steps < 1):
            raise WatchError(f"total_steps: expected a whole number >= 1 or None, got {total_steps!r}")
        self.health = health_config(policies, health_overrides)
        self.baseline = None if parsed is None else parsed.value
        self.baseline_text = None if parsed is None else parsed.text.replace("--baseline ", "baseline=")
        self.run_dir = Path(run_dir)
        self.total_steps = total_steps
        self.every = every
        self.log_name = log_name
        self.alerts: list[dict] = []
        self.should_stop = False
        self.stop_reason = ""
        self.claims: list = []
        self._pending: list[tuple[int, dict]] = []
        self._rows: dict[int, dict] = {}  # step -> its judged values (rows of one step merged), for the report
        self._detectors = None
        self._calls = 0

    def log(self, step: int, **metrics: Any) -> list[dict]:
        """Add a row (`loss=`, `acc=`, `val_acc=`, `val_loss=`, `grad_norm=`, `lr=`, any metric);
        the alerts of the rows this call judged (none between judging calls)."""
        if _is_tensor(step):
            raise WatchError("log: step must be a Python int, not a tensor (reading it would sync)")
        if isinstance(step, bool) or not isinstance(step, numbers.Integral):
            raise WatchError(f"log: step must be an int, got {step!r}")
        step = int(step)
        row = {}
        for key, value in metrics.items():
            if value is None:
                continue
            # a tensor is kept as it is, detached and copied (a running sum updated in place later
            # must not change the logged value); reading it waits for the judging call
            row[key] = value.detach().clone() if _is_tensor(value) else _plain(value, key)
        self._pending.append((step, row))
        self._calls += 1
        return self.flush() if self._calls % self.every == 0 else []

    def flush(self) -> list[dict]:
        """Judge every buffered row now; the alerts they raised."""
        if not self._pending:
            return []
        pending, self._pending = self._pending, []
        rows = _to_floats(pending)
        if self._detectors is None:
            self._detectors = build_detectors(self.health, self.baseline, self.total_steps or 1)
            if not self.total_steps:  # no planned length: no warm-up, rather than one over a made-up length
                for d in self._detectors:
                    d.total_steps = 0
        fired = []
        for row in rows:
            # the report's row of a step: every value logged for it, the latest of each (a
            # validation logged after its step's training row joins that row)
            self._rows[row["step"]] = {**self._rows.get(row["step"], {}), **row}
            for d in self._detectors:
                for alert in d.update(row["step"], row):
                    alert["policy"] = policy_of(self.health, d.name)
                    fired.append(alert)
                    if alert["policy"] == "stop" and not self.should_stop:
                        self.should_stop = True
                        self.stop_reason = f"{alert['message']} (policy {d.name}=stop)"
        if fired:
            self.alerts += fired
            self._append_events(fired)
        return fired

    def _append_events(self, alerts: list[dict]) -> None:
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            with open(self.run_dir / EVENTS_FILE, "a", encoding="utf-8") as fh:
                for alert in alerts:
                    fh.write(json.dumps(alert, default=str) + "\n")
        except OSError as exc:
            raise WatchError(f"run_dir {self.run_dir}: cannot write {EVENTS_FILE} ({exc.strerror or exc})") from None

    @property
    def rows(self) -> list[dict]:
        """The judged rows, one per step (the latest value of each metric logged at it), in step order."""
        return [self._rows[s] for s in sorted(self._rows)]

    def report(self) -> list:
        """Judge what is buffered, then the claims over every row (health.check.judge_rows, as
        `trainlab check` makes them) into run_dir/check.json, and report.md / report.html with the
        plots (report.render.write_log_report, as for another loop's log); the claims."""
        self.flush()
        rows = self.rows
        total = self.total_steps or (rows[-1]["step"] if rows else 1) or 1
        health = self.health
        if not self.total_steps:  # no warm-up, as live
            health = dataclasses.replace(health, warmup_fraction=0.0)
        # without a baseline, stuck is "not measured" and divergence judges its rise rule alone
        alerts, claims = judge_rows(health, self.baseline, total, rows, self.log_name)
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise WatchError(f"run_dir {self.run_dir}: cannot create it ({exc.strerror or exc})") from None
        save_check(self.run_dir, alerts, claims)
        from trainlab.report.render import write_log_report  # matplotlib: only when a report is made

        try:
            write_log_report(self.run_dir, rows, claims, f"Watch ({self.log_name})", self.log_name,
                             baseline=self.baseline, baseline_text=self.baseline_text)
        except OSError as exc:
            raise WatchError(f"run_dir {self.run_dir}: cannot write the report ({exc.strerror or exc})") from None
        self.claims = claims
        return claims

    def verdicts(self) -> dict[str, str]:
        """{detector: verdict} of the last report()."""
        return {c.name: c.verdict for c in self.claims}


def _to_floats(pending: list[tuple[int, dict]]) -> list[dict]:
    """The buffered rows with every tensor read: one torch.stack(...).tolist() per device."""
    slots: dict[Any, list[tuple[dict, str, Any]]] = {}
    rows = []
    for step, values in pending:
        row = {"step": step}
        for key, value in values.items():
            if _is_tensor(value):
                if value.numel() != 1:
                    raise WatchError(f"log: {key} is a tensor of shape {tuple(value.shape)}; expected a 0-d tensor")
                slots.setdefault(value.device, []).append((row, key, value.reshape(())))
            else:
                row[key] = value
        rows.append(row)
    if slots:
        import torch  # only when tensors were logged

        for entries in slots.values():
            numbers = torch.stack([v.to(torch.float64) for _, _, v in entries]).tolist()
            for (row, key, _), number in zip(entries, numbers):
                row[key] = number
    return rows
