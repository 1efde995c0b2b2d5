"""The homeostasis timeline of one ternary VAE run: coverage, hierarchy (with its ceiling) and Q against
step, the intervals during which the controller kept each part frozen, and the jump and milestone alerts.

    write_timeline(Path("runs/ternary_vae-quick"))   # plots/homeostasis-timeline.svg and .png

Everything is read back from the run directory (metrics.csv, events.jsonl, config.yaml) through
trainlab.report.run.load_run, and drawn with the reports' conventions (trainlab.report.figures: an Agg
canvas, no pyplot, STYLE, the same SVG and PNG writer).  matplotlib is imported only to draw:
`homeostasis_history` and `frozen_intervals` serve the sweep rules too (ablation.py).
"""

from __future__ import annotations

import sys
import textwrap
from pathlib import Path
from typing import TYPE_CHECKING, Iterable

from trainlab.engine.callbacks import Callback
from trainlab.errors import brief
from trainlab.experiments.ternary_vae.homeostasis import EVENT
from trainlab.experiments.ternary_vae.model import PARTS
from trainlab.report.run import RunData, load_run

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from trainlab.report.figures import Chart

STEM = "homeostasis-timeline"  # plots/<STEM>.svg and .png
DECISIONS = ("freeze", "unfreeze", "relax")  # the actions that change the controller's state ("kept" does not)
MARKED_DETECTORS = ("jump", "grokking", "milestone")  # the alerts drawn as vertical lines
TITLE_CHARS = 90  # a title line longer than this (a long run name) wraps: it would run off the figure
LABEL_CHARS = 32  # an alert label longer than this is cut to its detector's name (the tooltip keeps it all)
# where a run's history restarts from an earlier step: what was logged after that step was undone
RESTARTS = ("resume", "rollback")


def homeostasis_history(events: Iterable[dict]) -> list[dict]:
    """The homeostasis events of the run's true history, in order.  A resume or a rollback to step s
    restores the controller's state of step s, so decisions logged after s before it were undone (and
    are made again, or not, after it): they are dropped, as last_row_per_step drops overwritten rows."""
    kept: list[dict] = []
    for event in events:
        kind, step = event.get("kind"), event.get("step")
        if not isinstance(step, int) or isinstance(step, bool):
            continue
        if kind in RESTARTS:
            kept = [e for e in kept if e["step"] <= step]
        elif kind == EVENT:
            kept.append(event)
    return kept


def frozen_intervals(events: Iterable[dict], last_step: int) -> dict[str, list[tuple[int, int]]]:
    """Per part, the (from, to) steps during which it was frozen, from the freeze and unfreeze events
    (homeostasis_history is applied first); a part still frozen at the end is frozen to `last_step`.
    A freeze of a part already frozen (or an unfreeze of one that is not) changes nothing."""
    since: dict[str, int | None] = {part: None for part in PARTS}
    out: dict[str, list[tuple[int, int]]] = {part: [] for part in PARTS}
    for event in homeostasis_history(events):
        action, step = event.get("action"), event["step"]
        if action not in ("freeze", "unfreeze"):
            continue
        for part in event.get("parts") or []:
            if part not in since:
                continue  # a part this version does not know: nothing to draw it on
            if action == "freeze" and since[part] is None:
                since[part] = step
            elif action == "unfreeze" and since[part] is not None:
                out[part].append((since[part], step))
                since[part] = None
    for part, start in since.items():
        if start is not None:
            out[part].append((start, max(start, last_step)))
    return out


