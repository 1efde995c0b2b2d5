"""The training loop -- readable top to bottom.

    setup ........ seed, model, data, optimizer, scaler, curriculum, logs; resume from the newest
                   valid checkpoint if there is one
    for each optimizer step:
      schedules .. LR and loss weights, pure functions of the step
      micro-steps  batch(step, micro, level) -> autocast forward -> scaled backward, `accum` times
      update ..... unscale, clip (norm kept as a device tensor), optimizer step, scaler update
      curriculum . record the gate metric (device tensor)
      log step ... ONE host sync: a row to metrics.csv, promotion check, progress, non-finite check
      eval step .. experiment.evaluate(); its numbers join the next row (a log row is forced)
      memory ..... poll every memory.every steps; over the ceiling -> checkpoint and stop
      checkpoint . every ckpt.every steps, at the end, and when SIGINT/SIGTERM arrived

Everything that watches or steers the run from outside -- the health detectors, preflight's probe,
heatmaps, TensorBoard and the experiment trackers, a user's own code -- is a Callback (see
engine/callbacks.py) handed in by whoever builds the Trainer; the engine imports none of them.
A callback steers only through request_stop() and request_rollback(), honoured at the end of the
step, as are the engine's own policies (train.nonfinite, the memory guard).

Between log steps nothing calls .item(): metrics accumulate as device tensors (nanoGPT and litgpt
make the same point -- a sync per step costs real throughput on a GPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainlab.config import RunConfig
from trainlab.engine import schedules
from trainlab.engine.callbacks import EVENTS, Callback, Evaluation, overrides
from trainlab.engine.checkpoint import CheckpointStore, step_dir_name
from trainlab.engine.curriculum import Curriculum
from trainlab.engine.distributed import OUT_OF_MEMORY, ROLLBACK, SIGNAL, SINGLE, STOP, World
from trainlab.engine.logs import (ARRAYS_FILE, METRICS_FILE, SAMPLES_FILE, EventLog, MetricsLog, NullLog, read_events,
                                  read_metrics)
from trainlab.engine.memory import MemoryGuard, empty_device_cache
from trainlab.engine.progress import Progress, format_rate
from trainlab.engine.rundir import write_status
from trainlab.engine.state import rng_state, seed_everything, set_rng_state
from trainlab.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, TrainingStopped, UsageError
from trainlab.experiment import Experiment, StepContext
from trainlab.formatting import format_duration
from trainlab.optim import build_optimizer, width_lr_factor

# Seconds of training after which, if no log row came yet, the progress shows the measured step rate
# and ETA of the first steps (and a preset sized for another device says so): a run whose log.every
# is far away, or whose steps are slow, is not silent for minutes.
FIRST_TIMING_S = 3.0


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    return "fp32"


def autocast_context(precision: str, device: torch.device):
    if precision == "fp32":
        return contextlib.nullcontext()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)


@dataclass
class RunResult:
    """How fit() ended.  state: finished | stopped | crashed (as in status.json); reason: why, in
    words (empty only for a run that reached train.steps); error: the exception that ended it."""

    state: str
    step: int
    total_steps: int
    last_row: dict[str, Any]
    elapsed_s: float
    reason: str = ""
    error: BaseException | None = None


@dataclass
class StopRequest:
    reason: str
    checkpoint: bool  # False when the weights may be broken (a non-finite interval)
    source: str  # who asked, in the checkpoint's reason (events.jsonl)


_APPLIED = "_applied"  # interval sum of the steps GradScaler applied (fp16); not a logged column


@dataclass
class _Interval:
    """Metric sums since the last log row, kept on the device."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    # steps each sum holds: every step's for the main loss and its metrics, fewer for the metrics of
    # an ExtraUpdate that runs every few steps (its mean is over the steps it ran)
    counts: dict[str, int] = field(default_factory=dict)
    grad_norm_max: torch.Tensor | None = None
    steps: int = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()
        self.counts[name] = self.counts.get(name, 0) + 1

    def mean(self, name: str) -> torch.Tensor:
        return self.sums[name] / max(self.counts.get(name, self.steps), 1)

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "steps": self.steps, "counts": dict(self.counts),
                "grad_norm_max": None if self.grad_norm_max is None else self.grad_norm_max.cpu()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])
        # checkpoints from before the counts were kept: every sum held every step
        self.counts = {k: int(state.get("counts", {}).get(k, self.steps)) for k in self.sums}
        gmax = state.get("grad_norm_max")
        self.grad_norm_max = None if gmax is None else gmax.to(device)


