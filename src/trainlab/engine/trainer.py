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

Between log steps nothing calls .item(): metrics accumulate as device tensors (nanoGPT and litgpt
make the same point -- a sync per step costs real throughput on a GPU).
"""

from __future__ import annotations

import contextlib
import math
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from trainlab.config import RunConfig
from trainlab.engine import schedules
from trainlab.engine.checkpoint import CheckpointStore
from trainlab.engine.curriculum import Curriculum
from trainlab.engine.logs import (ARRAYS_FILE, METRICS_FILE, SAMPLES_FILE, EventLog, MetricsLog, TensorBoardLog,
                                  read_events, read_metrics)
from trainlab.engine.memory import MemoryGuard, empty_device_cache
from trainlab.engine.progress import Progress
from trainlab.engine.rundir import write_status
from trainlab.engine.state import rng_state, seed_everything, set_rng_state
from trainlab.errors import EXIT_SIGINT, EXIT_SIGTERM, Interrupted, TrainingStopped
from trainlab.experiment import Experiment, StepContext
from trainlab.health.monitor import HealthMonitor
from trainlab.optim import build_optimizer, width_lr_factor
from trainlab.report.heatmap import svg_heatmap


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
    state: str  # finished | stopped
    step: int
    total_steps: int
    last_row: dict[str, Any]
    elapsed_s: float
    reason: str = ""


_APPLIED = "_applied"  # interval sum of the steps GradScaler applied (fp16); not a logged column


@dataclass
class _Interval:
    """Metric sums since the last log row, kept on the device."""

    sums: dict[str, torch.Tensor] = field(default_factory=dict)
    grad_norm_max: torch.Tensor | None = None
    steps: int = 0

    def add(self, name: str, value: torch.Tensor) -> None:
        value = value.detach().float()
        self.sums[name] = self.sums[name] + value if name in self.sums else value.clone()

    def state_dict(self) -> dict:
        return {"sums": {k: v.cpu() for k, v in self.sums.items()}, "steps": self.steps,
                "grad_norm_max": None if self.grad_norm_max is None else self.grad_norm_max.cpu()}

    def load_state_dict(self, state: dict, device: torch.device) -> None:
        self.sums = {k: v.to(device) for k, v in state["sums"].items()}
        self.steps = int(state["steps"])
        gmax = state.get("grad_norm_max")
        self.grad_norm_max = None if gmax is None else gmax.to(device)


class Trainer:
    def __init__(self, cfg: RunConfig, experiment: Experiment, run_dir: Path, device: torch.device,
                 observers: list | None = None, max_seconds: float | None = None, stop_at: int | None = None):
        self.cfg = cfg
        self.exp = experiment
        self.run_dir = run_dir
        self.device = device
        self.precision = resolve_precision(cfg.train.precision, device)
        self._signal: tuple[str, int] | None = None
        self.pending_events: list[dict] = []  # events decided before the log opened (config changes)
        # Observers (preflight's probe, health monitors) may define before_update(trainer),
        # after_update(trainer) and on_row(trainer, row); none are called when there are none.
        self.observers = list(observers or [])
        self.max_seconds = max_seconds  # a time budget: the run ends early, as if at its last step
        self.stop_at = stop_at  # end after this step, schedules unchanged (train.steps still sets them)
        self.last_step_loss: torch.Tensor | None = None
        self._t0 = self._last_log_t = time.monotonic()
        self._last_log_step = 0

    # ------------------------------------------------------------------ setup
    def _setup(self) -> None:
        cfg, device = self.cfg, self.device
        if cfg.train.deterministic:
            if device.type == "cuda":
                os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
            torch.use_deterministic_algorithms(True, warn_only=True)
        seed_everything(cfg.train.seed)
        self.model = self.exp.build_model(cfg).to(device)
        self.model.train()
        # the compiled wrapper runs the training step; checkpoints, evaluation and samples use the module
        # itself (its state_dict keys stay unprefixed, and evaluation shapes cause no recompiles)
        self.step_model = torch.compile(self.model) if cfg.train.compile else self.model
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.events = EventLog(self.run_dir)
        self.arrays = EventLog(self.run_dir, ARRAYS_FILE)
        # only experiments that draw samples get a samples.jsonl
        draws_samples = type(self.exp).samples is not Experiment.samples
        self.samples = EventLog(self.run_dir, SAMPLES_FILE) if draws_samples else None
        self.data = self.exp.build_data(cfg, device)
        attach = getattr(self.data, "attach", None)
        if callable(attach):  # a data stream may report events (a restarted producer, say)
            attach(self.events.write)
        self.optimizer = build_optimizer(cfg.optim, self.model, device)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.precision == "fp16")
        self.curriculum = Curriculum(cfg.curriculum, device)
        self.guard = MemoryGuard(cfg.memory, device)
        self.store = CheckpointStore(self.run_dir / "checkpoints", cfg.ckpt.keep, self.events.write)
        self.attempt = 1 + sum(e.get("kind") in ("start", "resume") for e in read_events(self.events.path))
        self.interval = _Interval()
        self.step = 0
        self.elapsed_before = 0.0
        self.best_value: float | None = None
        self.last_values: dict[str, float] = {}
        self.amp_skipped = torch.zeros((), device=device)
        # optim.lr_scale: the peak LR follows the model's width (seed 004's LR-scaling follow-up)
        self.base_lr = cfg.optim.lr * width_lr_factor(cfg.optim, self.exp.width(cfg))
        self.last_lr = self.base_lr
        self.last_weight_decay = cfg.optim.weight_decay
        self.lr_scale = 1.0  # scaled down by rollbacks
        self.rollbacks = 0
        self.micro_split = 1  # doubled by each out-of-memory error
        self.skipped_steps = 0  # steps not applied for a non-finite gradient (train.nonfinite=skip)
        self._stop_request: str | None = None
        self._rollback_request: dict | None = None
        self.monitor = HealthMonitor(cfg, self.exp.baseline_loss(cfg))
        self._on_row.append(self.monitor.on_row)

    def _columns(self) -> list[str]:
        cfg = self.cfg
        cols = ["step", "attempt", "elapsed_s", "lr", "loss", "grad_norm", "grad_norm_max"]
        cols += list(self.exp.train_metrics) + list(self.exp.eval_metrics)
        cols += [f"w_{name}" for name in cfg.schedule.loss_weights]
        if cfg.schedule.two_stage_at > 0:
            cols += ["weight_decay"]  # switched off in stage 2
        if self.curriculum.enabled:
            cols += [cfg.curriculum.name, "phase", "threshold", "gate_mean"]  # seed 002's column names
        if self.precision == "fp16":
            cols += ["amp_scale", "amp_skipped"]
        if cfg.train.nonfinite == "skip":
            cols += ["skipped_steps"]
        cols += [f"{self.exp.throughput_unit}_per_s", "ram_gb", "peak_ram_gb", "dev_mem_gb", "peak_dev_mem_gb"]
        return cols

    def _resume(self) -> None:
        self.store.sweep_incomplete()
        ckpt = self.store.latest_valid()
        if ckpt is None:
            self.events.write({"kind": "start", "attempt": self.attempt, "device": str(self.device),
                               "precision": self.precision, "pid": os.getpid(), **parameter_counts(self.model)})
            if self.base_lr != self.cfg.optim.lr:
                self.events.write({"kind": "lr_scaled", "rule": self.cfg.optim.lr_scale,
                                   "width": self.exp.width(self.cfg), "base": self.cfg.optim.lr_scale_base,
                                   "optim_lr": self.cfg.optim.lr, "peak_lr": self.base_lr})
            return
        self._restore(self.store.load(ckpt, self.model, self.device))
        self.monitor.replay([r for r in read_metrics(self.run_dir / METRICS_FILE) if r["step"] <= self.step])
        self.events.write({"kind": "resume", "attempt": self.attempt, "step": self.step,
                           "checkpoint": str(ckpt.path), "device": str(self.device), "pid": os.getpid(),
                           "curriculum_phase": self.curriculum.phase if self.curriculum.enabled else None})

    def _restore(self, state: dict) -> None:
        """Everything but the weights (already loaded) from a checkpoint's state."""
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

    # ------------------------------------------------------------------ health policies
    def request_stop(self, reason: str) -> None:
        self._stop_request = reason

    def request_rollback(self, alert: dict) -> None:
        self._rollback_request = alert

    def _rollback(self, alert: dict) -> None:
        """Reload the newest whole checkpoint from before the alert's onset, scale the LR, go on."""
        health = self.cfg.health
        if self.rollbacks >= health.rollback_max:
            raise TrainingStopped(f"health policy: {alert['message']}; stopped after {self.rollbacks} rollbacks "
                                  f"(health.rollback_max={health.rollback_max})")
        onset = int(alert.get("evidence", {}).get("onset_step", alert["step"]))
        ckpt = self.store.latest_valid(before_step=onset)
        if ckpt is None:
            raise TrainingStopped(f"health policy: {alert['message']}; rollback found no checkpoint before "
                                  f"step {onset}")
        rollbacks, lr_scale = self.rollbacks, self.lr_scale  # these carry over; the rest is reloaded
        self._restore(self.store.load(ckpt, self.model, self.device))
        # newer checkpoints hold the run being discarded: the retry's save of such a step would keep
        # them (a whole folder is not rewritten), and a resume would continue the discarded run
        self.store.set_aside_from(ckpt.step + 1, f"discarded by the rollback to step {ckpt.step}")
        self.rollbacks = rollbacks + 1
        self.lr_scale = lr_scale * health.rollback_lr_factor
        self._last_log_step = self.step  # the next row's interval starts at the restored step
        self.monitor.reset()
        self.monitor.replay([r for r in read_metrics(self.run_dir / METRICS_FILE) if r["step"] <= self.step])
        self.events.write({"kind": "rollback", "step": self.step, "from_step": alert["step"],
                           "detector": alert["detector"], "checkpoint": str(ckpt.path), "lr_scale": self.lr_scale,
                           "rollback": self.rollbacks})

    # ------------------------------------------------------------------ checkpoints
    def _state(self, elapsed: float) -> dict:
        return {
            "step": self.step,
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
        best = self._is_best()
        info = {"reason": reason, "loss": self.last_values.get("loss"),
                "best_metric": self.cfg.ckpt.best_metric or None, "best_value": self.best_value}
        path = self.store.save(self.step, self.model, self._state(elapsed), info, best=best)
        self.events.write({"kind": "checkpoint", "step": self.step, "path": str(path), "reason": reason,
                           "best": best})
        write_status(self.run_dir, "running", self.step, total_steps=self.cfg.train.steps)
        return path

    # ------------------------------------------------------------------ signals
    def _on_signal(self, signum, frame) -> None:
        name = signal.Signals(signum).name
        if self._signal is not None:  # a second signal: the user insists
            raise KeyboardInterrupt
        self._signal = (name, EXIT_SIGINT if signum == signal.SIGINT else EXIT_SIGTERM)

    # ------------------------------------------------------------------ one optimizer step
    def _train_step(self, params: list[torch.nn.Parameter]) -> None:
        cfg = self.cfg
        total = cfg.train.steps
        lr = self.base_lr * self.lr_scale * schedules.lr_multiplier(cfg.schedule, self.step, total)
        weight_decay = cfg.optim.weight_decay * schedules.weight_decay_multiplier(cfg.schedule, self.step, total)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
            if group.get("decays"):
                group["weight_decay"] = weight_decay
        self.last_weight_decay = weight_decay
        ctx = StepContext(step=self.step, level=self.curriculum.level,
                          weights=schedules.loss_weights(cfg.schedule, self.step, total))
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
        for hook in self._before_update:  # gradients are unscaled and clipped here
            hook(self)
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
        self.optimizer.zero_grad(set_to_none=True)
        self.last_step_loss = step_loss
        for hook in self._after_update:
            hook(self)

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

    def _forward_backward(self, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """All micro-batches of one optimizer step; each split in `micro_split` parts after an
        out-of-memory error (same samples, same effective batch, smaller activations)."""
        accum = self.cfg.train.accum
        step_loss = None
        step_metrics: dict[str, torch.Tensor] = {}
        for micro in range(accum):
            batch = self.data.batch(self.step, micro, ctx.level)
            for piece, share in split_batch(batch, self.micro_split, self.cfg.train.micro_batch):
                weight = share / accum  # a piece's loss is a mean over its samples: weight it by its size
                with autocast_context(self.precision, self.device):
                    loss, metrics = self.exp.loss(self.step_model, piece, ctx)
                self.scaler.scale(loss * weight).backward()
                part = loss.detach().float() * weight
                step_loss = part if step_loss is None else step_loss + part
                for k, v in metrics.items():
                    part = v.detach().float() * weight
                    step_metrics[k] = part if k not in step_metrics else step_metrics[k] + part
        return step_loss, step_metrics

    def _on_out_of_memory(self) -> None:
        """Halve the micro-batch (split each one in two more parts), keep the step and the effective
        batch, and retry; refuse to go below one sample per micro-batch."""
        self.optimizer.zero_grad(set_to_none=True)
        empty_device_cache(self.device)
        micro_batch = self.cfg.train.micro_batch
        if micro_batch // (self.micro_split * 2) < 1:
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
        self._draw(out, f"{tag}-step{self.step}", f"phase {promotion['from_phase']} "
                   f"({self.cfg.curriculum.name} {promotion['from_value']:g}), step {self.step}")

    def _write_array(self, name: str, value: torch.Tensor, **extra) -> None:
        self.arrays.write({"step": self.step, "name": name, **extra, "shape": list(value.shape),
                           "values": [round(x, 6) for x in value.detach().float().flatten().tolist()]})

    def _draw(self, out: dict[str, torch.Tensor], tag: str, caption: str) -> None:
        """2-D arrays the experiment names in `heatmaps` become SVG pictures in plots/."""
        for name, view in self.exp.heatmaps.items():
            value = out.get(name)
            if value is None or value.dim() != 2:
                continue
            svg = svg_heatmap(value.detach().float().cpu().tolist(), f"{view.get('title', name)}: {caption}",
                              view.get("rows"), view.get("cols"), view.get("lo", 0.0), view.get("hi", 1.0))
            plots = self.run_dir / "plots"
            plots.mkdir(exist_ok=True)
            (plots / f"{name}-{tag}.svg").write_text(svg, encoding="utf-8")

    def _log_row(self, eval_metrics: dict[str, torch.Tensor], elapsed: float, dt: float, steps_in_dt: int) -> dict:
        """Build the row: the one host sync of this log interval."""
        n = max(self.interval.steps, 1)
        names = list(self.interval.sums)
        tensors = [self.interval.sums[k] / n for k in names]
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
        values = torch.stack([t.to(self.device) for t in tensors]).tolist() if tensors else []  # <- the sync
        row: dict[str, Any] = dict(zip(names, values))
        if _APPLIED in row:  # grad_norm over the steps GradScaler applied; none applied: not measured
            applied_share = row.pop(_APPLIED)
            row["grad_norm"] = row["grad_norm"] / applied_share if applied_share > 0 else None
            if applied_share == 0:
                row["grad_norm_max"] = None
        row.update(step=self.step, attempt=self.attempt, elapsed_s=round(elapsed, 3), lr=self.last_lr,
                   skipped_steps=self.skipped_steps, weight_decay=self.last_weight_decay)
        for name, w in schedules.loss_weights(self.cfg.schedule, max(self.step - 1, 0), self.cfg.train.steps).items():
            row[f"w_{name}"] = w
        if self.curriculum.enabled:
            row[self.cfg.curriculum.name] = self.curriculum.level
            row["phase"] = self.curriculum.phase
            row["threshold"] = self.cfg.curriculum.gates[self.curriculum.phase]
            row["gate_mean"] = self.curriculum.running_mean()
        unit = self.exp.items_per_sample(self.cfg) * self.cfg.train.micro_batch * self.cfg.train.accum
        row[f"{self.exp.throughput_unit}_per_s"] = round(unit * steps_in_dt / dt, 2) if dt > 0 else None
        mem = self.guard.read()
        row.update(ram_gb=round(mem.host_gb, 4), peak_ram_gb=round(self.guard.peak_host_gb, 4),
                   dev_mem_gb=round(mem.device_gb, 4), peak_dev_mem_gb=round(self.guard.peak_device_gb, 4))
        self.interval = _Interval()
        self.last_values.update({k: v for k, v in row.items() if isinstance(v, (int, float))})
        return row

    # ------------------------------------------------------------------ the run
    def fit(self) -> RunResult:
        cfg = self.cfg
        self._before_update = [o.before_update for o in self.observers if hasattr(o, "before_update")]
        self._after_update = [o.after_update for o in self.observers if hasattr(o, "after_update")]
        self._on_row = [o.on_row for o in self.observers if hasattr(o, "on_row")]
        self._setup()
        self._resume()
        for event in self.pending_events:
            self.events.write({**event, "step": self.step})
        total = cfg.train.steps
        metrics_log = MetricsLog(self.run_dir, self._columns())
        if metrics_log.torn_tail:
            self.events.write({"kind": "metrics_torn_row_removed", "text": metrics_log.torn_tail})
        if metrics_log.dropped:
            self.events.write({"kind": "columns_not_logged", "columns": sorted(metrics_log.dropped),
                               "why": "metrics.csv keeps the header it was created with"})
        tb = TensorBoardLog(self.run_dir) if cfg.log.tensorboard else None
        label = f"{self.exp.name}-{cfg.preset}" if cfg.preset else self.exp.name
        progress = Progress(cfg.log.progress, total, self.step, label, cfg.log.plain_interval_s)
        write_status(self.run_dir, "running", self.step, total_steps=total, attempt=self.attempt)
        previous = {s: signal.signal(s, self._on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
        params = [p for p in self.model.parameters() if p.requires_grad]
        self._t0 = self._last_log_t = time.monotonic()
        self._last_log_step = self.step
        row: dict[str, Any] = dict(self.last_values)
        state, reason = "finished", ""
        try:
            while self.step < total or self._rollback_request is not None:
                if self._rollback_request is not None:
                    alert, self._rollback_request = self._rollback_request, None
                    self._rollback(alert)
                self._train_step(params)
                out_of_time = ((self.max_seconds is not None and time.monotonic() - self._t0 >= self.max_seconds)
                               or self.step == self.stop_at)
                is_last = self.step == total or out_of_time
                do_eval = (cfg.eval.every and self.step % cfg.eval.every == 0) or (is_last and cfg.eval.at_end)
                eval_metrics = self._evaluate(self.curriculum.level) if do_eval else {}
                if do_eval:
                    self._write_samples()
                if is_last and eval_metrics:
                    self._draw(eval_metrics, f"final-step{self.step}", f"end of run, step {self.step}")
                if self.step % cfg.log.every == 0 or is_last or do_eval:
                    row = self._log_step(eval_metrics, is_last, metrics_log, tb, progress)
                self._stop_if_asked()
                if self._rollback_request is not None:
                    continue  # never checkpoint the state a rollback is about to discard
                if is_last or (cfg.ckpt.every and self.step % cfg.ckpt.every == 0):
                    self._checkpoint(self._elapsed(), "final" if is_last else "periodic")
                if out_of_time:
                    reason = (f"stopped at step {self.step} as asked" if self.step == self.stop_at else
                              f"time budget of {self.max_seconds:g} s reached at step {self.step}")
                    break
        except TrainingStopped as exc:
            state, reason = "stopped", str(exc)
            raise
        except Interrupted as exc:
            state, reason = "stopped", f"{exc.signal_name}; checkpoint saved at step {self.step}"
            raise
        except KeyboardInterrupt:  # a second signal before the first one's checkpoint: the user insists
            first = self._signal[0] if self._signal is not None else "SIGINT"
            state, reason = "stopped", (f"{first} twice: stopped at step {self.step} without a checkpoint; "
                                        "the last one saved stands")
            raise
        except BaseException as exc:
            state, reason = "crashed", f"{type(exc).__name__}: {exc}"
            raise
        finally:
            for s, handler in previous.items():
                signal.signal(s, handler)
            progress.close()
            self.events.write({"kind": {"finished": "finish"}.get(state, state), "step": self.step,
                               "reason": reason, "elapsed_s": round(self._elapsed(), 3)})
            write_status(self.run_dir, state, self.step, total_steps=total, reason=reason,
                         attempt=self.attempt)
            metrics_log.close()
            self.events.close()
            self.arrays.close()
            if self.samples is not None:
                self.samples.close()
            if tb:
                tb.close()
            close = getattr(self.data, "close", None)
            if callable(close):
                close()
        return RunResult("finished", self.step, total, row, self._elapsed())

    def _elapsed(self) -> float:
        """Training seconds over all attempts."""
        return self.elapsed_before + time.monotonic() - self._t0

    def _log_step(self, eval_metrics: dict, is_last: bool, metrics_log: MetricsLog, tb, progress: Progress) -> dict:
        """The log step: the row (one host sync), its consumers, and the decisions made on it."""
        now = time.monotonic()
        first_step = self._last_log_step + 1
        row = self._log_row(eval_metrics, self._elapsed(), now - self._last_log_t, self.step - self._last_log_step)
        self._last_log_t, self._last_log_step = now, self.step
        metrics_log.write(row)
        if tb:
            tb.write(self.step, row)
        progress.update(self.step, row, _steps_per_s(row, self.exp, self.cfg), final=is_last)
        for hook in self._on_row:
            hook(self, row)
        self._check_finite(row, first_step)
        promotion = self.curriculum.maybe_promote(self.step)
        if promotion:
            self.events.write(promotion)
            if self.cfg.eval.on_promotion:
                self._phase_end_eval(promotion)
        return row

    def _stop_if_asked(self) -> None:
        """A health policy, the memory guard or a signal ends the run here, after a checkpoint."""
        if self._stop_request is not None:
            path = self._checkpoint(self._elapsed(), "health policy")
            raise TrainingStopped(f"{self._stop_request}; checkpoint saved to {path}")
        if self.guard.watching and self.step % self.cfg.memory.every == 0:
            problem = self.guard.check(self.events.write)
            if problem:
                path = self._checkpoint(self._elapsed(), "memory guard")
                raise TrainingStopped(f"memory guard: {problem} at step {self.step}; checkpoint saved to {path}")
        if self._signal is not None:
            name, code = self._signal
            self._checkpoint(self._elapsed(), name)
            raise Interrupted(name, code)

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
        self.store.set_aside_from(first_step, f"saved inside the non-finite interval {first_step}-{self.step}")
        if policy == "stop":
            raise TrainingStopped(f"non-finite {detail} in the log interval {first_step}-{self.step}; "
                                  "no checkpoint from that interval is kept (train.nonfinite=stop)")
        self.request_rollback({"detector": "nonfinite", "step": self.step, "message": f"non-finite {detail}",
                               "evidence": {"onset_step": first_step}})


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
