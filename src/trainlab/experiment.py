"""The Experiment contract and the registry of experiments by name.

An experiment is one package that the engine knows nothing special about.  It supplies:

- `model_config`, `data_config`: dataclasses for its `model.*` and `data.*` sections (and
  `loss_config` for a `loss.*` section, where its losses have options);
- `presets`: named overrides as plain data, always with a seconds-long `smoke`;
- `build_model(cfg)`; `build_data(cfg, device)` -> a DataStream whose batch at (step, micro) is a
  pure function of (seed, step, micro, curriculum value) -- this is what makes resume exact;
- `loss(model, batch, ctx)` -> (loss, metrics), metrics as 0-d device tensors (no host sync);
- `baseline_loss(cfg)`: the loss of an honest random guess (ln 2 per bit, ln V per token);
- `evaluate(model, data, cfg, level)` -> held-out metrics as 0-d device tensors (optional);
- `extra_updates(cfg)` -> a second (third...) optimizer over part of the model, stepped on its own
  schedule with its own loss: a GAN's critic, say (optional; see ExtraUpdate);
- `callbacks(cfg)` -> callbacks of its own that steer its runs (freezing parts of the model, say;
  optional).

Nothing in engine/ changes for a new experiment, nor anything here: it is named by a reference to
the user's own file or module (`path/to/file.py:NAME`, `package.module:NAME`), registered by an
installed package under the entry-point group `trainlab.experiments`, or -- one trainlab ships --
one package and one line in `_BUILTIN` (docs/adding-an-experiment.md).
"""

from __future__ import annotations

import abc
import dataclasses
import hashlib
import importlib
import importlib.util
import os
import re
import sys
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Protocol

import torch
from torch import nn

from trainlab.errors import ConfigError, UsageError, brief


@dataclass
class Preset:
    description: str
    overrides: dict = field(default_factory=dict)
    # The device type whose memory and speed the preset's sizes were chosen for ("cuda"); empty: any.
    # A run on another device says so on the terminal, with the ETA measured over its first steps.
    sized_for: str = ""


@dataclass
class StepContext:
    """What the engine tells the experiment about the step being computed."""

    step: int
    level: float | None  # the curriculum value of the current phase, None without a curriculum
    weights: dict[str, float]  # loss weights from the schedule, by loss name


@dataclass
class ExtraUpdate:
    """A second optimizer over some of the model's parameters, with a loss and a schedule of its own
    (the StegaStamp experiment's WGAN critic: RMSProp at lr 1e-5, stepped after each encoder/decoder
    step, its weights clipped after each of its steps).

    The engine takes `parameters(model)` out of the main optimizer (and out of its gradient clipping),
    builds `optimizer(params)` once, and after the main update of every step s with s >= start and
    (s - start) % every == 0 runs `loss(model, batch, ctx)` on the same micro-batches the main step
    used (drawn again: a batch is a pure function of (seed, step, micro)), backward, its optimizer's
    step and `after_step(model)` (under no_grad).  Its optimizer state (and fp16 grad scaler) rides in
    every checkpoint, so a resume is exact.  The metrics its loss returns are logged as the step's
    train metrics (list them in train_metrics), averaged over the steps it ran; the main loss's
    gradient reaching these parameters is discarded (they are not its to move)."""

    name: str  # a key in the checkpoint, and in messages ("critic")
    parameters: Callable[[nn.Module], Iterable[nn.Parameter]]
    optimizer: Callable[[list[nn.Parameter]], torch.optim.Optimizer]
    loss: Callable[[nn.Module, Any, "StepContext"], tuple[torch.Tensor, dict[str, torch.Tensor]]]
    every: int = 1
    start: int = 0
    after_step: Callable[[nn.Module], None] | None = None

    def due(self, step: int) -> bool:
        """Whether it runs after the main update of the 0-based optimizer step `step`."""
        return step >= self.start and (step - self.start) % self.every == 0


@dataclass
class RunCommand:
    """Something a user does with a trained run of an experiment, as `trainlab use RUN_DIR NAME ARGS...`
    (the StegaStamp experiment's `hide` and `reveal`).  `run(run_dir, cfg, args)` gets the run's
    directory, its config and the arguments after NAME, parses them itself, and returns the exit
    code; bad input raises UsageError (one line, exit 2)."""

    help: str
    run: Callable[[Path, Any, list[str]], int]


