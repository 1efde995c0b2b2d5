"""The Experiment contract and the registry of experiments by name.

An experiment is one package that the engine knows nothing special about.  It supplies:

- `model_config`, `data_config`: dataclasses for its `model.*` and `data.*` sections;
- `presets`: named overrides as plain data, always with a seconds-long `smoke`;
- `build_model(cfg)`; `build_data(cfg, device)` -> a DataStream whose batch at (step, micro) is a
  pure function of (seed, step, micro, curriculum value) -- this is what makes resume exact;
- `loss(model, batch, ctx)` -> (loss, metrics), metrics as 0-d device tensors (no host sync);
- `baseline_loss(cfg)`: the loss of an honest random guess (ln 2 per bit, ln V per token);
- `evaluate(model, data, cfg, level)` -> held-out metrics as 0-d device tensors (optional).

Adding an experiment is adding one package and one line in `_BUILTIN`; nothing in engine/ changes.
"""

from __future__ import annotations

import abc
import importlib
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch
from torch import nn

from trainlab.errors import ConfigError, UsageError


@dataclass
class Preset:
    description: str
    overrides: dict = field(default_factory=dict)


@dataclass
class StepContext:
    """What the engine tells the experiment about the step being computed."""

    step: int
    level: float | None  # the curriculum value of the current phase, None without a curriculum
    weights: dict[str, float]  # loss weights from the schedule, by loss name


class DataStream(Protocol):
    def batch(self, step: int, micro: int, level: float | None) -> Any: ...


class Experiment(abc.ABC):
    """Base class with the optional parts filled in; subclasses set the class attributes."""

    name: str = ""
    description: str = ""
    model_config: type = object
    data_config: type = object
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

    def evaluate(self, model: nn.Module, data: DataStream, cfg: Any, level: float | None) -> dict[str, torch.Tensor]:
        """Held-out metrics named in `eval_metrics` (0-d tensors) at curriculum value `level`; runs
        under no_grad and eval mode.  Tensors with more than one element (maps, histograms) are
        written to eval_arrays.jsonl instead of metrics.csv."""
        return {}

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
_BUILTIN = ("trainlab.experiments.modadd", "trainlab.experiments.sha256", "trainlab.experiments.bitnet_lm")


def registry() -> dict[str, Experiment]:
    out = {}
    for module_name in _BUILTIN:
        exp = importlib.import_module(module_name).EXPERIMENT
        out[exp.name] = exp
    return out


def get_experiment(name: str) -> Experiment:
    experiments = registry()
    if name not in experiments:
        import difflib

        close = difflib.get_close_matches(name, list(experiments), n=1)
        hint = f"did you mean '{close[0]}'? " if close else ""
        raise UsageError(f"unknown experiment '{name}'; {hint}allowed: {', '.join(experiments)} "
                         "(or a path to a YAML config file)")
    return experiments[name]
