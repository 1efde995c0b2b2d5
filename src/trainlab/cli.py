"""trainlab's command line: list · run · runs · config · preflight · check · watch · report · sweep.

Exit codes: 0 finished (or nothing left to do); 1 stopped by a health policy or a training failure;
2 invalid input (one line on stderr, nothing written); 130 after SIGINT, 143 after SIGTERM, each
once the checkpoint is saved.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import traceback
from pathlib import Path

from trainlab.errors import EXIT_SIGINT, EXIT_STOPPED, EXIT_USAGE, Interrupted, TrainingStopped, UsageError, brief
from trainlab.formatting import format_duration, format_number  # plain standard library: cheap at start-up


class _Parser(argparse.ArgumentParser):
    """argparse prints usage and exits 2 itself; we want our one-line message instead."""

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{self.prog}: {message}")


def _add_target_options(p: argparse.ArgumentParser, steps_help: str = "shorthand for --set train.steps=N",
                         target_nargs: str | None = None) -> None:
    p.add_argument("target", nargs=target_nargs,
                   help="experiment name (trainlab list), a YAML config file, or your own experiment: "
                        "path/to/file.py:NAME or package.module:NAME (docs/adding-an-experiment.md)")
    p.add_argument("--preset", help="preset of the experiment (default: the experiment's default)")
    p.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                   help="override one config key, e.g. --set optim.lr=3e-4 (repeatable)")
    p.add_argument("--steps", type=int, help=steps_help)


def _add_log_options(log_opts, steps_help: str = "planned length of the run, for warm-up (default: the last "
                                                  "step in the log)", steps: bool = True) -> None:
    """The options that say how to read a log trainlab did not write: `check` and `watch` take the same
    (`preflight --log` too, without --steps: its --steps is the length of its own run)."""
    log_opts.add_argument("--baseline", metavar="LOSS|bce|ce:V",
                          help="the loss of a random guess: a number, bce (ln 2) or ce:V (ln V for V classes); "
                               "without it the stuck detector is not measured")
    if steps:
        log_opts.add_argument("--steps", type=int, help=steps_help)
    log_opts.add_argument("--out", metavar="DIR", help="where check.json and the report go (default: "
                                                       "<log name>.trainlab/ beside the log)")
    log_opts.add_argument("--format", dest="log_format", choices=["csv", "jsonl", "json", "tensorboard"],
                          help="the log's format (default: from its name and first bytes)")
    for role, flag, names in (("step", "--step-col", "step, global_step, iteration, iter, epoch"),
                              ("loss", "--loss-col", "loss, train_loss, train/loss"),
                              ("acc", "--train-metric", "acc, accuracy, train_acc"),
                              ("val_acc", "--val-metric", "val_acc, eval_accuracy, val/acc"),
                              ("val_loss", "--val-loss-col", "val_loss, eval_loss, val/loss"),
                              ("grad_norm", "--grad-norm-col", "grad_norm"),
                              ("lr", "--lr-col", "lr, learning_rate")):
        log_opts.add_argument(flag, dest=f"col_{role}", metavar="COLUMN",
                              help=f"the column read as {role} (default: the first of {names} in the log)")


def _log_columns(args) -> dict[str, str | None]:
    """The column of each role the user named with _add_log_options' flags (None: found by name)."""
    return {k[4:]: v for k, v in vars(args).items() if k.startswith("col_")}


