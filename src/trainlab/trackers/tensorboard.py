"""TensorBoard: the scalars of every metrics.csv row as event files in run_dir/tensorboard."""

from __future__ import annotations

from pathlib import Path

from trainlab.trackers import Tracker, metric_values

TENSORBOARD_DIR = "tensorboard"


class TensorBoardTracker(Tracker):
    """Every row is written as it comes, also the steps a resume computes again: each attempt
    writes a new event file, and TensorBoard itself drops the points of an older file at and
    after the first step a newer one writes again ("purging orphaned data") -- the last value per
    step, as metrics.csv reads.  So nothing is held back and nothing is filled in on resume."""

    label = "TensorBoard"

    def __init__(self, run_dir: Path):
        super().__init__(run_dir)
        self.writer = None

    def on_resume(self, trainer, rows: list[dict], kind: str) -> None:
        """Nothing to fill in: see the class docstring."""

    def open(self, trainer) -> None:
        from torch.utils.tensorboard import SummaryWriter  # needs the tensorboard package

        self.writer = SummaryWriter(log_dir=str(self.run_dir / TENSORBOARD_DIR))

    def log_row(self, row: dict) -> None:
        self.send(int(row["step"]), metric_values(row))

    def send(self, step: int, values: dict[str, float]) -> None:
        for key, value in values.items():
            self.writer.add_scalar(key, value, step)

    def close(self, result) -> None:
        self.writer.close()
