"""Heatmaps of the 2-D evaluation arrays an experiment names (per-bit accuracy maps and the like):
a callback draws each into plots/<name>-<tag>.svg and .png at the run's final evaluation and at
the end of each curriculum phase; the run's report shows the SVGs.

Every run loads this module (the launcher hands every run a HeatmapWriter); matplotlib is loaded
only when there is a heatmap to draw."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Sequence

from trainlab.engine.callbacks import Callback, Evaluation

if TYPE_CHECKING:
    from trainlab.report.figures import Chart


def draw_heatmap(values: Sequence[Sequence[float]], title: str, row_labels: Sequence[str] | None = None,
                 col_labels: Sequence[str] | None = None, lo: float = 0.0, hi: float = 1.0, *,
                 x_label: str = "column", y_label: str = "row", value_label: str = "value") -> "Chart":
    """A heatmap chart: white at `lo` to dark blue at `hi`, row 0 at the top, with a colour bar."""
    from trainlab.report.figures import heatmap_chart

    return heatmap_chart(values, title, row_labels, col_labels, lo, hi, x_label=x_label, y_label=y_label,
                         value_label=value_label)


class HeatmapWriter(Callback):
    """The 2-D arrays an experiment names in `heatmaps` (name -> {title, rows, cols, lo, hi, and
    optionally x_label, y_label, value_label}), drawn into plots/ at the run's final evaluation and
    at the end of each curriculum phase."""

    KINDS = ("final", "phase_end")

    def __init__(self, run_dir: Path):
        self.plots = Path(run_dir) / "plots"

    def on_evaluate(self, trainer, evaluation: Evaluation) -> None:
        if evaluation.kind not in self.KINDS:
            return
        for name, view in trainer.exp.heatmaps.items():
            value = evaluation.metrics.get(name)
            if value is None or value.dim() != 2:
                continue
            title = f"{view.get('title', name)}: {evaluation.caption}"
            chart = draw_heatmap(value.detach().float().cpu().tolist(), title, view.get("rows"), view.get("cols"),
                                 view.get("lo", 0.0), view.get("hi", 1.0), x_label=view.get("x_label", "column"),
                                 y_label=view.get("y_label", "row"),
                                 value_label=view.get("value_label", name))
            self.plots.mkdir(exist_ok=True)
            chart.write(self.plots, f"{name}-{evaluation.tag}")