def _log_flags_given(args, steps: bool = True) -> list[str]:
    """The log-reading flags of _add_log_options the user gave, as typed: for the one-line refusal
    of a flag that means nothing for a trainlab experiment or run directory."""
    from trainlab.health.foreign import ROLE_FLAGS

    given = [(f, v) for f, v in (("--baseline", args.baseline), ("--steps", args.steps if steps else None),
                                 ("--out", args.out), ("--format", args.log_format))]
    return ([f for f, v in given if v is not None]
            + [ROLE_FLAGS[role] for role, v in _log_columns(args).items() if v is not None])


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="trainlab", description="Train small experimental networks and know, with "
                     "measured evidence, whether a run is healthy.")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    sub.add_parser("list", help="experiments and their presets")

    run = sub.add_parser("run", help="train (resumes automatically from the run directory)")
    _add_target_options(run)
    run.add_argument("--run-dir", help="run directory (default: runs/<experiment>-<preset>)")
    run.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="where to train: auto (default) = CUDA if available, else MPS, else the CPU")
    run.add_argument("--fresh", action="store_true",
                     help="start from step 0; an existing run directory is moved aside, never deleted")
    run.add_argument("--nproc", type=int, metavar="N",
                     help="data-parallel over N processes on this machine, one per GPU (gloo on the CPU): starts "
                          "torchrun for you (torchrun --standalone --nproc-per-node N -m trainlab run ...); "
                          "several machines: docs/distributed.md")

    pre = sub.add_parser("preflight", help="a short real run, measured: is this run worth its GPU hours?")
    _add_target_options(pre, steps_help="steps of the preflight run (default 200; its config's train.steps "
                                        "is the planned length)", target_nargs="?")
    pre.add_argument("--run-dir", help="where the preflight runs (default: runs/<experiment>-<preset>-preflight; "
                                       "an old one is moved aside)")
    pre.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda", "mps"],
                     help="where the preflight runs (measure on the device the real run will use): auto (default) "
                          "= CUDA if available, else MPS, else the CPU")
    pre.add_argument("--planned-steps", type=int, help="steps of the real run, for the ETA and the projection "
                                                       "(default: train.steps)")
    pre.add_argument("--max-seconds", type=float, default=300.0, help="time budget of the preflight run")
    pre.add_argument("--target", dest="targets", action="append", default=[], metavar="'METRIC>=LEVEL'",
                     help="a goal of the run, projected to the planned step: a logged metric, >=, <=, > or <, a "
                          "level, e.g. --target 'val_acc>=0.9' (quoted: the shell reads > as a redirection; "
                          "repeatable; READY needs every goal projected to be reached)")
    foreign = pre.add_argument_group("someone else's script: trainlab preflight --log PATH --max-seconds S "
                                     "[options] -- COMMAND ... (no target)")
    foreign.add_argument("--log", metavar="PATH", help="the log COMMAND writes (CSV, JSON Lines, JSON or a "
                                                       "TensorBoard directory); COMMAND runs --max-seconds, then "
                                                       "the verdict from its log")
    foreign.add_argument("--grace", type=float, default=30.0, metavar="S",
                         help="seconds COMMAND has after SIGINT, then after SIGTERM, to save and exit (default 30)")
    _add_log_options(foreign, steps=False)

    check = sub.add_parser("check", help="run the health detectors over a run directory's metrics, or over a "
                                         "log another training loop wrote (CSV, JSON Lines, JSON, TensorBoard)")
    check.add_argument("run_dir", metavar="PATH",
                       help="a run directory, e.g. runs/modadd-quick (its metrics.csv and config.yaml are read; the "
                            "verdicts go to check.json there), or another loop's log: a CSV file, JSON Lines, a JSON "
                            "list of rows or dict of columns, a TensorBoard log directory (verdicts and report go to "
                            "<log name>.trainlab/ beside it, or --out)")
    _add_log_options(check.add_argument_group("a log trainlab did not write"))

    watch = sub.add_parser("watch", help="run someone else's training script and its log through the live "
                                         "detectors: trainlab watch --log PATH [options] -- COMMAND ...")
    watch.add_argument("--log", metavar="PATH", help="the log COMMAND writes: CSV, JSON Lines, JSON or a TensorBoard "
                                                     "directory (it may appear after COMMAND starts)")
    watch.add_argument("--policy", dest="policies", action="append", default=[], metavar="NAME=warn|stop",
                       help="what an alert of detector NAME does: warn (the default for every detector) or stop "
                            "(send the child --stop-signal, then SIGTERM, then SIGKILL, --grace seconds apart; "
                            "exit 1); repeatable")
    watch.add_argument("--poll", type=float, default=1.0, metavar="S", help="seconds between reads of the log "
                                                                            "(default 1)")
    watch.add_argument("--grace", type=float, default=30.0, metavar="S",
                       help="seconds the child has after each signal of a stop to save and exit (default 30)")
    watch.add_argument("--stop-signal", default="INT", metavar="SIG",
                       help="the first signal of a stop: INT (the default: a script's Ctrl-C handler saves its "
                            "checkpoint), TERM, HUP, QUIT, USR1 or USR2")
    _add_log_options(watch.add_argument_group("how to read the log (as trainlab check)"),
                     steps_help="planned length of the run, for warm-up (default: none while it runs; the final "
                                "check takes the last step in the log)")
    watch.add_argument("child_command", nargs=argparse.REMAINDER, metavar="-- COMMAND ...",
                       help="the training script and its arguments, after --")

    report = sub.add_parser("report", help="write report.md and report.html for a run directory")
    report.add_argument("run_dir", help="a run directory, e.g. runs/modadd-quick, or a sweep directory")

    sweep = sub.add_parser("sweep", help="a grid of runs, K at a time, each its own process; then the sweep report")
    sweep.add_argument("target", nargs="?", help="experiment name, a run-config YAML, or a sweep YAML (one with "
                                                "grid:); not needed with --report-only")
    sweep.add_argument("--grid", action="append", default=[], metavar="KEY=V1,V2,...",
                       help="a config key and its values, e.g. --grid model.hidden=256,512 (repeatable: the "
                            "points are every combination)")
    sweep.add_argument("--preset", help="preset of every point")
    sweep.add_argument("--set", dest="sets", action="append", default=[], metavar="KEY=VALUE",
                       help="override for every point (repeatable)")
    sweep.add_argument("--steps", type=int, help="train.steps of every point")
    sweep.add_argument("--parallel", type=int, help="points running at once (default 1)")
    sweep.add_argument("--nproc-per-point", type=int, metavar="N",
                       help="processes per point: each point runs as a torchrun job of N ranks (data-parallel; "
                            "`trainlab run --nproc N`); default 1")
    sweep.add_argument("--device", choices=["auto", "cpu", "cuda", "mps"], help="device of every point (default auto)")
    sweep.add_argument("--gpus", help="comma-separated GPU indices: each point gets one, or N with --nproc-per-point N "
                                      "(least busy first); "
                                      "default: points share the visible GPUs")
    sweep.add_argument("--sweep-dir", help="where the points' run directories go (default runs/sweep-<experiment>-"
                                           "<preset>-<grid keys>)")
    sweep.add_argument("--backend", choices=["local", "ray"], help="local processes (default) or Ray tasks")
    sweep.add_argument("--gpus-per-point", type=float, help="Ray backend: GPUs each point requests (default 1 "
                                                            "where CUDA is available, else 0; 0.25 shares one by 4)")
    sweep.add_argument("--ray-address", help="Ray backend: cluster address (default: start a local one)")
    sweep.add_argument("--at", help="steps of the report's table, e.g. 1000,4000,10000 (default 10/40/100 %% "
                                    "of train.steps)")
    sweep.add_argument("--diverse-above", type=float, help="collapse metric at or above which a point counts as "
                                                           "diverse (default: half the distinct true next tokens)")
    sweep.add_argument("--report-only", action="store_true", help="write the report of the sweep directory "
                                                                  "as it stands, run nothing")

    runs = sub.add_parser("runs", help="the runs under a root with their status")
    runs.add_argument("root", nargs="?", default="runs", help="where to look for run directories (default: runs)")

    use = sub.add_parser("use", help="do what an experiment offers with a trained run (StegaStamp: hide and "
                                     "reveal text in images); `trainlab use RUN_DIR` lists its commands")
    use.add_argument("run_dir", type=Path, help="a trained run's directory")
    use.add_argument("name", nargs="?", help="the command (omit to list them)")
    use.add_argument("args", nargs=argparse.REMAINDER, help="the command's own arguments (its --help lists them)")
    show = sub.add_parser("config", help="print the resolved config of a target as YAML")
    _add_target_options(show)
    return parser


