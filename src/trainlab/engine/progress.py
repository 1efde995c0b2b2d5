"""Progress: a rich bar on a terminal, plain periodic lines elsewhere (CI, nohup logs).

Both name the run directory and label the remaining time ("eta"), computed by trainlab from the
measured step rate (the bar does not guess its own).  Plain lines come at log steps, at most one per
`plain_interval_s` seconds (plus the first and the last), so a nohup log never floods.  Before the
first log step, `early()` shows the step rate of the first steps (timed on the host clock, no loss:
the loss is read at log steps only), so a slow run says how slow within seconds of its first step.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from trainlab.formatting import format_duration


def format_rate(steps_per_s: float) -> str:
    """12.3 step/s; two significant digits below one step per second (0.087 step/s)."""
    return f"{steps_per_s:.1f} step/s" if steps_per_s >= 1 else f"{steps_per_s:.2g} step/s"


class Progress:
    def __init__(self, mode: str, total: int, start: int, label: str, plain_interval_s: float, stream=None):
        self.stream = stream or sys.stderr
        if mode == "auto":
            mode = "bar" if self.stream.isatty() else "plain"
        self.mode = mode
        self.total = total
        self.label = label
        self.plain_interval_s = plain_interval_s
        self._last_plain = 0.0
        self._bar = None
        if mode == "bar":
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn
            from rich.console import Console

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"),
                                     TextColumn("{task.fields[info]}"),
                                     console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def _info(self, step: int, loss_text: str, steps_per_s: float, rate_note: str = "") -> str:
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        parts = [loss_text] if loss_text else []
        if steps_per_s > 0:
            parts.append(format_rate(steps_per_s) + rate_note)
        parts.append(f"eta {format_duration(eta)}")
        return " | ".join(parts)

    def _show(self, step: int, info: str, force: bool) -> None:
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain":
            now = time.monotonic()
            if force or self._last_plain == 0.0 or now - self._last_plain >= self.plain_interval_s:
                self._last_plain = now
                print(f"[{self.label}] step {step}/{self.total} | {info}", file=self.stream, flush=True)

    def update(self, step: int, row: dict[str, Any], steps_per_s: float, final: bool = False) -> None:
        loss = row.get("loss")
        self._show(step, self._info(step, f"loss {loss:.4g}" if isinstance(loss, float) else "", steps_per_s),
                   force=final)

    def early(self, step: int, steps_done: int, steps_per_s: float) -> None:
        """A progress-only line before the first log step: the rate of the first `steps_done` steps."""
        first = "the first step" if steps_done == 1 else f"the first {steps_done} steps"
        self._show(step, self._info(step, "", steps_per_s, f" over {first}"), force=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
