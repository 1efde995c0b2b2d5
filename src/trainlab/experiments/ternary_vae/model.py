"""Two encoders, one decoder and a Poincare-ball latent over the 9 trits of a ternary operation.

Encoder A is for coverage (its latent is decoded back to the 9 trits), encoder B for the 3-adic
hierarchy (its latent's hyperbolic distance from the origin should fall as the valuation rises).  Both
map 9 trits to a Gaussian in the tangent space at the ball's origin; a sample (training) or the mean
(evaluation) is carried onto the ball by geoopt's exponential map from the origin, its radius capped.

The ball is geoopt's PoincareBall: curvature -c with c fixed at model.curvature or learned (geoopt
keeps it positive through a softplus).  Distances are the ball's own (`dist0`, `dist`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
from torch import nn

from trainlab.config import knob
from trainlab.nn.hyperbolic import load_geoopt
from trainlab.experiments.ternary_vae.data import N_TRITS

# the modules the homeostasis controller freezes and unfreezes, by the names it reports
PARTS = ("encoder_a", "encoder_b", "decoder")


@dataclass
class TernaryVAEModelConfig:
    hidden: int = knob(64, "width of the encoders' and the decoder's hidden layers", ge=1)
    latent: int = knob(16, "dimension of the Poincare-ball latent", ge=2)
    layers: int = knob(2, "hidden layers in each encoder and in the decoder", ge=1)
    components: Literal["plain", "improved"] = knob(
        "improved", "plain = Linear + ReLU; improved = Linear + LayerNorm + SiLU + dropout (the audit's v5.12.4)")
    dropout: float = knob(0.0, "dropout after each hidden layer of the improved components", ge=0, lt=1)
    curvature: float = knob(1.0, "c of the ball (curvature -c) at the start", gt=0)
    learn_curvature: bool = knob(True, "learn c (geoopt's learnable PoincareBall); false = fixed")
    max_radius: float = knob(0.99, "the largest Euclidean norm of a latent, as a fraction of the ball's radius "
                                   "1/sqrt(c): points nearer the boundary have distances that float32 cannot resolve",
                             gt=0, lt=1)
    homeostasis: Literal["on", "off"] = knob(
        "on", "the homeostasis controller: freeze and unfreeze encoder A, encoder B and the decoder from coverage "
              "and the hierarchy's plateau (the homeostasis_* knobs)")
    homeostasis_coverage_freeze: float = knob(
        0.999, "coverage at or above which encoder A and the decoder are frozen (their job is done)", ge=0, le=1)
    homeostasis_coverage_unfreeze: float = knob(
        0.995, "coverage below which they are unfrozen again (below the freeze level: hysteresis)", ge=0, le=1)
    homeostasis_plateau_evals: int = knob(
        5, "evaluations over which the hierarchy must change by less than homeostasis_plateau_delta to freeze "
           "encoder B", ge=2)
    homeostasis_plateau_delta: float = knob(0.001, "the hierarchy change that counts as progress", gt=0)
    homeostasis_b_rest_evals: int = knob(
        5, "evaluations encoder B stays frozen before it is unfrozen to try again", ge=1)
    homeostasis_relax_step: float = knob(
        0.001, "each time Q reaches a new best, the coverage freeze level relaxes by this much (never below the "
               "unfreeze level): a model that structures better may trade a little coverage", ge=0)
    homeostasis_min_q_gain: float = knob(0.005, "the rise of Q over its best that counts as an improvement", ge=0)
    controller: Literal["on", "off"] = knob(
        "off", "a differentiable loss-weight controller: a small MLP from the step's detached losses to a "
               "log-weight per structure loss, trained with the losses it weights (Kendall et al.'s "
               "uncertainty weighting: each term is exp(-s) x loss + s, so no weight runs to zero)")
    controller_hidden: int = knob(16, "hidden width of the loss-weight controller", ge=1)

    def check(self, prefix: str) -> None:
        from trainlab.errors import ConfigError

        if self.homeostasis_coverage_unfreeze > self.homeostasis_coverage_freeze:
            raise ConfigError(f"{prefix}.homeostasis_coverage_unfreeze",
                              f"must be at most homeostasis_coverage_freeze ({self.homeostasis_coverage_freeze:g}), "
                              f"got {self.homeostasis_coverage_unfreeze:g}")


def _mlp(sizes: list[int], components: str, dropout: float) -> nn.Sequential:
    """Linear layers with the chosen activation between them (none after the last)."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes, sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            if components == "improved":
                layers += [nn.LayerNorm(n_out), nn.SiLU()]
                if dropout > 0:
                    layers.append(nn.Dropout(dropout))
            else:
                layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class Encoder(nn.Module):
    """9 trits -> the mean and log-variance of a Gaussian in the ball's tangent space at the origin."""

    def __init__(self, cfg: TernaryVAEModelConfig):
        super().__init__()
        self.body = _mlp([N_TRITS] + [cfg.hidden] * cfg.layers + [2 * cfg.latent], cfg.components, cfg.dropout)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        mu, logvar = self.body(x).chunk(2, dim=-1)
        # a bounded log-variance: exp() of a stray large value would make the sample (and the KL) inf
        return mu, logvar.clamp(-10.0, 4.0)


