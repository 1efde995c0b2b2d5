"""The ternary VAE's losses, each a mean over one batch, kept as device tensors (no host sync).

Encoder A's latent is decoded (reconstruction); encoder B's latent carries the structure:
  - hierarchy: every radius pulled toward its level's target, which falls linearly from
    `radius_outer` (v = 0) to `radius_inner` (v = 9); the squared errors are averaged per level, then
    over the levels in the batch;
  - richness: a level whose radii spread less than `richness_floor` (variance) is pushed apart;
  - rank: for pairs of different valuation, the higher valuation's radius should be smaller by at
    least `rank_margin` (a hinge);
  - geodesic: 1 - the Pearson correlation between the pairs' hyperbolic distance and |v_i - v_j|
    (the differentiable twin of the dist_corr metric, which is a Spearman correlation).
Pairs are each sample with the samples `pair_shifts` places after it in the batch (a batch is drawn at
random, so these are random pairs; no extra random numbers, no B x B matrix).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from trainlab.config import knob
from trainlab.experiments.ternary_vae.data import N_TRITS

LEVELS = N_TRITS + 1  # valuations 0 ... 9
# the loss-weight schedule's names (schedule.loss_weights), and each one's weight when it is not scheduled
DEFAULT_WEIGHTS = {"recon": 1.0, "kl": 1e-3, "hierarchy": 1.0, "richness": 1.0, "geodesic": 0.0, "rank": 0.5}
STRUCTURE = ("hierarchy", "richness", "geodesic", "rank")


@dataclass
class TernaryVAELossConfig:
    radius_outer: float = knob(3.0, "target hyperbolic radius of the valuation-0 level", gt=0)
    radius_inner: float = knob(0.3, "target hyperbolic radius of the valuation-9 level (the zero operation)", ge=0)
    richness_floor: float = knob(0.005, "within-level radius variance below which the richness term pushes the "
                                        "level's points apart", ge=0)
    rank_margin: float = knob(0.05, "how much smaller the higher valuation's radius must be in a pair", ge=0)
    pair_shifts: int = knob(4, "pairs per sample for the rank and geodesic terms", ge=1)

    def check(self, prefix: str) -> None:
        from trainlab.errors import ConfigError

        if self.radius_inner >= self.radius_outer:
            raise ConfigError(f"{prefix}.radius_inner", f"must be below radius_outer ({self.radius_outer:g}) so that "
                                                        f"high valuations sit nearer the origin; got {self.radius_inner:g}")


def reconstruction(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the 3 classes of each trit, averaged over trits (ln 3 for a uniform guess)."""
    return F.cross_entropy(logits.flatten(0, -2).float(), target.flatten())


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL of the encoder's Gaussian from N(0, I) in the tangent space, summed over dimensions."""
    return (-0.5 * (1 + logvar - mu.pow(2) - logvar.exp()).sum(-1)).mean()


def level_targets(cfg: TernaryVAELossConfig, v: torch.Tensor) -> torch.Tensor:
    return cfg.radius_outer - (cfg.radius_outer - cfg.radius_inner) * v.float() / (LEVELS - 1)


def level_statistics(v: torch.Tensor, radius: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per valuation level: the count, the mean radius and the population variance of the radii
    (0 where a level has fewer than one / two members)."""
    one_hot = F.one_hot(v, LEVELS).to(radius.dtype)  # [B, 10]
    count = one_hot.sum(0)
    mean = (one_hot * radius[:, None]).sum(0) / count.clamp_min(1)
    var = (one_hot * (radius[:, None] - mean).pow(2)).sum(0) / count.clamp_min(1)
    return count, mean, var


def structure_losses(cfg: TernaryVAELossConfig, v: torch.Tensor, radius: torch.Tensor, point: torch.Tensor,
                     distance) -> dict[str, torch.Tensor]:
    """The four structure losses of encoder B's latent `point` (radius = its distance from the origin)."""
    count, mean, var = level_statistics(v, radius)
    present = (count > 0).to(radius.dtype)
    # each level's mean squared distance from its target radius, averaged over the levels present: a
    # level of 2 operations counts as much as the 13,122 of v = 0 (stratified batches bring them in)
    one_hot = F.one_hot(v, LEVELS).to(radius.dtype)
    error = (radius - level_targets(cfg, v)).pow(2)
    hierarchy = ((one_hot * error[:, None]).sum(0) / count.clamp_min(1) * present).sum() / present.sum()
    spread = (count > 1).to(radius.dtype)
    richness = (F.relu(cfg.richness_floor - var) * spread).sum() / spread.sum().clamp_min(1)

    n = len(v)
    shifts = [s for s in range(1, cfg.pair_shifts + 1) if s < n] or [0]
    j = torch.cat([torch.roll(torch.arange(n, device=v.device), -s) for s in shifts])
    i = torch.arange(n, device=v.device).repeat(len(shifts))
    dv = (v[i] - v[j]).float()
    differ = (dv != 0).to(radius.dtype)
    # higher valuation nearer the origin: sign(dv) * (r_j - r_i) should be at least the margin
    hinge = F.relu(cfg.rank_margin - torch.sign(dv) * (radius[j] - radius[i]))
    rank = (hinge * differ).sum() / differ.sum().clamp_min(1)
    geodesic = 1 - _pearson(distance(point[i], point[j]), dv.abs())
    return {"hierarchy": hierarchy, "richness": richness, "geodesic": geodesic, "rank": rank}


def _pearson(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    x, y = x - x.mean(), y - y.mean()
    return (x * y).sum() / (x.pow(2).sum().sqrt() * y.pow(2).sum().sqrt()).clamp_min(1e-12)