def jump_alerts(events: Iterable[dict]) -> list[tuple[int, str, str]]:
    """(step, short label, full message) of each jump, grokking or milestone alert, each once (a resume can log an
    alert of a recomputed step again), in step order."""
    seen: dict[tuple, tuple[int, str, str]] = {}
    for event in events:
        step, detector = event.get("step"), event.get("detector")
        if event.get("kind") != "alert" or detector not in MARKED_DETECTORS or not isinstance(step, int):
            continue
        message = str(event.get("message") or detector)
        # "jump: coverage 0.41 -> 0.93 (+0.52, 12 noise sigmas) at step ..." -> "jump: coverage 0.41 -> 0.93"
        label = message.split(" (")[0]
        if detector == "milestone" and isinstance(event.get("evidence"), dict):
            label = str(event["evidence"].get("goal", label))  # "hierarchy<=-0.80": the goal says it all
        if len(label) > LABEL_CHARS:
            label = str(detector)
        seen.setdefault((step, detector, message), (step, label, message))
    return sorted(seen.values(), key=lambda a: a[0])


def _homeostasis_setting(run: RunData) -> str:
    model = (run.config or {}).get("model")
    return str(model.get("homeostasis", "")) if isinstance(model, dict) else ""


def timeline_chart(run: RunData) -> "Chart | None":
    """The timeline as a report Chart (figure and SVG tooltips); None without coverage or hierarchy values."""
    coverage, hierarchy = run.series("coverage"), run.series("hierarchy")
    if not coverage and not hierarchy:
        return None
    import matplotlib

    from trainlab.report.figures import (CHART_WIDTH, MARKER_COLOUR, PALETTE, REFERENCE_COLOUR, ROW_HEIGHT, STYLE,
                                         Chart, _fit_labels, _freeze_layout, _new_figure, _plain)

    steps = [s for s, _ in coverage + hierarchy]
    last_step = max([row["step"] for row in run.rows] + steps)
    history = homeostasis_history(run.events)
    intervals = frozen_intervals(history, last_step)
    alerts = jump_alerts(run.events)
    with matplotlib.rc_context(STYLE):
        fig = _new_figure((CHART_WIDTH, 6.4), layout="constrained")
        top, middle, bottom = fig.subplots(3, 1, sharex=True, gridspec_kw={"height_ratios": [3, 2, 1.3]})
        chart = Chart(fig)

        # coverage and hierarchy share one axis: both lie in [-1, 1] (hierarchy is a Spearman correlation)
        for k, (name, points) in enumerate((("coverage", coverage), ("hierarchy", hierarchy))):
            if points:
                top.plot(*zip(*points), color=PALETTE[k], lw=1.6, marker="o", markersize=2.5, label=name,
                         gid=f"series-{k}")
                chart.tooltips[f"series-{k}"] = name
        ceiling = run.series("hierarchy_ceiling")
        if ceiling:
            values = {round(v, 5) for _, v in ceiling}
            shown = f" {ceiling[-1][1]:.5f}" if len(values) == 1 else ""
            top.plot(*zip(*ceiling), color=REFERENCE_COLOUR, lw=1.2, linestyle=(0, (7, 4)),
                     label=f"hierarchy ceiling{shown}", gid="hline-0")
            chart.tooltips["hline-0"] = ("hierarchy_ceiling: the most negative hierarchy that radii distinct within "
                                         "each valuation level allow")
        top.set_ylabel("coverage (share)\nhierarchy (Spearman)")

        q = run.series("Q")
        if q:
            middle.plot(*zip(*q), color=PALETTE[2], lw=1.6, marker="o", markersize=2.5, label="Q", gid="series-2")
            chart.tooltips["series-2"] = "Q = dist_corr + 1.5 |hierarchy|"
        else:
            middle.text(0.5, 0.5, "Q not measured", transform=middle.transAxes, ha="center", va="center",
                        color="#888888")
        middle.set_ylabel("Q = dist_corr\n+ 1.5 |hierarchy|")

        # one row per part; a zero-length interval (frozen at the last step) still shows, as its edge
        labelled = False  # the legend names the bars once
        for row, part in enumerate(PARTS):
            spans = intervals[part]
            if spans:
                bars = bottom.broken_barh([(a, b - a) for a, b in spans], (row - 0.35, 0.7), color=PALETTE[3],
                                          edgecolor=PALETTE[3], lw=1.0, zorder=2, gid=f"frozen-{part}",
                                          label=None if labelled else "frozen")
                labelled = True
                chart.tooltips[bars.get_gid()] = f"{part} frozen: " + ", ".join(f"steps {a}-{b}" for a, b in spans)
        bottom.set_yticks(range(len(PARTS)), list(PARTS))
        bottom.set_ylim(len(PARTS) - 0.5, -0.5)  # encoder_a on top, as listed
        bottom.grid(False, axis="y")
        bottom.set_ylabel("frozen")
        bottom.set_xlabel("step")
        if not any(intervals.values()):
            setting = _homeostasis_setting(run)
            why = "homeostasis off" if setting == "off" else f"{len(history)} homeostasis events in events.jsonl"
            bottom.text(0.5, 0.5, f"no part was frozen ({why})", transform=bottom.transAxes, ha="center",
                        va="center", color="#888888")

        for k, (step, label, message) in enumerate(alerts):
            for ax in (middle, bottom):
                ax.axvline(step, color=MARKER_COLOUR, lw=1.0, linestyle=(0, (3, 3)))
            top.axvline(step, color=MARKER_COLOUR, lw=1.0, linestyle=(0, (3, 3)), gid=f"marker-{k}")
            top.annotate(_plain(label), xy=(step, 1), xycoords=("data", "axes fraction"), xytext=(3, 3),
                         textcoords="offset points", ha="left", va="bottom", fontsize=7.5, color=MARKER_COLOUR,
                         annotation_clip=False, gid=f"marker-{k}-label")
            chart.tooltips[f"marker-{k}"] = f"step {step}: {message}"
        # one legend for the three panels, under them: no panel has a corner the curves never reach
        handles = [h for ax in (top, middle, bottom) for h in ax.get_legend_handles_labels()[0]]
        if handles:
            fig.legend(handles=handles, loc="outside lower center", ncols=len(handles))
        fig.get_layout_engine().execute(fig)  # the axes' final widths: the labels are measured against them
        rows = _fit_labels(fig, top, 0.0)  # labels that would overlap take rows above the plot, or stay tooltips
        title = textwrap.wrap(f"Homeostasis timeline of {run.path.name}", TITLE_CHARS) + [
            "coverage, hierarchy and Q per evaluation; when each part was frozen; jumps and goals met"]
        top.set_title(_plain("\n".join(title)), pad=6 + ROW_HEIGHT * rows)
        _freeze_layout(fig)
    return chart


