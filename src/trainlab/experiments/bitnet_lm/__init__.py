"""BitNet b1.58 language models on real text, and the BitNet size study's question: does degenerate decoding
(few distinct next-token predictions) go away with model size, or does it need an LR scaled with size?

The collapse metric is the BitNet size study's: the number of distinct argmax next-token predictions over a fixed
validation batch (`distinct_preds`), next to the number of distinct true next tokens in that batch
(`distinct_targets`) for scale.  It is wired to the collapse detector (health.collapse_metric), so a
run whose predictions collapse below health.collapse_min (the BitNet size study: 10) raises an alert.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.errors import ConfigError
from trainlab.experiment import Preset
from trainlab.experiments.bitnet_lm.data import BitLMDataConfig, TextStream, corpus_for
from trainlab.experiments.bitnet_lm.language_model import LanguageModelExperiment
from trainlab.experiments.bitnet_lm.model import BitLM, BitLMModelConfig, resolved_shape

EVAL_CHUNK = 8  # validation sequences per forward pass: bounds the memory of vocab-wide logits


def distinct_predictions(logits: torch.Tensor, vocab_size: int) -> torch.Tensor:
    """The BitNet size study's collapse metric: how many different tokens are the argmax prediction anywhere in
    `logits` (..., vocab).  A 0-d float tensor, computed without a host sync (no torch.unique)."""
    return distinct_tokens(logits.argmax(-1), vocab_size)


def distinct_tokens(tokens: torch.Tensor, vocab_size: int) -> torch.Tensor:
    seen = torch.zeros(vocab_size, dtype=torch.bool, device=tokens.device)
    seen[tokens.flatten()] = True
    return seen.sum().float()


# The BitNet size study's optimisation for every size: LR 0.0015, weight decay 0.1 (stage 1) and 0 (stage 2).
_SEED_OPTIM = {"name": "adamw", "lr": 1.5e-3, "weight_decay": 0.1, "betas": [0.9, 0.95]}
# the BitNet size study's collapse metric, watched live by the collapse detector (health.collapse_min: 10 tokens)
_HEALTH = {"collapse_metric": "distinct_preds"}
_SEED_LOOP = {"train": {"steps": 10000, "micro_batch": 32},
              "health": _HEALTH,
              "optim": _SEED_OPTIM,
              "schedule": {"warmup": 500, "decay": "cosine", "min_lr_ratio": 0.1, "two_stage_at": 0.5},
              "log": {"every": 50}, "eval": {"every": 250}, "ckpt": {"every": 1000},
              "data": {"seq_len": 512}}


def _sized(hidden: int, layers: int, heads: int) -> Preset:
    return Preset(f"hidden {hidden}, {layers} layers, {heads} heads, sequences of 512 bytes x 32, 10k steps at "
                  "LR 0.0015, two stages (weight decay 0.1 then 0) -- sized for a GPU",
                  {**_SEED_LOOP, "model": {"hidden": hidden, "layers": layers, "heads": heads}}, sized_for="cuda")


class BitNetLM(LanguageModelExperiment):
    name = "bitnet_lm"
    description = "BitNet b1.58 byte-level language model; degenerate decoding against model size (the BitNet size study)"
    model_config = BitLMModelConfig
    data_config = BitLMDataConfig
    eval_metrics = ("val_loss", "val_bpb", "val_acc", "distinct_preds", "distinct_targets")
    default_preset = "cpu"
    presets = {
        "smoke": Preset("seconds on CPU, for tests: hidden 32, one layer, 32-byte sequences", {
            "train": {"steps": 30, "micro_batch": 8},
            "optim": {**_SEED_OPTIM, "lr": 3e-3},
            "schedule": {"warmup": 5, "two_stage_at": 0.5},
            "log": {"every": 5}, "eval": {"every": 10}, "ckpt": {"every": 10, "keep": 2},
            "health": _HEALTH,
            "model": {"hidden": 32, "layers": 1, "heads": 2},
            "data": {"seq_len": 32, "eval_sequences": 4, "sample_tokens": 16, "prompt_tokens": 16},
        }),
        "cpu": Preset("minutes on CPU: hidden 128, 2 layers, 128-byte sequences x 16, 1500 steps, the BitNet size study's LR "
                      "and two stages", {
            "train": {"steps": 1500, "micro_batch": 16},
            "optim": _SEED_OPTIM,
            "schedule": {"warmup": 100, "decay": "cosine", "min_lr_ratio": 0.1, "two_stage_at": 0.5},
            "log": {"every": 25}, "eval": {"every": 250}, "ckpt": {"every": 500},
            "health": _HEALTH,
            "model": {"hidden": 128, "layers": 2, "heads": 2},
            "data": {"seq_len": 128, "eval_sequences": 16},
        }),
        "original": Preset("the BitNet size study's own run: hidden 256 (layers and heads follow model.hidden, so a sweep over "
                       "model.hidden varies the whole shape), 10k steps of stage 1 only (LR 0.0015, weight decay "
                       "0.1), as the seed ran it", {
            **_SEED_LOOP,
            "schedule": {**_SEED_LOOP["schedule"], "two_stage_at": 1.0},
            "model": {"hidden": 256},
        }, sized_for="cuda"),
        "s256": _sized(256, 4, 4),
        "s512": _sized(512, 6, 8),
        "s768": _sized(768, 8, 12),
        "s1024": _sized(1024, 8, 16),
    }

    def check_config(self, cfg) -> None:
        super().check_config(cfg)
        try:
            resolved_shape(cfg.model)
        except ValueError as exc:
            raise ConfigError("model.heads", str(exc)) from None

    def build_model(self, cfg) -> nn.Module:
        return BitLM(cfg.model, corpus_for(cfg).vocab_size, cfg.data.seq_len)

    def build_data(self, cfg, device: torch.device) -> TextStream:
        return TextStream(cfg, device)

    def width(self, cfg) -> int:
        return cfg.model.hidden

    def baseline_loss(self, cfg) -> float:
        return math.log(corpus_for(cfg).vocab_size)  # a uniform guess over the vocabulary

    def evaluate(self, model: nn.Module, data: TextStream, cfg, level=None) -> dict[str, torch.Tensor]:
        vocab = data.corpus.vocab_size
        loss_sum = torch.zeros((), device=data.eval_x.device)
        preds = []
        for start in range(0, len(data.eval_x), EVAL_CHUNK):
            x, y = data.eval_x[start:start + EVAL_CHUNK], data.eval_y[start:start + EVAL_CHUNK]
            logits = model(x).float()
            loss_sum += F.cross_entropy(logits.flatten(0, 1), y.flatten(), reduction="sum")
            preds.append(logits.argmax(-1))  # token ids, not logits: small enough to keep for the batch
        preds = torch.cat(preds)
        n = data.eval_y.numel()
        val_loss = loss_sum / n
        return {"val_loss": val_loss, "val_bpb": val_loss * data.corpus.bits_per_byte_factor("val"),
                "val_acc": (preds == data.eval_y).float().mean(), "distinct_preds": distinct_tokens(preds, vocab),
                "distinct_targets": distinct_tokens(data.eval_y, vocab)}


EXPERIMENT = BitNetLM()
