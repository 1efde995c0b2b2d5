"""The typed config tree: dataclasses with a help text and bounds on every field, YAML in and out,
`--set a.b=value` overrides converted by the field's type, and strict validation.

Why not pydantic: we need one-line messages naming the dotted key, a "did you mean" for unknown
keys, PyYAML's quirks fixed ("1e-3" loads as a string), and sections whose type depends on the
experiment (model.*, data.*).  That is ~250 lines here against a heavy dependency whose messages
we would have to rewrite anyway.

Resolution order (later wins): the dataclass defaults < the experiment's preset < a YAML file <
`--set` overrides < `--steps`.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import typing
from dataclasses import dataclass, field
from typing import Any, Literal

import yaml

from trainlab.errors import ConfigError, UsageError, brief


def knob(default: Any = dataclasses.MISSING, help: str = "", *, factory: Any = None,
         ge: float | None = None, gt: float | None = None, le: float | None = None,
         lt: float | None = None) -> Any:
    """A config field with its help text and numeric bounds (checked for scalars and list items)."""
    meta = {"help": help, "ge": ge, "gt": gt, "le": le, "lt": lt}
    if factory is not None:
        return field(default_factory=factory, metadata=meta)
    return field(default=default, metadata=meta)


# --------------------------------------------------------------------------------------------
# The sections every experiment shares
# --------------------------------------------------------------------------------------------

# A billion optimizer steps is 11.6 days at 1000 steps/s, beyond any run of the small networks trainlab
# is for; a larger number is a typo (an exponent, a group of zeros too many), refused before a run
# plans its LR schedule and its ETA on it.
MAX_STEPS = 10**9


@dataclass
class TrainConfig:
    steps: int = knob(1000, f"optimizer steps in the whole run, at most {MAX_STEPS:,}", ge=1)
    micro_batch: int = knob(32, "samples per forward/backward pass", ge=1)
    accum: int = knob(1, "micro-batches per optimizer step on each process (effective batch = micro_batch x accum x "
                               "processes under torchrun)", ge=1)
    clip: float = knob(1.0, "global gradient-norm clip; 0 disables clipping (the norm is still logged)", ge=0)
    precision: Literal["auto", "fp32", "bf16", "fp16"] = knob(
        "auto", "auto = fp32 on CPU/MPS, bf16 on CUDA with bf16 support, else fp16 (with GradScaler)")
    seed: int = knob(0, "seed of weights, data and every RNG; data at step s is a pure function of (seed, s)", ge=0)
    deterministic: bool = knob(True, "deterministic algorithms (bitwise-exact resume on CPU)")
    compile: bool = knob(False, "torch.compile the model for the training step (evaluation stays eager); the "
                                "first steps pay the compilation")
    allow_world_size_change: bool = knob(
        False, "a resume under another number of processes (torchrun) is refused unless this is true: then "
               "train.accum is rescaled so that micro_batch x accum x processes stays what the checkpoint had")
    nonfinite: Literal["stop", "warn", "skip", "rollback"] = knob(
        "stop", "a non-finite loss or gradient norm: stop (exit 1); warn; skip (a step with a non-finite "
                "gradient norm is not applied -- costs one host sync per step); rollback (reload the last "
                "checkpoint before the interval, scale the LR, up to health.rollback_max times). Checkpoints "
                "from a non-finite interval are set aside under stop and rollback")

    def check(self, prefix: str) -> None:
        """Cross-field rules, after every field passed its own."""
        if self.steps > MAX_STEPS:
            shown = f"{self.steps:.3g}" if self.steps >= 10**12 else f"{self.steps:,}"
            raise ConfigError(f"{prefix}.steps", f"allowed: 1 to {MAX_STEPS:,} (a billion steps is more than any "
                                                 f"run trainlab is for); got {shown}")


@dataclass
class OptimConfig:
    name: Literal["adamw", "lion", "riemannian_adam"] = knob(
        "adamw", "optimizer: adamw; lion; riemannian_adam (geoopt's RiemannianAdam: Adam that keeps manifold "
                 "parameters on their manifold, plain Adam with coupled L2 weight decay on the others)")
    lr: float = knob(1e-3, "peak learning rate", gt=0)
    weight_decay: float = knob(0.0, "decoupled weight decay", ge=0)
    betas: tuple[float, float] = knob((0.9, 0.999), "momentum coefficients (beta1, beta2)", ge=0, lt=1)
    eps: float = knob(1e-8, "AdamW denominator epsilon", gt=0)
    momentum_dtype: Literal["fp32", "bf16"] = knob(
        "fp32", "dtype of Lion's momentum buffer (bf16 halves optimizer memory, as the SHA-256 curriculum does)")
    galore_rank: int = knob(0, "GaLore (Zhao et al. 2024): project gradients of 2-D weights to this rank; "
                               "0 = off", ge=0)
    galore_update_every: int = knob(200, "steps between refreshes of GaLore's projection (an SVD of the "
                                         "gradient)", ge=1)
    galore_scale: float = knob(0.25, "GaLore's alpha: scale of the update projected back to full rank", gt=0)
    lr_scale: Literal["none", "sqrt"] = knob(
        "none", "scale the LR with the model's width: sqrt = optim.lr x sqrt(lr_scale_base / width) (the BitNet size study's "
                "follow-up for wide ternary models); the width is the experiment's (bitnet_lm: model.hidden)")
    lr_scale_base: int = knob(256, "the width at which lr_scale leaves optim.lr unchanged", ge=1)
    lr_factors: dict[str, float] = knob(factory=dict, help=(
        "LR multipliers by parameter-name prefix, each prefix its own parameter group, e.g. {encoder_b.: 0.1}; the "
        "longest matching prefix wins, a prefix that matches no parameter is refused"), gt=0)

    def check(self, prefix: str) -> None:
        """Cross-field rules, after every field passed its own."""
        if self.momentum_dtype == "bf16" and self.name != "lion":
            raise ConfigError(f"{prefix}.momentum_dtype", "bf16 is supported with optim.name=lion only")
        if self.galore_rank > 0 and self.name == "riemannian_adam":
            raise ConfigError(f"{prefix}.galore_rank", f"GaLore projects the gradients of adamw and lion only; got "
                                                       f"{self.galore_rank} with optim.name=riemannian_adam (0 = off)")
        for name, factor in self.lr_factors.items():
            if not math.isfinite(factor):  # the field's bound already refuses <= 0
                raise ConfigError(f"{prefix}.lr_factors.{name}", f"must be a finite number > 0, got {factor!r}")


@dataclass
class LRPhase:
    kind: Literal["linear", "cosine", "constant"] = knob("constant", "shape of the LR within the phase")
    steps: int = knob(0, "length in optimizer steps; 0 = until the end of training (last phase only)", ge=0)
    start: float = knob(1.0, "LR multiplier (of optim.lr) at the start of the phase", ge=0)
    end: float = knob(1.0, "LR multiplier at the end of the phase (ignored by constant)", ge=0)


@dataclass
class ScheduleConfig:
    warmup: int = knob(0, "linear warmup steps from 0 to optim.lr (when phases is empty)", ge=0)
    decay: Literal["cosine", "linear", "constant"] = knob("cosine", "decay after warmup (when phases is empty)")
    min_lr_ratio: float = knob(0.1, "final LR as a fraction of optim.lr for cosine/linear decay", ge=0, le=1)
    phases: list[LRPhase] = knob(factory=list, help=(
        "explicit LR phases, in order; replaces warmup/decay when given, e.g. "
        "[{kind: linear, steps: 100, start: 0, end: 1}, {kind: cosine, steps: 0, start: 1, end: 0.1}]"))
    loss_weights: dict[str, list[tuple[float, float]]] = knob(factory=dict, help=(
        "piecewise-linear loss-weight ramps by loss name: [[at, weight], ...], held constant "
        "outside the points; e.g. {l2: [[0, 0], [0.1, 0.5], [0.4, 2.0]]}"))
    loss_weight_unit: Literal["fraction", "steps"] = knob(
        "fraction", "unit of the 'at' points of loss_weights: fraction of train.steps, or steps")
    two_stage_at: float = knob(
        0.0, "BitNet b1.58's two-stage recipe: after warmup the LR holds its peak with weight decay on (stage 1); "
             "from this fraction of train.steps the LR decays (decay, to min_lr_ratio) and weight decay is 0 "
             "(stage 2). 1 = stage 1 only; 0 = off (warmup/decay or phases as set)", ge=0, le=1)

    def check(self, prefix: str) -> None:
        """Cross-field rules, after every field passed its own."""
        if self.two_stage_at > 0 and self.phases:
            raise ConfigError(f"{prefix}.two_stage_at", f"{self.two_stage_at:g} cannot be combined with explicit "
                              f"{prefix}.phases ({len(self.phases)} given); set one of them (two_stage_at: 0 "
                              "turns it off)")
        for i, phase in enumerate(self.phases):
            if phase.steps == 0 and i != len(self.phases) - 1:
                raise ConfigError(f"{prefix}.phases[{i}].steps",
                                  "0 (until the end) is allowed for the last phase only")
        for name, points in self.loss_weights.items():
            if not points:
                raise ConfigError(f"{prefix}.loss_weights.{name}", "needs at least one [at, weight] point")
            ats = [p[0] for p in points]
            if any(b < a for a, b in zip(ats, ats[1:])):
                raise ConfigError(f"{prefix}.loss_weights.{name}", f"points must be in increasing order of 'at', got {ats}")
            if self.loss_weight_unit == "fraction" and any(not 0 <= a <= 1 for a in ats):
                raise ConfigError(f"{prefix}.loss_weights.{name}", f"'at' must lie in [0, 1] as a fraction, got {ats}")


@dataclass
class LogConfig:
    every: int = knob(10, "optimizer steps between metric rows (one host sync per row)", ge=1)
    progress: Literal["auto", "bar", "plain", "off"] = knob(
        "auto", "auto = a progress bar on a terminal, plain periodic lines otherwise")
    plain_interval_s: float = knob(10.0, "least seconds between two plain progress lines", ge=0)
    tensorboard: bool = knob(False, "also write TensorBoard event files (needs the tensorboard package)")
    mlflow: bool = knob(False, "also log to MLflow (needs mlflow-skinny): params, a metric per row, report.html and "
                               "config.yaml at the end; tracking URI from MLFLOW_TRACKING_URI, else a file store in "
                               "the run directory; a resumed run continues its MLflow run")
    wandb: bool = knob(False, "also log to Weights & Biases (needs wandb): offline unless WANDB_MODE says otherwise; "
                              "a resumed run continues its W&B run")
    project: str = knob("trainlab", "the MLflow experiment / W&B project the run is logged under")


@dataclass
class EvalConfig:
    every: int = knob(100, "optimizer steps between evaluations; 0 = only at the end", ge=0)
    at_end: bool = knob(True, "evaluate after the last step")
    on_promotion: bool = knob(True, "evaluate at the level a curriculum phase just left (its final numbers "
                                    "and maps go to events.jsonl and eval_arrays.jsonl)")


@dataclass
class CkptConfig:
    every: int = knob(500, "optimizer steps between checkpoints; 0 = only at exit and on signals", ge=0)
    keep: int = knob(3, "newest checkpoints kept (the best one is kept besides)", ge=1)
    best_metric: str = knob("", "metric that picks the best checkpoint, e.g. val_loss; empty = none")
    best_mode: Literal["min", "max"] = knob("min", "whether a lower or a higher best_metric is better")


@dataclass
class CurriculumConfig:
    name: str = knob("level", "name of the curriculum value (a metrics column), e.g. rounds")
    values: list[float] = knob(factory=list, help="value of each phase, e.g. [8, 16, 32, 64]; empty = no curriculum")
    min_steps: list[int] = knob(factory=list, help="least optimizer steps spent in each phase before promotion", ge=0)
    gates: list[float] = knob(factory=list, help="running-average metric needed to leave each phase", ge=0, le=1)
    metric: str = knob("acc", "training metric the gates compare")
    window: int = knob(50, "optimizer steps in the running average of the gate metric", ge=1)
    start_phase: int = knob(0, "phase index a fresh run begins at", ge=0)
    on_resume: Literal["checkpoint", "start"] = knob(
        "checkpoint", "on resume: continue the saved phase, or go back to start_phase (the SHA-256 curriculum)")

    def check(self, prefix: str) -> None:
        """Cross-field rules, after every field passed its own."""
        n = len(self.values)
        lengths = {"values": n, "min_steps": len(self.min_steps), "gates": len(self.gates)}
        if len(set(lengths.values())) != 1:
            shown = ", ".join(f"{k} has {v}" for k, v in lengths.items())
            raise ConfigError(prefix, f"values, min_steps and gates must have equal lengths; {shown}")
        if n and self.start_phase >= n:
            raise ConfigError(f"{prefix}.start_phase", f"must be < {n} (the number of phases), got {self.start_phase}")
        if not self.name.isidentifier():
            raise ConfigError(f"{prefix}.name", f"must be an identifier (a metrics column), got {self.name!r}")


@dataclass
class MemoryConfig:
    host_ceiling_gb: float = knob(0.0, "host RAM ceiling in GB; 0 = no ceiling", ge=0)
    host_measure: Literal["process", "system"] = knob(
        "process", "process = RSS of this process and its children; system = machine-wide used RAM")
    device_ceiling_gb: float = knob(0.0, "device memory ceiling in GB (allocated by torch); 0 = none", ge=0)
    every: int = knob(10, "optimizer steps between memory polls (with a ceiling set; without one, memory is "
                          "read at log rows only)", ge=1)
    pause_s: float = knob(0.0, "seconds to wait for memory to drain before stopping; 0 = stop at once", ge=0)


Policy = Literal["off", "warn", "stop", "rollback"]


@dataclass
class HealthConfig:
    divergence: Policy = knob("warn", "a sustained loss rise, or the loss back above the baseline after being below")
    spike: Policy = knob("warn", "a loss jump far outside recent statistics")
    plateau: Policy = knob("warn", "no significant improvement over plateau_window rows")
    stuck: Policy = knob("warn", "loss not below the random baseline and not falling, after warm-up")
    collapse: Policy = knob("warn", "collapse_metric below collapse_min, rank_metric falling, or bounds violated")
    grad_regime: Policy = knob("warn", "a change of the gradient-norm level by grad_regime_ratio or more")
    grokking: Literal["off", "warn"] = knob("warn", "report memorisation and generalisation steps (an event, no action)")
    milestone: Literal["off", "warn"] = knob("warn", "report the step at which each goal of health.targets is first "
                                                     "reached (an event, no action)")
    jump: Literal["off", "warn"] = knob("warn", "report a sudden change of a metric named in jumps after a plateau (a "
                                                "phase transition; an event, no action)")
    overfitting: Literal["off", "warn", "stop"] = knob(
        "warn", "memorising, not generalising: the training metric high while the validation metric stays far below "
                "it, or the validation loss rising while the training loss does not (stop: early stopping)")
    loss_metric: str = knob("loss", "the logged loss the divergence, spike, plateau, stuck and overfitting detectors and "
                        "preflight's learning signal judge, against the experiment's random-guess baseline; an experiment "
                        "whose optimised loss adds penalties that ramp in names its task loss (StegaStamp: secret_loss)")
    window: int = knob(20, "rows (log steps) the trend and spike statistics look back over", ge=5)
    alpha: float = knob(0.01, "significance level of the trend and baseline tests", gt=0, lt=0.5)
    warmup_fraction: float = knob(0.1, "fraction of train.steps before stuck/plateau/divergence may fire", ge=0, lt=1)
    divergence_min_rise: float = knob(0.02, "a rise counts as divergence only above this fraction of the baseline "
                                            "loss (so 1e-8 -> 5e-8 near zero is no divergence)", ge=0)
    spike_z: float = knob(6.0, "a spike is this many sigma of the row-to-row loss noise above the median of the "
                                  "last 5 rows (OLMo uses 6 sigma)", gt=0)
    spike_ratio: float = knob(1.5, "and the loss must exceed this multiple of that median", ge=1)
    spike_min_rise: float = knob(0.002, "and rise above that median by more than this fraction of the "
                                       "baseline loss (so 1e-4 -> 3e-4 on a memorised task is no spike)", ge=0)
    plateau_window: int = knob(50, "rows without significant improvement that make a plateau", ge=10)
    plateau_min_improvement: float = knob(0.01, "relative loss improvement over the plateau window that counts", ge=0)
    collapse_metric: str = knob("", "a metric that collapses toward 0 (e.g. distinct_preds); empty = none")
    collapse_min: float = knob(10.0, "collapse when collapse_metric falls below this (the BitNet size study: 10 tokens)")
    rank_metric: str = knob("", "an effective-rank metric (RankMe) to watch; empty = none")
    rank_drop: float = knob(0.5, "collapse when rank_metric falls below this fraction of its maximum", gt=0, lt=1)
    bounds: dict[str, tuple[float, float]] = knob(factory=dict, help=(
        "allowed [low, high] of metrics, e.g. {residual_rms: [0.01, 10]} (the StegaStamp readiness report's residual bounds)"))
    grad_regime_ratio: float = knob(3.0, "level change of the gradient norm that counts as a new regime", gt=1)
    grok_train_metric: str = knob("acc", "training accuracy metric for grokking")
    grok_val_metric: str = knob("val_acc", "validation accuracy metric for grokking")
    grok_train_level: float = knob(0.99, "training accuracy that marks memorisation", gt=0, le=1)
    grok_val_level: float = knob(0.9, "validation accuracy that marks generalisation", gt=0, le=1)
    jumps: dict[str, float] = knob(factory=dict, help=(
        "logged metrics the jump detector watches, each with the least absolute change that counts as a jump, e.g. "
        "{coverage: 0.05, hierarchy: 0.05}; empty = none (0 = the noise rule alone)"), ge=0)
    jump_window: int = knob(8, "values of a metric that a jump is measured against: their median without a "
                               "Mann-Kendall trend (a plateau), else their Theil-Sen line (a trend needs 6 values "
                               "to be found at alpha 0.01)", ge=6)
    jump_z: float = knob(6.0, "a jump lies this many sigma of the window's noise beyond its level", gt=0)
    overfit_train_metric: str = knob("acc", "training accuracy-like metric (higher is better) for overfitting")
    overfit_val_metric: str = knob("val_acc", "its held-out counterpart")
    overfit_train_level: float = knob(0.95, "overfitting needs the training metric at or above this", gt=0, le=1)
    overfit_gap: float = knob(0.2, "and the validation metric this far below it; clears when the gap is under half of it",
                              gt=0, le=1)
    overfit_val_loss: str = knob("val_loss", "held-out loss whose significant rise (while the training loss does not "
                                             "rise) is overfitting too; empty = none")
    overfit_min_rise: float = knob(0.05, "that rise must lift the recent validation loss by this fraction above its "
                                         "lowest value in the window", ge=0)
    rollback_lr_factor: float = knob(0.5, "rollback policy: LR multiplied by this after reloading", gt=0, lt=1)
    rollback_max: int = knob(3, "rollback policy: retries before the run stops", ge=1)
    targets: list[str] = knob(factory=list, help=(
        "goals of the run that trainlab preflight projects to the planned step, each 'METRIC OP LEVEL' with OP one "
        "of >=, <=, >, < and METRIC a logged metric, e.g. [\"val_acc>=0.9\"]; READY needs every one projected to "
        "be reached (besides the curriculum's gate). trainlab run reports the step each is first reached at "
        "(health.milestone) and does not act on them"))

    def check(self, prefix: str) -> None:
        """Each target must parse; whether its metric is logged, the experiment checks (check_config)."""
        from trainlab.health.goals import parse_target  # standard library only

        for i, text in enumerate(self.targets):
            try:
                parse_target(text)
            except ValueError as exc:
                raise ConfigError(f"{prefix}.targets[{i}]", f"{exc}; got {_show(text)}") from None


@dataclass
class CallbackSpec:
    path: str = knob("", "'package.module:ClassName' of a trainlab.Callback subclass")
    kwargs: dict[str, Any] = knob(factory=dict, help="keyword arguments its __init__ is called with")

    def check(self, prefix: str) -> None:
        module, sep, name = self.path.partition(":")
        if not (module and sep and name):
            raise ConfigError(f"{prefix}.path", f"must look like 'package.module:ClassName', got {_show(self.path)}")


@dataclass
class RunConfig:
    experiment: str = knob("modadd", "experiment name (trainlab list)")
    # Written only when set, so the configs of built-in and installed experiments stay as they were.
    experiment_ref: str = field(default="", metadata={
        "help": "where an experiment that is neither built in nor installed is defined: an absolute "
                "'/path/to/file.py:NAME' or 'package.module:NAME'; set from TARGET, not with --set",
        "omit_empty": True})
    preset: str = knob("", "preset the config started from")
    train: TrainConfig = knob(factory=TrainConfig, help="the loop")
    optim: OptimConfig = knob(factory=OptimConfig, help="the optimizer")
    schedule: ScheduleConfig = knob(factory=ScheduleConfig, help="learning-rate and loss-weight schedules")
    log: LogConfig = knob(factory=LogConfig, help="metrics and progress")
    eval: EvalConfig = knob(factory=EvalConfig, help="held-out evaluation")
    ckpt: CkptConfig = knob(factory=CkptConfig, help="checkpoints")
    curriculum: CurriculumConfig = knob(factory=CurriculumConfig, help="accuracy-gated phases")
    memory: MemoryConfig = knob(factory=MemoryConfig, help="memory guard")
    health: HealthConfig = knob(factory=HealthConfig, help="live health detectors and their policies")
    callbacks: list[CallbackSpec] = knob(
        factory=list, help="your own callbacks: 'package.module:ClassName', or {path: 'package.module:ClassName', "
                           "kwargs: {...}}; each a subclass of trainlab.Callback, run after trainlab's own")
    model: Any = knob(None, "the experiment's model section")
    data: Any = knob(None, "the experiment's data section")
    # Only experiments whose losses have options of their own have one (Experiment.loss_config), so the
    # configs of the others stay as they were.
    loss: Any = field(default=None, metadata={"help": "the experiment's loss section, where it has one",
                                              "omit_empty": True})


SHARED_SECTIONS = ("train", "optim", "schedule", "log", "eval", "ckpt", "curriculum", "memory", "health")


# --------------------------------------------------------------------------------------------
# Strict conversion from plain data to typed dataclasses
# --------------------------------------------------------------------------------------------

def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def _describe(tp: Any) -> str:
    origin = typing.get_origin(tp)
    if tp is int:
        return "an integer"
    if tp is float:
        return "a number"
    if tp is bool:
        return "true or false"
    if tp is str:
        return "a string"
    if origin is Literal:
        return "one of " + ", ".join(str(c) for c in typing.get_args(tp))
    if origin is list:
        return f"a list of {_describe(typing.get_args(tp)[0]).removeprefix('a ').removeprefix('an ')}s"
    if origin is tuple:
        return f"a list of {len(typing.get_args(tp))} numbers"
    if origin is dict:
        return "a mapping"
    if dataclasses.is_dataclass(tp):
        return "a mapping"
    return str(tp)


def _show(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _check_bounds(value: float, meta: dict, key: str) -> None:
    if meta.get("ge") is not None and value < meta["ge"]:
        raise ConfigError(key, f"must be >= {meta['ge']}, got {_show(value)}")
    if meta.get("gt") is not None and value <= meta["gt"]:
        raise ConfigError(key, f"must be > {meta['gt']}, got {_show(value)}")
    if meta.get("le") is not None and value > meta["le"]:
        raise ConfigError(key, f"must be <= {meta['le']}, got {_show(value)}")
    if meta.get("lt") is not None and value >= meta["lt"]:
        raise ConfigError(key, f"must be < {meta['lt']}, got {_show(value)}")


_TRUE = {"true", "yes", "on", "1"}
_FALSE = {"false", "no", "off", "0"}


def coerce(value: Any, tp: Any, key: str, meta: dict | None = None) -> Any:
    """Convert `value` (plain YAML data, or a string from --set) to type `tp`, or raise ConfigError."""
    meta = meta or {}
    origin = typing.get_origin(tp)
    wrong = ConfigError(key, f"expected {_describe(tp)}, got {_show(value)}")
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
            return value.strip().lower() in _TRUE
        raise wrong
    if tp is int:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, str):
            try:
                value = float(value.strip()) if any(c in value for c in ".eE") else int(value.strip())
            except ValueError:
                raise wrong from None
        if isinstance(value, float):
            if not (math.isfinite(value) and value.is_integer()):
                raise wrong
            value = int(value)
        if not isinstance(value, int):
            raise wrong
        _check_bounds(value, meta, key)
        return value
    if tp is float:
        if isinstance(value, bool):
            raise wrong
        if isinstance(value, str):  # PyYAML reads "1e-3" as a string; --set gives strings
            try:
                value = float(value.strip())
            except ValueError:
                raise wrong from None
        if not isinstance(value, (int, float)):
            raise wrong
        value = float(value)
        if not math.isfinite(value):
            raise ConfigError(key, f"must be a finite number, got {_show(value)}")
        _check_bounds(value, meta, key)
        return value
    if tp is str:
        if not isinstance(value, str):
            raise wrong
        return value
    if origin is Literal:
        choices = typing.get_args(tp)
        if value not in choices:
            raise ConfigError(key, f"must be one of {', '.join(map(str, choices))}; got {_show(value)}")
        return value
    if origin is list:
        if isinstance(value, str):
            value = _parse_flow(value, key)
        if not isinstance(value, (list, tuple)):
            raise wrong
        (item_tp,) = typing.get_args(tp)
        return [coerce(v, item_tp, f"{key}[{i}]", meta) for i, v in enumerate(value)]
    if origin is tuple:
        if isinstance(value, str):
            value = _parse_flow(value, key)
        item_tps = typing.get_args(tp)
        if not isinstance(value, (list, tuple)) or len(value) != len(item_tps):
            raise wrong
        return tuple(coerce(v, t, f"{key}[{i}]", meta) for i, (v, t) in enumerate(zip(value, item_tps)))
    if origin is dict:
        if isinstance(value, str):
            value = _parse_flow(value, key)
        if not isinstance(value, dict):
            raise wrong
        key_tp, val_tp = typing.get_args(tp)
        out = {}
        for k, v in value.items():
            if not isinstance(k, str) or not k:
                raise ConfigError(key, f"keys must be non-empty strings, got {_show(k)}")
            out[k] = coerce(v, val_tp, f"{key}.{k}", meta)
        return out
    if tp is Any:  # free-form data a user's code receives as it is (callback kwargs)
        return value
    if tp is CallbackSpec and isinstance(value, str):  # the short form: just the path
        value = {"path": value}
    if dataclasses.is_dataclass(tp):
        if isinstance(value, str):
            value = _parse_flow(value, key)
        if not isinstance(value, dict):
            raise wrong
        return from_dict(tp, value, key)
    raise ConfigError(key, f"unsupported field type {tp!r}")  # a bug in a config class, not user input


def _parse_flow(text: str, key: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(key, f"cannot parse {_show(text)} as YAML: {brief(exc, None)}") from None




def unknown_key(key: str, name: str, allowed: list[str]) -> ConfigError:
    close = difflib.get_close_matches(name, allowed, n=1, cutoff=0.6)
    hint = f"did you mean '{close[0]}'? " if close else ""
    return ConfigError(key, f"unknown key; {hint}allowed: {', '.join(allowed)}")


def from_dict(cls: type, data: dict, prefix: str = "") -> Any:
    """Build dataclass `cls` from `data`, strictly: unknown keys and wrong types raise ConfigError."""
    hints = _hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for name, value in data.items():
        key = f"{prefix}.{name}" if prefix else str(name)
        if name not in fields:
            raise unknown_key(key, str(name), list(fields))
        kwargs[name] = coerce(value, hints[name], key, dict(fields[name].metadata))
    try:
        obj = cls(**kwargs)
    except TypeError as exc:  # a missing required field
        raise ConfigError(prefix, brief(exc, None)) from None
    check = getattr(obj, "check", None)
    if callable(check):
        check(prefix)
    return obj


def to_dict(obj: Any) -> Any:
    """Plain data (dicts, lists, scalars) for YAML; tuples become lists."""
    if dataclasses.is_dataclass(obj):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)
                if getattr(obj, f.name) or not f.metadata.get("omit_empty")}
    if isinstance(obj, (list, tuple)):
        return [to_dict(v) for v in obj]
    if isinstance(obj, dict):
        return {k: to_dict(v) for k, v in obj.items()}
    return obj


def merge(base: dict, update: dict) -> dict:
    """Nested dict merge: mappings merge key by key, everything else (lists too) is replaced."""
    out = dict(base)
    for k, v in update.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = merge(out[k], v)
        else:
            out[k] = v
    return out


# --------------------------------------------------------------------------------------------
# Resolution: defaults < preset < YAML < --set < --steps
# --------------------------------------------------------------------------------------------

def load_yaml_file(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as fh:
            data = yaml.safe_load(fh)
    except FileNotFoundError:
        raise UsageError(f"config file {path}: not found") from None
    except IsADirectoryError:
        raise UsageError(f"config file {path}: is a directory, expected a YAML file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"config file {path}: cannot read: {brief(exc, None)}") from None
    except yaml.YAMLError as exc:
        raise UsageError(f"config file {path}: malformed YAML: {brief(exc, None)}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UsageError(f"config file {path}: expected a mapping of sections at the top, got {type(data).__name__}")
    return data


def parse_set(items: list[str]) -> list[tuple[str, str]]:
    out = []
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--set {item!r}: expected key=value, e.g. --set optim.lr=3e-4")
        out.append((key, value))
    return out


def _field_type(root_types: dict[str, type], key: str) -> tuple[Any, dict]:
    """The type and metadata of the field at dotted `key`, or ConfigError naming what exists."""
    parts = key.split(".")
    cls: Any = RunConfig
    hints = dict(_hints(RunConfig), **root_types)
    meta: dict = {}
    for depth, name in enumerate(parts):
        fields = {f.name: f for f in dataclasses.fields(cls)}
        here = ".".join(parts[: depth + 1])
        if name not in fields:  # an empty first part (`--set .x=1`) leaves `here` empty: name the whole key
            raise unknown_key(here or key, name, list(fields))
        tp = hints[name]
        meta = dict(fields[name].metadata)
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(tp):
                raise ConfigError(here, f"is {_describe(tp)}, it has no key '{parts[depth + 1]}'")
            cls, hints = tp, _hints(tp)
    return tp, meta


def get_path(data: dict, key: str) -> Any:
    node: Any = data
    for name in key.split("."):
        if not isinstance(node, dict):
            return None
        node = node.get(name)
    return node


def set_path(data: dict, key: str, value: Any) -> None:
    parts = key.split(".")
    node = data
    for name in parts[:-1]:
        node = node.setdefault(name, {})
    node[parts[-1]] = value


def resolve(experiment: Any, preset: str, file_data: dict | None = None,
            overrides: list[tuple[str, str]] | None = None, steps: int | None = None) -> RunConfig:
    """The full, validated config of a run of `experiment` (an Experiment) from `preset`."""
    if preset not in experiment.presets:
        raise UsageError(f"unknown preset '{preset}' for experiment {experiment.name}; "
                         f"allowed: {', '.join(experiment.presets)}")
    root_types = {"model": experiment.model_config, "data": experiment.data_config}
    if getattr(experiment, "loss_config", None) is not None:
        root_types["loss"] = experiment.loss_config
    data = merge(default_data(experiment, preset), experiment.presets[preset].overrides)
    if file_data:
        data = merge(data, {k: v for k, v in file_data.items() if k not in ("experiment", "experiment_ref", "preset")})
    for key, raw in overrides or []:
        if key in ("experiment", "experiment_ref", "preset"):
            raise ConfigError(key, "cannot be changed with --set; give it as TARGET or --preset")
        tp, meta = _field_type(root_types, key)
        value = to_dict(coerce(raw, tp, key, meta))  # validated now; kept as plain data for build()
        if dataclasses.is_dataclass(tp):  # a section given whole merges over what is there
            value = merge(get_path(data, key) or {}, _parse_flow(raw, key))
        set_path(data, key, value)
    if steps is not None:
        set_path(data, "train.steps", steps)
    return build(experiment, data)


def default_data(experiment: Any, preset: str = "") -> dict:
    """Every key of a run of `experiment` at its dataclass default, as plain data."""
    from trainlab.experiment import reference_of  # loaded already: `experiment` is one of its classes

    loss_config = getattr(experiment, "loss_config", None)
    return to_dict(RunConfig(experiment=experiment.name, experiment_ref=reference_of(experiment), preset=preset,
                             model=experiment.model_config(), data=experiment.data_config(),
                             loss=loss_config() if loss_config is not None else None))


def build_saved(experiment: Any, data: dict) -> RunConfig:
    """A run directory's config.yaml as a RunConfig.  One written by an older trainlab may lack a
    section or key added since: the defaults fill it in."""
    return build(experiment, merge(default_data(experiment, str(data.get("preset") or "")), data))


def build(experiment: Any, data: dict) -> RunConfig:
    """Typed RunConfig from complete plain data, with the experiment's own sections and checks."""
    top = {f.name for f in dataclasses.fields(RunConfig)}
    for name in data:
        if name not in top:
            raise unknown_key(str(name), str(name), sorted(top))
    kwargs = {}
    hints = _hints(RunConfig)
    for f in dataclasses.fields(RunConfig):
        value = data.get(f.name, f.default if f.metadata.get("omit_empty") else None)
        if f.name in ("model", "data"):
            if not isinstance(value, dict):
                raise ConfigError(f.name, f"expected a mapping, got {_show(value)}")
            section_cls = experiment.model_config if f.name == "model" else experiment.data_config
            kwargs[f.name] = from_dict(section_cls, value, f.name)
        elif f.name == "loss":
            loss_config = getattr(experiment, "loss_config", None)
            if loss_config is None:
                if value is not None:
                    raise ConfigError("loss", f"experiment {experiment.name} has no loss section (its loss options, "
                                              "if any, are under model.*)")
                continue
            if not isinstance(value, dict):
                raise ConfigError("loss", f"expected a mapping, got {_show(value)}")
            kwargs["loss"] = from_dict(loss_config, value, "loss")
        elif value is None:
            raise ConfigError(f.name, "missing")
        else:
            kwargs[f.name] = coerce(value, hints[f.name], f.name, dict(f.metadata))
    cfg = RunConfig(**kwargs)
    experiment.check_config(cfg)
    return cfg