def draw_timeline(run_dir: Path) -> "Figure | None":
    """The run's homeostasis timeline as a matplotlib Figure (Agg canvas); None when the run has no
    coverage or hierarchy values."""
    chart = timeline_chart(load_run(Path(run_dir)))
    return chart.figure if chart is not None else None


def write_timeline(run_dir: Path) -> list[Path]:
    """Write plots/homeostasis-timeline.svg and .png into the run directory; returns their paths, or []
    (writing nothing) when the run has no coverage or hierarchy values."""
    run_dir = Path(run_dir)
    chart = timeline_chart(load_run(run_dir))
    if chart is None:
        return []
    plots = run_dir / "plots"
    plots.mkdir(exist_ok=True)
    return list(chart.write(plots, STEM))


class TimelineWriter(Callback):
    """Draws the timeline at the end of every ternary VAE run (also after a stop or a crash), before the
    run's report is written, which shows it with the heatmaps.  A figure that cannot be drawn must not
    fail the run: one line says so."""

    key = "ternary_vae.timeline"

    def on_fit_end(self, trainer, result) -> None:
        if isinstance(result.error, KeyboardInterrupt):
            return  # a second Ctrl-C: the user asked to leave now
        try:
            write_timeline(trainer.run_dir)
        except Exception as exc:  # noqa: BLE001 -- the training result stands; say what went wrong
            print(f"trainlab: could not draw the homeostasis timeline ({type(exc).__name__}: {brief(exc)})",
                  file=sys.stderr)
