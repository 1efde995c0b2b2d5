#!/usr/bin/env python3
"""Engine overhead and host syncs: trainlab's Trainer against a minimal hand-written loop.

Figure 1 -- the same model, data, loss, optimizer, precision, LR schedule and clipping, run by
`Trainer.fit()` and by `hand_loop()` below (what a user writes by hand, ~40 lines), in rounds
A, B, B, A, A, B, ... with a fresh model each time.  A round's step time is its mean over steps
warmup+1..steps, timestamped in `after_update` (CUDA: synchronised there, and only there), so
setup, warm-up and the Trainer's final checkpoint stay outside the window while its log steps are
inside it.  The figure is median(Trainer) / median(hand loop) over the rounds.  Eval and periodic
checkpoints are off; everything else is the preset's (deterministic algorithms included, in both).

Figure 2 (CUDA only) -- host syncs per optimizer step: a Trainer run under
torch.cuda.set_sync_debug_mode("warn"), each synchronising call recorded as a warning and filed
under the step it happened in, split into the steps between log steps and the log steps.

    python bench/engine_overhead.py [--device cpu|cuda] [--models modadd,sha256,bitnet_lm]
                                    [--rounds 5] [--steps N] [--warmup W] [--no-syncs]
The last lines are the summary lines (bench/_common.py).
"""

from __future__ import annotations

import argparse
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import torch

import _common as C
from trainlab import Callback
from trainlab.config import resolve
from trainlab.engine import schedules
from trainlab.engine.state import seed_everything
from trainlab.engine.trainer import Trainer, autocast_context, resolve_precision
from trainlab.experiment import StepContext, get_experiment
from trainlab.launch import run_watchers
from trainlab.optim import build_optimizer, width_lr_factor

# (preset, overrides) per device.  CUDA: the full sizes; CPU: small enough for 2 cores.
# sha256: the device loader (the shm producers are figure 3's subject) and no curriculum (a fixed
# number of rounds), so the hand loop needs no curriculum code to do equal work.
CASES = {
    "cpu": {
        "modadd": ("quick", [("model.dim", "64"), ("train.micro_batch", "256")]),
        "sha256": ("quick", [("data.loader", "device"), ("curriculum.values", "[]"), ("curriculum.min_steps", "[]"), ("curriculum.gates", "[]"), ("data.rounds", "16"),
                             ("model.dim", "64"), ("train.micro_batch", "64")]),
        "bitnet_lm": ("cpu", [("train.micro_batch", "8")]),
    },
    "cuda": {
        "modadd": ("grok", []),
        "sha256": ("gpu", [("curriculum.values", "[]"), ("curriculum.min_steps", "[]"), ("curriculum.gates", "[]"), ("data.rounds", "16")]),
        "bitnet_lm": ("s1024", []),
    },
}
STEPS = {"cpu": (40, 10), "cuda": (120, 20)}  # (steps per round, warm-up steps not timed)
COMMON = [("eval.every", "0"), ("eval.at_end", "false"), ("ckpt.every", "0"), ("log.progress", "off")]
TARGET = {"cpu": 1.05, "cuda": 1.02}


def make_config(name: str, device: torch.device, steps: int, extra: list | None = None):
    exp = get_experiment(name)
    preset, overrides = CASES[device.type][name]
    cfg = resolve(exp, preset, None, COMMON + overrides + [("train.steps", str(steps))] + list(extra or []), None)
    return exp, cfg


class Clock(Callback):
    """Timestamps at the end of optimizer steps `warmup` and `steps` (synchronised on CUDA), and
    the per-step loss tensors (kept as references: no sync)."""

    def __init__(self, device: torch.device, warmup: int, steps: int, keep_losses: bool = False):
        self.device, self.warmup, self.steps = device, warmup, steps
        self.t: dict[int, float] = {}
        self.losses: list[torch.Tensor] = []
        self.keep_losses = keep_losses

    def tick(self, step: int, loss: torch.Tensor) -> None:  # step: optimizer steps done
        if self.keep_losses:
            self.losses.append(loss.detach())
        if step in (self.warmup, self.steps):
            C.sync(self.device)
            self.t[step] = time.perf_counter()

    def on_after_update(self, trainer) -> None:  # a Trainer callback event
        self.tick(trainer.step + 1, trainer.last_step_loss)

    def step_time(self) -> float:
        return (self.t[self.steps] - self.t[self.warmup]) / (self.steps - self.warmup)


