"""Experiment trackers as callbacks: TensorBoard, MLflow and Weights & Biases, each switched on
from the config (log.tensorboard, log.mlflow, log.wandb) and each an optional extra.

metrics.csv stays the source of truth; a tracker mirrors it into a tool people already compare
runs in.  The promises every tracker keeps (see docs/trackers.md):

- a tracker that cannot work (package missing, store unwritable) is refused by check_trackers()
  before anything is written to the run -- one line, exit 2; one that fails later (a full disk, a
  server gone) says so in one line and events.jsonl, and the training goes on without it;
- a resumed run continues the tracker's run (its id is kept in trackers.json in the run
  directory) and each step reaches the tracker once: what the tracker already holds is read back
  when the run opens, steps up to that are not sent again, and the rows of metrics.csv it lacks
  (lost by a kill before they were flushed) are sent from metrics.csv.

Nothing here imports mlflow, wandb or tensorboard until that tracker is switched on.
"""

from __future__ import annotations

import abc
import importlib.util
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

from trainlab.engine.callbacks import Callback
from trainlab.errors import UsageError, brief

KEPT_FILE = "trackers.json"  # the tracker runs' ids, so that a resume continues them
NOT_METRICS = ("step", "attempt")  # the step is the axis; the attempt is in events.jsonl and the tags


def check_trackers(cfg, run_dir: Path) -> None:
    """Refuse (UsageError, one line) a tracker switched on that cannot work here.  Writes nothing
    to the run directory; imports a tracker's package only when that tracker is on."""
    if cfg.log.tensorboard and importlib.util.find_spec("tensorboard") is None:
        raise UsageError("config log.tensorboard: true needs the tensorboard package; "
                         "pip install 'trainlab[tensorboard]', or leave log.tensorboard false")
    if cfg.log.mlflow:
        from trainlab.trackers.mlflow_tracker import check_mlflow

        check_mlflow(Path(run_dir))
    if cfg.log.wandb:
        from trainlab.trackers.wandb_tracker import check_wandb

        check_wandb()


def build_trackers(cfg, run_dir: Path) -> list[Callback]:
    """The callbacks of the trackers switched on: TensorBoard, MLflow, W&B, in that order."""
    run_dir = Path(run_dir)
    trackers: list[Callback] = []
    if cfg.log.tensorboard:
        from trainlab.trackers.tensorboard import TensorBoardTracker

        trackers.append(TensorBoardTracker(run_dir))
    if cfg.log.mlflow:
        from trainlab.trackers.mlflow_tracker import MlflowTracker

        trackers.append(MlflowTracker(cfg, run_dir))
    if cfg.log.wandb:
        from trainlab.trackers.wandb_tracker import WandbTracker

        trackers.append(WandbTracker(cfg, run_dir))
    return trackers


def import_tracker_package(module: str, key: str, extra: str, package: str) -> None:
    """Refuse a tracker whose package is missing or does not import (a broken install)."""
    if importlib.util.find_spec(module) is None:
        raise UsageError(f"config {key}: true needs {package}; pip install 'trainlab[{extra}]', "
                         f"or leave {key} false")
    try:
        importlib.import_module(module)
    except Exception as exc:  # noqa: BLE001 -- any import failure is the user's install to fix; say which
        raise UsageError(f"config {key}: true, but {module} does not import ({type(exc).__name__}: {brief(exc)}); "
                         f"reinstall with pip install 'trainlab[{extra}]', or leave {key} false") from None


def blank_is_unset(*names: str) -> None:
    """An environment variable set to nothing means "not set" here; the trackers' packages read
    the environment themselves and refuse an empty WANDB_MODE or MLFLOW_ALLOW_FILE_STORE."""
    for name in names:
        if name in os.environ and not os.environ[name].strip():
            del os.environ[name]


def metric_values(row: dict[str, Any]) -> dict[str, float]:
    """The numbers of a metrics.csv row a tracker logs.  Skipped: the step (it is the axis), the
    attempt, booleans, None (a column not measured in this row: evaluation columns between
    evaluations, grad_norm when fp16 applied no step) and NaN/inf -- a non-finite value is already in
    metrics.csv and events.jsonl ("nonfinite"), JSON (MLflow's REST API, W&B's history) has no
    NaN, and a value the tracker refuses mid-run would end the tracker."""
    return {k: float(v) for k, v in row.items()
            if k not in NOT_METRICS and isinstance(v, (int, float)) and not isinstance(v, bool)
            and math.isfinite(v)}


