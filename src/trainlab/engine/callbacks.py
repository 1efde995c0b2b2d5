"""Callbacks: everything that watches or steers a run without being the loop itself.

The Trainer calls each callback's events at fixed points of the loop, in the order the callbacks
were handed in (the launcher's own first, then the user's from `callbacks:` in the config).  Every
event is a no-op by default, so a callback overrides only what it needs.  Modelled on Lightning's
and composer's `Callback`, with two differences that matter for trainlab's promise of exact resume:

- `state_dict()` / `load_state_dict()` ride in every checkpoint (keyed by `key`), and are loaded
  again before `on_resume`, on a resume and on a rollback alike;
- a callback steers the run only through the two requests on the trainer -- `request_stop(reason)`
  and `request_rollback(alert)` -- which the loop honours at the end of the step, after the log row
  and before a checkpoint; the reason reaches status.json, events.jsonl and the exit message.

Events, in the order a run meets them (trainer.step is the number of steps done so far, except in
the two update events, where it is the index of the step being taken):

    on_resume(trainer, rows, kind) . a checkpoint was loaded: kind "resume" (before on_fit_start)
                                     or "rollback" (mid-run); rows = metrics.csv up to trainer.step
    on_fit_start(trainer) .......... the logs are open, the first step is next
    on_before_update(trainer) ...... gradients unscaled and clipped, the optimizer step is next
    on_after_update(trainer) ....... the optimizer step was taken (gradients zeroed)
    on_log_row(trainer, row) ....... a row was written to metrics.csv
    on_evaluate(trainer, evaluation) the experiment's evaluate() returned (see `Evaluation`)
    on_checkpoint(trainer, path, reason)  a checkpoint was written and verified
    on_fit_end(trainer, result) .... always, also after a crash, once status.json is final

An exception raised by a callback is an exception of the run (it crashes like the loop's own);
wrap what may fail in the callback itself when failure must not end the run.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from trainlab.errors import UsageError, brief

if TYPE_CHECKING:  # annotations only: importing the trainer here would be circular
    import torch

    from trainlab.engine.trainer import RunResult, Trainer


@dataclass
class Evaluation:
    """One call of the experiment's evaluate(), as callbacks see it.

    kind: "periodic" (eval.every), "final" (the run's last step) or "phase_end" (the curriculum
    level just left, eval.on_promotion); `tag` names files written for it (e.g. "final-step200"),
    `caption` says in words what was evaluated."""

    kind: str
    step: int
    metrics: dict[str, "torch.Tensor"]
    tag: str
    caption: str
    phase: int | None = None
    level: float | None = None
    extra: dict[str, Any] = field(default_factory=dict)


class Callback:
    """Base class of every callback; see the module docstring for the events and their order."""

    # Under torchrun, a callback runs on rank 0 only (the one that writes the run directory), unless it
    # steers the training itself on every rank -- freezes parameters, say -- and so must run on each:
    # then all_ranks = True, and it sees the same rows on every rank.  A stop or rollback a callback
    # asks for on rank 0 is agreed by every rank at the end of the step.
    all_ranks: bool = False

    @property
    def key(self) -> str:
        """Where this callback's state is kept in a checkpoint; two callbacks of one class in one run
        need distinct keys (override, e.g. with a name given to __init__)."""
        return f"{type(self).__module__}.{type(self).__qualname__}"

    def on_resume(self, trainer: "Trainer", rows: list[dict], kind: str) -> None: ...
    def on_fit_start(self, trainer: "Trainer") -> None: ...
    def on_before_update(self, trainer: "Trainer") -> None: ...
    def on_after_update(self, trainer: "Trainer") -> None: ...
    def on_log_row(self, trainer: "Trainer", row: dict) -> None: ...
    def on_evaluate(self, trainer: "Trainer", evaluation: Evaluation) -> None: ...
    def on_checkpoint(self, trainer: "Trainer", path, reason: str) -> None: ...
    def on_fit_end(self, trainer: "Trainer", result: "RunResult") -> None: ...

    def state_dict(self) -> dict:
        """Plain data (tensors allowed) that must survive a resume; {} when there is none."""
        return {}

    def load_state_dict(self, state: dict) -> None:
        """Restore what state_dict() returned; called before on_resume."""


EVENTS = tuple(name for name in vars(Callback) if name.startswith("on_"))


def overrides(callback: Callback, event: str) -> bool:
    """Whether `callback` does something at `event` (the Trainer calls only those: no per-step cost
    for the callbacks that ignore the update events)."""
    return getattr(type(callback), event) is not getattr(Callback, event)


def load_callback(spec: str, kwargs: dict[str, Any] | None = None, where: str = "callbacks") -> Callback:
    """A user's callback from "package.module:ClassName" and its keyword arguments; UsageError
    (one line, exit 2) when the module or class cannot be found, is not a Callback, or refuses the
    arguments."""
    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"config {where}: {spec!r} must look like 'package.module:ClassName'")
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:  # noqa: BLE001 -- any import failure is the user's to fix; say which
        raise UsageError(f"config {where}: cannot import {module_name!r} for {spec!r} "
                         f"({type(exc).__name__}: {brief(exc)})") from None
    target: Any = module
    for part in attr.split("."):
        target = getattr(target, part, None)
        if target is None:
            raise UsageError(f"config {where}: module {module_name!r} has no {attr!r}")
    if not (isinstance(target, type) and issubclass(target, Callback)):
        raise UsageError(f"config {where}: {spec!r} is not a trainlab Callback class "
                         "(subclass trainlab.Callback)")
    try:
        return target(**(kwargs or {}))
    except TypeError as exc:
        raise UsageError(f"config {where}: {spec!r} refused its arguments {sorted(kwargs or {})} "
                         f"({brief(exc)})") from None
