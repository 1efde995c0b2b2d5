"""From a command line to a running Trainer: target -> config, device, the run directory's
decisions (new, resume, already finished, --fresh), lock, and the resolved config on disk.

Every refusal here happens before anything is written (exit code 2)."""

from __future__ import annotations

import contextlib
import json
import sys
import time
from pathlib import Path

import torch

from trainlab import config as config_mod
from trainlab.config import RunConfig
from trainlab.engine.callbacks import Callback, load_callback
from trainlab.engine.checkpoint import MANIFEST, CheckpointStore
from trainlab.engine.distributed import SINGLE, World
from trainlab.engine.memory import refuse_if_it_cannot_fit
from trainlab.engine.rundir import CONFIG_FILE, RunLock, check_usable, has_run, move_aside, read_run_config, read_status
from trainlab.engine.trainer import RunResult, Trainer
from trainlab.errors import UsageError, brief
from trainlab.experiment import Experiment, experiment_for, get_experiment
from trainlab.optim import check_parameter_groups

# A resumed run keeps its model, its data and its optimizer's kind: a change there would load
# mismatched weights, silently train on another task, or feed one optimizer's state to another.
# optim.lr_factors sets the parameter groups, whose layout the saved optimizer state must match.
# Everything else (steps, LR, weight decay, logging...) may change on resume.
FIXED_ON_RESUME = ("experiment", "model.", "data.", "optim.name", "optim.galore_rank", "optim.lr_factors")


def is_config_path(target: str) -> bool:
    """A registered experiment name wins over a stray file of the same name in the cwd; a reference
    (path/to/file.py:NAME, package.module:NAME) is never a config file."""
    from trainlab.experiment import is_reference, known_names

    if is_reference(target) or target in known_names():
        return False
    return target.endswith((".yaml", ".yml")) or Path(target).is_file()


def load_target(target: str, preset: str | None, sets: list[str], steps: int | None) -> tuple[Experiment, RunConfig]:
    overrides = config_mod.parse_set(sets)
    file_data = None
    if is_config_path(target):
        file_data = config_mod.load_yaml_file(target)
        name = file_data.get("experiment")
        if not isinstance(name, str) or not name:
            raise UsageError(f"config file {target}: needs a top-level 'experiment:' key naming the experiment")
        experiment = experiment_for(file_data, f"config file {target}")
        file_preset = file_data.get("preset") or None
        if file_preset is not None and not isinstance(file_preset, str):
            raise UsageError(f"config file {target}: 'preset' must be a string, got {file_preset!r}")
        preset = preset or file_preset or experiment.default_preset
    else:
        experiment = get_experiment(target)
        preset = preset or experiment.default_preset
    return experiment, config_mod.resolve(experiment, preset, file_data, overrides, steps)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device cuda: CUDA is not available here (torch {torch.__version__}); "
                         "allowed here: auto, cpu")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here; allowed here: auto, cpu")
    return torch.device(name)


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.experiment}-{cfg.preset}"


def config_diff(old: dict, new: dict) -> dict[str, tuple]:
    a, b = config_mod.flatten(old), config_mod.flatten(new)
    return {k: (a.get(k), b.get(k)) for k in sorted(set(a) | set(b)) if a.get(k) != b.get(k)}


def _read_saved_config(run_dir: Path) -> dict | None:
    """The config the run directory was run with; None when it has none to compare with."""
    try:
        return read_run_config(run_dir)
    except UsageError as exc:
        raise UsageError(f"{exc}; pass --fresh to start over (the old contents are moved aside)") from None


def run_watchers(cfg: RunConfig, experiment: Experiment, run_dir: Path) -> list[Callback]:
    """The callbacks every run trainlab trains gets (preflight's too): the live health detectors
    and their policies, the heatmaps of the experiment's 2-D evaluation arrays, and the experiment's
    own (Experiment.callbacks)."""
    from trainlab.health.monitor import HealthMonitor
    from trainlab.report.heatmap import HeatmapWriter

    return [HealthMonitor(cfg, experiment.baseline_loss(cfg)), HeatmapWriter(run_dir), *experiment.callbacks(cfg)]