# ---------------------------------------------------------------------------------------- the hand loop
def hand_loop(exp, cfg, device: torch.device, clock: Clock) -> None:
    """A minimal loop a user writes by hand, doing the Trainer's work: same seed, model, data,
    optimizer, schedule, precision, clipping; the loss read back once per log interval."""
    if cfg.train.deterministic:
        torch.use_deterministic_algorithms(True, warn_only=True)
    seed_everything(cfg.train.seed)
    model = exp.build_model(cfg).to(device)
    model.train()
    data = exp.build_data(cfg, device)
    opt = build_optimizer(cfg.optim, model, device)
    precision = resolve_precision(cfg.train.precision, device)
    scaler = torch.amp.GradScaler(device.type, enabled=precision == "fp16")
    params = [p for p in model.parameters() if p.requires_grad]
    lr0 = cfg.optim.lr * width_lr_factor(cfg.optim, exp.width(cfg))
    total, accum = cfg.train.steps, cfg.train.accum
    loss_sum = torch.zeros((), device=device)
    try:
        for step in range(total):
            lr = lr0 * schedules.lr_multiplier(cfg.schedule, step, total)
            wd = cfg.optim.weight_decay * schedules.weight_decay_multiplier(cfg.schedule, step, total)
            for group in opt.param_groups:
                group["lr"] = lr
                if group.get("decays"):
                    group["weight_decay"] = wd
            ctx = StepContext(step=step, level=None, weights=schedules.loss_weights(cfg.schedule, step, total))
            for micro in range(accum):
                with autocast_context(precision, device):
                    loss, _ = exp.loss(model, data.batch(step, micro, None), ctx)
                scaler.scale(loss * (1.0 / accum)).backward()
            scaler.unscale_(opt)
            torch.nn.utils.clip_grad_norm_(params, cfg.train.clip)
            scaler.step(opt)
            scaler.update()
            opt.zero_grad(set_to_none=True)
            loss_sum += loss.detach()
            if (step + 1) % cfg.log.every == 0:
                loss_sum.item()  # the log line's one host sync
                loss_sum.zero_()
            clock.tick(step + 1, loss)
    finally:
        close = getattr(data, "close", None)
        if callable(close):
            close()


def trainer_loop(exp, cfg, device: torch.device, clock: Clock, callbacks: list | None = None) -> None:
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as run_dir:
        run = Path(run_dir) / "run"
        # the watchers every trainlab run has (health detectors, heatmaps) are part of its overhead
        Trainer(cfg, exp, run, device, callbacks=[clock, *run_watchers(cfg, exp, run), *(callbacks or [])]).fit()


def interleaved_trainer_rounds(exp, cfgs: dict, device: torch.device, rounds: int, warmup: int,
                               steps: int) -> dict[str, list[float]]:
    """Mean step time of a Trainer.fit() of each config, round by round: the configs run one after the
    other, the order turned every round (A, B, B, A, ...) so neither always runs first."""
    times: dict[str, list[float]] = {name: [] for name in cfgs}
    order = list(cfgs)
    for r in range(rounds):
        for name in (order if r % 2 == 0 else order[::-1]):
            clock = Clock(device, warmup, steps)
            trainer_loop(exp, cfgs[name], device, clock)
            times[name].append(clock.step_time())
    return times


