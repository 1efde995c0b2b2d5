"""The ternary VAE with hyperbolic latents (the ternary VAE study): all 3^9 = 19,683 ternary
operations, two encoders on a Poincare ball, structure losses as loss-weight schedules, and the
homeostasis controller as a callback.

Every evaluation scores all 19,683 operations (evaluation uses the encoders' means, no sampling):
  - coverage: the share whose 9 trits are all reconstructed from encoder A's latent;
  - hierarchy: Spearman correlation between valuation and encoder B's hyperbolic radius (negative is
    right), hierarchy_ceiling (the most negative value radii distinct within each level allow,
    computed from the valuations: -0.83205, because 2/3 of the operations share v = 0) and
    hierarchy_gap = hierarchy - ceiling (0 at the ceiling);
  - richness: the mean within-level variance of those radii; dist_corr: Spearman correlation between
    pairwise latent distances and |v_i - v_j| on a fixed sample of pairs; Q = dist_corr + 1.5 |hierarchy|;
  - curvature: the ball's c (learned with model.learn_curvature).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import torch

from trainlab.config import knob
from trainlab.experiment import Experiment, Preset, StepContext
from trainlab.experiments.ternary_vae import metrics
from trainlab.experiments.ternary_vae.data import N_OPS, Operations, OperationBatches, valuation
from trainlab.experiments.ternary_vae.losses import (DEFAULT_WEIGHTS, STRUCTURE, TernaryVAELossConfig, kl_divergence,
                                                     reconstruction, structure_losses)
from trainlab.experiments.ternary_vae.model import TernaryVAE, TernaryVAEModelConfig

EVAL_CHUNK = 4096  # operations per forward pass at evaluation
@functools.cache
def hierarchy_ceiling() -> float:
    """The most negative hierarchy radii distinct within each level allow, from the valuations themselves
    (-0.83205); computed on first use, not at import (it needs scipy, which `trainlab list` need not load)."""
    return metrics.hierarchy_ceiling(valuation(torch.arange(N_OPS)))


@dataclass
class TernaryVAEDataConfig:
    high_v_share: float = knob(0.0, "share of each batch drawn from operations with v >= high_v_min (stratified "
                                     "sampling, with replacement); 0 = plain epochs, every operation once per pass",
                               ge=0, lt=1)
    high_v_min: int = knob(2, "the valuation from which an operation counts as high-valuation (v >= 2: 729 of "
                              "19,683 operations, 3.7 %)", ge=1, le=9)
    eval_pairs: int = knob(20_000, "pairs of operations the dist_corr metric scores (a fixed sample, the same at "
                                   "every evaluation and in every run)", ge=100)


class OperationStream:
    """The training batches (data.py) and what every evaluation reuses: all operations on the device,
    the fixed pairs of dist_corr and the hierarchy ceiling of these valuations."""

    def __init__(self, cfg, device: torch.device):
        self.ops = Operations(device)
        self.batches = OperationBatches(self.ops, cfg.train.micro_batch, cfg.train.seed,
                                        high_v_share=cfg.data.high_v_share, high_v_min=cfg.data.high_v_min,
                                        stratified=cfg.data.high_v_share > 0, accum=cfg.train.accum)
        i, j = metrics.pair_sample(N_OPS, cfg.data.eval_pairs)
        self.eval_pairs = (torch.as_tensor(i, device=device), torch.as_tensor(j, device=device))
        self.hierarchy_ceiling = hierarchy_ceiling()

    def batch(self, step: int, micro: int, level: float | None) -> dict:
        return self.batches.batch(step, micro, level)


def steps_for(epochs: float, batch: int) -> int:
    """Optimizer steps that draw `epochs` passes' worth of the 19,683 operations at this batch size."""
    return math.ceil(epochs * N_OPS / batch)


def _weights(**points) -> dict:
    """schedule.loss_weights from {name: weight or [[fraction, weight], ...]}."""
    return {name: value if isinstance(value, list) else [[0.0, value]] for name, value in points.items()}


# what every preset watches: the reconstruction is the loss a random guess (ln 3 per trit) is judged
# against (the total adds structure terms with their own scales); the jumps the audit wants reported are
# coverage's and the hierarchy's; the goals (which preflight projects, and the milestone detector reports
# when met) are the quick preset's: coverage >= 99 %, hierarchy <= -0.80
_HEALTH = {"loss_metric": "recon_loss", "jumps": {"coverage": 0.05, "hierarchy": 0.05},
           "targets": ["coverage>=0.99", "hierarchy<=-0.80"]}
