"""Accuracy-gated curriculum phases.

A phase is left for the next when BOTH hold (the SHA-256 curriculum's rule, with its bug fixed: the minimum
counts steps spent *in this phase*, not the run's total step):
  1. steps_in_phase >= min_steps[phase], and
  2. the running mean of the gate metric over the last `window` steps *of this phase* >= gates[phase]
     (a full window is required, so a phase never promotes on a handful of lucky steps).
The last phase never ends.  Promotion is decided at log steps, where the engine syncs with the
host anyway; between them the metric history stays a device tensor (no `.item()` per step).
"""

from __future__ import annotations

import torch

from trainlab.config import CurriculumConfig


class Curriculum:
    def __init__(self, cfg: CurriculumConfig, device: torch.device):
        self.cfg = cfg
        self.enabled = bool(cfg.values)
        self.phase = cfg.start_phase
        self.steps_in_phase = 0
        self.history = torch.zeros(cfg.window, device=device)  # ring buffer of the gate metric
        self.seen = 0  # observations in this phase (a python int: no sync)

    @property
    def level(self) -> float | None:
        return self.cfg.values[self.phase] if self.enabled else None

    @property
    def is_last(self) -> bool:
        return self.phase >= len(self.cfg.values) - 1

    def observe(self, metric: torch.Tensor) -> None:
        """Record one optimizer step's gate metric (a device tensor)."""
        if not self.enabled:
            return
        self.history[self.seen % self.cfg.window] = metric.detach().float()
        self.seen += 1
        self.steps_in_phase += 1

    def running_mean(self) -> float | None:
        """Mean over the window (host sync); None until the window is full."""
        if self.seen < self.cfg.window:
            return None
        return float(self.history.mean())

    def maybe_promote(self, step: int) -> dict | None:
        """Promote if the rule holds; returns the event to log, else None.  Syncs with the host."""
        if not self.enabled or self.is_last:
            return None
        if self.steps_in_phase < self.cfg.min_steps[self.phase]:
            return None
        mean = self.running_mean()
        gate = self.cfg.gates[self.phase]
        if mean is None or mean < gate:
            return None
        event = {
            "kind": "promotion", "step": step, "from_phase": self.phase, "to_phase": self.phase + 1,
            "from_value": self.cfg.values[self.phase], "to_value": self.cfg.values[self.phase + 1],
            "steps_in_phase": self.steps_in_phase, "metric": self.cfg.metric,
            "running_mean": round(mean, 6), "window": self.cfg.window, "gate": gate,
        }
        self.phase += 1
        self.steps_in_phase = 0
        self.seen = 0
        self.history.zero_()
        return event

    def state_dict(self) -> dict:
        return {"phase": self.phase, "steps_in_phase": self.steps_in_phase, "seen": self.seen,
                "history": self.history.detach().cpu().clone()}

    def load_state_dict(self, state: dict) -> None:
        """Restore; with on_resume=start the run goes back to start_phase (the SHA-256 curriculum's behaviour)."""
        if self.cfg.on_resume == "start":
            self.phase, self.steps_in_phase, self.seen = self.cfg.start_phase, 0, 0
            self.history.zero_()
            return
        self.phase = min(int(state["phase"]), len(self.cfg.values) - 1)
        self.steps_in_phase = int(state["steps_in_phase"])
        self.seen = int(state["seen"])
        history = state["history"].to(self.history.device)
        if history.shape == self.history.shape:
            self.history.copy_(history)
        else:  # the window was changed on resume: start a fresh window in this phase
            self.seen = 0
            self.history.zero_()
