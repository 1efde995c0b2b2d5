"""SHA-256 round logic learned by a BitNet transformer under an accuracy-gated curriculum.

`step` mode asks for one round at a time (learnable in principle: the inputs hold W_t and K_t);
`multi` mode asks for the state after R rounds straight from the block -- the hard version, which
is expected to stay at the random baseline beyond a few rounds.  See data.py for the sample format.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial
from typing import Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.data.shared_memory import ArraySpec, SharedMemoryLoader
from trainlab.engine.state import step_seed
from trainlab.errors import ConfigError
from trainlab.experiment import Experiment, Preset, StepContext
from trainlab.experiments.sha256.data import (ROUNDS, STATE_WORDS, random_batch_numpy, random_batch_torch,
                                              tokens_per_sample)
from trainlab.experiments.sha256.model import Sha256ModelConfig, SparseLogicTransformer

STATE_BITS = 256


@dataclass
class Sha256DataConfig:
    mode: Literal["step", "multi"] = knob("step", "step: one round from (state, W_t, K_t); multi: R rounds from the block")
    rounds: int = knob(8, "rounds R when no curriculum is set (with one, its values are the rounds)", ge=1, le=64)
    loader: Literal["auto", "device", "shm"] = knob(
        "auto", "device: generate on the training device (the fast path on a GPU); shm: CPU producer processes "
                "filling shared-memory buffers; auto: device on CUDA, shm elsewhere")
    workers: int = knob(2, "CPU producer processes (loader shm)", ge=1)
    slots: int = knob(8, "shared-memory batch buffers in the ring (loader shm)", ge=2)
    eval_batch: int = knob(4096, "samples in the fixed evaluation batch (one per curriculum level)", ge=1)
    eval_seed: int = knob(2**31 - 1, "seed of the evaluation batch, apart from the training stream", ge=0)


def _numpy_batch(seed: int, batch: int, mode: str, default_rounds: int, step: int, micro: int,
                 level: float | None) -> dict[str, np.ndarray]:
    """Module-level (picklable) producer function: the batch at (step, micro, level)."""
    rounds = int(level) if level is not None else default_rounds
    x, y = random_batch_numpy(step_seed(seed, step, micro), batch, rounds, mode)
    return {"x": x, "y": y}


class Sha256Stream:
    """Batches of (input bits [B, T, 32], target bits [B, 256]); a pure function of (seed, step,
    micro, rounds) for a given loader and device."""

    def __init__(self, cfg, device: torch.device):
        self.cfg, self.device = cfg, device
        self.mode = cfg.data.mode
        self.micro_batch = cfg.train.micro_batch
        loader = cfg.data.loader
        if loader == "auto":
            loader = "device" if device.type == "cuda" else "shm"
        self.loader_kind = loader
        self.shm: SharedMemoryLoader | None = None
        self._eval: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        if loader == "shm":
            tokens = tokens_per_sample(self.mode)
            specs = {"x": ArraySpec((self.micro_batch, tokens, 32), "uint8"),
                     "y": ArraySpec((self.micro_batch, STATE_WORDS, 32), "uint8")}
            make = partial(_numpy_batch, cfg.train.seed, self.micro_batch, self.mode, cfg.data.rounds)
            self.shm = SharedMemoryLoader(make, specs, accum=cfg.train.accum, workers=cfg.data.workers,
                                          slots=cfg.data.slots, device=device)

    def attach(self, on_event) -> None:
        if self.shm is not None:
            self.shm.on_event = on_event

    def rounds(self, level: float | None) -> int:
        return int(level) if level is not None else self.cfg.data.rounds

    def batch(self, step: int, micro: int, level: float | None):
        if self.shm is not None:
            out = self.shm.get(step, micro, level)
            x, y = out["x"], out["y"]
        else:
            x, y = random_batch_torch(step_seed(self.cfg.train.seed, step, micro), self.micro_batch,
                                      self.rounds(level), self.mode, self.device)
        return x, y.flatten(1)

    def eval_batch(self, level: float | None):
        rounds = self.rounds(level)
        if rounds not in self._eval:
            x, y = random_batch_torch(self.cfg.data.eval_seed + rounds, self.cfg.data.eval_batch, rounds,
                                      self.mode, self.device)
            self._eval[rounds] = (x, y.flatten(1))
        return self._eval[rounds]

    def close(self) -> None:
        if self.shm is not None:
            self.shm.close()


WORD_NAMES = "abcdefgh"  # the working variables, in the order of the 256 target bits
WORD_METRICS = tuple(f"acc_word_{w}" for w in WORD_NAMES)


def bit_metrics(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bit, word and exact-state accuracy of (B, 256) logits against (B, 256) bits."""
    hits = (logits > 0) == target.bool()
    word_hits = hits.view(-1, STATE_WORDS, 32).all(-1)
    return {"acc": hits.float().mean(), "word_acc": word_hits.float().mean(),
            "exact_acc": hits.all(-1).float().mean()}