class DataStream(Protocol):
    def batch(self, step: int, micro: int, level: float | None) -> Any: ...


class Experiment(abc.ABC):
    """Base class with the optional parts filled in; subclasses set the class attributes.

    Two optional attributes tell `trainlab preflight` what the run is for (health/goals.py):
    `goal`, the experiment's own goal ("val_acc>=0.9"), and `parts`, per-part metrics whose parts
    at chance no projection may count on (sha256's eight state words).  See their comments below."""

    name: str = ""
    description: str = ""
    model_config: type = object
    data_config: type = object
    # A dataclass for a `loss.*` section, for an experiment whose losses have options of their own
    # (StegaStamp: the perceptual term, the YUV weights); None: no such section.
    loss_config: type | None = None
    presets: dict[str, Preset] = {}
    default_preset: str = "smoke"
    # Names of the 0-d tensors `loss()` returns (besides the loss) and `evaluate()` returns.
    train_metrics: tuple[str, ...] = ()
    eval_metrics: tuple[str, ...] = ()
    # Number of samples in a micro-batch's worth of "items" for throughput (tokens, samples).
    throughput_unit: str = "samples"
    # The loss cannot go below this (0 for cross-entropy); curve projections respect it.  None for a
    # loss that can be negative (a continuous likelihood, say).
    loss_lower_bound: float | None = 0.0
    # 2-D evaluation arrays to draw as heatmaps (plots/<name>-<tag>.svg and .png) at the end of each
    # curriculum phase and of the run: name -> {title, rows, cols, lo, hi} (tick labels and colour
    # range), optionally x_label, y_label (the axes' names) and value_label (the colour bar's).
    heatmaps: dict[str, dict] = {}
    # The experiment's own goal, when it has one whatever the config: a logged metric, a comparison
    # and a level, written as a `trainlab preflight --target` is, e.g. "val_acc>=0.9" (ops >=, <=,
    # >, <).  `trainlab preflight` projects it to the planned step and is READY only when it is
    # projected to be reached (besides the curriculum's gate and the user's health.targets).
    # Empty: no goal of its own.
    goal: str = ""
    # The names of the losses schedule.loss_weights may weight (StegaStamp's secret, l2, ...); a name not
    # among them is refused.  Empty: the experiment weights no named losses, and any name is passed on.
    loss_names: tuple[str, ...] = ()
    # The range a logged metric can take, where its values do not say it: name -> (lowest, highest), None
    # for an open end (a correlation: (-1.0, 1.0)).  A goal's projection is bounded by it, as an
    # accuracy's is by 1.  Empty: ranges come from the logged values (a fraction, a loss >= 0).
    metric_ranges: dict[str, tuple[float | None, float | None]] = {}
    # Per-part training metrics, when the task splits into parts that are learned separately (sha256:
    # the bit accuracy of each state word a..h), so preflight can say which parts learn and which
    # sit at chance, and no projection counts on the parts at chance:
    #   metrics: the 0-d train metrics, one per part (also listed in train_metrics);
    #   chance: a part's metric when it guesses (0.5 for a bit); perfect: when it is right (1.0);
    #   loss_at_chance: what one part at chance adds to the loss (the loss projection's floor is
    #     raised by it per part at chance: sha256's mean-bit BCE gets ln 2 / 8 per word);
    #   mean_of: logged metrics that are the plain mean of the parts (their ceiling is what the parts
    #     at chance leave: sha256's acc with 2 words at chance is at most about (6 + 2 x 0.5) / 8).
    # Empty: no parts.
    parts: dict[str, Any] = {}
    # Under torchrun, whether some trainable parameters may get no gradient in a step (a callback
    # freezes a part mid-run, a branch is skipped): DistributedDataParallel then looks for them after
    # each forward (find_unused_parameters, a walk of the graph) instead of waiting for their gradients
    # for ever.  The engine turns it on by itself for an experiment with extra_updates.
    parameters_may_go_unused: bool = False

    def check_config(self, cfg: Any) -> None:
        """Cross-section rules of this experiment; raise ConfigError. Called after typing.
        Subclasses extend it (call super())."""
        if cfg.curriculum.values and cfg.curriculum.metric not in self.train_metrics:
            raise ConfigError("curriculum.metric", f"must be a training metric of {self.name}: "
                              f"{', '.join(self.train_metrics)}; got {cfg.curriculum.metric!r}")
        logged = ("loss",) + self.train_metrics + self.eval_metrics
        if cfg.ckpt.best_metric and cfg.ckpt.best_metric not in logged:
            raise ConfigError("ckpt.best_metric", f"must be a logged metric of {self.name}: "
                              f"{', '.join(logged)} (or empty); got {cfg.ckpt.best_metric!r}")
        if cfg.health.loss_metric not in logged:
            raise ConfigError("health.loss_metric", f"must be a logged loss of {self.name}: "
                              f"{', '.join(logged)}; got {cfg.health.loss_metric!r}")
        from trainlab.health.goals import parse_target  # standard library only; the syntax is checked already

        for i, text in enumerate(cfg.health.targets):
            metric = parse_target(text)[0]
            if metric not in logged:
                raise ConfigError(f"health.targets[{i}]", f"{metric!r} is not a logged metric of {self.name}; "
                                  f"allowed: {', '.join(logged)}")
        unknown = sorted(set(cfg.schedule.loss_weights) - set(self.loss_names)) if self.loss_names else []
        if unknown:
            raise ConfigError(f"schedule.loss_weights.{unknown[0]}", f"not a loss of {self.name}; allowed: "
                              f"{', '.join(self.loss_names)}")
        for metric in cfg.health.jumps:
            if metric not in logged:
                raise ConfigError(f"health.jumps.{metric}", f"{metric!r} is not a logged metric of {self.name}; "
                                  f"allowed: {', '.join(logged)}")

    @abc.abstractmethod
    def build_model(self, cfg: Any) -> nn.Module:
        """Required."""

    @abc.abstractmethod
    def build_data(self, cfg: Any, device: torch.device) -> DataStream:
        """Required."""

    @abc.abstractmethod
    def loss(self, model: nn.Module, batch: Any, ctx: StepContext) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Required."""

    @abc.abstractmethod
    def baseline_loss(self, cfg: Any) -> float:
        """Required."""

    def context_free_loss(self, cfg: Any) -> float | None:
        """The training loss of the best prediction that ignores the input (a language model's: the
        entropy of the token frequencies), or None where there is none to state.  Preflight tells a loss
        that only falls from the random baseline toward it -- learned by the output bias in a few steps --
        from one that goes below it."""
        return None

    def evaluate(self, model: nn.Module, data: DataStream, cfg: Any, level: float | None) -> dict[str, torch.Tensor]:
        """Held-out metrics named in `eval_metrics` (0-d tensors) at curriculum value `level`; runs
        under no_grad and eval mode.  Tensors with more than one element (maps, histograms) are
        written to eval_arrays.jsonl instead of metrics.csv."""
        return {}

    def extra_updates(self, cfg: Any) -> list[ExtraUpdate]:
        """Optimizers besides the main one, each over its own parameters on its own schedule
        (ExtraUpdate).  None by default."""
        return []

    def callbacks(self, cfg: Any) -> list:
        """Callbacks (trainlab.Callback) this experiment's runs get -- preflight's too -- after
        trainlab's own detectors and before the user's: what steers a run of this experiment in ways the
        engine must not know about (the ternary VAE's homeostasis controller, which freezes and unfreezes
        parts of the model).  Their state rides in every checkpoint as any callback's does.  None by default."""
        return []

    def commands(self) -> dict[str, RunCommand]:
        """What `trainlab use RUN_DIR NAME ...` can do with a trained run of this experiment, by NAME.
        None by default."""
        return {}

    def sweep_findings(self, points: list) -> Any:
        """The conclusions of a sweep over this experiment: a trainlab.sweep.report.SweepFindings from the
        points (sweep/report.py's PointResult, each with its RunData as `.run`), or None for the
        collapse-against-size rules every experiment gets by default."""
        return None

    def samples(self, model: nn.Module, data: DataStream, cfg: Any, step: int) -> dict[str, Any]:
        """What the model produces at an evaluation, for people to read (generated text, say):
        JSON-able values, written to samples.jsonl with the step.  Runs under no_grad and eval mode;
        may sync with the host (evaluations only).  Optional."""
        return {}

    def width(self, cfg: Any) -> int | None:
        """The model's width, for optim.lr_scale; None where width means nothing."""
        return None

    def items_per_sample(self, cfg: Any) -> int:
        """How many throughput units one sample holds (tokens per sequence, say)."""
        return 1