def flat_config(cfg) -> dict[str, Any]:
    """The resolved config as dotted keys ("train.steps"), as `trainlab run --set` names them."""
    from trainlab import config as config_mod

    return config_mod.flatten(config_mod.to_dict(cfg))


def read_kept(run_dir: Path) -> dict[str, Any]:
    try:
        data = json.loads((run_dir / KEPT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    return data if isinstance(data, dict) else {}


def keep(run_dir: Path, tracker: str, record: dict[str, Any]) -> None:
    """Store one tracker's record in trackers.json; written whole and renamed, so a kill leaves
    either the old file or the new one."""
    kept = read_kept(run_dir)
    kept[tracker] = record
    tmp = run_dir / f"{KEPT_FILE}.tmp"
    tmp.write_text(json.dumps(kept, indent=2, sort_keys=True) + "\n", encoding="utf-8")
    os.replace(tmp, run_dir / KEPT_FILE)


class Tracker(Callback, abc.ABC):
    """What the trackers share: failures that never end the training, and the resume rule.

    A subclass implements open(trainer) (start or continue its run; return the last step it
    already holds, per metric or one for all), send(step, values) and close(result)."""

    label = "tracker"

    def __init__(self, run_dir: Path):
        self.run_dir = Path(run_dir)
        self.failed: str | None = None
        self.opened = False
        self.held: dict[str, int] = {}  # metric -> the last step the tracker holds
        self.held_all = 0  # ... or one step for all metrics (W&B: a history row is one record)
        self._rows_before: list[dict] = []

    @property
    def key(self) -> str:
        return f"trainlab.trackers.{self.label}"

    def _guarded(self, trainer, what: str, action, *args) -> None:
        if self.failed is not None:
            return
        try:
            action(*args)
        except Exception as exc:  # noqa: BLE001 -- a tracker never ends the training; say so once
            self.failed = f"{type(exc).__name__}: {brief(exc)}"
            step = getattr(trainer, "step", None)
            print(f"trainlab: the {self.label} tracker failed {what} at step {step} ({self.failed}); "
                  "training goes on without it (metrics.csv has every row)", file=sys.stderr)
            events = getattr(trainer, "events", None)
            if events is not None:
                events.write({"kind": "tracker_failed", "tracker": self.label, "during": what, "step": step,
                              "error": self.failed})

    # ---- the callback events
    def on_resume(self, trainer, rows: list[dict], kind: str) -> None:
        if kind == "resume":  # a rollback's rows were all sent already: nothing to fill in
            self._rows_before = rows

    def on_fit_start(self, trainer) -> None:
        self._guarded(trainer, "to open its run", self._open, trainer)

    def _open(self, trainer) -> None:
        self.open(trainer)
        self.opened = True
        # rows of metrics.csv up to the checkpoint that the tracker lacks: a kill lost them before
        # they were flushed, or the tracker was switched on at this resume
        for row in self._rows_before:
            self.log_row(row)
        self._rows_before = []

    def on_log_row(self, trainer, row: dict) -> None:
        if self.opened:
            self._guarded(trainer, "to log a row", self.log_row, row)

    def on_fit_end(self, trainer, result) -> None:
        if self.opened:
            self._guarded(trainer, "to close its run", self.close, result)

    # ---- the resume rule
    def log_row(self, row: dict) -> None:
        """Send the values of `row` the tracker does not hold yet.  After a resume the loop
        computes again the steps after the checkpoint; on CPU they are the same numbers, so the
        first value sent stands (MLflow keeps every value sent, W&B refuses a step lower than its
        last; metrics.csv, which appends, keeps the last row per step)."""
        step = int(row["step"])
        if step <= self.held_all:
            return
        values = {k: v for k, v in metric_values(row).items() if step > self.held.get(k, 0)}
        if values:
            self.send(step, values)
            for k in values:
                self.held[k] = step

    @abc.abstractmethod
    def open(self, trainer) -> None:
        """Start or continue the tracker's run; set self.held / self.held_all to what it holds."""

    @abc.abstractmethod
    def send(self, step: int, values: dict[str, float]) -> None:
        """Log `values` at `step`."""

    @abc.abstractmethod
    def close(self, result) -> None:
        """Finish the run (artifacts, final status from result.state)."""