class LossWeightController(nn.Module):
    """model.controller=on: detached losses in, one log-weight s_k per weighted loss out; each loss then
    enters as exp(-s_k) x loss_k + s_k (Kendall, Gal and Cipolla 2018), whose minimum over s_k is at
    s_k = ln(loss_k): a weight that balances instead of one that the optimiser drives to zero."""

    def __init__(self, n_losses: int, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(n_losses, hidden), nn.SiLU(), nn.Linear(hidden, n_losses))
        nn.init.zeros_(self.net[-1].weight)  # starts at s = 0: every weight 1, as without the controller
        nn.init.zeros_(self.net[-1].bias)

    def forward(self, losses: torch.Tensor) -> torch.Tensor:
        # log1p of the losses: their scales differ by orders of magnitude (a KL near 0, a rank loss near 1)
        return self.net(torch.log1p(losses.detach().clamp_min(0)))


class TernaryVAE(nn.Module):
    def __init__(self, cfg: TernaryVAEModelConfig, controlled_losses: int = 0):
        super().__init__()
        self.cfg = cfg
        self.encoder_a = Encoder(cfg)
        self.encoder_b = Encoder(cfg)
        self.decoder = _mlp([cfg.latent] + [cfg.hidden] * cfg.layers + [3 * N_TRITS], cfg.components, cfg.dropout)
        self.ball = load_geoopt().PoincareBall(c=cfg.curvature, learnable=cfg.learn_curvature)
        self.controller = (LossWeightController(controlled_losses, cfg.controller_hidden)
                           if cfg.controller == "on" and controlled_losses else None)

    def to_ball(self, tangent: torch.Tensor) -> torch.Tensor:
        """A tangent vector at the origin carried onto the ball, its norm capped at max_radius / sqrt(c).
        The cap is applied in the tangent space (tanh is monotone), so it is exact and keeps a gradient
        for every point inside it."""
        sqrt_c = self.ball.c.sqrt()
        limit = math.atanh(self.cfg.max_radius) / sqrt_c
        norm = tangent.norm(dim=-1, keepdim=True).clamp_min(1e-15)
        capped = tangent * torch.clamp(limit / norm, max=1.0)
        return self.ball.expmap0(capped)

    def radius(self, point: torch.Tensor) -> torch.Tensor:
        """Hyperbolic distance from the origin."""
        return self.ball.dist0(point)

    def distance(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.ball.dist(a, b)

    def decode(self, point: torch.Tensor) -> torch.Tensor:
        """Logits [..., 9, 3] of each trit's class (-1, 0, 1 as 0, 1, 2)."""
        return self.decoder(point).unflatten(-1, (N_TRITS, 3))

    def encode(self, encoder: nn.Module, x: torch.Tensor, sample: bool) -> dict[str, torch.Tensor]:
        mu, logvar = encoder(x)
        tangent = mu + torch.randn_like(mu) * (0.5 * logvar).exp() if sample else mu
        return {"mu": mu, "logvar": logvar, "z": self.to_ball(tangent)}

    def forward(self, x: torch.Tensor, sample: bool = True) -> dict[str, dict[str, torch.Tensor]]:
        a = self.encode(self.encoder_a, x, sample)
        a["logits"] = self.decode(a["z"])
        return {"a": a, "b": self.encode(self.encoder_b, x, sample)}

    def part(self, name: str) -> nn.Module:
        """One of PARTS, by name."""
        if name not in PARTS:
            raise KeyError(f"no part {name!r}; parts: {', '.join(PARTS)}")
        return getattr(self, name)