# Built-in experiments, each a module exposing EXPERIMENT.  Import is lazy so `trainlab list` and
# config errors stay fast and one broken experiment cannot break the others' commands.
_BUILTIN = ("trainlab.experiments.modadd", "trainlab.experiments.sha256", "trainlab.experiments.bitnet_lm",
            "trainlab.experiments.stegastamp", "trainlab.experiments.memory_lm", "trainlab.experiments.ternary_vae")

# Installed packages register experiments under this entry-point group, each entry point naming an
# Experiment instance or subclass:  [project.entry-points."trainlab.experiments"]  my_exp = "pkg.mod:EXPERIMENT"
PLUGIN_GROUP = "trainlab.experiments"

# What a name must look like: it becomes part of run directory names (runs/<name>-<preset>), and a
# ':' or '.py' would make it read as a reference.
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")

_LOADED: dict[str, Experiment] = {}  # canonical reference (or "plugin:<name>") -> its experiment, loaded once
_REFERENCE: dict[int, str] = {}  # id(experiment) -> the canonical reference it was loaded from


def registry() -> dict[str, Experiment]:
    """The built-in experiments by name (what docs/config.md documents; installed ones are not in it)."""
    out = {}
    for module_name in _BUILTIN:
        exp = importlib.import_module(module_name).EXPERIMENT
        out[exp.name] = exp
    return out