class RunReport(Callback):
    """report.md and report.html at the end of `trainlab run` -- also after a stop or a crash, which
    is when a report is most wanted.  Not after a second Ctrl-C: the user asked to leave now.  A
    report that cannot be drawn must not fail the run: one line says so, `trainlab report` retries.

    The report carries the detectors' verdicts, the claims `trainlab check` makes (the same code,
    health.check.judge, over metrics.csv: the live detectors' state is a function of its rows), and
    writes them to check.json as `trainlab check` does: so `trainlab report` later shows the same
    verdicts, and a check.json from before a resume or an extension never stays behind, stale.  It
    costs 1-2 ms per log row (1400 rows: 1.2-2.3 s on one core of a loaded 2-core machine; a smoke
    run's 8 rows: under a millisecond)."""

    def on_fit_end(self, trainer, result) -> None:
        if isinstance(result.error, KeyboardInterrupt):
            return
        from trainlab.engine.logs import METRICS_FILE, read_metrics
        from trainlab.health.check import CHECK_FILE, judge, save_check
        from trainlab.health.evidence import claims_for
        from trainlab.report.render import write_report

        run_dir = trainer.run_dir
        try:
            alerts, claims = judge(trainer.exp, trainer.cfg, read_metrics(run_dir / METRICS_FILE))
            save_check(run_dir, alerts, claims)
        except Exception as exc:  # noqa: BLE001 -- the report is still wanted, without these verdicts
            print(f"trainlab: could not judge the run ({type(exc).__name__}: {brief(exc)}); "
                  f"`trainlab check {run_dir}` retries", file=sys.stderr)
            with contextlib.suppress(OSError):  # verdicts on fewer rows than the run has must not be shown
                (run_dir / CHECK_FILE).unlink(missing_ok=True)
        try:
            write_report(run_dir, claims_for(run_dir))
        except Exception as exc:  # noqa: BLE001 -- the training result stands; say what went wrong
            print(f"trainlab: could not write the report ({type(exc).__name__}: {brief(exc)}); "
                  f"`trainlab report {run_dir}` retries", file=sys.stderr)