def dump_yaml(cfg: RunConfig) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False, default_flow_style=None, width=100)


def flatten(data: dict, prefix: str = "") -> dict[str, Any]:
    out = {}
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else k
        if isinstance(v, dict) and v and all(isinstance(x, str) for x in v):
            out.update(flatten(v, key))
        else:
            out[key] = v
    return out


# --------------------------------------------------------------------------------------------
# The reference document (docs/config.md is this output; a test keeps it true)
# --------------------------------------------------------------------------------------------

def _fmt_default(f: dataclasses.Field) -> str:
    if f.default is not dataclasses.MISSING:
        value = f.default
    elif f.default_factory is not dataclasses.MISSING:  # type: ignore[misc]
        value = f.default_factory()  # type: ignore[misc]
    else:
        return "(required)"
    if dataclasses.is_dataclass(value) or (value is None and f.name in ("model", "data")):
        return "(section)"
    return "`" + yaml.safe_dump(to_dict(value), default_flow_style=True, width=1000).strip().removesuffix("...").strip() + "`"


def _bounds(meta: dict) -> str:
    parts = []
    for k, sym in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<")):
        if meta.get(k) is not None:
            parts.append(f"{sym} {meta[k]}")
    return ", ".join(parts)


def reference_rows(cls: type, prefix: str) -> list[str]:
    rows = []
    hints = _hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        key = f"{prefix}.{f.name}" if prefix else f.name
        if dataclasses.is_dataclass(tp) and prefix == "":
            continue
        kind = "the experiment's section" if tp is Any else _describe(tp)
        bounds = _bounds(dict(f.metadata))
        if bounds:
            kind += f" ({bounds})"
        rows.append(f"| `{key}` | {kind} | {_fmt_default(f)} | {f.metadata.get('help', '')} |")
    return rows