def is_reference(target: str) -> bool:
    """`path/to/file.py[:NAME]` or `package.module:NAME`: an experiment defined outside trainlab."""
    if target.endswith((".yaml", ".yml")):
        return False
    return ":" in target or target.endswith(".py")


def _parts(target: str) -> tuple[str, str, bool]:
    """(file or module, attribute, whether it is a file) of a reference; a bare file means its EXPERIMENT."""
    where, sep, attr = target.rpartition(":")
    if not sep:
        where, attr = target, "EXPERIMENT"
    return where, attr, where.endswith(".py") or "/" in where


def canonical_reference(target: str) -> str:
    """The form a run's config.yaml records: a file made absolute, so that `trainlab check`, a rerun
    from its config.yaml or a sweep's point finds the same file from any working directory (a path
    relative to the run directory would break when runs are copied elsewhere, one relative to the
    working directory whenever the command runs from another); a module reference as given."""
    where, attr, is_file = _parts(target)
    if is_file:
        where = str(Path(where).expanduser().resolve())
    return f"{where}:{attr}"


def _shown(path: str) -> str:
    rel = os.path.relpath(path)
    return path if rel.startswith("..") else rel


def _origin(exc: BaseException, roots: list[str]) -> str:
    """file:line where an import failed: the innermost frame in the user's own files when there is one."""
    if isinstance(exc, SyntaxError) and exc.filename:  # its frame is the importer's; the error's own place
        return f"{_shown(exc.filename)}:{exc.lineno}"
    frames = [f for f in traceback.extract_tb(exc.__traceback__)
              if not f.filename.startswith("<") and f.filename != __file__]
    installed = f"{os.sep}site-packages{os.sep}"  # a venv inside the user's folder holds no code of theirs
    own = [f for f in frames if any(f.filename.startswith(r) and (installed in r or installed not in f.filename)
                                    for r in roots)]
    frame = (own or frames or [None])[-1]
    return f"{_shown(frame.filename)}:{frame.lineno}" if frame else "no traceback"


def _import_failure(label: str, exc: BaseException, roots: list[str]) -> UsageError:
    message = exc.msg if isinstance(exc, SyntaxError) else exc  # a SyntaxError's str() repeats the place
    return UsageError(f"{label}: importing it raised {type(exc).__name__}: {brief(message, 200)} "
                      f"({_origin(exc, roots)})")