def lightning_loop(exp, cfg, device: torch.device, clock: Clock) -> None:
    """The same work through Lightning's Trainer (only when `lightning` is installed)."""
    import lightning as L

    class Module(L.LightningModule):
        def __init__(self):
            super().__init__()
            self.model = exp.build_model(cfg)

        def training_step(self, batch, _):
            step = self.global_step
            ctx = StepContext(step=step, level=None, weights=schedules.loss_weights(cfg.schedule, step, total))
            loss, _ = exp.loss(self.model, data.batch(step, 0, None), ctx)
            return loss

        def configure_optimizers(self):
            opt = build_optimizer(cfg.optim, self.model, device)
            mult = lambda s: schedules.lr_multiplier(cfg.schedule, s, total)  # noqa: E731
            return {"optimizer": opt, "lr_scheduler": {"scheduler": torch.optim.lr_scheduler.LambdaLR(opt, mult),
                                                       "interval": "step"}}

        def on_train_batch_end(self, outputs, batch, batch_idx):
            clock.tick(self.global_step, outputs["loss"])

    total = cfg.train.steps
    seed_everything(cfg.train.seed)
    module = Module()
    data = exp.build_data(cfg, device)
    precision = {"fp32": "32-true", "bf16": "bf16-mixed", "fp16": "16-mixed"}[resolve_precision(cfg.train.precision,
                                                                                                 device)]
    dummy = torch.utils.data.DataLoader(range(total), batch_size=None)  # the stream makes the batches
    trainer = L.Trainer(accelerator=device.type, devices=1, max_steps=total, precision=precision,
                        gradient_clip_val=cfg.train.clip, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=cfg.log.every,
                        deterministic=cfg.train.deterministic)
    trainer.fit(module, dummy)
    close = getattr(data, "close", None)
    if callable(close):
        close()


def lightning_available() -> bool:
    try:
        import lightning  # noqa: F401
    except ImportError:
        return False
    return True


def measure(name: str, device: torch.device, rounds: int, steps: int, warmup: int,
            with_lightning: bool) -> dict[str, float]:
    exp, cfg = make_config(name, device, steps)
    loops = {"trainer": trainer_loop, "hand": hand_loop}
    if with_lightning:
        loops["lightning"] = lightning_loop
    times: dict[str, list[float]] = {k: [] for k in loops}
    order = list(loops)
    for r in range(rounds):
        for k in (order if r % 2 == 0 else order[::-1]):
            clock = Clock(device, warmup, steps)
            loops[k](exp, cfg, device, clock)
            times[k].append(clock.step_time())
    med = {k: C.median(v) for k, v in times.items()}
    unit = exp.items_per_sample(cfg) * cfg.train.micro_batch * cfg.train.accum
    print(f"{name:10s} preset {cfg.preset:6s} batch {cfg.train.micro_batch:5d} precision "
          f"{resolve_precision(cfg.train.precision, device):5s} | "
          + " | ".join(f"{k} {med[k] * 1e3:8.2f} ms/step ({C.fmt_rate(unit / med[k])} {exp.throughput_unit}/s)"
                       for k in loops)
          + f" | trainer/hand {med['trainer'] / med['hand']:.3f}"
          + (f" | lightning/hand {med['lightning'] / med['hand']:.3f}" if "lightning" in med else ""))
    print(f"{'':10s} per-round ms/step: " + "; ".join(f"{k} " + " ".join(f"{t * 1e3:.2f}" for t in v)
                                                      for k, v in times.items()))
    return med


# ---------------------------------------------------------------------------------------- host syncs
class SyncCounter(Callback):
    """Files each synchronisation warning under the optimizer step it happened in: 'train' (the
    step's own work, up to on_after_update) or 'log' (the log row and what follows it)."""

    def __init__(self, record: list):
        self.record = record
        self.seen = 0
        self.per_step: dict[int, Counter] = {}
        self.where: Counter = Counter()

    def _take(self, step: int, part: str) -> None:
        new = [w for w in self.record[self.seen:] if "synchroniz" in str(w.message)]  # not other warnings
        self.seen = len(self.record)
        self.per_step.setdefault(step, Counter())[part] += len(new)
        for w in new:
            self.where[f"{Path(w.filename).name}:{w.lineno} ({part})"] += 1

    def on_after_update(self, trainer) -> None:
        self._take(trainer.step + 1, "train")

    def on_log_row(self, trainer, row) -> None:  # after the watchers': their syncs count as the log's
        self._take(trainer.step, "log")


