"""Progress: a rich bar on a terminal, plain periodic lines elsewhere (CI, nohup logs).

Plain lines come at log steps, at most one per `plain_interval_s` seconds (plus the first and the
last), so a nohup log never floods.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from trainlab.formatting import format_duration


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
            from rich.progress import BarColumn, Progress as RichProgress, TextColumn, TimeRemainingColumn
            from rich.console import Console

            self._bar = RichProgress(TextColumn("[bold]{task.description}"), BarColumn(),
                                     TextColumn("{task.completed}/{task.total}"), TimeRemainingColumn(),
                                     TextColumn("{task.fields[info]}"),
                                     console=Console(file=self.stream), transient=False)
            self._task = self._bar.add_task(label, total=total, completed=start, info="")
            self._bar.start()

    def update(self, step: int, row: dict[str, Any], steps_per_s: float, final: bool = False) -> None:
        loss = row.get("loss")
        info = f"loss {loss:.4g}" if isinstance(loss, float) else ""
        if steps_per_s > 0:
            info += f" | {steps_per_s:.1f} step/s"
        eta = (self.total - step) / steps_per_s if steps_per_s > 0 else float("nan")
        if self._bar is not None:
            self._bar.update(self._task, completed=step, info=info)
        elif self.mode == "plain":
            now = time.monotonic()
            if final or self._last_plain == 0.0 or now - self._last_plain >= self.plain_interval_s:
                self._last_plain = now
                print(f"[{self.label}] step {step}/{self.total} {info} | eta {format_duration(eta)}",
                      file=self.stream, flush=True)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