def _import_file(path: Path, label: str):
    if not path.exists():
        raise UsageError(f"{label}: no file {_shown(str(path))}")
    if not path.is_file():
        raise UsageError(f"{label}: {_shown(str(path))} is not a file")
    # a name of its own: the file's stem could shadow (or be shadowed by) a real module of that name
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:8]
    name = f"_trainlab_file_{re.sub(r'[^0-9A-Za-z_]', '_', path.stem)}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    folder = str(path.parent)
    if folder not in sys.path:  # as when the file is run as a script: its neighbours import
        sys.path.append(folder)
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise UsageError(f"{label}: {_shown(str(path))} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module  # before running it: dataclasses look their module up while it runs
    try:
        spec.loader.exec_module(module)
    except Exception as exc:  # noqa: BLE001 -- whatever the user's file raises is theirs to fix; say where
        del sys.modules[name]
        raise _import_failure(label, exc, [folder + os.sep]) from None
    return module


def _import_module(module_name: str, label: str):
    # the working directory is searched too (last), as `python -m` and `uvicorn pkg.mod:app` do
    if os.getcwd() not in sys.path:
        sys.path.append(os.getcwd())
    try:
        return importlib.import_module(module_name)
    except ModuleNotFoundError as exc:
        if exc.name and (module_name == exc.name or module_name.startswith(exc.name + ".")):
            raise UsageError(f"{label}: no module named {exc.name!r} (searched sys.path and the current "
                             "directory; a file needs its path: dir/file.py:NAME)") from None
        raise _import_failure(label, exc, _package_roots(module_name)) from None
    except Exception as exc:  # noqa: BLE001
        raise _import_failure(label, exc, _package_roots(module_name)) from None


def _package_roots(module_name: str) -> list[str]:
    """The folder of the module's top package (its files are the user's), where it can be found."""
    try:
        spec = importlib.util.find_spec(module_name.partition(".")[0])
    except (ImportError, ValueError):
        return []
    origin = spec.origin if spec else None
    return [os.path.dirname(origin) + os.sep] if origin else []


def _as_experiment(obj: Any, label: str) -> Experiment:
    """An Experiment instance as is, an Experiment subclass instantiated; anything else refused."""
    if isinstance(obj, type) and issubclass(obj, Experiment):
        try:
            obj = obj()
        except Exception as exc:  # noqa: BLE001 -- a missing hook (abstract method) or its own __init__
            raise UsageError(f"{label}: cannot instantiate {obj.__name__}: {type(exc).__name__}: "
                             f"{brief(exc, 200)}") from None
    if not isinstance(obj, Experiment):
        raise UsageError(f"{label}: names {_describe(obj)}, not an Experiment (an instance of a subclass of "
                         "trainlab.experiment.Experiment, or the subclass itself)")
    if not isinstance(obj.name, str) or not _NAME.fullmatch(obj.name):
        raise UsageError(f"{label}: its name {obj.name!r} must be letters, digits, '_' or '-' (it names run "
                         "directories: runs/<name>-<preset>); set the class attribute name")
    for attr, section in (("model_config", "model"), ("data_config", "data")):
        if not dataclasses.is_dataclass(getattr(obj, attr)):
            raise UsageError(f"{label}: {attr} must be a dataclass (the {section}.* section of its config), "
                             f"got {_describe(getattr(obj, attr))}")
    return obj


def _describe(obj: Any) -> str:
    return f"the class {obj.__name__}" if isinstance(obj, type) else f"an object of type {type(obj).__name__}"


def load_reference(target: str) -> Experiment:
    """The experiment a reference names, imported once per process; UsageError of one line when
    the file or module does not import or the name is not an Experiment."""
    ref = canonical_reference(target)
    if ref in _LOADED:
        return _LOADED[ref]
    label = f"experiment reference {target}"
    where, attr, is_file = _parts(ref)
    if not attr:
        raise UsageError(f"{label}: names no attribute after ':'; e.g. {target}EXPERIMENT")
    module = _import_file(Path(where), label) if is_file else _import_module(where, label)
    obj: Any = module
    for part in attr.split("."):
        if not hasattr(obj, part):
            found = [k for k, v in vars(module).items() if isinstance(v, Experiment)
                     or isinstance(v, type) and issubclass(v, Experiment) and v is not Experiment]
            there = f"; Experiments there: {', '.join(found)}" if found else "; it defines no Experiment"
            raise UsageError(f"{label}: {_shown(where) if is_file else where} has no attribute {attr!r}{there}")
        obj = getattr(obj, part)
    exp = _as_experiment(obj, label)
    builtin = registry().get(exp.name)
    _LOADED[ref] = exp
    # a built-in reached through its module is the built-in: its runs record only the name
    _REFERENCE[id(exp)] = "" if exp is builtin else ref
    return exp


def reference_of(experiment: Experiment) -> str:
    """The reference `experiment` was loaded from ("" for a built-in or an installed one, found by name)."""
    return _REFERENCE.get(id(experiment), "")


def _distribution(point) -> str:
    dist = getattr(point, "dist", None)
    return f"package {dist.metadata['Name']} {dist.version}" if dist is not None else "an unknown package"


def _plugin_points() -> tuple[dict[str, Any], list[tuple[Any, str]]]:
    """Installed experiments by name, unimported; and the entry points left out, each with why.
    A built-in's name stays the built-in: installing a package must not change what `trainlab run
    modadd` trains, nor what a saved run's `experiment: modadd` means.  Of two packages claiming one
    name, the first on sys.path wins (as Python's own imports do)."""
    from importlib.metadata import entry_points

    builtin = registry()
    points: dict[str, Any] = {}
    left_out: list[tuple[Any, str]] = []
    for point in entry_points(group=PLUGIN_GROUP):
        if point.name in builtin:
            left_out.append((point, f"the built-in {point.name} wins; run this one as {point.value}"))
        elif point.name in points:
            left_out.append((point, f"{_distribution(points[point.name])} claims the name first; run this "
                                    f"one as {point.value}"))
        else:
            points[point.name] = point
    return points, left_out


def _plugin_label(point) -> str:
    return f"installed experiment {point.name} ({point.value} in {_distribution(point)})"


def _load_plugin(point) -> Experiment:
    key = f"plugin:{point.name}"
    if key in _LOADED:
        return _LOADED[key]
    label = _plugin_label(point)
    module_name = point.value.partition(":")[0].strip()
    try:
        obj = point.load()
    except Exception as exc:  # noqa: BLE001 -- the package's own failure; one line, exit 2
        raise _import_failure(label, exc, _package_roots(module_name)) from None
    exp = _as_experiment(obj, label)
    if exp.name != point.name:  # its runs record the name; a rerun must find it by that name again
        raise UsageError(f"{label}: its entry point is named {point.name!r} but the experiment {exp.name!r}; "
                         "the two must agree")
    _LOADED[key] = exp
    return exp


@dataclass
class Listed:
    """One line of `trainlab list`: an experiment, or why an installed one cannot be used."""

    name: str
    experiment: Experiment | None
    origin: str  # "" for a built-in, else the package it came from (and its entry point, when it cannot be used)
    problem: str = ""


def available() -> list[Listed]:
    """Every experiment that runs by name: the built-ins, then the installed ones (imported now:
    listing needs their descriptions and presets); a broken one is listed with what is wrong."""
    out = [Listed(name, exp, "") for name, exp in registry().items()]
    points, left_out = _plugin_points()
    for name, point in points.items():
        try:
            out.append(Listed(name, _load_plugin(point), _distribution(point)))
        except UsageError as exc:
            out.append(Listed(name, None, f"{point.value} in {_distribution(point)}",
                              "cannot be used: " + str(exc).removeprefix(_plugin_label(point) + ": ")))
    out += [Listed(point.name, None, f"{point.value} in {_distribution(point)}", f"not used: {why}")
            for point, why in left_out]
    return out


def known_names() -> list[str]:
    """Names that `trainlab run NAME` accepts, nothing imported but the built-ins."""
    return list(registry()) + list(_plugin_points()[0])


def get_experiment(name: str) -> Experiment:
    """A built-in experiment, an installed one (only that one imported), or one a reference names."""
    if is_reference(name):
        return load_reference(name)
    experiments = registry()
    if name in experiments:
        return experiments[name]
    points = _plugin_points()[0]
    if name in points:
        return _load_plugin(points[name])
    import difflib

    names = list(experiments) + list(points)
    close = difflib.get_close_matches(name, names, n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise UsageError(f"unknown experiment '{name}'; {hint}allowed: {', '.join(names)} "
                     "(or a YAML config file, or your own: path/to/file.py:NAME, package.module:NAME)")


def experiment_for(data: dict, where: str) -> Experiment:
    """The experiment a config (a run's config.yaml, a config file) was written for: the one its
    experiment_ref names when it has one, else its experiment by name; errors prefixed by `where`."""
    ref = data.get("experiment_ref")
    try:
        if ref:
            if not isinstance(ref, str):
                raise UsageError(f"experiment_ref must be a string like path/to/file.py:NAME, got {ref!r}")
            return load_reference(ref)
        return get_experiment(str(data.get("experiment")))
    except UsageError as exc:
        moved = " (moved? correct experiment_ref in the config)" if ref else ""
        raise UsageError(f"{where}: {exc}{moved}") from None