def render_reference(experiments: dict) -> str:
    lines = [
        "# Config reference",
        "",
        "Generated from the dataclasses in `src/trainlab/config.py` and each experiment's config by",
        "`python -m trainlab.config > docs/config.md`; `tests/test_config.py` fails when it is stale.",
        "",
        "Every key can be set in a YAML file (`trainlab run file.yaml`) or on the command line",
        "(`--set section.key=value`). Resolution order, later wins: defaults < preset < YAML < `--set` < `--steps`.",
        "Unknown keys, wrong types and out-of-range values are refused before anything runs (exit code 2).",
        "",
        "| key | type | default | meaning |",
        "|---|---|---|---|",
    ]
    lines += reference_rows(RunConfig, "")
    for section in SHARED_SECTIONS:
        cls = _hints(RunConfig)[section]
        lines += reference_rows(cls, section)
    lines += reference_rows(LRPhase, "schedule.phases[]")
    lines += reference_rows(CallbackSpec, "callbacks[]")
    for exp in experiments.values():
        lines += ["", f"## Experiment `{exp.name}`", "", exp.description, "",
                  "| key | type | default | meaning |", "|---|---|---|---|"]
        lines += reference_rows(exp.model_config, "model")
        lines += reference_rows(exp.data_config, "data")
        if getattr(exp, "loss_config", None) is not None:
            lines += reference_rows(exp.loss_config, "loss")
        lines += ["", "Presets:", ""]
        lines += [f"- `{name}`: {p.description}" for name, p in exp.presets.items()]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    from trainlab.experiment import registry

    print(render_reference(registry()), end="")