def cmd_list(args) -> int:
    from trainlab.experiment import available

    for item in available():
        exp, origin = item.experiment, f" (from {item.origin})" if item.origin else ""
        if exp is None:  # an installed one that does not load or is shadowed: one line, the others still listed
            print(f"{item.name} ({item.origin}): {item.problem}")
            continue
        print(f"{exp.name}: {exp.description}{origin}")
        for name, preset in exp.presets.items():
            mark = " (default)" if name == exp.default_preset else ""
            print(f"  {exp.name} --preset {name}{mark}: {preset.description}")
    return 0


def cmd_use(args) -> int:
    from trainlab.health.check import load_run

    experiment, cfg, _ = load_run(args.run_dir)
    commands = experiment.commands()
    offered = ", ".join(commands) or "none"
    if args.name is None:
        if not commands:
            print(f"{args.run_dir} is a {experiment.name} run; {experiment.name} offers no commands")
        for name, command in commands.items():
            print(f"trainlab use {args.run_dir} {name}: {command.help}")
        return 0
    if args.name not in commands:
        raise UsageError(f"{args.run_dir} is a {experiment.name} run; {experiment.name} has no command "
                         f"{args.name!r} (its commands: {offered})")
    return commands[args.name].run(args.run_dir, cfg, list(args.args))


