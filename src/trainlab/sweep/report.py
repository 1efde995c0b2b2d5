"""The sweep report: the BitNet size study's table, overlaid curves, final loss against size with a
fitted power law, and a conclusion reached by explicit rules, each printing the numbers it used.
An experiment with questions of its own (memory_lm's ablation: does the memory help beyond the window?)
draws its own conclusions and tables through Experiment.sweep_findings instead of the size rules below.

Sizes are parameter counts without embedding tables (Kaplan et al. 2020 count those), read from each
point's start event.  Points are grouped by the grid keys outside `model.*` (an LR grid, say), and
the size rules and the fit run within each group.

The rules mirror the BitNet size study's decision tree, on the collapse metric (distinct argmax
predictions over a fixed validation batch) at the last evaluation of each point:
  collapsed   value < health.collapse_min (the BitNet size study: 10)
  diverse     value >= the diverse threshold: --diverse-above, else half the distinct true next
              tokens in the same batch (measured; a byte model cannot predict more kinds of token
              than the text holds, so the BitNet size study's "> 100 tokens" of a large vocabulary
              is relative here)
  1. every size diverse                  -> "no size collapses" (scaling fixes it from the smallest)
  2. the diverse sizes are all sizes >= X -> "scaling fixes it from size X"
  3. no size diverse                     -> "no size stays diverse: LR is the lever" (next: lr_scale)
  4. the diverse sizes are all sizes <= X -> "larger sizes lose diversity: LR is the lever"
  5. otherwise                           -> "non-monotonic: investigate"
A point within 10 % of the diverse threshold is named: the verdict hangs on it.

Only points whose run finished at its planned last step take part in the rules and the fit: the last
value of a crashed, stopped, still running or cut-short point is not its final value, and judging it
as one could turn a crash into "this size collapses".  Such points are named, with their state, step
and reason, in the conclusion of their group ("left out, ...") and under the fit.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from trainlab.formatting import format_number
from trainlab.report.document import Figure, Heading, Para, Table
from trainlab.report.html import inline_svg, to_html
from trainlab.report.markdown import to_markdown
from trainlab.report.run import load_run
from trainlab.sweep.powerlaw import PowerLawFit, fit_power_law
from trainlab.sweep.spec import read_manifest

if TYPE_CHECKING:  # matplotlib is imported only when the figures are drawn
    from trainlab.report.figures import Chart

TABLE_FRACTIONS = (0.1, 0.4, 1.0)  # the BitNet size study's steps 1k / 4k / 10k of a 10k run


@dataclass
class PointResult:
    name: str
    values: dict
    run_dir: Path
    state: str
    step: int | None
    total_steps: int | None
    params: int | None  # without embeddings
    loss_col: str
    final_loss: float | None
    metric_series: list[tuple[int, float]]
    loss_series: list[tuple[int, float]]
    distinct_targets: float | None
    collapse_min: float | None
    lr_scale: str = "none"
    reason: str = ""  # why the run ended where it did (status.json), when it says
    run: Any = None  # the point's RunData (report/run.py), for an experiment's own sweep rules


def is_complete(p: PointResult) -> bool:
    """True when the point's run finished at its planned last step, so its last values are final."""
    return p.state == "finished" and p.step is not None and (p.total_steps is None or p.step >= p.total_steps)


def left_out_text(p: PointResult) -> str:
    """Why a point takes no part in the conclusion: its state, how far it got, and its reason."""
    if p.state == "not started":
        return f"{p.name} not started (no metrics.csv)"
    state = "finished early" if p.state == "finished" else p.state
    where = f" at step {format_number(p.step)} of {format_number(p.total_steps)}"
    return f"{p.name} {state}{where}" + (f" ({p.reason})" if p.reason else "")


@dataclass
class Conclusion:
    group: str
    rule: str
    verdict: str
    numbers: list[str] = field(default_factory=list)
    diverse_threshold: float | None = None
    left_out: list[str] = field(default_factory=list)  # points of the group not judged, and why


@dataclass
class SweepFindings:
    """What an experiment's own sweep rules conclude (Experiment.sweep_findings), in place of the
    collapse-against-size rules: the conclusions, and tables (title, headers, rows) of the numbers."""
    conclusions: list[Conclusion]
    tables: list[tuple[str, list[str], list[list[str]]]] = field(default_factory=list)


def _value_at(series: list[tuple[int, float]], step: int) -> tuple[float, int] | None:
    """The value logged at the largest step <= `step`, with that step."""
    before = [(s, v) for s, v in series if s <= step]
    return (before[-1][1], before[-1][0]) if before else None


