"""Optimizers by config name.  Weight decay applies to matrices (>= 2-D) only: decaying biases,
norm gains and embeddings' 1-D cousins hurts and is what nanoGPT and most LM recipes avoid."""

from __future__ import annotations

import math

import torch
from torch import nn

from trainlab.config import OptimConfig
from trainlab.errors import ConfigError
from trainlab.optim.galore import GaLoreAdamW, GaLoreLion, optimizer_state_bytes  # noqa: F401 (re-exported)
from trainlab.optim.lion import Lion


def _lr_factor(name: str, factors: dict[str, float]) -> tuple[str, float]:
    """The optim.lr_factors prefix that governs parameter `name` (the longest that matches) and its factor."""
    matches = [prefix for prefix in factors if name.startswith(prefix)]
    if not matches:
        return "", 1.0
    prefix = max(matches, key=len)
    return prefix, factors[prefix]


def param_groups(model: nn.Module, weight_decay: float, exclude: frozenset[int] = frozenset(),
                 lr_factors: dict[str, float] | None = None) -> list[dict]:
    """The model's trainable parameters in decayed and undecayed groups, one pair per optim.lr_factors
    prefix (each group's "lr_factor" multiplies the scheduled LR); parameters whose id() is in
    `exclude` belong to another optimizer (an Experiment's ExtraUpdate) and are left out.  A prefix
    that matches no parameter raises ConfigError: a misspelt name must not leave the LR unscaled."""
    factors = lr_factors or {}
    groups: dict[tuple[str, bool], dict] = {}

    def group(prefix: str, factor: float, decays: bool) -> dict:
        return groups.setdefault((prefix, decays), {
            "params": [], "weight_decay": weight_decay if decays else 0.0, "lr_factor": factor,
            # "decays" marks the groups whose weight decay the schedule may switch off (two-stage recipe)
            "decays": decays})

    group("", 1.0, True)  # always there, as before lr_factors: a saved optimizer state keeps its layout
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in exclude:
            continue
        prefix, factor = _lr_factor(name, factors)
        group(prefix, factor, p.dim() >= 2)["params"].append(p)
    unused = sorted(set(factors) - {prefix for (prefix, _), g in groups.items() if g["params"]})
    if unused:
        names = [n for n, _ in model.named_parameters()]
        shown = ", ".join(sorted({n.rsplit(".", 1)[0] + "." for n in names if "." in n})[:12])
        raise ConfigError(f"optim.lr_factors.{unused[0]}", f"matches no trainable parameter; parameter names start "
                                                           f"with: {shown}")
    # the unscaled decayed group first, then its undecayed one, then each prefix's: the order before lr_factors
    ordered = sorted(groups.items(), key=lambda item: (item[0][0] != "", item[0][0], not item[0][1]))
    return [g for _, g in ordered]


def check_parameter_groups(experiment, cfg) -> None:
    """ConfigError before anything is written when optim.lr_factors names a prefix no parameter has;
    the model is built on the meta device (no memory, milliseconds) for its parameter names.  A model
    whose build_model cannot run there is checked later, by param_groups when the run builds it."""
    if not cfg.optim.lr_factors:
        return
    try:
        with torch.device("meta"):
            model = experiment.build_model(cfg)
    except Exception:  # noqa: BLE001 -- a model that cannot be built on meta is checked when the run builds it
        return
    param_groups(model, cfg.optim.weight_decay, lr_factors=cfg.optim.lr_factors)


def width_lr_factor(cfg: OptimConfig, width: int | None) -> float:
    """optim.lr_scale: the factor on optim.lr for a model of this width (1 when off or unknown)."""
    if cfg.lr_scale == "none" or width is None:
        return 1.0
    return math.sqrt(cfg.lr_scale_base / width)


def _adamw(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    if cfg.galore_rank > 0:
        return GaLoreAdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, **_galore(cfg))
    # fused kernels on CUDA: one launch for all parameters instead of one per tensor
    return torch.optim.AdamW(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps, fused=device.type == "cuda")


def _lion(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    dtype = torch.bfloat16 if cfg.momentum_dtype == "bf16" else None
    if cfg.galore_rank > 0:
        return GaLoreLion(groups, lr=cfg.lr, betas=cfg.betas, momentum_dtype=dtype, **_galore(cfg))
    return Lion(groups, lr=cfg.lr, betas=cfg.betas, momentum_dtype=dtype)


def _riemannian_adam(groups: list[dict], cfg: OptimConfig, device: torch.device) -> torch.optim.Optimizer:
    from trainlab.optim.riemannian import RiemannianAdam  # here: only runs that ask for it pay for the import

    # geoopt's weight decay is Adam's coupled L2 (added to the gradient), not AdamW's decoupled one;
    # the config's help text says so.  stabilize=None: the manifold parameters are projected back on
    # every step anyway (retraction), a periodic extra projection buys nothing here.
    return RiemannianAdam(groups, lr=cfg.lr, betas=cfg.betas, eps=cfg.eps)


def _galore(cfg: OptimConfig) -> dict:
    # GaLore projects only the 2-D weights wider than the rank; the rest of each group
    # (biases, norms, small matrices) is stepped at full rank by the same rule
    return dict(rank=cfg.galore_rank, update_every=cfg.galore_update_every, scale=cfg.galore_scale)


# optim.name -> a builder from the parameter groups; a new optimizer is one function and one entry here
# (and its name in OptimConfig.name's Literal, which the config validates against)
OPTIMIZERS = {"adamw": _adamw, "lion": _lion, "riemannian_adam": _riemannian_adam}


def build_optimizer(cfg: OptimConfig, model: nn.Module, device: torch.device,
                    exclude: frozenset[int] = frozenset()) -> torch.optim.Optimizer:
    return OPTIMIZERS[cfg.name](param_groups(model, cfg.weight_decay, exclude, cfg.lr_factors), cfg, device)
