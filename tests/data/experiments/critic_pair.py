"""A tiny adversarial pair for the engine's ExtraUpdate tests: a generator maps noise to 2-D points,
a WGAN critic (its own RMSProp, weight clipping, every `critic_every` steps from `critic_start`)
scores real against generated points.  Nothing here is StegaStamp-specific: it is the smallest
experiment with a second optimizer on its own schedule."""

from dataclasses import dataclass

import torch
from torch import nn

from trainlab.config import knob
from trainlab.engine.state import step_seed
from trainlab.experiment import Experiment, ExtraUpdate, Preset


@dataclass
class PairModelConfig:
    hidden: int = knob(16, "width of both MLPs", ge=1)
    critic_every: int = knob(1, "optimizer steps between critic steps", ge=1)
    critic_start: int = knob(0, "first step the critic trains", ge=0)
    critic_lr: float = knob(1e-3, "the critic's RMSProp LR", gt=0)


@dataclass
class PairDataConfig:
    noise_dim: int = knob(4, "generator input size", ge=1)


class Pair(nn.Module):
    def __init__(self, cfg):
        super().__init__()
        h, z = cfg.model.hidden, cfg.data.noise_dim
        self.generator = nn.Sequential(nn.Linear(z, h), nn.ReLU(), nn.Linear(h, 2))
        self.critic = nn.Sequential(nn.Linear(2, h), nn.ReLU(), nn.Linear(h, 1))


class Points:
    def __init__(self, cfg, device):
        self.cfg, self.device = cfg, device

    def batch(self, step, micro, level):
        g = torch.Generator(device=self.device).manual_seed(step_seed(self.cfg.train.seed, step, micro))
        n = self.cfg.train.micro_batch
        real = torch.randn(n, 2, generator=g, device=self.device) * 0.3 + torch.tensor([2.0, -1.0], device=self.device)
        noise = torch.randn(n, self.cfg.data.noise_dim, generator=g, device=self.device)
        return real, noise


class CriticPair(Experiment):
    name = "critic_pair"
    description = "a generator and a WGAN critic on 2-D points (engine test of ExtraUpdate)"
    model_config, data_config = PairModelConfig, PairDataConfig
    train_metrics = ("critic_gap", "critic_score_fake")
    loss_lower_bound = None  # a WGAN generator loss is a critic score: any sign
    presets = {"smoke": Preset("seconds", {
        "train": {"steps": 60, "micro_batch": 16, "accum": 2}, "optim": {"lr": 1e-2},
        "schedule": {"decay": "constant"}, "log": {"every": 5}, "eval": {"every": 0},
        "ckpt": {"every": 7, "keep": 2}, "health": {"stuck": "off"}})}

    def build_model(self, cfg):
        return Pair(cfg)

    def build_data(self, cfg, device):
        return Points(cfg, device)

    def loss(self, model, batch, ctx):
        real, noise = batch
        fake_score = model.critic(model.generator(noise)).mean()
        # the generator's loss; the mean distance to the real centre keeps it learnable without the critic
        pull = (model.generator(noise) - real.mean(0)).pow(2).mean()
        return pull - 0.1 * fake_score, {"critic_score_fake": fake_score}

    def critic_loss(self, model, batch, ctx):
        real, noise = batch
        with torch.no_grad():
            fake = model.generator(noise)
        gap = model.critic(real).mean() - model.critic(fake).mean()
        return -gap, {"critic_gap": gap}

    def extra_updates(self, cfg):
        m = cfg.model

        def clip(model):
            for p in model.critic.parameters():
                p.clamp_(-0.05, 0.05)

        return [ExtraUpdate("critic", parameters=lambda model: model.critic.parameters(),
                            optimizer=lambda params: torch.optim.RMSprop(params, lr=m.critic_lr),
                            loss=self.critic_loss, every=m.critic_every, start=m.critic_start, after_step=clip)]

    def baseline_loss(self, cfg):
        return 5.0


EXPERIMENT = CriticPair()