def load_points(sweep_dir: Path, manifest: dict) -> tuple[list[PointResult], str]:
    out, metric = [], ""
    for record in manifest["points"]:
        run_dir = sweep_dir / record["name"]
        if not (run_dir / "metrics.csv").is_file():
            out.append(PointResult(record["name"], record["values"], run_dir, "not started", None, None, None, "",
                                   None, [], [], None, None))
            continue
        run = load_run(run_dir)
        health = (run.config or {}).get("health") or {}
        metric = metric or str(health.get("collapse_metric") or "")
        start = run.first_start
        params = start.get("params")
        if isinstance(params, int) and isinstance(start.get("params_embedding"), int):
            params -= start["params_embedding"]
        loss_col = "val_loss" if run.series("val_loss") else "loss"
        losses = run.series(loss_col)
        targets = run.series("distinct_targets")
        out.append(PointResult(
            record["name"], record["values"], run_dir, run.summary.state, run.summary.step,
            run.status.get("total_steps"), params, loss_col, losses[-1][1] if losses else None,
            run.series(metric) if metric else [], losses, targets[-1][1] if targets else None,
            float(health["collapse_min"]) if isinstance(health.get("collapse_min"), (int, float)) else None,
            str(((run.config or {}).get("optim") or {}).get("lr_scale", "none")), run.summary.reason, run))
    return out, metric


def _size_label(p: PointResult) -> str:
    model = {k: v for k, v in p.values.items() if k.startswith("model.")}
    return ", ".join(f"{k.split('.', 1)[1]}={v}" for k, v in model.items()) or p.name


def _group_label(p: PointResult) -> str:
    other = {k: v for k, v in p.values.items() if not k.startswith("model.")}
    return ", ".join(f"{k}={v}" for k, v in other.items()) or "all points"