def cmd_config(args) -> int:
    from trainlab.config import dump_yaml
    from trainlab.launch import load_target

    _, cfg = load_target(args.target, args.preset, args.sets, args.steps)
    print(dump_yaml(cfg), end="")
    return 0


def _summary(row: dict, keys: tuple[str, ...]) -> str:
    """The last row's numbers for the closing line: "loss 2.879, acc 0.1219"."""
    return ", ".join(f"{k} {format_number(row[k])}" for k in keys if isinstance(row.get(k), (int, float)))


def _already_finished(run_dir: Path, step: int, steps: int) -> str:
    return (f"trainlab: {run_dir} already finished at step {step} (train.steps={steps}); pass --steps N with a "
            "larger N to extend it, or --fresh to start over")


def _run_as_job(args, experiment, cfg, device, run_dir: Path) -> int:
    """`trainlab run --nproc N`: every check here first (a refusal is one line, before any process
    starts), then the same command as a torchrun job of N processes."""
    from trainlab.engine.distributed import run_local_job
    from trainlab.launch import Launch

    if args.nproc < 1:
        raise UsageError(f"--nproc {args.nproc}: allowed: 1 or more processes")
    if device.type == "cuda":
        import torch

        if args.nproc > torch.cuda.device_count():
            raise UsageError(f"--nproc {args.nproc}: this machine has {torch.cuda.device_count()} CUDA GPUs "
                             "visible; allowed: 1 to that many (or --device cpu)")
    elif device.type != "cpu":
        raise UsageError(f"--nproc with --device {device.type}: allowed: cuda (NCCL) or cpu (gloo)")
    launch = Launch(experiment, cfg, run_dir, device, world_size=args.nproc)
    launch.prepare(args.fresh)  # --fresh moves the old run aside here, once
    if launch.already_done_at is not None:
        print(_already_finished(run_dir, launch.already_done_at, cfg.train.steps))
        return 0
    if launch.moved_to is not None:
        print(f"trainlab: {launch.notes[0]}", file=sys.stderr)
    command = ["-m", "trainlab", "run", args.target, "--run-dir", str(run_dir), "--device", device.type]
    if args.preset:
        command += ["--preset", args.preset]
    for item in args.sets:
        command += ["--set", item]
    if args.steps is not None:
        command += ["--steps", str(args.steps)]
    return run_local_job(command, args.nproc, str(run_dir))


def cmd_run(args) -> int:
    from trainlab.engine.distributed import World, launched_by_torchrun
    from trainlab.launch import default_run_dir, load_target, resolve_device

    experiment, cfg = load_target(args.target, args.preset, args.sets, args.steps)
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir) if args.run_dir else default_run_dir(cfg)
    if args.nproc is not None:
        if launched_by_torchrun():
            raise UsageError(f"--nproc {args.nproc}: this process is already one of a torchrun job; "
                             "give the process count to torchrun (--nproc-per-node) alone")
        return _run_as_job(args, experiment, cfg, device, run_dir)
    world = World.from_environment(device.type)
    try:
        code = _run_here(args, experiment, cfg, world.device(device), run_dir, world)
    except BaseException:
        world.close()
        raise
    if world.distributed:
        # every file is closed and the ranks have met at their last barrier: leave now.  Tearing the
        # process groups down (or letting the interpreter do it) while the peer does the same now and
        # then aborts in gloo's C++ destructors ("terminate called without an active exception",
        # SIGABRT), which torchrun reports as a dead rank after a finished run
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)
    return code