def _v5_12_4_weights(geodesic_from: float) -> dict:
    """v5.12.4's loss weights, the geodesic term switched on at the fraction `geodesic_from` of the run."""
    return _weights(recon=1.0, kl=1e-3, hierarchy=5.0, richness=2.0, rank=0.5,
                    geodesic=[[0.0, 0.0], [geodesic_from, 0.0], [geodesic_from, 0.3]])


def _epoch_run(epochs: int, batch: int, eval_epochs: float, geodesic_epoch: float, **overrides) -> dict:
    """A preset in the audit's units: `epochs` passes at `batch`, an evaluation every `eval_epochs`, the
    geodesic term from epoch `geodesic_epoch` (v5.12.4: 30)."""
    steps = steps_for(epochs, batch)
    every = max(1, round(eval_epochs * N_OPS / batch))
    base = {
        "train": {"steps": steps, "micro_batch": batch, "clip": 1.0},
        "optim": {"name": "riemannian_adam", "lr": 1e-3, "lr_factors": {"encoder_b.": 0.1}},
        "schedule": {"warmup": 0, "decay": "cosine", "min_lr_ratio": 0.01,
                     "loss_weights": _v5_12_4_weights(geodesic_epoch / epochs)},
        "log": {"every": max(1, every // 4)}, "eval": {"every": every},
        "ckpt": {"every": every * 5, "keep": 3, "best_metric": "Q", "best_mode": "max"},
        "data": {"high_v_share": 0.25},
        "health": _HEALTH,
    }
    for section, values in overrides.items():
        base[section] = {**base.get(section, {}), **values}
    return base


class TernaryVAEExperiment(Experiment):
    name = "ternary_vae"
    description = ("a VAE over all 3^9 ternary operations with Poincare-ball latents, 3-adic hierarchy losses and a "
                   "homeostasis controller that freezes and unfreezes its parts (the ternary VAE study)")
    parameters_may_go_unused = True  # the homeostasis controller freezes encoders and the decoder mid-run
    model_config = TernaryVAEModelConfig
    data_config = TernaryVAEDataConfig
    loss_config = TernaryVAELossConfig
    loss_names = tuple(DEFAULT_WEIGHTS)
    train_metrics = ("recon_loss", "kl_loss", "hierarchy_loss", "richness_loss", "geodesic_loss", "rank_loss",
                     "trit_acc")
    eval_metrics = ("coverage", "hierarchy", "hierarchy_ceiling", "hierarchy_gap", "richness", "dist_corr", "Q",
                    "curvature")
    default_preset = "quick"
    # Spearman correlations; coverage a share; Q = dist_corr + 1.5 |hierarchy|.  The hierarchy's floor is
    # its ceiling of -0.83205 (radii distinct within each level, as a network's float radii are): only
    # radii tied exactly within every level reach -1, so a projection past -0.83205 projects nothing real
    @property
    def metric_ranges(self) -> dict[str, tuple[float, float]]:
        ceiling = hierarchy_ceiling()
        return {"hierarchy": (ceiling, -ceiling), "dist_corr": (-1.0, 1.0), "coverage": (0.0, 1.0),
                "Q": (-1.0, 1.0 - 1.5 * ceiling)}

    presets = {
        "smoke": Preset("seconds on CPU, for tests: hidden 16, latent 4, 40 steps of 128 operations", {
            "train": {"steps": 40, "micro_batch": 128},
            "optim": {"name": "riemannian_adam", "lr": 3e-3, "lr_factors": {"encoder_b.": 0.1}},
            "schedule": {"warmup": 0, "decay": "constant", "loss_weights": _v5_12_4_weights(0.3)},
            "log": {"every": 5}, "eval": {"every": 10}, "ckpt": {"every": 10, "keep": 2},
            "model": {"hidden": 16, "latent": 4, "homeostasis_plateau_evals": 2, "homeostasis_b_rest_evals": 1},
            "data": {"high_v_share": 0.25, "eval_pairs": 2000},
            "health": _HEALTH,
        }),
        "quick": Preset("under a minute on one CPU core: the v5.12.4 model and losses for 40 epochs of 512 "
                        "operations, the geodesic term from epoch 12, encoder B at the full learning rate (at v5.12.4's 0.1x its hierarchy is still "
                        "far from the ceiling after 100 epochs)",
                        _epoch_run(40, 512, 1.0, geodesic_epoch=12, optim={"lr_factors": {}})),
        "v5_12_4": Preset("the audit's v5.12.4 configuration: hidden 64, latent 16, improved components, learnable "
                          "curvature, RiemannianAdam at 1e-3 (encoder B at 0.1x), 100 epochs at batch 512, hierarchy "
                          "weight 5, richness 2, rank 0.5, geodesic 0.3 from epoch 30, a quarter of each batch from "
                          "high valuations, homeostasis on", _epoch_run(100, 512, 2.0, geodesic_epoch=30)),
        "extended": Preset("the audit's 500-epoch plan: cosine at 1e-3 to epoch 100, constant 1e-4 to epoch 300, "
                           "linear decay from 1e-5 to epoch 500, on the v5.12.4 model and losses (geodesic from "
                           "epoch 30)",
                           _epoch_run(500, 512, 2.0, geodesic_epoch=30, schedule={"phases": [
                               {"kind": "cosine", "steps": steps_for(100, 512), "start": 1.0, "end": 0.1},
                               {"kind": "constant", "steps": steps_for(300, 512) - steps_for(100, 512), "start": 0.1},
                               {"kind": "linear", "steps": 0, "start": 0.01, "end": 0.0}]})),
    }

    def build_model(self, cfg) -> TernaryVAE:
        model = TernaryVAE(cfg.model, controlled_losses=len(STRUCTURE))
        model.loss_options = cfg.loss  # what loss() needs besides the batch (loss() sees no config)
        return model

    def build_data(self, cfg, device: torch.device) -> OperationStream:
        return OperationStream(cfg, device)

    def baseline_loss(self, cfg) -> float:
        return math.log(3)  # cross-entropy of a uniform guess per trit

    def callbacks(self, cfg) -> list:
        from trainlab.experiments.ternary_vae.homeostasis import HomeostasisController
        from trainlab.experiments.ternary_vae.timeline import TimelineWriter

        controller = [HomeostasisController.from_config(cfg.model)] if cfg.model.homeostasis == "on" else []
        return [*controller, TimelineWriter()]

    def sweep_findings(self, points):
        from trainlab.experiments.ternary_vae.ablation import sweep_findings

        return sweep_findings(points)

    def loss(self, model, batch, ctx: StepContext):
        net = getattr(model, "_orig_mod", model)  # torch.compile's wrapper keeps the module's attributes there
        options = net.loss_options
        out = model(batch["x"])
        a, b = out["a"], out["b"]
        weights = {name: ctx.weights.get(name, default) for name, default in DEFAULT_WEIGHTS.items()}
        recon = reconstruction(a["logits"], batch["target"])
        kl = 0.5 * (kl_divergence(a["mu"], a["logvar"]) + kl_divergence(b["mu"], b["logvar"]))
        radius = net.radius(b["z"])
        structure = structure_losses(options, batch["v"], radius, b["z"], net.distance)
        total = weights["recon"] * recon + weights["kl"] * kl
        if net.controller is not None:
            # uncertainty weighting: exp(-s) x loss + s per structure term, s from the controller
            log_weights = net.controller(torch.stack([structure[k] for k in STRUCTURE]))
            for k, s in zip(STRUCTURE, log_weights):
                total = total + weights[k] * (torch.exp(-s) * structure[k] + s)
        else:
            for k in STRUCTURE:
                total = total + weights[k] * structure[k]
        trit_acc = (a["logits"].argmax(-1) == batch["target"]).float().mean()
        return total, {"recon_loss": recon.detach(), "kl_loss": kl.detach(), "trit_acc": trit_acc,
                       **{f"{k}_loss": structure[k].detach() for k in STRUCTURE}}

    def evaluate(self, model, data: OperationStream, cfg, level):
        ops = data.ops
        logits, points = [], []
        for start in range(0, N_OPS, EVAL_CHUNK):
            out = model(ops.x[start:start + EVAL_CHUNK], sample=False)
            logits.append(out["a"]["logits"])
            points.append(out["b"]["z"])
        z = torch.cat(points)
        radius = model.radius(z)
        i, j = data.eval_pairs
        pair_distance = model.distance(z[i], z[j])
        v = ops.v
        hierarchy = metrics.hierarchy(v, radius)
        dist_corr = metrics.dist_corr(pair_distance, v[i], v[j])
        values = {
            "coverage": metrics.coverage(torch.cat(logits), ops.target),
            "hierarchy": hierarchy,
            "hierarchy_ceiling": data.hierarchy_ceiling,
            "hierarchy_gap": hierarchy - data.hierarchy_ceiling,
            "richness": metrics.richness(v, radius),
            "dist_corr": dist_corr,
            "Q": metrics.quality(dist_corr, hierarchy),
            "curvature": float(model.ball.c),
        }
        return {k: torch.tensor(float(x), device=ops.x.device) for k, x in values.items()}


EXPERIMENT = TernaryVAEExperiment()
