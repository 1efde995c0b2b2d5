"""The detectors live in a run: fed each metrics row, their alerts written to events.jsonl and
acted on by policy -- warn (log only), stop (checkpoint, then exit 1), rollback (reload the last
checkpoint before the alert's onset, scale the LR, retry up to health.rollback_max times).

Non-finite values are the trainer's own check (train.nonfinite): a detector cannot act on them
any better, and the trainer must stop before it writes a checkpoint of broken weights."""

from __future__ import annotations

from trainlab.config import RunConfig
from trainlab.engine.callbacks import Callback
from trainlab.health.detectors import build_detectors, policy_of


class HealthMonitor(Callback):
    """The live detectors as a callback.  Their state is not saved in the checkpoint: it is a
    function of the metric rows, so a resume or a rollback replays the rows up to the restored step
    (the same rows, so the same state, and no alert is written twice).  It runs on every rank of a
    torchrun job: the rows are the same on each, so each takes the same decision at the same step."""

    all_ranks = True

    def __init__(self, cfg: RunConfig, baseline: float):
        self.cfg = cfg
        self.baseline = baseline
        self.reset()

    def reset(self) -> None:
        self.detectors = [d for d in build_detectors(self.cfg.health, self.baseline, self.cfg.train.steps)
                          if d.name != "nonfinite"]

    def replay(self, rows: list[dict]) -> None:
        """Feed history silently (after a resume or a rollback) so windows and states are as they were."""
        for row in rows:
            for d in self.detectors:
                d.update(row["step"], row)

    def on_resume(self, trainer, rows: list[dict], kind: str) -> None:
        if kind == "rollback":
            self.reset()
        self.replay(rows)

    def on_log_row(self, trainer, row: dict) -> None:
        for d in self.detectors:
            for alert in d.update(row["step"], row):
                policy = policy_of(self.cfg.health, d.name)
                alert["policy"] = policy
                trainer.events.write(alert)
                if policy == "stop":
                    trainer.request_stop(f"health policy: {alert['message']} (health.{d.name}=stop)",
                                         source="health policy")
                elif policy == "rollback":
                    trainer.request_rollback(alert)
