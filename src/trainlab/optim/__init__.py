"""Optimizers by config name.  Weight decay applies to matrices (>= 2-D) only: decaying biases,
norm gains and embeddings' 1-D cousins hurts and is what nanoGPT and most LM recipes avoid."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainlab.config import OptimConfig
from trainlab.optim.galore import GaLoreAdamW, GaLoreLion, optimizer_state_bytes  # noqa: F401 (re-exported)
from trainlab.optim.lion import Lion


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset()) -> list[dict]:
    """The model's trainable parameters in a decayed and an undecayed group; parameters whose id()
    is in `exclude` belong to another optimizer (an Experiment's ExtraUpdate) and are left out."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad and id(p) not in exclude:
            (decay if p.dim() >= 2 else no_decay).append(p)
    # "decays" marks the group whose weight decay the schedule may switch off (two-stage recipe)
    groups = [{"params": decay, "weight_decay": weight_decay, "decays": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "decays": False})
    return groups


def width_lr_factor(cfg: OptimConfig, width: int | None) -> float:
    """optim.lr_scale: the factor on optim.lr for a model of this width (1 when off or unknown)."""
    if cfg.lr_scale == "none" or width is None:
        return 1.0
    return math.sqrt(cfg.lr_scale_base / width)


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device,
                    exclude: frozenset[int] = frozenset()) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay, exclude)
    dtype = torch.bfloat16 if cfg.momentum_dtype == "bf16" else None
    if cfg.galore_rank > 0:
        # GaLore projects only the 2-D weights wider than the rank; the rest of each group
        # (biases, norms, small matrices) is stepped at full rank by the same rule
        galore = dict(rank=cfg.galore_rank, update_every=cfg.galore_update_every, scale=cfg.galore_scale)
        if cfg.name == "adamw":
            return GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **galore)
        return GaLoreLion(groups, lr=cfg.lr, betas=cfg.betas, momentum_dtype=dtype, **galore)
    if cfg.name == "adamw":
        # fused kernels on CUDA: one launch for all parameters instead of one per tensor
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 fused=device.type == "cuda")
    return Lion(groups, lr=cfg.lr, betas=cfg.betas, momentum_dtype=dtype)
