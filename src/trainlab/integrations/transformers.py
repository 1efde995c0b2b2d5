"""`HealthCallback` for the Hugging Face Trainer: trainlab's detectors over what the Trainer
already logs (on_log: `loss`, `eval_loss`, `grad_norm`, `learning_rate`, `eval_accuracy`), a
"stop" alert acting through `control.should_training_stop`.

    trainer = Trainer(..., callbacks=[HealthCallback(baseline=math.log(2), policies={"stuck": "stop"})])

Rows are what the Trainer logs every `logging_steps` (already Python floats: the Trainer synced
them); an evaluation's metrics join the next training row, as trainlab's own metrics rows hold the
evaluation of their step.  The report is written at the end of training (on the main process)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from transformers import TrainerCallback
except ImportError:  # pragma: no cover - depends on the environment
    raise ImportError("trainlab.integrations.transformers needs transformers: pip install trainlab[transformers]") from None

from trainlab.health.watch import Watch

# trainlab's row key <- the Trainer's log key.  Not "train_loss": the Trainer logs that once, at
# the end, as the mean over the whole run.
TRAIN_KEYS = {"loss": "loss", "grad_norm": "grad_norm", "learning_rate": "lr"}
EVAL_KEYS = {"eval_loss": "val_loss", "eval_accuracy": "val_acc", "eval_acc": "val_acc"}


class HealthCallback(TrainerCallback):
    """trainlab's live detectors in a transformers Trainer.  Arguments as trainlab.health.Watch
    (baseline, policies, run_dir, total_steps -- default the Trainer's max_steps -- and HealthConfig
    knobs).  After training: `.watch` (alerts, should_stop) and `.claims` (the verdict per detector)."""

    def __init__(self, baseline: float | str | None = None, policies: dict[str, str] | None = None,
                 run_dir: str | Path = "health", total_steps: int | None = None, **health_overrides: Any):
        # built now, so that a bad argument fails before training starts
        self.watch = Watch(baseline=baseline, policies=policies, run_dir=run_dir, total_steps=total_steps,
                           every=1, log_name="Trainer logs", **health_overrides)
        self.claims: list = []
        self._eval: dict[str, float] = {}

    def on_train_begin(self, args, state, control, **kwargs):
        if self.watch.total_steps is None and state.max_steps and state.max_steps > 0:
            self.watch.total_steps = int(state.max_steps)

    def on_log(self, args, state, control, logs=None, **kwargs):
        logs = logs or {}
        evaluated = {mine: logs[theirs] for theirs, mine in EVAL_KEYS.items() if theirs in logs}
        if evaluated:
            self._eval.update(evaluated)
        row = {mine: logs[theirs] for theirs, mine in TRAIN_KEYS.items() if theirs in logs}
        if "loss" not in row:  # an evaluation's log, or the end-of-training summary
            return
        row.update(self._eval)
        self._eval = {}
        self.watch.log(int(state.global_step), **row)
        if self.watch.should_stop:
            control.should_training_stop = True

    def on_train_end(self, args, state, control, **kwargs):
        if self._eval:  # the last evaluation, after the last training row
            self.watch.log(int(state.global_step), **self._eval)
            self._eval = {}
        if state.is_world_process_zero:
            self.claims = self.watch.report()