def per_word_bit_accuracy(logits: torch.Tensor, target: torch.Tensor) -> dict[str, torch.Tensor]:
    """Bit accuracy within each state word a..h: which words are learned and which sit at chance
    (0.5).  Indexing one 8-vector gives 0-d views of it: device tensors, no host sync."""
    per_word = ((logits > 0) == target.bool()).view(-1, STATE_WORDS, 32).float().mean((0, 2))
    return {name: per_word[i] for i, name in enumerate(WORD_METRICS)}


_SEED_CURRICULUM = {"name": "rounds", "values": [8, 16, 32, 64], "min_steps": [500, 2000, 5000, 0],
                    "gates": [0.95, 0.95, 0.95, 1.0], "metric": "acc", "window": 100}


class Sha256(Experiment):
    name = "sha256"
    description = "SHA-256 round logic by a BitNet transformer under an accuracy-gated curriculum"
    model_config = Sha256ModelConfig
    data_config = Sha256DataConfig
    train_metrics = ("acc", "accuracy", "word_acc", "exact_acc") + WORD_METRICS
    eval_metrics = ("val_loss", "val_acc", "val_word_acc", "val_exact_acc")
    # The eight state words are the parts: each holds 32 of the 256 bits, so a word that guesses
    # (bit accuracy 0.5) adds 32 x ln 2 / 256 = ln 2 / 8 to the mean-bit BCE, and acc (the bit
    # accuracy over all words) is their plain mean -- val_acc too, on the evaluation batch.
    parts = {"metrics": WORD_METRICS, "chance": 0.5, "perfect": 1.0,
             "loss_at_chance": math.log(2) / STATE_WORDS, "mean_of": ("acc", "accuracy", "val_acc")}
    default_preset = "quick"
    heatmaps = {"bit_acc_map": {
        "title": "per-bit accuracy (rows a..h, columns bit 31..0)", "rows": list("abcdefgh"),
        "cols": [str(31 - j) for j in range(32)], "lo": 0.5, "hi": 1.0,
        "x_label": "bit", "y_label": "state word", "value_label": "accuracy"}}
    presets = {
        "smoke": Preset("seconds on CPU, for tests: a tiny model, rounds 1 -> 2 -> 4 with open gates", {
            "train": {"steps": 30, "micro_batch": 64},
            "optim": {"lr": 3e-3},
            "curriculum": {"name": "rounds", "values": [1, 2, 4], "min_steps": [5, 5, 0], "gates": [0.0, 0.0, 1.0],
                           "metric": "acc", "window": 5},
            "log": {"every": 5}, "eval": {"every": 10}, "ckpt": {"every": 10, "keep": 2},
            "model": {"dim": 32, "layers": 1, "heads": 2},
            "data": {"loader": "device", "eval_batch": 256},
        }),
        "quick": Preset("minutes on CPU: step mode, a small BitNet model, the seed's curriculum with shorter "
                        "minimum phases, 2 shared-memory producers", {
            "train": {"steps": 2000, "micro_batch": 256},
            "optim": {"lr": 2e-3, "weight_decay": 0.01},
            "schedule": {"warmup": 100, "decay": "constant"},
            "curriculum": {**_SEED_CURRICULUM, "min_steps": [200, 200, 200, 0], "window": 50},
            "log": {"every": 25}, "eval": {"every": 250}, "ckpt": {"every": 500},
            "memory": {"host_ceiling_gb": 10.0},
            "model": {"dim": 96, "layers": 2, "heads": 4},
            "data": {"eval_batch": 2048},
        }),
        "original": Preset("the loop of the SHA-256 curriculum's own script: Lion with bf16 momentum, micro-batch 2 x accumulation 32, clip 1.0, fp16 "
                       "with GradScaler, checkpoint every 500, curriculum 8/16/32/64 at 95 % gates, 10 GB RAM guard", {
            "train": {"steps": 100000, "micro_batch": 2, "accum": 32, "clip": 1.0, "precision": "fp16"},
            "optim": {"name": "lion", "lr": 1e-4, "betas": [0.9, 0.99], "weight_decay": 0.1, "momentum_dtype": "bf16"},
            "schedule": {"warmup": 500, "decay": "constant"},
            "curriculum": _SEED_CURRICULUM,
            "log": {"every": 10}, "eval": {"every": 2000}, "ckpt": {"every": 500},
            "memory": {"host_ceiling_gb": 10.0, "every": 10},
            "model": {"dim": 256, "layers": 4, "heads": 8},
        }),
        "gpu": Preset("sized for an H100-class GPU (wall time not yet measured): step mode, micro-batch 4096 "
                      "generated on the GPU, width 256 x 4 layers", {
            "train": {"steps": 20000, "micro_batch": 4096},
            "optim": {"lr": 1e-3, "weight_decay": 0.01},
            "schedule": {"warmup": 500, "decay": "constant"},
            "curriculum": {**_SEED_CURRICULUM, "min_steps": [500, 500, 500, 0], "window": 100},
            "log": {"every": 50}, "eval": {"every": 1000}, "ckpt": {"every": 2000},
            "memory": {"host_ceiling_gb": 10.0},
            "model": {"dim": 256, "layers": 4, "heads": 8},
            "data": {"loader": "device", "eval_batch": 16384},
        }, sized_for="cuda"),
        "multi": Preset("the hard version: the state after R rounds straight from the block, R = 1, 2, 4, ... 64", {
            "train": {"steps": 3000, "micro_batch": 256},
            "optim": {"lr": 2e-3, "weight_decay": 0.01},
            "schedule": {"warmup": 100, "decay": "constant"},
            "curriculum": {"name": "rounds", "values": [1, 2, 4, 8, 16, 32, 64], "min_steps": [200] * 6 + [0],
                           "gates": [0.95] * 6 + [1.0], "metric": "acc", "window": 50},
            "log": {"every": 25}, "eval": {"every": 250}, "ckpt": {"every": 500},
            "memory": {"host_ceiling_gb": 10.0},
            "model": {"dim": 96, "layers": 2, "heads": 4},
            "data": {"mode": "multi", "eval_batch": 2048},
        }),
    }

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        if cfg.model.dim % cfg.model.heads:
            raise ConfigError("model.heads", f"must divide model.dim={cfg.model.dim}; got {cfg.model.heads}")
        for i, value in enumerate(cfg.curriculum.values):
            if not (float(value).is_integer() and 1 <= value <= ROUNDS):
                raise ConfigError(f"curriculum.values[{i}]", f"rounds must be whole numbers in [1, {ROUNDS}], got {value}")

    def build_model(self, cfg) -> nn.Module:
        return SparseLogicTransformer(cfg.model, tokens_per_sample(cfg.data.mode))

    def build_data(self, cfg, device: torch.device) -> Sha256Stream:
        return Sha256Stream(cfg, device)

    def loss(self, model: nn.Module, batch, ctx: StepContext):
        x, y = batch
        logits = model(x).float()
        loss = F.binary_cross_entropy_with_logits(logits, y.float())
        metrics = bit_metrics(logits.detach(), y)
        metrics["accuracy"] = metrics["acc"]  # the SHA-256 curriculum's CSV column name
        metrics.update(per_word_bit_accuracy(logits.detach(), y))
        return loss, metrics

    def baseline_loss(self, cfg) -> float:
        return math.log(2)  # a fair coin per bit

    def evaluate(self, model: nn.Module, data: Sha256Stream, cfg, level=None) -> dict[str, torch.Tensor]:
        x, y = data.eval_batch(level)
        per_bit_hits, losses, metrics = [], [], []
        for start in range(0, len(x), 4096):
            logits = model(x[start:start + 4096]).float()
            target = y[start:start + 4096]
            losses.append(F.binary_cross_entropy_with_logits(logits, target.float(), reduction="sum"))
            per_bit_hits.append(((logits > 0) == target.bool()).float().sum(0))
            metrics.append({k: v * len(target) for k, v in bit_metrics(logits, target).items()})
        n = len(x)
        out = {"val_loss": torch.stack(losses).sum() / (n * STATE_BITS)}
        for k in metrics[0]:
            out[f"val_{k}"] = torch.stack([m[k] for m in metrics]).sum() / n
        # which of the 256 bits are learned: a..h words x 32 bits, most significant first
        out["bit_acc_map"] = (torch.stack(per_bit_hits).sum(0) / n).view(STATE_WORDS, 32)
        return out


EXPERIMENT = Sha256()