class Trainer:
    """One run of an experiment.  All run state is created here (the counters that a checkpoint
    saves) or in _setup() (the model, data, optimizer and logs, built when fit() starts); every
    opened resource closes through fit()'s one ExitStack."""

    def __init__(self, cfg: RunConfig, experiment: Experiment, run_dir: Path, device: torch.device,
                 callbacks: list[Callback] | None = None, max_seconds: float | None = None,
                 stop_at: int | None = None, schedule_steps: int | None = None, world: World = SINGLE):
        self.cfg = cfg
        # this process's rank under torchrun: rank 0 writes the run directory and the terminal, every
        # rank trains its share of each step's micro-batches
        self.world = world
        self.exp = experiment
        self.run_dir = run_dir
        self.device = device
        self.precision = resolve_precision(cfg.train.precision, device)
        self.callbacks = list(callbacks or [])
        for cb in self.callbacks:
            if not isinstance(cb, Callback):
                raise TypeError(f"Trainer callbacks must be trainlab.Callback instances, got {type(cb).__name__}")
        if not world.is_main:  # the others write files or the terminal: rank 0's alone
            self.callbacks = [cb for cb in self.callbacks if cb.all_ranks]
        keys = [cb.key for cb in self.callbacks]
        clash = sorted({k for k in keys if keys.count(k) > 1})
        if clash:
            raise TypeError(f"two callbacks share the checkpoint key {clash[0]!r}; give one a distinct `key`")
        # each event's hooks, in the callbacks' order; events nobody overrides cost nothing per step
        self._hooks = {event: [getattr(cb, event) for cb in self.callbacks if overrides(cb, event)]
                       for event in EVENTS}
        self.max_seconds = max_seconds  # a time budget: the run ends early, as if at its last step
        self.stop_at = stop_at  # end after this step, schedules unchanged (train.steps still sets them)
        # the length the LR, weight-decay and loss-weight schedules are laid out over: train.steps, or
        # the planned run's length when this is its first part (preflight: a schedule in fractions of
        # the run must not be squeezed into the preflight's few steps)
        self.schedule_steps = schedule_steps or cfg.train.steps
        self.pending_events: list[dict] = []  # events decided before the log opened (config changes)
        # ---- the run's state: what a checkpoint saves and a resume restores (see _state/_restore)
        self.step = 0
        self.elapsed_before = 0.0
        self.best_value: float | None = None
        self.last_values: dict[str, float] = {}
        self.interval = _Interval()
        self.amp_skipped = torch.zeros((), device=device)
        self.lr_scale = 1.0  # scaled down by rollbacks
        self.rollbacks = 0
        self.micro_split = 1  # doubled by each out-of-memory error
        self.skipped_steps = 0  # steps not applied for a non-finite gradient (train.nonfinite=skip)
        # ---- per attempt
        # optim.lr_scale: the peak LR follows the model's width (the BitNet size study's LR-scaling follow-up)
        self.base_lr = cfg.optim.lr * width_lr_factor(cfg.optim, experiment.width(cfg))
        self.last_lr = self.base_lr
        self.last_weight_decay = cfg.optim.weight_decay
        self.last_step_loss: torch.Tensor | None = None
        self.last_row: dict[str, Any] = {}
        self.result: RunResult | None = None
        self._signal: tuple[str, int] | None = None
        self._stop: StopRequest | None = None
        self._rollback_request: dict | None = None
        self._t0 = self._last_log_t = time.monotonic()
        self._last_log_step = 0
        self._loop_start_step = 0
        self._timing_pending = True  # until the first steps' rate has been shown (early or at a log step)
        self.ending_agreed = False  # a stop every rank takes at the same step (not one rank's failure)
        self._ddp_forwards = 0  # calls of the DDP wrapper's forward (see _data_parallel)

    # ------------------------------------------------------------------ setup
    def _setup(self, resources: contextlib.ExitStack) -> None:
        """Model, data, optimizer and logs; each resource's close joins `resources`."""
        cfg, device = self.cfg, self.device
        if cfg.train.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        # the same seed on every rank: the same initial weights, and the same RNG draws per step, so rank
        # 0's saved RNG state is every rank's (a consequence: dropout masks are the same on every rank)
        seed_everything(cfg.train.seed)
        self.model = self.exp.build_model(cfg).to(device)
        self.model.train()
        self._setup_extra_updates()
        self.ddp = self._data_parallel(self.model) if self.world.distributed else None
        # the compiled wrapper runs the training step; checkpoints, evaluation and samples use the module
        # itself (its state_dict keys stay unprefixed, and evaluation shapes cause no recompiles)
        trained = self.ddp if self.ddp is not None else self.model
        self.step_model = torch.compile(trained) if cfg.train.compile else trained
        log = EventLog if self.world.is_main else NullLog
        if self.world.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = log(self.run_dir)
        resources.callback(self.events.close)
        self.arrays = log(self.run_dir, ARRAYS_FILE)
        resources.callback(self.arrays.close)
        # only experiments that draw samples get a samples.jsonl
        draws_samples = type(self.exp).samples is not Experiment.samples
        self.samples = log(self.run_dir, SAMPLES_FILE) if draws_samples else None
        if self.samples is not None:
            resources.callback(self.samples.close)
        # the data of a step is world x accum micro-batches, as for one process with that accumulation:
        # rank r draws micro-batches r, world + r, 2 world + r, ... (see _forward_backward)
        data_cfg = cfg if self.world.size == 1 else dataclasses.replace(
            cfg, train=dataclasses.replace(cfg.train, accum=cfg.train.accum * self.world.size))
        self.data = self.exp.build_data(data_cfg, device)
        close = getattr(self.data, "close", None)  # a data stream with a producer process to stop
        if callable(close):
            resources.callback(close)
        attach = getattr(self.data, "attach", None)
        if callable(attach):  # a data stream may report events (a restarted producer, say)
            attach(self.events.write)
        self.optimizer = build_optimizer(cfg.optim, self.model, device, exclude=self.extra_params)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.curriculum = Curriculum(cfg.curriculum, device)
        self.guard = MemoryGuard(cfg.memory, device)
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.ckpt.keep, self.events.write)
        self.attempt = self.world.share(
            1 + sum(e.get("kind") in ("start", "resume") for e in read_events(self.events.path))
            if self.world.is_main else None)

    def _data_parallel(self, model: torch.nn.Module):
        """The model under DistributedDataParallel (torchrun): its gradients averaged over ranks in the
        backward of each step's last micro-batch.  Rank 0's weights reach every rank here."""
        from torch.nn.parallel import DistributedDataParallel

        class WithModuleAttributes(DistributedDataParallel):
            """DDP that answers for the module's own attributes too: a loss that reads `model.options`
            or calls `model.radius(z)` beside `model(x)` works unchanged."""

            def __getattr__(self, name):
                try:
                    return super().__getattr__(name)
                except AttributeError:
                    return getattr(self.module, name)

        # a parameter that gets no gradient in a step (a part frozen mid-run, an extra update's own
        # parameters in the main loss's backward) would make DDP wait for it: look for such ones
        unused = self.exp.parameters_may_go_unused or bool(self.extra_updates)
        ddp = WithModuleAttributes(model, device_ids=[self.device.index] if self.device.type == "cuda" else None,
                                   find_unused_parameters=unused)
        # DDP averages the gradients only of a backward whose forward went through it (model(x)); a loss
        # that calls the model's parts directly would train every rank apart, silently: counted here
        ddp.register_forward_pre_hook(lambda module, inputs: setattr(self, "_ddp_forwards", self._ddp_forwards + 1))
        return ddp

    def _setup_extra_updates(self) -> None:
        """The experiment's ExtraUpdates (a GAN's critic, say): each one's optimizer over its own
        parameters, and an fp16 grad scaler of its own (its loss has its own scale)."""
        self.extra_updates = list(self.exp.extra_updates(self.cfg))
        self.extra_optimizers: dict[str, tuple[torch.optim.Optimizer, torch.amp.GradScaler]] = {}
        owned: set[int] = set()
        for extra in self.extra_updates:
            if extra.name in self.extra_optimizers:
                raise TypeError(f"{self.exp.name}: two extra updates are named {extra.name!r}")
            if extra.every < 1 or extra.start < 0:
                raise TypeError(f"{self.exp.name}: extra update {extra.name!r} needs every >= 1 and start >= 0, "
                                f"got every={extra.every}, start={extra.start}")
            params = [p for p in extra.parameters(self.model) if p.requires_grad]
            shared = [p for p in params if id(p) in owned]
            if not params or shared:
                raise TypeError(f"{self.exp.name}: extra update {extra.name!r} "
                                + ("shares parameters with another one" if shared else "has no trainable parameters"))
            owned.update(id(p) for p in params)
            scaler = torch.amp.GradScaler(self.device.type, enabled=self.precision == "fp16")
            self.extra_optimizers[extra.name] = (extra.optimizer(params), scaler)
        self.extra_params = frozenset(owned)

    def _backend(self) -> str:
        import torch.distributed as dist

        return dist.get_backend() if dist.is_initialized() else "none"

    def _fire(self, event: str, *args) -> None:
        for hook in self._hooks[event]:
            hook(self, *args)

    def _columns(self) -> list[str]:
        cfg = self.cfg
        cols = ["step", "attempt", "elapsed_s", "lr", "loss", "grad_norm", "grad_norm_max"]
        cols += list(self.exp.train_metrics) + list(self.exp.eval_metrics)
        cols += [f"w_{name}" for name in cfg.schedule.loss_weights]
        if cfg.schedule.two_stage_at > 0:
            cols += ["weight_decay"]  # switched off in stage 2
        if self.curriculum.enabled:
            cols += [cfg.curriculum.name, "phase", "threshold", "gate_mean"]  # the SHA-256 curriculum's column names
        if self.precision == "fp16":
            cols += ["amp_scale", "amp_skipped"]
        if cfg.train.nonfinite == "skip":
            cols += ["skipped_steps"]
        cols += [f"{self.exp.throughput_unit}_per_s", "ram_gb", "peak_ram_gb", "dev_mem_gb", "peak_dev_mem_gb"]
        return cols

    def _say(self, text: str) -> None:
        """One line on the terminal (stderr), beside the progress: what a person must know at once
        (rank 0's; under torchrun the others keep quiet)."""
        if self.world.is_main:
            print(f"trainlab: {text}", file=sys.stderr, flush=True)

    def _write_status(self, state: str, **extra) -> None:
        if self.world.is_main:
            write_status(self.run_dir, state, self.step, total_steps=self.cfg.train.steps, **extra)

    def _resume(self) -> None:
        # rank 0 chooses (and sets aside what is broken); every rank loads the checkpoint it chose
        ckpt, broken = None, []
        if self.world.is_main:
            self.store.sweep_incomplete()
            broken_before = len(self.store.found_broken)
            ckpt = self.store.latest_valid()
            broken = self.store.found_broken[broken_before:]
        ckpt, broken = self.world.share((ckpt, broken))
        if broken:
            name, problem = broken[0]
            more = f" and {len(broken) - 1} more" if len(broken) > 1 else ""
            why = f"{name}: {problem}{more}; set aside as *.corrupt, kept"
        if ckpt is None and broken:
            self._say(f"every checkpoint of {self.run_dir} is corrupt ({why}); starting over from step 0")
        if ckpt is None:
            counts = parameter_counts(self.model)
            self.events.write({"kind": "start", "attempt": self.attempt, "device": str(self.device),
                               "world_size": self.world.size,
                               "precision": self.precision, "pid": os.getpid(), **counts})
            t, n = self.cfg.train, self.world.size
            if self.cfg.log.progress != "off":  # off: the terminal carries only what went wrong
                batch = (f"{t.micro_batch} x {t.accum} = {t.micro_batch * t.accum}" if n == 1 else
                         f"{t.micro_batch} x {t.accum} x {n} processes = {t.micro_batch * t.accum * n}")
                where = f"{self.device}" if n == 1 else f"{self.device.type} ({n} ranks, {self._backend()})"
                self._say(f"starting {self.run_dir.name}: {counts['params']:,} parameters "
                          f"({counts['params_embedding']:,} in embeddings), effective batch {batch}, "
                          f"{self.precision} on {where}")
            if self.base_lr != self.cfg.optim.lr:
                self.events.write({"kind": "lr_scaled", "rule": self.cfg.optim.lr_scale,
                                   "width": self.exp.width(self.cfg), "base": self.cfg.optim.lr_scale_base,
                                   "optim_lr": self.cfg.optim.lr, "peak_lr": self.base_lr})
            return
        self._restore(self.store.load(ckpt, self.model, self.device))
        self._say(f"resuming {self.run_dir} at step {self.step} from its checkpoint {ckpt.path.name}"
                  + (f" (a newer one is corrupt: {why})" if broken else ""))
        self._fire_resume("resume")
        self.events.write({"kind": "resume", "attempt": self.attempt, "step": self.step,
                           "checkpoint": str(ckpt.path), "device": str(self.device), "pid": os.getpid(),
                           "curriculum_phase": self.curriculum.phase if self.curriculum.enabled else None})

    def _restore(self, state: dict) -> None:
        """Everything but the weights (already loaded) from a checkpoint's state."""
        saved_world = int(state.get("world_size", 1))
        if saved_world != self.world.size and not self.cfg.train.allow_world_size_change:
            raise UsageError(f"{self.run_dir}: its checkpoint was trained with {saved_world} processes and this run "
                             f"has {self.world.size}; pass --set train.allow_world_size_change=true to go on")
        # under torchrun: this rank's own share of the steps since the last log row (another world
        # size: rank 0's, for every rank)
        own = state.get("ranks", [])
        if len(own) == self.world.size:
            state = {**state, **own[self.world.rank]}
        # torch restores the saved hyperparameters with the state; the config is the truth, so a
        # weight decay or betas changed on resume take effect (lr is set every step anyway)
        configured = [{k: v for k, v in g.items() if k != "params"} for g in self.optimizer.param_groups]
        self.optimizer.load_state_dict(state["optimizer"])
        for group, hyper in zip(self.optimizer.param_groups, configured):
            group.update(hyper)
        if self.scaler.is_enabled() and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        if self.curriculum.enabled and state.get("curriculum"):
            self.curriculum.load_state_dict(state["curriculum"])
        self.interval.load_state_dict(state["interval"], self.device)
        self.amp_skipped = state["amp_skipped"].to(self.device)
        set_rng_state(state["rng"])
        self.step = int(state["step"])
        self.elapsed_before = float(state["elapsed_s"])
        self.best_value = state.get("best_value")
        self.last_values = dict(state.get("last_values", {}))
        self.lr_scale = float(state.get("lr_scale", 1.0))
        self.rollbacks = int(state.get("rollbacks", 0))
        self.micro_split = int(state.get("micro_split", 1))
        self.skipped_steps = int(state.get("skipped_steps", 0))
        saved_extras = state.get("extra_updates", {})
        for name, (optimizer, scaler) in self.extra_optimizers.items():
            if name not in saved_extras:  # an update added since that checkpoint starts fresh; say so
                self.events.write({"kind": "extra_update_not_in_checkpoint", "name": name, "step": self.step})
                continue
            optimizer.load_state_dict(saved_extras[name]["optimizer"])
            if scaler.is_enabled() and saved_extras[name].get("scaler"):
                scaler.load_state_dict(saved_extras[name]["scaler"])
        saved = state.get("callbacks", {})
        for cb in self.callbacks:
            if cb.key in saved:
                cb.load_state_dict(saved[cb.key])

    def _fire_resume(self, kind: str) -> None:
        """on_resume with the history up to the restored step (read only when someone listens)."""
        if self._hooks["on_resume"]:
            rows = [r for r in read_metrics(self.run_dir / METRICS_FILE) if r["step"] <= self.step]
            self._fire("on_resume", rows, kind)

    # ------------------------------------------------------------------ the door for stop and rollback
    def request_stop(self, reason: str, checkpoint: bool = True, source: str = "stop request") -> None:
        """End the run after this step: a checkpoint first (unless `checkpoint` is False: the
        weights may be broken; `source` names who asked in its reason), then TrainingStopped(reason)
        -- status.json "stopped", exit 1.  A request without a checkpoint wins over one with;
        otherwise the first reason stands."""
        if self._stop is None or (self._stop.checkpoint and not checkpoint):
            self._stop = StopRequest(reason, checkpoint, source)

    def request_rollback(self, alert: dict) -> None:
        """Reload the newest checkpoint from before alert["evidence"]["onset_step"] (else
        alert["step"]), scale the LR by health.rollback_lr_factor and go on; alert also names its
        "detector" and "message".  After health.rollback_max rollbacks the run stops instead."""
        self._rollback_request = alert

    def _rollback(self, alert: dict) -> None:
        """Reload the newest whole checkpoint from before the alert's onset, scale the LR, go on."""
        health = self.cfg.health
        self.ending_agreed = True  # every rank rolls back together, and so stops together if it cannot
        if self.rollbacks >= health.rollback_max:
            raise TrainingStopped(f"health policy: {alert['message']}; stopped after {self.rollbacks} rollbacks "
                                  f"(health.rollback_max={health.rollback_max})")
        onset = int(alert.get("evidence", {}).get("onset_step", alert["step"]))
        ckpt = self.world.share(self.store.latest_valid(before_step=onset) if self.world.is_main else None)
        if ckpt is None:
            raise TrainingStopped(f"health policy: {alert['message']}; rollback found no checkpoint before "
                                  f"step {onset}")
        self.ending_agreed = False
        rollbacks, lr_scale = self.rollbacks, self.lr_scale  # these carry over; the rest is reloaded
        self._restore(self.store.load(ckpt, self.model, self.device))
        # newer checkpoints hold the run being discarded: the retry's save of such a step would keep
        # them (a whole folder is not rewritten), and a resume would continue the discarded run
        if self.world.is_main:
            self.store.set_aside_from(ckpt.step + 1, f"discarded by the rollback to step {ckpt.step}")
        self.rollbacks = rollbacks + 1
        self.lr_scale = lr_scale * health.rollback_lr_factor
        self._last_log_step = self.step  # the next row's interval starts at the restored step
        self._fire_resume("rollback")
        self.events.write({"kind": "rollback", "step": self.step, "from_step": alert["step"],
                           "detector": alert["detector"], "checkpoint": str(ckpt.path), "lr_scale": self.lr_scale,
                           "rollback": self.rollbacks})

    # ------------------------------------------------------------------ checkpoints
    def _state(self, elapsed: float) -> dict:
        return {
            "step": self.step,
            "world_size": self.world.size,
            "optimizer": self.optimizer.state_dict(),
            "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
            "curriculum": self.curriculum.state_dict() if self.curriculum.enabled else {},
            "interval": self.interval.state_dict(),
            "amp_skipped": self.amp_skipped.cpu(),
            "rng": rng_state(),
            "elapsed_s": elapsed,
            "best_value": self.best_value,
            "last_values": self.last_values,
            "lr_scale": self.lr_scale,
            "rollbacks": self.rollbacks,
            "micro_split": self.micro_split,
            "skipped_steps": self.skipped_steps,
            "callbacks": {cb.key: state for cb in self.callbacks if (state := cb.state_dict())},
            "extra_updates": {name: {"optimizer": optimizer.state_dict(),
                                     "scaler": scaler.state_dict() if scaler.is_enabled() else {}}
                              for name, (optimizer, scaler) in self.extra_optimizers.items()},
        }

    def _is_best(self) -> bool:
        name = self.cfg.ckpt.best_metric
        value = self.last_values.get(name)
        if not name or value is None or not math.isfinite(value):
            return False
        better = (self.best_value is None or
                  (value < self.best_value if self.cfg.ckpt.best_mode == "min" else value > self.best_value))
        if better:
            self.best_value = value
        return better

    def _checkpoint(self, elapsed: float, reason: str) -> Path:
        """Every rank comes here at the same step; rank 0 writes."""
        # each rank's own share, saved beside rank 0's state: a checkpoint between log steps (a signal's)
        # resumes every rank with its own sums, so the next row is the uninterrupted run's to the bit
        shares = self.world.gather(self._own_share()) if self.world.size > 1 else None
        best = self._is_best()
        # the process count and accumulation, for `trainlab run` to check a resume before anything is written
        info = {"reason": reason, "loss": self.last_values.get("loss"),
                "best_metric": self.cfg.ckpt.best_metric or None, "best_value": self.best_value,
                "world_size": self.world.size, "accum": self.cfg.train.accum}
        if self.world.is_main:
            state = self._state(elapsed)
            if shares is not None:
                state["ranks"] = shares
            path = self.store.save(self.step, self.model, state, info, best=best)
        else:
            path = self.store.root / step_dir_name(self.step)
        self.events.write({"kind": "checkpoint", "step": self.step, "path": str(path), "reason": reason,
                           "best": best})
        self._write_status("running")
        self._fire("on_checkpoint", path, reason)
        return path

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:
            if self.world.distributed:
                # torchrun passes the signal it got on to every rank, and a terminal's Ctrl-C reached them
                # already: a second one is that echo.  Insisting is torchrun's: SIGKILL after its grace.
                return
            raise KeyboardInterrupt  # a second signal: the user insists
        self._signal = (name, EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self, params: list[torch.nn.Parameter]) -> None:
        cfg = self.cfg
        lr = self.base_lr * self.lr_scale * schedules.lr_multiplier(cfg.schedule, self.step, self.schedule_steps)
        weight_decay = cfg.optim.weight_decay * schedules.weight_decay_multiplier(cfg.schedule, self.step,
                                                                                self.schedule_steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr * group.get("lr_factor", 1.0)  # optim.lr_factors: a group's own multiple
            if group.get("decays"):
                group["weight_decay"] = weight_decay
        self.last_weight_decay = weight_decay
        ctx = StepContext(step=self.step, level=self.curriculum.level,
                          weights=schedules.loss_weights(cfg.schedule, self.step, self.schedule_steps))
        while True:
            try:
                step_loss, step_metrics = self._forward_backward(ctx)
                break
            except torch.OutOfMemoryError:
                self._on_out_of_memory()

        if self.scaler.is_enabled():
            self.scaler.unscale_(self.optimizer)
            # GradScaler's public get_scale() syncs with the host; its device tensor does not
            scale_before = self.scaler._scale.clone()
        grads = [p.grad for p in params if p.grad is not None]
        if cfg.train.clip > 0:
            grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.train.clip, foreach=None)
        else:
            grad_norm = torch.nn.utils.get_total_norm(grads)
        self._fire("on_before_update")  # gradients are unscaled and clipped here
        if cfg.train.nonfinite == "skip" and not bool(torch.isfinite(grad_norm)):  # a host sync, skip mode only
            self.skipped_steps += 1
            self.events.write({"kind": "nonfinite_step_skipped", "step": self.step + 1,
                               "grad_norm": float(grad_norm), "loss": float(step_loss)})
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        applied = None
        if self.scaler.is_enabled():
            # the scale shrinks exactly when the step was skipped for inf/nan gradients
            applied = (self.scaler._scale >= scale_before).squeeze()
            self.amp_skipped += (~applied).float()
        # the model's, not only the optimizer's: the main loss also reached the extra updates' parameters
        self.model.zero_grad(set_to_none=True)
        self.last_step_loss = step_loss
        self._fire("on_after_update")
        for extra in self.extra_updates:
            if extra.due(self.step):
                while True:
                    try:
                        extra_metrics = self._extra_update(extra, ctx)
                        break
                    except torch.OutOfMemoryError:
                        self._on_out_of_memory()
                for k, v in extra_metrics.items():
                    self.interval.add(k, v)

        self.interval.add("loss", step_loss)
        self.last_lr = lr
        gn = grad_norm.detach().float()
        if applied is not None:
            # a step GradScaler skipped has an inf/nan norm by construction and changed no weight: that
            # is fp16's normal recovery (amp_skipped counts it), not a fault for train.nonfinite, so its
            # norm stays out of grad_norm and grad_norm_max (no host sync: a masked sum and a count)
            gn = torch.where(applied, gn, torch.zeros_like(gn))
            self.interval.add(_APPLIED, applied.float())
        self.interval.add("grad_norm", gn)
        self.interval.grad_norm_max = gn.clone() if self.interval.grad_norm_max is None \
            else torch.maximum(self.interval.grad_norm_max, gn)
        for k, v in step_metrics.items():
            self.interval.add(k, v)
        self.interval.steps += 1
        if self.curriculum.enabled:
            self.curriculum.observe(step_metrics[cfg.curriculum.metric])
        self.step += 1

    def _forward_backward(self, ctx: StepContext, loss_fn=None,
                          scaler: torch.amp.GradScaler | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All micro-batches of one optimizer step through `loss_fn` (the experiment's loss, or an
        ExtraUpdate's on the same micro-batches), backward through `scaler`; each micro-batch split in
        `micro_split` parts after an out-of-memory error (same samples, same effective batch, smaller
        activations).  Returns the step's loss and metrics, weighted means over the pieces."""
        loss_fn = loss_fn or self.exp.loss
        scaler = scaler or self.scaler
        accum, world = self.cfg.train.accum, self.world
        step_loss = None
        step_metrics: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            # this rank's share of the step's world x accum micro-batches (world 1: micro itself)
            batch = self.data.batch(self.step, micro * world.size + world.rank, ctx.level)
            pieces = split_batch(batch, self.micro_split, self.cfg.train.micro_batch)
            for i, (piece, share) in enumerate(pieces):
                # DDP all-reduces the gradients in the backward of the step's last piece only
                final = micro == accum - 1 and i == len(pieces) - 1
                if final and world.size > 1 and accum * len(pieces) > 1 and self._agree_out_of_memory(False):
                    raise torch.OutOfMemoryError("out of memory on another rank")  # every rank splits
                weight = share / accum  # a piece's loss is a mean over its samples: weight it by its size
                forwards = self._ddp_forwards
                try:
                    with contextlib.nullcontext() if final or self.ddp is None else self.ddp.no_sync():
                        with autocast_context(self.precision, self.device):
                            loss, metrics = loss_fn(self.step_model, piece, ctx)
                        if final and self.ddp is not None and not self.cfg.train.compile \
                                and self._ddp_forwards == forwards:
                            self.ending_agreed = True  # the same loss on every rank: all stop here
                            raise TrainingStopped(
                                f"{self.exp.name}: its loss calls the model's parts, not model(...) itself, so "
                                "DistributedDataParallel would not average its gradients across ranks; it runs "
                                "in one process only (without --nproc / torchrun)")
                        scaler.scale(loss * weight).backward()
                except torch.OutOfMemoryError:
                    if world.size == 1:
                        raise
                    if final:
                        # the other ranks are in this backward's all-reduce, waiting for this one's gradients
                        raise TrainingStopped(
                            f"out of device memory on rank {world.rank} at step {self.step + 1} in the last "
                            "micro-batch, whose backward all-reduces the gradients: with several processes it "
                            "cannot be retried alone; rerun with a smaller train.micro_batch and a larger "
                            "train.accum (the same effective batch)") from None
                    self._agree_out_of_memory(True)
                    raise
                part = loss.detach().float() * weight
                step_loss = part if step_loss is None else step_loss + part
                for k, v in metrics.items():
                    part = v.detach().float() * weight
                    step_metrics[k] = part if k not in step_metrics else step_metrics[k] + part
        return step_loss, step_metrics

    def _agree_out_of_memory(self, here: bool) -> bool:
        """Whether any rank ran out of memory in this step's pieces before the last one: every rank asks
        exactly once per try of a step (at its failure, or before its last piece)."""
        return bool(self.world.agree([0, 0, 0, int(here)])[OUT_OF_MEMORY])

    def _extra_update(self, extra, ctx: StepContext) -> dict[str, torch.Tensor]:
        """One step of an ExtraUpdate's optimizer, on the micro-batches of the main step just taken."""
        optimizer, scaler = self.extra_optimizers[extra.name]
        _, metrics_sum = self._forward_backward(ctx, extra.loss, scaler)
        scaler.step(optimizer)
        scaler.update()
        if extra.after_step is not None:
            with torch.no_grad():
                extra.after_step(self.model)
        self.model.zero_grad(set_to_none=True)  # its loss reached the main parameters too
        return metrics_sum

    def _on_out_of_memory(self) -> None:
        """Halve the micro-batch (split each one in two more parts), keep the step and the effective
        batch, and retry; refuse to go below one sample per micro-batch."""
        self.model.zero_grad(set_to_none=True)
        empty_device_cache(self.device)
        micro_batch = self.cfg.train.micro_batch
        if micro_batch // (self.micro_split * 2) < 1:
            self.ending_agreed = True  # every rank splits together, so every rank gets here
            raise TrainingStopped(f"out of device memory at step {self.step + 1} with a micro-batch of "
                                  f"{micro_batch // self.micro_split}; it cannot be halved below 1")
        self.micro_split *= 2
        self.events.write({"kind": "out_of_memory", "step": self.step + 1,
                           "micro_batch": micro_batch // self.micro_split,
                           "accum": self.cfg.train.accum * self.micro_split,
                           "effective_batch": micro_batch * self.cfg.train.accum})

    # ------------------------------------------------------------------ evaluation and logging
    @contextlib.contextmanager
    def _eval_mode(self):
        """No gradients, eval mode, the run's autocast; training mode again afterwards."""
        self.model.eval()
        try:
            with torch.no_grad(), autocast_context(self.precision, self.device):
                yield
        finally:
            self.model.train()

    def _evaluate(self, level: float | None) -> dict[str, torch.Tensor]:
        with self._eval_mode():
            return self.exp.evaluate(self.model, self.data, self.cfg, level)

    def _write_samples(self) -> None:
        """Text (or other) samples the experiment draws at an evaluation, kept in samples.jsonl."""
        if self.samples is None:
            return
        with self._eval_mode():
            samples = self.exp.samples(self.model, self.data, self.cfg, self.step)
        if samples:
            self.samples.write({"step": self.step, **samples})

    def _phase_end_eval(self, promotion: dict) -> None:
        """Evaluate at the level just left: the phase's final held-out numbers and maps."""
        out = self._evaluate(promotion["from_value"])
        scalars = {k: round(float(v), 6) for k, v in out.items() if v.numel() == 1}
        self.events.write({"kind": "phase_end_eval", "step": self.step, "phase": promotion["from_phase"],
                           "level": promotion["from_value"], **scalars})
        tag = f"phase_end_{promotion['from_phase']}"
        for k, v in out.items():
            if v.numel() > 1:
                self._write_array(k, v, tag=tag, level=promotion["from_value"])
        self._fire("on_evaluate", Evaluation(
            "phase_end", self.step, out, f"{tag}-step{self.step}",
            f"phase {promotion['from_phase']} ({self.cfg.curriculum.name} {promotion['from_value']:g}), "
            f"step {self.step}", phase=promotion["from_phase"], level=promotion["from_value"]))

    def _write_array(self, name: str, value: torch.Tensor, **extra) -> None:
        self.arrays.write({"step": self.step, "name": name, **extra, "shape": list(value.shape),
                           "values": [round(x, 6) for x in value.detach().float().flatten().tolist()]})

    def _log_row(self, eval_metrics: dict[str, torch.Tensor], elapsed: float, dt: float, steps_in_dt: int) -> dict:
        """Build the row: the one host sync of this log interval."""
        names = list(self.interval.sums)
        tensors = [self.interval.mean(k) for k in names]
        if self.interval.grad_norm_max is not None:
            names.append("grad_norm_max")
            tensors.append(self.interval.grad_norm_max)
        for k, v in eval_metrics.items():
            if v.numel() == 1:
                names.append(k)
                tensors.append(v.detach().float().reshape(()))
            else:  # maps and histograms go to eval_arrays.jsonl, not into the CSV
                self._write_array(k, v)
        if self.precision == "fp16":
            names += ["amp_scale", "amp_skipped"]
            tensors += [self.scaler._scale.float().reshape(()), self.amp_skipped.reshape(())]
        stacked = torch.stack([t.to(self.device) for t in tensors]) if tensors else None
        if stacked is not None and self.world.size > 1:
            # every rank's interval (and its evaluation: the same weights give the same numbers) averaged --
            # a collective only here, once per log interval
            self.world.mean(stacked)
        values = stacked.tolist() if stacked is not None else []  # <- the sync
        row: dict[str, Any] = dict(zip(names, values))
        if _APPLIED in row:  # grad_norm over the steps GradScaler applied; none applied: not measured
            applied_share = row.pop(_APPLIED)
            row["grad_norm"] = row["grad_norm"] / applied_share if applied_share > 0 else None
            if applied_share == 0:
                row["grad_norm_max"] = None
        row.update(step=self.step, attempt=self.attempt, elapsed_s=round(elapsed, 3), lr=self.last_lr,
                   skipped_steps=self.skipped_steps, weight_decay=self.last_weight_decay)
        for name, w in schedules.loss_weights(self.cfg.schedule, max(self.step - 1, 0), self.schedule_steps).items():
            row[f"w_{name}"] = w
        if self.curriculum.enabled:
            row[self.cfg.curriculum.name] = self.curriculum.level
            row["phase"] = self.curriculum.phase
            row["threshold"] = self.cfg.curriculum.gates[self.curriculum.phase]
            row["gate_mean"] = self.curriculum.running_mean()
        unit = self.exp.items_per_sample(self.cfg) * self.cfg.train.micro_batch * self.cfg.train.accum * self.world.size
        row[f"{self.exp.throughput_unit}_per_s"] = round(unit * steps_in_dt / dt, 2) if dt > 0 else None
        mem = self.guard.read()
        row.update(ram_gb=round(mem.host_gb, 4), peak_ram_gb=round(self.guard.peak_host_gb, 4),
                   dev_mem_gb=round(mem.device_gb, 4), peak_dev_mem_gb=round(self.guard.peak_device_gb, 4))
        self.interval = _Interval()
        # rank 0's row on every rank (its clock, its memory): every rank's detectors and policies decide
        # on the same numbers, so they take the same decisions at the same step
        row = self.world.share(row)
        self.last_values.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
        return row

    # ------------------------------------------------------------------ the run
    def fit(self) -> RunResult:
        cfg = self.cfg
        total = cfg.train.steps
        with contextlib.ExitStack() as resources:
            self._setup(resources)
            self._resume()
            for event in self.pending_events:
                self.events.write({**event, "step": self.step})
            metrics_log = (MetricsLog(self.run_dir, self._columns()) if self.world.is_main
                           else NullLog(self.run_dir, METRICS_FILE))
            resources.callback(metrics_log.close)
            if metrics_log.torn_tail:
                self.events.write({"kind": "metrics_torn_row_removed", "text": metrics_log.torn_tail})
            if metrics_log.dropped:
                self.events.write({"kind": "columns_not_logged", "columns": sorted(metrics_log.dropped),
                                   "why": "metrics.csv keeps the header it was created with"})
            name = f"{self.exp.name}-{cfg.preset}" if cfg.preset else self.exp.name
            label = str(self.run_dir) if self.run_dir.name == name else f"{self.run_dir} ({name})"
            progress = Progress(cfg.log.progress if self.world.is_main else "off", total, self.step, label,
                                cfg.log.plain_interval_s)
            resources.callback(progress.close)
            self._write_status("running", attempt=self.attempt)
            previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
            resources.callback(lambda: [signal.signal(s, handler) for s, handler in previous.items()])
            self.last_row = dict(self.last_values)
            state, reason, error = "finished", "", None
            try:
                self._fire("on_fit_start")
                reason = self._loop(metrics_log, progress)
            except TrainingStopped as exc:
                state, reason, error = "stopped", str(exc), exc
                raise
            except Interrupted as exc:
                state, reason, error = "stopped", f"{exc.signal_name}; checkpoint saved at step {self.step}", exc
                raise
            except KeyboardInterrupt as exc:  # a second signal before the first one's checkpoint: the user insists
                first = self._signal[0] if self._signal is not None else "SIGINT"
                state, reason, error = "stopped", (f"{first} twice: stopped at step {self.step} without a "
                                                   "checkpoint; the last one saved stands"), exc
                raise
            except BaseException as exc:
                state, reason, error = "crashed", f"{type(exc).__name__}: {exc}", exc
                raise
            finally:
                progress.close()  # the bar's last line before anything a callback prints
                self.events.write({"kind": {"finished": "finish"}.get(state, state), "step": self.step,
                                   "reason": reason, "elapsed_s": round(self._elapsed(), 3)})
                self._write_status(state, reason=reason, attempt=self.attempt)
                self.result = RunResult(state, self.step, total, self.last_row, self._elapsed(), reason, error)
                self._end_callbacks(self.result)
                self.ending_agreed = self.ending_agreed or error is None
                if self.world.size > 1 and self.ending_agreed:
                    # an ending every rank agreed on: none exits before rank 0 has written everything
                    # (torchrun stops the others as soon as one rank exits with an error code)
                    self.world.barrier()
        return self.result

    def _loop(self, metrics_log: MetricsLog, progress: Progress) -> str:
        """Steps until train.steps (or stop_at, or the time budget); returns why it ended early
        ("" when it reached train.steps).  A stop raises."""
        cfg = self.cfg
        total = cfg.train.steps
        # the optimizer's parameters, frozen or not: a part a callback froze (requires_grad off, so no
        # gradient) and later unfreezes must be clipped again, and a resume with it frozen must clip the
        # same set as the uninterrupted run did; the model's order, which the gradient norm sums in
        stepped = {id(p) for group in self.optimizer.param_groups for p in group["params"]}
        params = [p for p in self.model.parameters() if id(p) in stepped]
        self._t0 = self._last_log_t = time.monotonic()
        self._last_log_step = self._loop_start_step = self.step
        while self.step < total or self._rollback_request is not None:
            if self._rollback_request is not None:
                alert, self._rollback_request = self._rollback_request, None
                self._rollback(alert)
            self._train_step(params)
            over_budget = self.max_seconds is not None and time.monotonic() - self._t0 >= self.max_seconds
            if self.max_seconds is not None and self.world.size > 1:  # every rank's clock: all end together
                over_budget = bool(self.world.agree([int(over_budget)])[0])
            out_of_time = over_budget or self.step == self.stop_at
            is_last = self.step == total or out_of_time
            do_eval = (cfg.eval.every and self.step % cfg.eval.every == 0) or (is_last and cfg.eval.at_end)
            eval_metrics = self._evaluate(self.curriculum.level) if do_eval else {}
            if do_eval:
                self._write_samples()
                final = is_last and cfg.eval.at_end
                self._fire("on_evaluate", Evaluation(
                    "final" if final else "periodic", self.step, eval_metrics,
                    f"final-step{self.step}" if final else f"step{self.step}",
                    f"end of run, step {self.step}" if final else f"step {self.step}",
                    level=self.curriculum.level if self.curriculum.enabled else None))
            log_now = self.step % cfg.log.every == 0 or is_last or do_eval
            if self._timing_pending and (log_now or time.monotonic() - self._t0 >= FIRST_TIMING_S):
                self._first_timing(progress, show=not log_now)
            if log_now:
                self.last_row = self._log_step(eval_metrics, is_last, metrics_log, progress)
            self._stop_if_asked()
            if self._rollback_request is not None:
                continue  # never checkpoint the state a rollback is about to discard
            if is_last or (cfg.ckpt.every and self.step % cfg.ckpt.every == 0):
                self._checkpoint(self._elapsed(), "final" if is_last else "periodic")
            if out_of_time:
                return (f"stopped at step {self.step} as asked" if self.step == self.stop_at else
                        f"time budget of {self.max_seconds:g} s reached at step {self.step}")
        return ""

    def _first_timing(self, progress: Progress, show: bool) -> None:
        """The rate of this attempt's first steps on the host clock (no device sync: on a GPU it
        counts launched work, which the first log row then corrects): shown as progress when no log
        row is due (`show`), and, for a preset sized for another device, one line with the ETA."""
        self._timing_pending = False
        done, seconds = self.step - self._loop_start_step, time.monotonic() - self._t0
        if done <= 0 or seconds <= 0:
            return
        rate = done / seconds
        if show:
            progress.early(self.step, done, rate)
        preset = self.exp.presets.get(self.cfg.preset)
        sized_for = getattr(preset, "sized_for", "")
        if sized_for and sized_for != self.device.type:
            total = self.cfg.train.steps
            eta = format_duration((total - self.step) / rate)
            others = [n for n, p in self.exp.presets.items() if not getattr(p, "sized_for", "")]
            hint = f"; presets for any device: {', '.join(others)}" if others else ""
            self._say(f"{self.exp.name} --preset {self.cfg.preset} is sized for {_device_words(sized_for)} and "
                      f"runs on {self.device.type} here: {format_rate(rate)} over its first "
                      f"{'step' if done == 1 else f'{done} steps'}, about {eta} for the {total - self.step} "
                      f"steps left{hint}")

    def _end_callbacks(self, result: RunResult) -> None:
        """on_fit_end for every callback, even when one of them fails: a tracker must close its run
        whatever the report writer did.  A failure is logged; it is raised (after all ran) only when
        the run itself succeeded -- never in place of the run's own error."""
        failure = None
        for hook in self._hooks["on_fit_end"]:
            try:
                hook(self, result)
            except Exception as exc:  # noqa: BLE001 -- see the docstring
                failure = failure or exc
                self.events.write({"kind": "callback_failed", "event": "on_fit_end", "step": self.step,
                                   "callback": type(getattr(hook, "__self__", hook)).__name__,
                                   "error": f"{type(exc).__name__}: {exc}"})
        if failure is not None and result.error is None:
            raise failure

    def _elapsed(self) -> float:
        """Training seconds over all attempts."""
        return self.elapsed_before + time.monotonic() - self._t0

    def _log_step(self, eval_metrics: dict, is_last: bool, metrics_log: MetricsLog, progress: Progress) -> dict:
        """The log step: the row (one host sync), its consumers, and the decisions made on it."""
        now = time.monotonic()
        first_step = self._last_log_step + 1
        row = self._log_row(eval_metrics, self._elapsed(), now - self._last_log_t, self.step - self._last_log_step)
        self._last_log_t, self._last_log_step = now, self.step
        metrics_log.write(row)
        progress.update(self.step, row, _steps_per_s(row, self.exp, self.cfg), final=is_last)
        self._fire("on_log_row", row)
        self._check_finite(row, first_step)
        if self._stop is not None and not self._stop.checkpoint:
            return row  # broken weights: no promotion, no phase-end evaluation
        self._reduce_curriculum()
        promotion = self.curriculum.maybe_promote(self.step)
        if promotion:
            self.events.write(promotion)
            if self.cfg.eval.on_promotion:
                self._phase_end_eval(promotion)
        return row

    def _stop_if_asked(self) -> None:
        """A stop request (a callback, train.nonfinite, the memory guard) or a signal ends the run
        here, after a checkpoint where the weights can be trusted."""
        if self._stop is None and self.guard.watching and self.step % self.cfg.memory.every == 0:
            problem = self.guard.check(self.events.write)
            if problem:
                where = f" on rank {self.world.rank}" if self.world.size > 1 else ""
                self.request_stop(f"memory guard: {problem}{where} at step {self.step}", source="memory guard")
        self._agree_on_requests()
        if self._stop is not None:
            request, self._stop = self._stop, None
            if not request.checkpoint:
                self.ending_agreed = True
                raise TrainingStopped(request.reason)
            path = self._checkpoint(self._elapsed(), request.source)
            self.ending_agreed = True
            raise TrainingStopped(f"{request.reason}; checkpoint saved to {path}")
        if self._signal is not None:
            name, code = self._signal
            self._checkpoint(self._elapsed(), name)
            self.ending_agreed = True
            raise Interrupted(name, code)

    def _agree_on_requests(self) -> None:
        """Under torchrun, every rank ends the step knowing what any rank was asked: a signal (one rank
        may have got it before the others), a stop (the memory guard of one rank, a callback on rank 0)
        or a rollback -- so all stop, checkpoint or roll back at this same step.  One small collective
        on the host per step; the requests themselves are exchanged only when there is one."""
        if self.world.size == 1:
            return
        mine = [0, 0, 0, 0]
        mine[SIGNAL] = int(self._signal is not None)
        mine[STOP] = int(self._stop is not None)
        mine[ROLLBACK] = int(self._rollback_request is not None)
        if not any(self.world.agree(mine)):
            return
        asked = self.world.gather((self._signal, self._stop, self._rollback_request))
        signals = [a[0] for a in asked if a[0] is not None]
        stops = [a[1] for a in asked if a[1] is not None]
        rollbacks = [a[2] for a in asked if a[2] is not None]
        if signals:
            self._signal = signals[0]  # the lowest rank's
        if stops:  # as request_stop decides: one without a checkpoint wins, else the first reason stands
            unsafe = [r for r in stops if not r.checkpoint]
            self._stop = unsafe[0] if unsafe else stops[0]
        if rollbacks:
            self._rollback_request = rollbacks[0]

    def _own_share(self) -> dict:
        """What a rank keeps of its own micro-batches between log steps: the interval's sums and the
        curriculum's gate values (averaged over ranks only at log steps)."""
        return {"interval": self.interval.state_dict(),
                "curriculum": self.curriculum.state_dict() if self.curriculum.enabled else {}}

    def _reduce_curriculum(self) -> None:
        if self.world.size > 1 and self.curriculum.enabled:
            self.world.mean(self.curriculum.history)

    def _check_finite(self, row: dict, first_step: int) -> None:
        """A non-finite loss or gradient norm in the interval first_step..step, by train.nonfinite."""
        bad = [k for k in ("loss", "grad_norm") if isinstance(row.get(k), float) and not math.isfinite(row[k])]
        if not bad:
            return
        policy = self.cfg.train.nonfinite
        detail = ", ".join(f"{k}={row[k]}" for k in bad)
        self.events.write({"kind": "nonfinite", "step": self.step, "first_step": first_step, "detail": detail,
                           "policy": policy})
        if policy in ("warn", "skip"):  # skip: the broken steps were not applied; the row still shows them
            return
        # checkpoints written inside the broken interval may hold broken weights: set them aside
        if self.world.is_main:
            self.store.set_aside_from(first_step, f"saved inside the non-finite interval {first_step}-{self.step}")
        if policy == "stop":
            self.request_stop(f"non-finite {detail} in the log interval {first_step}-{self.step}; "
                              "no checkpoint from that interval is kept (train.nonfinite=stop)", checkpoint=False)
            return
        self.request_rollback({"detector": "nonfinite", "step": self.step, "message": f"non-finite {detail}",
                               "evidence": {"onset_step": first_step}})


def _device_words(device_type: str) -> str:
    return {"cuda": "a CUDA GPU", "mps": "an Apple GPU (MPS)", "cpu": "a CPU"}.get(device_type, device_type)


def _steps_per_s(row: dict, exp: Experiment, cfg: RunConfig) -> float:
    per_s = row.get(f"{exp.throughput_unit}_per_s")
    unit = exp.items_per_sample(cfg) * cfg.train.micro_batch * cfg.train.accum
    return per_s / unit if per_s else 0.0


def parameter_counts(model: torch.nn.Module) -> dict[str, int]:
    """Trainable parameters, and those in embedding tables (scaling laws count the rest, as Kaplan
    et al. 2020 do)."""
    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    embedding = sum(p.numel() for m in model.modules() if isinstance(m, torch.nn.Embedding)
                    for p in m.parameters() if p.requires_grad)
    return {"params": total, "params_embedding": embedding}


def split_batch(batch: Any, parts: int, micro_batch: int) -> list[tuple[Any, float]]:
    """`batch` cut into `parts` pieces along the sample axis, each with its share of the samples:
    every tensor whose first dimension is the micro-batch is split (as evenly as the size allows;
    empty pieces are dropped); tuples, lists and dicts are walked; anything else is shared."""
    if parts == 1:
        return [(batch, 1.0)]
    sizes = [len(c) for c in torch.arange(micro_batch).tensor_split(parts)]

    def piece(x: Any, i: int) -> Any:
        if isinstance(x, torch.Tensor) and x.dim() and x.shape[0] == micro_batch:
            return x.tensor_split(parts)[i]
        if isinstance(x, (tuple, list)):
            return type(x)(piece(v, i) for v in x)
        if isinstance(x, dict):
            return {k: piece(v, i) for k, v in x.items()}
        return x

    return [(piece(batch, i), n / micro_batch) for i, n in enumerate(sizes) if n]
