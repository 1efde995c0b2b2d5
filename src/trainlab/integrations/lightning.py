"""`HealthCallback` for Lightning: trainlab's detectors over the metrics a LightningModule
already logs with `self.log(...)`, a "stop" alert acting through `trainer.should_stop`.

    trainer = Trainer(callbacks=[HealthCallback(baseline=math.log(2), policies={"divergence": "stop"})])

Training values are read from `trainer.callback_metrics` at every optimizer step and a row, their
mean over the interval, is judged every `every_n_steps` steps (default: the trainer's
log_every_n_steps); the validation metrics are read at the end of each validation run (joined to
the next training row, as trainlab's own metrics rows hold the evaluation of their step); the
report is written at the end of fit.  Values stay tensors until a row is judged (trainlab.health.watch)."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

try:
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - depends on the environment
    try:
        from pytorch_lightning import Callback  # the older package name
    except ImportError:
        raise ImportError("trainlab.integrations.lightning needs Lightning: pip install trainlab[lightning]") from None

from trainlab.health.watch import Watch, WatchError

# trainlab's row key <- the names a LightningModule commonly logs it under, first match wins
# (a metric logged with on_step=True and on_epoch=True appears as NAME_step and NAME_epoch)
TRAIN_NAMES = {
    "loss": ("train_loss_step", "train_loss", "loss_step", "loss"),
    "acc": ("train_acc_step", "train_acc", "acc_step", "acc", "train_accuracy", "accuracy"),
    "grad_norm": ("grad_norm", "grad_2.0_norm_total"),
}
VAL_NAMES = {
    "val_loss": ("val_loss", "val_loss_epoch", "valid_loss"),
    "val_acc": ("val_acc", "val_acc_epoch", "val_accuracy", "valid_acc"),
}


def pick(metrics: dict, names: dict[str, tuple[str, ...]]) -> dict[str, Any]:
    """{row key: value} of the first logged name for each role."""
    row = {}
    for key, candidates in names.items():
        for name in candidates:
            if name in metrics:
                row[key] = metrics[name]
                break
    return row


class HealthCallback(Callback):
    """trainlab's live detectors in a Lightning fit.  Arguments as trainlab.health.Watch
    (baseline, policies, run_dir, total_steps -- default the trainer's max_steps or its estimated
    stepping batches -- and HealthConfig knobs); `every_n_steps` the reading cadence.  After the
    fit: `.watch` (alerts, should_stop) and `.claims` (the verdict per detector)."""

    def __init__(self, baseline: float | str | None = None, policies: dict[str, str] | None = None,
                 run_dir: str | Path = "health", total_steps: int | None = None,
                 every_n_steps: int | None = None, **health_overrides: Any):
        if every_n_steps is not None and (isinstance(every_n_steps, bool) or not isinstance(every_n_steps, int)
                                          or every_n_steps < 1):
            raise WatchError(f"every_n_steps: expected a whole number >= 1 or None, got {every_n_steps!r}")
        # built now, so that a bad argument fails before the fit starts; rows are judged as read
        self.watch = Watch(baseline=baseline, policies=policies, run_dir=run_dir, total_steps=total_steps,
                           every=1, log_name="Lightning callback_metrics", **health_overrides)
        self.every_n_steps = every_n_steps
        self.claims: list = []
        self._val: dict[str, Any] = {}
        self._sums: dict[str, tuple[Any, int]] = {}
        self._last_step: int | None = None

    def on_fit_start(self, trainer, pl_module) -> None:
        if self.watch.total_steps is None:
            planned = trainer.max_steps if trainer.max_steps and trainer.max_steps > 0 else None
            if planned is None:
                try:
                    estimated = trainer.estimated_stepping_batches
                    planned = int(estimated) if math.isfinite(estimated) else None
                except Exception:  # no dataloader length to estimate from: no warm-up then
                    planned = None
            self.watch.total_steps = planned

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        step = int(trainer.global_step)
        if step == self._last_step:  # gradient accumulation: one value per optimizer step
            return
        self._last_step = step
        values = pick(trainer.callback_metrics, TRAIN_NAMES)
        if "loss" not in values:  # nothing logged under a loss name: the loss training_step returned
            loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
            if loss is not None:
                values["loss"] = loss
        # Each step's value is summed (a tensor stays a tensor: no sync), and the row holds the mean
        # over the interval -- as trainlab's own rows do: one batch's loss is noise, not a level.
        for key, value in values.items():
            total, count = self._sums.get(key, (0.0, 0))
            self._sums[key] = (total + (value.detach() if hasattr(value, "detach") else value), count + 1)
        every = self.every_n_steps or max(1, int(getattr(trainer, "log_every_n_steps", 1) or 1))
        if step % every:
            return
        row = {key: total / count for key, (total, count) in self._sums.items()}
        self._sums = {}
        if trainer.optimizers:
            row["lr"] = trainer.optimizers[0].param_groups[0]["lr"]
        row.update(self._val)
        self._val = {}
        self.watch.log(step, **row)
        # every rank reaches this step: one rank's stop stops all (as Lightning's EarlyStopping decides)
        if trainer.strategy.reduce_boolean_decision(self.watch.should_stop, all=False):
            trainer.should_stop = True

    def on_validation_end(self, trainer, pl_module) -> None:
        if not trainer.sanity_checking:
            self._val = pick(trainer.callback_metrics, VAL_NAMES)

    def on_fit_end(self, trainer, pl_module) -> None:
        if self._val:  # the last validation, after the last training row
            self.watch.log(int(trainer.global_step), **self._val)  # joined to that step's row in the report
            self._val = {}
        if trainer.is_global_zero:
            self.claims = self.watch.report()