def _run_here(args, experiment, cfg, device, run_dir: Path, world) -> int:
    """The run in this process (one rank of a torchrun job, or the whole run).  Rank 0 prints."""
    from trainlab.launch import Launch

    def say(text: str, stream=sys.stderr) -> None:
        if world.is_main:
            print(text, file=stream, flush=True)

    launch = Launch(experiment, cfg, run_dir, device, world=world)
    code = _run_launch(launch, args.fresh, experiment, run_dir, world, say)
    if world.size > 1 and launch.trainer is not None and launch.trainer.ending_agreed:
        # an ending every rank took together: none leaves before rank 0 has said why (torchrun stops
        # the others as soon as one rank exits with an error code)
        world.barrier()
    return code


def _run_launch(launch, fresh: bool, experiment, run_dir: Path, world, say) -> int:
    launch.prepare_on_every_rank(fresh)
    cfg = launch.cfg
    if launch.already_done_at is not None:
        say(_already_finished(run_dir, launch.already_done_at, cfg.train.steps), sys.stdout)
        return 0
    for note in launch.notes:
        say(f"trainlab: {note}")
    keys = ("loss",) + experiment.train_metrics + experiment.eval_metrics
    try:
        result = launch.run()
    except TrainingStopped as exc:
        say(f"trainlab: stopped: {exc} ({run_dir})")
        return EXIT_STOPPED
    except Interrupted as exc:
        say(f"trainlab: {exc.signal_name}: checkpoint saved; rerun the same command to resume ({run_dir})")
        return exc.exit_code
    except KeyboardInterrupt:  # a second Ctrl-C before the first one's checkpoint, or one outside the loop
        say(f"trainlab: interrupted before a checkpoint could be saved; rerun the same command to resume "
            f"from the last one ({run_dir})")
        return EXIT_SIGINT
    except UsageError:
        raise
    except Exception as exc:  # a training failure: the traceback goes to the run directory
        log = run_dir / ("error.log" if world.is_main else f"error.rank{world.rank}.log")
        try:
            log.write_text(traceback.format_exc(), encoding="utf-8")
        except OSError:
            log = None
        where = f"; traceback in {log}" if log else ""
        print(f"trainlab: training failed: {type(exc).__name__}: {brief(exc, 300)}{where}",
              file=sys.stderr)
        return EXIT_STOPPED
    ended = f" ({result.reason})" if result.reason else ""  # a time budget or --stop-at ended it early
    say(f"trainlab: finished {run_dir.name} at step {result.step}/{result.total_steps}{ended}: "
        f"{_summary(result.last_row, keys)} in {format_duration(result.elapsed_s)} -> {run_dir}", sys.stdout)
    return 0


def cmd_runs(args) -> int:
    from trainlab.engine.rundir import find_runs, summarize

    root = Path(args.root)
    if not root.is_dir():
        raise UsageError(f"runs root {root}: not a directory")
    summaries = [summarize(p) for p in find_runs(root)]
    if not summaries:
        print(f"no runs under {root}")
        return 0
    header = ("run", "status", "step", "loss", "updated")
    rows = []
    now = time.time()
    for s in summaries:
        step = "-" if s.step is None else (f"{s.step}/{s.total}" if s.total else str(s.step))
        loss = "-" if s.loss is None else f"{s.loss:.4g}"
        updated = "-" if s.updated is None else f"{format_duration(now - s.updated)} ago"
        name = str(s.path.relative_to(root)) if s.path != root else str(s.path)
        status = s.state + (f" ({s.reason})" if s.reason and s.state in ("stopped", "crashed") else "")
        rows.append((name, status, step, loss, updated))
    widths = [max(len(r[i]) for r in rows + [header]) for i in range(len(header) - 1)]
    for r in [header] + rows:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1])
    return 0


PREFLIGHT_DEFAULT_STEPS = 200


def _print_claims(claims) -> None:
    width = max(len(c.name) for c in claims)
    for c in claims:
        print(f"  {c.name.ljust(width)}  {c.verdict.upper():12s} {c.value}")