class Launch:
    """What `trainlab run` decided: the run directory, and whether there is anything to do."""

    def __init__(self, experiment: Experiment, cfg: RunConfig, run_dir: Path, device: torch.device,
                 world: World = SINGLE, world_size: int | None = None):
        self.experiment, self.cfg, self.run_dir, self.device = experiment, cfg, run_dir, device
        # this process's place under torchrun; world_size: the processes the run will have (`--nproc N`
        # checks a resume before it starts them)
        self.world = world
        self.world_size = world_size or world.size
        self.notes: list[str] = []
        self.already_done_at: int | None = None
        self.config_changes: dict[str, tuple] = {}
        self.moved_to: Path | None = None
        self.user_callbacks: list[Callback] = []
        self.trainer: Trainer | None = None

    def prepare(self, fresh: bool) -> None:
        """All checks; moves old contents aside for --fresh.  Raises UsageError before writing."""
        run_dir, cfg = self.run_dir, self.cfg
        from trainlab.trackers import check_trackers

        check_trackers(cfg, run_dir)
        self._load_user_callbacks()
        check_usable(run_dir)  # creatable too: tried, and what it made removed again
        # a model whose weights, gradients and optimizer state alone exceed the memory could only fail
        # after allocating; built on the meta device (milliseconds), before the run directory exists
        refuse_if_it_cannot_fit(self.experiment, cfg, self.device)
        check_parameter_groups(self.experiment, cfg)
        if not has_run(run_dir):
            return
        if fresh:
            RunLock(run_dir).acquire_and_release()
            self.moved_to = move_aside(run_dir)
            self.notes.append(f"starting anew: the old contents of {run_dir} were moved to {self.moved_to}")
            return
        newest = CheckpointStore(run_dir / "checkpoints", cfg.ckpt.keep).complete_dirs()
        self._check_world_size(newest)
        saved = _read_saved_config(run_dir)
        new = config_mod.to_dict(cfg)
        if saved is not None:
            diff = config_diff(saved, new)
            fixed = [k for k in diff if k.startswith(FIXED_ON_RESUME)]
            if fixed:
                shown = "; ".join(f"{k}: {diff[k][0]!r} -> {diff[k][1]!r}" for k in fixed[:3])
                raise UsageError(f"run directory {run_dir} holds a run with another model, data or optimizer ({shown}); "
                                 "pass --fresh to start over (the old run is moved aside) or --run-dir for a new one")
            self.config_changes = {k: v for k, v in diff.items() if k != "preset"}
        status = read_status(run_dir)
        newest_step = int(newest[-1].name[5:]) if newest else 0
        if status.get("state") == "finished" and newest_step >= cfg.train.steps:
            self.already_done_at = newest_step

    def _load_user_callbacks(self) -> None:
        self.user_callbacks = [load_callback(spec.path, spec.kwargs, f"callbacks[{i}]")
                               for i, spec in enumerate(self.cfg.callbacks)]

    def _check_world_size(self, newest: list[Path]) -> None:
        """A resume under another number of processes changes which micro-batches each rank draws and
        the effective batch: refused, unless train.allow_world_size_change, which rescales train.accum
        so that micro_batch x accum x processes stays what the newest checkpoint had.  `newest`: the
        run's complete checkpoint folders, oldest first."""
        if not newest:
            return
        try:
            info = json.loads((newest[-1] / MANIFEST).read_text(encoding="utf-8")).get("info", {})
            saved_world, saved_accum = int(info.get("world_size", 1)), int(info.get("accum", self.cfg.train.accum))
        except (OSError, ValueError, TypeError, AttributeError):
            return  # a broken manifest: the resume sets that checkpoint aside and says so
        n, t = self.world_size, self.cfg.train
        if saved_world == n:
            return
        micro_batches = saved_world * saved_accum  # per optimizer step, over all ranks
        if not t.allow_world_size_change:
            raise UsageError(
                f"run directory {self.run_dir}: its checkpoint {newest[-1].name} was trained with {saved_world} "
                f"process{'es' if saved_world > 1 else ''} and this run has {n}; rerun with "
                f"{'--nproc ' + str(saved_world) if saved_world > 1 else 'one process'}, or pass --set "
                f"train.allow_world_size_change=true to rescale train.accum (effective batch {t.micro_batch} x "
                f"{micro_batches} micro-batches)")
        if micro_batches % n:
            raise UsageError(
                f"run directory {self.run_dir}: train.allow_world_size_change cannot keep the effective batch: the "
                f"checkpoint has {saved_world} x {saved_accum} = {micro_batches} micro-batches per step, which "
                f"{n} processes cannot share evenly; allowed here: a process count dividing {micro_batches}")
        accum = micro_batches // n
        self.notes.append(f"{saved_world} -> {n} processes: train.accum {saved_accum} -> {accum} keeps the effective "
                          f"batch {t.micro_batch} x {accum} x {n} = {t.micro_batch * micro_batches}")
        t.accum = accum

    def prepare_on_every_rank(self, fresh: bool) -> None:
        """prepare() under torchrun: rank 0 checks (and moves aside, for --fresh), the others take its
        outcome -- the same config, or the same refusal (which only rank 0 prints)."""
        if self.world.size == 1:
            self.prepare(fresh)
            return
        outcome = None
        if self.world.is_main:
            try:
                self.prepare(fresh)
                outcome = ("ready", self.cfg, self.already_done_at, self.config_changes)
            except UsageError as exc:
                outcome = ("refused", str(exc))
        outcome = self.world.share(outcome)
        if outcome[0] == "refused":
            raise UsageError(outcome[1])
        if not self.world.is_main:
            _, self.cfg, self.already_done_at, self.config_changes = outcome
            self._load_user_callbacks()  # those that run on every rank (all_ranks) are needed here too

    def write_config(self) -> None:
        path = self.run_dir / CONFIG_FILE
        text = config_mod.dump_yaml(self.cfg)
        if path.exists() and path.read_text(encoding="utf-8") != text:
            archived = path.with_name(f"config.before-{time.strftime('%Y%m%d-%H%M%S')}.yaml")
            path.rename(archived)
            self.notes.append(f"config changed on resume ({', '.join(self.config_changes) or 'layout'}); "
                              f"the previous one is kept as {archived.name}")
        if not path.exists():
            path.write_text(text, encoding="utf-8")

    @contextlib.contextmanager
    def holding(self):
        """The run directory created, locked for this process, with the resolved config in it (under
        torchrun: by rank 0, which holds the lock for the whole job)."""
        if not self.world.is_main:
            yield
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(self.run_dir)
        lock.acquire()
        try:
            self.write_config()
            yield
        finally:
            lock.release()

    def callbacks(self) -> list[Callback]:
        """trainlab's own first (the report before the trackers, which upload it), then the user's."""
        from trainlab.trackers import build_trackers

        if not self.world.is_main:  # the report and the trackers write: rank 0's alone
            return [*run_watchers(self.cfg, self.experiment, self.run_dir), *self.user_callbacks]
        return [*run_watchers(self.cfg, self.experiment, self.run_dir), RunReport(),
                *build_trackers(self.cfg, self.run_dir), *self.user_callbacks]

    def run(self) -> RunResult:
        with self.holding():
            self.trainer = trainer = Trainer(self.cfg, self.experiment, self.run_dir, self.device,
                                             callbacks=self.callbacks(), world=self.world)
            if self.config_changes:
                trainer.pending_events.append({"kind": "config_changed", "changes": {
                    k: [a, b] for k, (a, b) in self.config_changes.items()}})
            return trainer.fit()
