"""`trainlab sweep`: from the command line (or a sweep YAML) to points, processes, table and report."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

from trainlab.errors import EXIT_STOPPED, UsageError
from trainlab.sweep.spec import (SweepSpec, check_grid, check_same_sweep, is_sweep_file, load_sweep_file,
                                 parse_grid, write_manifest)


def _steps_list(text: str | None) -> list[int] | None:
    if not text:
        return None
    try:
        steps = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UsageError(f"--at {text!r}: expected comma-separated steps, e.g. --at 1000,4000,10000") from None
    if not steps or min(steps) < 1:
        raise UsageError(f"--at {text!r}: steps must be positive integers")
    return steps


def build_spec(args) -> SweepSpec:
    from trainlab.experiment import canonical_reference, is_reference
    from trainlab.sweep.runner import gpu_ids

    file: dict = {}
    target = args.target
    yaml_target = target.endswith((".yaml", ".yml")) and Path(target).is_file()
    # a YAML with grid: is a sweep file; without --grid a YAML target must be one (load it to say why not)
    if is_sweep_file(target) or (yaml_target and not args.grid):
        file = load_sweep_file(target)
        target = file["target"]
    grid = check_grid(list(file.get("grid", [])) + parse_grid(args.grid), "sweep file and --grid")
    if not grid:
        raise UsageError("sweep: no grid; give --grid KEY=V1,V2,... or a sweep YAML with grid:")
    keys = [k for k, _ in grid]
    sets = list(file.get("set", [])) + list(args.sets)
    for item in sets:
        key = item.partition("=")[0].strip()
        if key in keys:
            raise UsageError(f"sweep: {key} is both a grid key and a --set; the grid gives it its values")
    if target.endswith((".yaml", ".yml")) and Path(target).is_file():
        target = str(Path(target).resolve())  # points may start in another directory (Ray workers)
    elif is_reference(target):  # the same for an experiment in the user's own file
        target = canonical_reference(target)
    parallel = args.parallel if args.parallel is not None else file.get("parallel", 1)
    if parallel < 1:
        raise UsageError(f"--parallel {parallel}: must be >= 1")
    nproc = args.nproc_per_point if args.nproc_per_point is not None else file.get("nproc_per_point", 1)
    if nproc < 1:
        raise UsageError(f"--nproc-per-point {nproc}: must be >= 1")
    gpus = args.gpus.split(",") if args.gpus else file.get("gpus", [])
    if any(not g.strip().isdigit() for g in gpus):
        raise UsageError(f"--gpus {','.join(gpus)}: expected comma-separated GPU indices, e.g. --gpus 0,1")
    gpus = gpu_ids([g.strip() for g in gpus], os.environ.get("CUDA_VISIBLE_DEVICES"))
    backend = args.backend or file.get("backend", "local")
    if gpus and backend == "local" and nproc > len(gpus):
        raise UsageError(f"--nproc-per-point {nproc}: a point needs {nproc} distinct GPUs but --gpus gives "
                         f"{len(gpus)}; give at most {len(gpus)} or more --gpus indices")
    steps = args.steps if args.steps is not None else file.get("steps")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: must be >= 1")
    return SweepSpec(target=target, preset=args.preset or file.get("preset"), sets=sets, steps=steps, grid=grid,
                     device=args.device or file.get("device", "auto"), parallel=parallel,
                     backend=backend, gpus=gpus, nproc_per_point=nproc)


def print_sweep_report(sweep_dir: Path, at: list[int] | None = None, diverse_above: float | None = None) -> None:
    """Write the sweep report and print its conclusion, table and fit (exit 2 without a sweep.json)."""
    from trainlab.sweep.report import write_sweep_report

    md, html, lines = write_sweep_report(sweep_dir, at, diverse_above)
    print("\n".join(lines))
    print(f"trainlab: wrote {md} and {html}")


def run_sweep_command(args) -> int:
    from trainlab.launch import load_target, resolve_device
    from trainlab.sweep.runner import PointState, Table, already_finished, run_local, run_ray

    at = _steps_list(args.at)
    if args.report_only:
        if not args.sweep_dir:
            raise UsageError("--report-only needs --sweep-dir (the sweep directory to report on)")
        print_sweep_report(Path(args.sweep_dir), at, args.diverse_above)
        return 0
    if not args.target:
        raise UsageError("trainlab sweep needs a TARGET (an experiment name, a run-config YAML or a sweep YAML); "
                         "only --report-only --sweep-dir DIR goes without one")
    spec = build_spec(args)
    if spec.device != "auto" and spec.backend == "local":
        resolve_device(spec.device)  # refuse --device cuda on a machine without CUDA, before anything starts
    per_point = 0.0
    if spec.backend == "ray":
        if importlib.util.find_spec("ray") is None:
            raise UsageError("--backend ray needs Ray (pip install 'trainlab[ray]'); allowed without it: "
                             "--backend local")
        import torch

        # one GPU for each of a point's ranks
        per_point = args.gpus_per_point if args.gpus_per_point is not None else \
            (float(spec.nproc_per_point) if torch.cuda.is_available() else 0.0)
        if per_point < 0:
            raise UsageError(f"--gpus-per-point {per_point}: must be >= 0")
    points = spec.points()
    # every point's config is resolved here, so a bad key or value stops the sweep before it starts
    resolved = {}
    for point in points:
        experiment, cfg = load_target(spec.target, spec.preset, spec.sets + point.sets, spec.steps)
        resolved[point.name] = (experiment, cfg)
    experiment, cfg = resolved[points[0].name]
    keys = "-".join(k.rsplit(".", 1)[-1] for k, _ in spec.grid)
    sweep_dir = Path(args.sweep_dir) if args.sweep_dir else Path("runs") / f"sweep-{experiment.name}-{cfg.preset}-{keys}"
    sweep_dir = sweep_dir.resolve()
    if sweep_dir.exists() and not sweep_dir.is_dir():
        raise UsageError(f"--sweep-dir {sweep_dir}: exists and is not a directory")
    check_same_sweep(sweep_dir, spec)
    write_manifest(sweep_dir, spec, points)

    states = []
    for point in points:
        run_dir = sweep_dir / point.name
        total = resolved[point.name][1].train.steps
        state = PointState(point, run_dir, total)
        if already_finished(run_dir, total):
            state.state, state.note = "skipped", "finished before"
        states.append(state)
    skipped = sum(s.state == "skipped" for s in states)
    print(f"trainlab: sweep of {len(points)} points into {sweep_dir} ({skipped} finished before, skipped); "
          f"{spec.parallel} at a time"
          f"{f', {spec.nproc_per_point} processes per point' if spec.nproc_per_point > 1 else ''}, "
          f"backend {spec.backend}; logs in {sweep_dir / 'logs'}", flush=True)
    metric = cfg.health.collapse_metric
    table = Table(states, metric)
    table.update(force=True)
    try:
        if spec.backend == "ray":
            signal_code = run_ray(spec, states, table, sweep_dir / "logs", per_point, args.ray_address)
        else:
            signal_code = run_local(spec, states, table, sweep_dir / "logs")
        table.update()
    finally:
        table.close()
    print_sweep_report(sweep_dir, at, args.diverse_above)
    if signal_code is not None:
        print("trainlab: sweep interrupted; the running points saved checkpoints; rerun the same command to "
              "resume them", file=sys.stderr)
        return signal_code
    bad = [s for s in states if s.state not in ("finished", "skipped")]
    if bad:
        print("trainlab: " + "; ".join(f"{s.point.name} {s.state}{': ' + s.note if s.note else ''} "
                                       f"(exit {s.exit_code}, log {sweep_dir / 'logs' / (s.point.name + '.log')})"
                                       for s in bad), file=sys.stderr)
        return EXIT_STOPPED
    return 0