def _foreign_preflight(args) -> int:
    from trainlab.health.foreign_preflight import run_foreign_preflight

    if args.target is not None:
        raise UsageError(f"preflight: a target ({args.target}) or --log PATH -- COMMAND, not both")
    not_here = [f for f, v in (("--steps", args.steps), ("--preset", args.preset), ("--run-dir", args.run_dir))
                if v is not None] + (["--set"] if args.sets else []) + (["--target"] if args.targets else [])
    if not_here:
        raise UsageError(f"preflight --log: {', '.join(not_here)} only for a trainlab experiment (the script's "
                         "own length is --planned-steps, its budget --max-seconds)")
    if not args.grace >= 0:
        raise UsageError(f"--grace {args.grace}: seconds, 0 or more")
    return run_foreign_preflight(args.child_command, Path(args.log) if args.log else None,
                                 Path(args.out) if args.out else None, max_seconds=args.max_seconds,
                                 planned_steps=args.planned_steps, fmt=args.log_format,
                                 columns=_log_columns(args),
                                 baseline=args.baseline, grace=args.grace)


def cmd_preflight(args) -> int:
    args.child_command = getattr(args, "child_command", None) or []
    if args.log is not None or args.child_command:
        return _foreign_preflight(args)
    if args.target is None:
        raise UsageError("trainlab preflight: the following arguments are required: target (or --log PATH -- "
                         "COMMAND for someone else's script)")
    log_only = _log_flags_given(args, steps=False)  # preflight's own --steps is its run's length
    if log_only:
        raise UsageError(f"preflight: {', '.join(log_only)} only with --log PATH -- COMMAND (someone else's script)")
    from trainlab.config import MAX_STEPS
    from trainlab.health.goals import declared_goals
    from trainlab.health.claims import Claim
    from trainlab.health.preflight import ANSWERED_BY_PREFLIGHT, run_preflight
    from trainlab.launch import Launch, default_run_dir, load_target, resolve_device

    experiment, cfg = load_target(args.target, args.preset, args.sets, None)
    steps = args.steps if args.steps is not None else PREFLIGHT_DEFAULT_STEPS
    if not 20 <= steps <= MAX_STEPS:
        raise UsageError(f"--steps {steps}: allowed: 20 (the fewest that show a trend) to {MAX_STEPS:,}")
    planned = args.planned_steps if args.planned_steps is not None else cfg.train.steps
    if not 1 <= planned <= MAX_STEPS:
        raise UsageError(f"--planned-steps {planned}: allowed: 1 to {MAX_STEPS:,} (as train.steps)")
    if not args.max_seconds > 0:  # NaN too: it compares false with everything, so it would never end the run
        raise UsageError(f"--max-seconds {args.max_seconds}: must be > 0")
    declared_goals(experiment, cfg, args.targets)  # a bad --target is refused before anything is written
    device = resolve_device(args.device)
    run_dir = Path(args.run_dir) if args.run_dir else Path(f"{default_run_dir(cfg)}-preflight")
    launch = Launch(experiment, cfg, run_dir, device)
    launch.prepare(fresh=True)  # a preflight always starts anew; an old one is moved aside
    for note in launch.notes:
        print(f"trainlab: {note}", file=sys.stderr)
    with launch.holding():
        result = run_preflight(experiment, cfg, device, run_dir, steps, planned, args.max_seconds, args.targets)
    # the detectors that fired, beside preflight's own claims (the rest, passed or not measured, are in
    # the report); one whose question a preflight claim answers says which claim decided the verdict
    fired = [Claim(f"detector {c.name}", c.verdict if c.name not in ANSWERED_BY_PREFLIGHT else "info",
                   c.value + (f" (not decisive: the {ANSWERED_BY_PREFLIGHT[c.name]} claim judges the whole run)"
                              if c.name in ANSWERED_BY_PREFLIGHT else ""), c.evidence, c.source)
             for c in result.detector_claims if c.verdict in ("warn", "fail")]
    _print_claims(result.claims + fired)
    why = f": {'; '.join(result.reasons)}" if result.reasons else ""
    print(f"trainlab: preflight {result.verdict}{why} -> {run_dir / 'report.md'}")
    return 0 if result.verdict == "READY" else EXIT_STOPPED


