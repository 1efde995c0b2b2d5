"""Which of 8 numbers is the largest?  A complete experiment defined outside trainlab's source,
the worked example of docs/adding-an-experiment.md:

    trainlab run examples/argmax.py:EXPERIMENT --preset smoke
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.engine.state import step_seed
from trainlab.experiment import Experiment, Preset


@dataclass
class ArgmaxModelConfig:
    hidden: int = knob(64, "width of the MLP's two hidden layers", ge=1)


@dataclass
class ArgmaxDataConfig:
    numbers: int = knob(8, "numbers per sample; the label is the position of the largest", ge=2)
    val_samples: int = knob(4096, "held-out samples, drawn once from a seed of their own", ge=1)


class Numbers:
    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        g = torch.Generator(device=device).manual_seed(step_seed(cfg.train.seed, -1))  # no step is -1
        self.val_x = torch.randn(cfg.data.val_samples, cfg.data.numbers, generator=g, device=device)

    def batch(self, step: int, micro: int, level):
        # a pure function of (seed, step, micro): what makes a resumed run continue exactly
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.train.seed, step, micro))
        return torch.randn(self.cfg.train.micro_batch, self.cfg.data.numbers, generator=g, device=self.device)


class Argmax(Experiment):
    name = "argmax"
    description = "which of 8 Gaussian numbers is the largest: a 2-layer MLP, the worked example of an own experiment"
    model_config, data_config = ArgmaxModelConfig, ArgmaxDataConfig
    train_metrics = ("acc",)
    eval_metrics = ("val_loss", "val_acc")
    default_preset = "smoke"
    goal = "val_acc>=0.9"  # what a run of it is for: preflight is READY only if it is projected to be reached
    presets = {
        "smoke": Preset("seconds on CPU: 300 steps of 128 samples", {
            "train": {"steps": 300, "micro_batch": 128}, "optim": {"lr": 3e-3, "weight_decay": 0.0},
            "schedule": {"warmup": 10, "decay": "constant"},
            "log": {"every": 10}, "eval": {"every": 50}, "ckpt": {"every": 100, "keep": 2}}),
    }

    def build_model(self, cfg) -> nn.Module:
        h, n = cfg.model.hidden, cfg.data.numbers
        return nn.Sequential(nn.Linear(n, h), nn.ReLU(), nn.Linear(h, h), nn.ReLU(), nn.Linear(h, n))

    def build_data(self, cfg, device: torch.device) -> Numbers:
        return Numbers(cfg, device)

    def loss(self, model: nn.Module, batch, ctx):
        logits = model(batch)
        labels = batch.argmax(-1)
        return F.cross_entropy(logits, labels), {"acc": (logits.argmax(-1) == labels).float().mean()}

    def baseline_loss(self, cfg) -> float:
        return math.log(cfg.data.numbers)  # each position is the largest equally often: a guess is uniform

    def evaluate(self, model: nn.Module, data: Numbers, cfg, level=None) -> dict[str, torch.Tensor]:
        logits, labels = model(data.val_x), data.val_x.argmax(-1)
        return {"val_loss": F.cross_entropy(logits, labels), "val_acc": (logits.argmax(-1) == labels).float().mean()}


EXPERIMENT = Argmax()
