"""Optimizers by config name.  Weight decay applies to matrices (>= 2-D) only: decaying biases,
norm gains and embeddings' 1-D cousins hurts and is what nanoGPT and most LM recipes avoid."""

from __future__ import annotations

import torch
from torch import nn

from trainlab.config import OptimConfig
from trainlab.optim.lion import Lion


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0})
    return groups


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.weight_decay)
    if cfg.name == "adamw":
        # fused kernels on CUDA: one launch for all parameters instead of one per tensor
        return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps,
                                 fused=device.type == "cuda")
    dtype = torch.bfloat16 if cfg.momentum_dtype == "bf16" else None
    return Lion(groups, lr=cfg.lr, betas=cfg.betas, momentum_dtype=dtype)