def count_syncs(name: str, device: torch.device, steps: int, warmup: int) -> tuple[float, float, Counter]:
    """(syncs per step between log steps, syncs per log step, where) for one Trainer run."""
    exp, cfg = make_config(name, device, steps)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        counter = SyncCounter(record)
        torch.cuda.set_sync_debug_mode("warn")
        try:
            with tempfile.TemporaryDirectory(prefix="bench-syncs-") as run_dir:
                run = Path(run_dir) / "run"
                Trainer(cfg, exp, run, device, callbacks=[*run_watchers(cfg, exp, run), counter]).fit()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    log_every = cfg.log.every
    # what follows a log row (progress, memory poll) is filed under the next step: counted against
    # the steps between log steps, never hidden in the log step
    between = [c["train"] + c["log"] for s, c in counter.per_step.items() if s > warmup and s % log_every != 0]
    at_log = [c["train"] + c["log"] for s, c in counter.per_step.items() if s > warmup and s % log_every == 0]
    return (sum(between) / max(len(between), 1), sum(at_log) / max(len(at_log), 1), counter.where)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--models", default="modadd,sha256,bitnet_lm")
    parser.add_argument("--rounds", type=int, default=9, help="rounds of each loop (interleaved)")
    parser.add_argument("--steps", type=int, default=None, help="optimizer steps per round")
    parser.add_argument("--warmup", type=int, default=None, help="first steps of a round not timed")
    parser.add_argument("--no-syncs", action="store_true", help="skip figure 2 (host syncs)")
    args = parser.parse_args()
    device = torch.device(args.device)
    steps, warmup = STEPS[device.type]
    steps, warmup = args.steps or steps, args.warmup if args.warmup is not None else warmup
    models = [m for m in args.models.split(",") if m]
    with_lightning = lightning_available()
    print(C.header(device, "engine overhead: trainlab Trainer vs a hand-written loop"))
    print(f"{args.rounds} interleaved rounds of {steps} steps each, steps {warmup + 1}..{steps} timed; "
          f"ratio of median ms/step; lightning {'installed' if with_lightning else 'not installed'}")
    results = {m: measure(m, device, args.rounds, steps, warmup, with_lightning) for m in models}

    syncs = {}
    if device.type == "cuda" and not args.no_syncs:
        for m in models:
            between, at_log, where = count_syncs(m, device, steps, warmup)
            syncs[m] = (between, at_log)
            print(f"host syncs {m}: {between:.2f} per step between log steps, {at_log:.2f} per log step; "
                  f"where: {dict(where.most_common(8))}")

    target = TARGET[device.type]
    lines = []
    for m, med in results.items():
        ratio = med["trainer"] / med["hand"]
        lines.append(C.summary(f"engine overhead {m} ({device.type}, trainer/hand)", f"{ratio:.3f}",
                               f"<= {target}", C.verdict(ratio <= target)))
    for m, med in results.items():
        if "lightning" in med:
            ratio = med["trainer"] / med["lightning"]
            # the hand loop's target: trainlab may cost no more against Lightning than against a hand loop
            lines.append(C.summary(f"engine overhead {m} vs lightning ({device.type}, trainer/lightning)",
                                   f"{ratio:.3f}", f"<= {target}", C.verdict(ratio <= target)))
        else:
            lines.append(C.summary(f"engine overhead {m} vs lightning ({device.type})",
                                   "lightning is not installed", f"trainer/lightning <= {target}",
                                   "not measured (pip install lightning to measure)"))
    if device.type == "cuda" and syncs:
        for m, (between, at_log) in syncs.items():
            lines.append(C.summary(f"host syncs between log steps {m} (cuda)", f"{between:.2f} per step "
                                   f"({at_log:.2f} per log step)", "0", C.verdict(between == 0)))
    else:
        lines.append(C.summary("host syncs between log steps", f"not measured on {device.type} (needs CUDA)",
                               "0", "not measured"))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