def conclude(points: list[PointResult], collapse_min: float, diverse_above: float | None,
             metric: str) -> list[Conclusion]:
    """The BitNet size study's decision tree, per group of points that differ only in model.* keys."""
    groups: dict[str, list[PointResult]] = {}
    for p in points:
        groups.setdefault(_group_label(p), []).append(p)
    out = []
    for label, members in groups.items():
        left_out = [left_out_text(p) for p in members if not is_complete(p)]
        left_line = ([f"left out, their last values are not final: {'; '.join(left_out)}"] if left_out else [])
        if not metric:
            out.append(Conclusion(label, "-", "no collapse metric in these runs (health.collapse_metric is empty): "
                                              "no conclusion about collapse", left_line, left_out=left_out))
            continue
        sized = sorted((p for p in members if is_complete(p) and p.params is not None and p.metric_series),
                       key=lambda p: p.params)
        if len(sized) < 2 or len({p.params for p in sized}) < 2:
            out.append(Conclusion(label, "-", f"needs 2 or more sizes with measurements that finished, has "
                                              f"{len(sized)}: no conclusion about size", left_line,
                                  left_out=left_out))
            continue
        targets = [p.distinct_targets for p in sized if p.distinct_targets is not None]
        if diverse_above is not None:
            threshold, why = diverse_above, f"--diverse-above {diverse_above:g}"
        elif targets:
            median = sorted(targets)[len(targets) // 2]
            threshold, why = median / 2, f"half the {median:g} distinct true next tokens in the batch"
        else:
            threshold, why = 100.0, "the BitNet size study's 100 tokens (no distinct_targets logged)"
        finals = [(p, p.metric_series[-1][1], p.metric_series[-1][0]) for p in sized]
        numbers = [f"diverse threshold {threshold:g} ({why}); collapse below {collapse_min:g}"]
        for p, v, step in finals:
            kind = "diverse" if v >= threshold else "collapsed" if v < collapse_min else "partial"
            low = min(x for _, x in p.metric_series)
            dip = f", minimum {low:g}" if low < v else ""
            numbers.append(f"{_size_label(p)} ({p.params:,} params): {metric} {v:g} at step {step}{dip} -> {kind}")
        diverse = [v >= threshold for _, v, _ in finals]
        if all(diverse):
            rule, verdict = "1", (f"no size collapses: every size in this sweep stays diverse at these settings "
                                  f"(scaling fixes it from the smallest size, {_size_label(sized[0])})")
        elif not any(diverse):
            rule, verdict = "3", f"no size stays diverse: LR is the lever; next: {_next_lr_step(sized)}"
        else:
            first, last = diverse.index(True), len(diverse) - 1 - diverse[::-1].index(True)
            pattern = ", ".join(f"{_size_label(p)} {'diverse' if d else 'not'}" for (p, _, _), d in zip(finals, diverse))
            if all(diverse[first:]):
                rule, verdict = "2", f"scaling fixes it from size {_size_label(sized[first])}"
            elif all(diverse[:last + 1]):
                rule, verdict = "4", (f"larger sizes lose diversity (diverse up to {_size_label(sized[last])} only): "
                                      f"LR is the lever; next: {_next_lr_step(sized)}")
            else:
                rule, verdict = "5", f"non-monotonic: investigate ({pattern})"
        fragile = [f"{_size_label(p)} {v:g}" for p, v, _ in finals if abs(v - threshold) <= 0.1 * threshold]
        if fragile:
            numbers.append(f"within 10 % of the diverse threshold, so the verdict hangs on them: {', '.join(fragile)}")
        out.append(Conclusion(label, rule, verdict, numbers + left_line, threshold, left_out))
    return out


def _next_lr_step(points: list[PointResult]) -> str:
    if all(p.lr_scale == "sqrt" for p in points):
        return "a lower optim.lr (these points already scale it by sqrt(lr_scale_base / width))"
    return "the same sweep with --set optim.lr_scale=sqrt, or a lower optim.lr"


def fits(points: list[PointResult], floor: float = 0.0) -> dict[str, PowerLawFit]:
    groups: dict[str, list[PointResult]] = {}
    for p in points:
        if is_complete(p) and p.params is not None and p.final_loss is not None and math.isfinite(p.final_loss):
            groups.setdefault(_group_label(p), []).append(p)
    return {label: fit_power_law([p.params for p in ps], [p.final_loss for p in ps], floor=floor)
            for label, ps in groups.items()}


def table_steps(points: list[PointResult], at: list[int] | None) -> list[int]:
    """--at as given; else the evaluated steps nearest 10 %, 40 % and 100 % of train.steps (the BitNet
    size study's 1k / 4k / 10k of 10k), so every cell holds a measurement rather than an older one."""
    if at:
        return sorted(at)
    total = max((p.total_steps or 0 for p in points), default=0)
    evaluated = sorted({s for p in points for s, _ in p.metric_series})
    if not total:
        return []
    targets = [max(1, round(total * f)) for f in TABLE_FRACTIONS]
    if not evaluated:
        return targets
    return sorted({min(evaluated, key=lambda s: (abs(s - t), s)) for t in targets})


def write_sweep_report(sweep_dir: Path, at: list[int] | None = None,
                       diverse_above: float | None = None) -> tuple[Path, Path, list[str]]:
    """Write sweep_report.md/.html and sweep_summary.json; returns their paths and the lines to print."""
    manifest = read_manifest(sweep_dir)
    if manifest is None:
        from trainlab.errors import UsageError

        raise UsageError(f"sweep directory {sweep_dir}: no sweep.json (not a trainlab sweep directory?)")
    points, metric = load_points(sweep_dir, manifest)
    collapse_min = next((p.collapse_min for p in points if p.collapse_min is not None), 10.0)
    experiment = next((p.run.experiment for p in points if p.run is not None and p.run.experiment is not None), None)
    findings = experiment.sweep_findings(points) if experiment is not None else None
    steps = table_steps(points, at)
    conclusions = findings.conclusions if findings else conclude(points, collapse_min, diverse_above, metric)
    power = {} if findings else fits(points)

    blocks: list = [Heading(1, f"Sweep {sweep_dir.name}")]
    grid = ", ".join(f"{k} = {', '.join(v)}" for k, v in manifest["grid"])
    rules = f"{experiment.name}'s own sweep rules" if findings else "the collapse-against-size rules"
    blocks.append(Para(f"target {manifest['target']}, preset {manifest.get('preset') or '(default)'}, "
                        f"grid {grid}; {len(points)} points, judged by {rules}. Every number below is read from "
                        "the points' run directories."))
    blocks.append(Heading(2, "Conclusion"))
    lines = []
    for c in conclusions:
        head = f"[{c.group}] rule {c.rule}: {c.verdict}"
        lines.append(head)
        lines += [f"    {n}" for n in c.numbers]
        blocks.append(Para(head))
        if c.numbers:
            blocks.append(Table(["numbers used"], [[n] for n in c.numbers]))
    if findings:
        for title, headers, rows in findings.tables:
            blocks += [Heading(2, title), Table(headers, rows, css="numbers")]
            lines += ["", title, " | ".join(headers)] + [" | ".join(r) for r in rows]
    else:
        lines += _size_sections(blocks, points, metric, steps, power)
    plots = sweep_dir / "plots"
    plots.mkdir(exist_ok=True)
    thresholds = sorted({c.diverse_threshold for c in conclusions if c.diverse_threshold is not None})
    for stem, chart, caption in _figures(points, "" if findings else metric, collapse_min, thresholds, power):
        chart.write(plots, stem)
        blocks.append(Figure(f"{stem}.svg", inline_svg(chart.svg()), caption, png=f"{stem}.png"))
    md_path, html_path = sweep_dir / "sweep_report.md", sweep_dir / "sweep_report.html"
    md_path.write_text(to_markdown(blocks), encoding="utf-8")
    html_path.write_text(to_html(blocks, f"trainlab sweep {sweep_dir.name}"), encoding="utf-8")
    summary = {
        "metric": metric, "collapse_min": collapse_min, "table_steps": steps,
        "points": [{"name": p.name, "values": p.values, "state": p.state, "reason": p.reason, "step": p.step,
                    "total_steps": p.total_steps, "judged": is_complete(p), "params": p.params,
                    "final_loss": p.final_loss, "metric_at": {str(s): (_value_at(p.metric_series, s) or [None])[0]
                                                              for s in steps}} for p in points],
        "conclusions": [c.__dict__ for c in conclusions],
        "tables": [{"title": t, "headers": h, "rows": r} for t, h, r in (findings.tables if findings else [])],
        "fits": {k: {"E": f.E, "A": f.A, "alpha": f.alpha, "alpha_interval": f.alpha_interval,
                     "E_interval": f.E_interval, "dof": f.dof, "note": f.note} for k, f in power.items()},
    }
    (sweep_dir / "sweep_summary.json").write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
    return md_path, html_path, lines


def _size_sections(blocks: list, points: list[PointResult], metric: str, steps: list[int],
                   power: dict[str, PowerLawFit]) -> list[str]:
    """The BitNet size study's table and the power-law fit: appended to `blocks`; returns the lines to print."""
    lines: list[str] = []
    blocks.append(Heading(2, f"{metric or 'collapse metric'} by size and step (the BitNet size study's table)"))
    headers = ["point", "params (non-embedding)", "state"] + [f"step {s}" for s in steps] + ["final " + (
        points[0].loss_col if points and points[0].loss_col else "loss")]
    rows = []
    for p in sorted(points, key=lambda p: (_group_label(p), p.params or 0)):
        cells = [p.name, f"{p.params:,}" if p.params else "-",
                 f"{p.state} at {format_number(p.step)}/{format_number(p.total_steps)}"]
        for s in steps:
            hit = _value_at(p.metric_series, s)
            cells.append("-" if hit is None else f"{hit[0]:g}" + ("" if hit[1] == s else f" (step {hit[1]})"))
        cells.append(format_number(p.final_loss))
        rows.append(cells)
    blocks.append(Table(headers, rows, css="numbers"))
    lines.append("")
    lines.append(" | ".join(headers))
    lines += [" | ".join(r) for r in rows]

    blocks.append(Heading(2, "Final loss against size"))
    for label, fit in power.items():
        blocks.append(Para(f"[{label}] {fit.describe()}"))
        lines.append(f"[{label}] power law: {fit.describe()}")
    unfinished = [left_out_text(p) for p in points if not is_complete(p)]
    if unfinished:
        text = f"not in the fit, their last loss is not final: {'; '.join(unfinished)}"
        blocks.append(Para(text))
        lines.append(text)
    return lines


def _figures(points: list[PointResult], metric: str, collapse_min: float, thresholds: list[float],
             power: dict[str, PowerLawFit]) -> list[tuple[str, "Chart", str]]:
    """(file stem in plots/, chart, caption) of each figure of the sweep report."""
    from trainlab.report.figures import line_chart

    figs = []
    loss_col = next((p.loss_col for p in points if p.loss_col), "loss")
    curves = [(p.name, p.loss_series) for p in points if p.loss_series]
    if curves:
        figs.append(("sweep-loss", line_chart(curves, f"{loss_col} of every point", "step", loss_col),
                     f"{loss_col} against step, one line per point"))
    if metric:
        series = [(p.name, p.metric_series) for p in points if p.metric_series]
        if series:
            figs.append(("sweep-collapse", line_chart(
                series, f"{metric} of every point", "step", metric,
                hlines=[(collapse_min, f"collapse below {collapse_min:g}")] +
                       [(t, f"diverse from {t:g}") for t in thresholds]),
                f"{metric} against step; below the collapse line the collapse detector fires, from the "
                "diverse line on a point counts as diverse in the conclusion"))
    measured = [(p, p.params, p.final_loss) for p in points
                if is_complete(p) and p.params and p.final_loss is not None]
    if len(measured) >= 2 and power:  # no fit where an experiment's own rules judge the sweep
        series = []
        for label, fit in power.items():
            pts = sorted((float(n), loss) for p, n, loss in measured if _group_label(p) == label)
            series.append((f"measured [{label}]", pts))
            if fit.alpha is not None:
                lo, hi = math.log10(pts[0][0]), math.log10(pts[-1][0])
                grid = [10 ** (lo + (hi - lo) * i / 40) for i in range(41)]
                series.append((f"fit [{label}]", [(n, float(fit.predict(n))) for n in grid]))
        figs.append(("sweep-powerlaw", line_chart(
            series, f"final {loss_col} against size", "parameters (non-embedding)", f"final {loss_col}",
            log_x=True), "final loss of each point against its size, with the fitted L = E + A N^-alpha"))
    return figs