def cmd_check(args) -> int:
    from trainlab.health.check import check_log, check_run, is_foreign_log

    run_dir = Path(args.run_dir)
    log_flags = _log_flags_given(args)
    if args.log_format is not None or is_foreign_log(run_dir):
        result = check_log(run_dir, out=Path(args.out) if args.out else None, fmt=args.log_format,
                           columns=_log_columns(args),
                           baseline=args.baseline, total_steps=args.steps)
        _print_claims(result.claims)
        critical = result.critical
        worst = f": {critical[0]['detector']} at step {critical[0]['step']}" if critical else ""
        print(f"trainlab: check {run_dir}: {len(result.alerts)} alerts, {len(critical)} critical{worst} "
              f"-> {result.out_dir / 'report.html'}")
        return EXIT_STOPPED if critical else 0
    if log_flags:  # a trainlab run knows its baseline, length and columns from its config
        shown = ", ".join(log_flags)
        raise UsageError(f"{shown}: only for a log trainlab did not write; {run_dir} is a trainlab run directory")
    alerts, claims = check_run(run_dir)
    _print_claims(claims)
    serious = [a for a in alerts if a["severity"] in ("critical", "warn")]
    print(f"trainlab: check {run_dir}: {len(alerts)} alerts, {len(serious)} of them warnings or worse "
          f"-> {run_dir / 'check.json'}")
    return EXIT_STOPPED if serious else 0


def cmd_watch(args) -> int:
    from trainlab.health.watcher import run_watch

    command = args.child_command[1:] if args.child_command[:1] == ["--"] else args.child_command
    return run_watch(command, Path(args.log) if args.log else None, Path(args.out) if args.out else None,
                     fmt=args.log_format, columns=_log_columns(args),
                     baseline=args.baseline, total_steps=args.steps, policies=args.policies, poll=args.poll,
                     grace=args.grace, stop_signal=args.stop_signal)


def cmd_report(args) -> int:
    from trainlab.health.evidence import claims_for
    from trainlab.report.render import write_report
    from trainlab.sweep.spec import MANIFEST

    run_dir = Path(args.run_dir)
    if not run_dir.is_dir():
        raise UsageError(f"run directory {run_dir}: not found")
    if (run_dir / MANIFEST).is_file():  # a sweep directory: the sweep report
        from trainlab.sweep.cli import print_sweep_report

        print_sweep_report(run_dir)
        return 0
    if not (run_dir / "metrics.csv").is_file():
        raise UsageError(f"run directory {run_dir}: no metrics.csv (not a trainlab run directory?)")
    try:
        claims = claims_for(run_dir)
    except (TypeError, ValueError) as exc:
        raise UsageError(f"run directory {run_dir}: a saved verdict file is malformed ({exc})") from None
    try:
        md, html = write_report(run_dir, claims)
    except OSError as exc:  # a read-only copy of a run, say: one line, not a traceback
        raise UsageError(f"run directory {run_dir}: cannot write the report ({exc.strerror or exc}: "
                         f"{exc.filename or run_dir})") from None
    print(f"trainlab: wrote {md} and {html}")
    return 0


def cmd_sweep(args) -> int:
    from trainlab.sweep.cli import run_sweep_command

    return run_sweep_command(args)


COMMANDS = {"list": cmd_list, "run": cmd_run, "runs": cmd_runs, "config": cmd_config,
            "preflight": cmd_preflight, "check": cmd_check, "watch": cmd_watch, "report": cmd_report,
            "sweep": cmd_sweep, "use": cmd_use}


def _split_child_command(argv: list[str]) -> tuple[list[str], list[str] | None]:
    """`preflight ... -- COMMAND ...`: (trainlab's arguments, COMMAND); COMMAND is None without `--`.
    Split before argparse, which would read COMMAND's first word as preflight's optional target."""
    if argv[:1] == ["preflight"] and "--" in argv:
        cut = argv.index("--")
        return argv[:cut], argv[cut + 1:]
    return argv, None


def main(argv: list[str] | None = None) -> int:
    try:
        argv, child_command = _split_child_command(list(sys.argv[1:] if argv is None else argv))
        args = build_parser().parse_args(argv)
        if args.command == "preflight":
            args.child_command = child_command or []
        return COMMANDS[args.command](args)
    except UsageError as exc:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, rank 0 says it for the job
            print(f"trainlab: error: {brief(exc, None)}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("trainlab: interrupted", file=sys.stderr)
        return EXIT_SIGINT


if __name__ == "__main__":
    sys.exit(main())
