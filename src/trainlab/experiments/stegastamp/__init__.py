"""The StegaStamp experiment: an encoder hides a bit string in an image as an additive residual, a
decoder reads it back after the perturbations a printed or re-saved photo goes through (Tancik et
al., CVPR 2020; the reference is tancik/StegaStamp, whose architecture and base.sh schedule the
seed100 preset follows, and the 256-bit design the StegaStamp readiness report scales it to).

Losses, by the names the loss-weight schedule (schedule.loss_weights) ramps:
  secret      BCE with logits of the decoded bits (ln 2 = 0.6931 is a random guess: the baseline);
  l2          the YUV-weighted mean square of encoded - cover (loss.yuv_scales: Y 1, U 100, V 100);
  l2_edge     the gain of an extra L2 weight near the image border (the reference's falloff);
  perceptual  1 - SSIM (default; kornia) or LPIPS from a local weights file;
  critic      the WGAN critic's score of the encoded image (the critic trains on its own optimizer,
              an ExtraUpdate: RMSProp, weight clipping).
The optimised loss is their weighted sum; the health detectors and preflight judge `secret_loss`
against ln 2 (health.loss_metric), since the penalties ramp in and move the sum on their own.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.errors import ConfigError, UsageError
from trainlab.experiment import Experiment, ExtraUpdate, Preset, StepContext

LOSS_NAMES = ("secret", "l2", "l2_edge", "perceptual", "critic")
# every perturbation's name, in the order applied (perturbations.PERTURBATIONS; repeated here so
# that `trainlab list` and config errors need neither kornia nor the model's imports)
PERTURBATION_NAMES = ("warp", "blur", "noise", "contrast", "brightness", "hue", "saturation", "jpeg")
BCH_CORRECTABLE = 5  # the reference's BCH code corrects 5 wrong bits: the "<= 5 wrong" recovery metric
EVAL_CHUNK = 8  # held-out images per forward pass: bounds evaluation memory at 400 x 400


def _require_extras() -> None:
    """kornia (perturbations, SSIM, colour spaces) and scikit-image (the default photographs) are the
    `stegastamp` extra: a missing one is one line, not a traceback."""
    missing = []
    for module, package in (("kornia", "kornia"), ("bchlib", "bchlib"), ("PIL", "pillow")):
        try:
            __import__(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise UsageError(f"the StegaStamp experiment needs {', '.join(missing)}: pip install 'trainlab[stegastamp]'")


@dataclass
class StegaStampLossConfig:
    perceptual: Literal["ssim", "lpips", "none"] = knob(
        "ssim", "the perceptual term: 1 - SSIM (kornia, nothing downloaded), LPIPS (needs the lpips package and a local "
                "weights file in loss.lpips_weights: trainlab never downloads weights), or none")
    lpips_weights: str = knob("", "a local file with the whole LPIPS state dict (backbone and linear layers), for "
                                  "loss.perceptual=lpips")
    lpips_net: Literal["alex", "vgg", "squeeze"] = knob("alex", "the LPIPS backbone the weights file is for")
    yuv_scales: tuple[float, float, float] = knob((1.0, 100.0, 100.0), "weights of the Y, U and V channels in the L2 "
                                                  "term (the reference: 1, 100, 100: colour changes cost more)", ge=0)
    edge_width: float = knob(0.25, "width of the border band the l2_edge weight adds to, as a fraction of the image "
                                   "side (the reference's falloff: a quarter)", gt=0, le=0.5)

    def check(self, prefix: str) -> None:
        if self.perceptual == "lpips":
            import os

            if not self.lpips_weights:
                raise ConfigError(f"{prefix}.lpips_weights", "loss.perceptual=lpips needs a local weights file here "
                                  "(trainlab never downloads weights); or use loss.perceptual=ssim")
            if not os.path.isfile(self.lpips_weights):
                raise ConfigError(f"{prefix}.lpips_weights", f"no file {self.lpips_weights}")


def yuv_l2(encoded: torch.Tensor, cover: torch.Tensor, scales: tuple[float, float, float],
           edge_gain: float, edge_width: float) -> torch.Tensor:
    """The reference's image loss: the per-channel mean square of the YUV difference, weighted by
    `scales`; within `edge_width` of the border the difference counts (1 + edge_gain x falloff)
    times, the falloff a half cosine from 1 at the edge to 0 at the band's inner side."""
    from kornia.color import rgb_to_yuv

    diff = rgb_to_yuv(encoded) - rgb_to_yuv(cover)
    if edge_gain > 0:
        side = diff.shape[-1]
        pos = torch.arange(side, device=diff.device, dtype=diff.dtype)
        to_edge = torch.minimum(pos, side - 1 - pos) / (edge_width * side)
        falloff = torch.where(to_edge < 1, (1 + torch.cos(math.pi * to_edge.clamp(max=1))) / 2, torch.zeros_like(pos))
        band = torch.maximum(falloff[:, None], falloff[None, :])
        diff = diff * (1 + edge_gain * band)
    per_channel = diff.pow(2).mean(dim=(0, 2, 3))
    return (per_channel * torch.tensor(scales, device=diff.device, dtype=diff.dtype)).sum()


class Perceptual(nn.Module):
    """1 - SSIM (kornia, 11x11 window), or LPIPS from the user's local weights; `none`: 0."""

    def __init__(self, cfg: StegaStampLossConfig):
        super().__init__()
        self.kind = cfg.perceptual
        self.lpips = None
        if self.kind == "lpips":
            try:
                import lpips
            except ImportError:
                raise UsageError("loss.perceptual=lpips needs the lpips package (pip install lpips); or use "
                                 "loss.perceptual=ssim") from None
            # pretrained=False and pnet_rand=True: lpips builds its network without fetching anything;
            # every weight then comes from the user's own file
            net = lpips.LPIPS(pretrained=False, net=cfg.lpips_net, pnet_rand=True, verbose=False)
            try:
                state = torch.load(cfg.lpips_weights, map_location="cpu", weights_only=True)
                net.load_state_dict(state)
            except Exception as exc:  # noqa: BLE001 -- the user's file: one line, exit 2
                raise UsageError(f"loss.lpips_weights {cfg.lpips_weights}: not an LPIPS-{cfg.lpips_net} state dict "
                                 f"({type(exc).__name__}: {str(exc)[:160]})") from None
            for p in net.parameters():
                p.requires_grad_(False)
            self.lpips = net.eval()

    def forward(self, encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
        if self.kind == "none":
            return encoded.new_zeros(())
        if self.kind == "lpips":
            return self.lpips(encoded * 2 - 1, cover * 2 - 1).mean()  # LPIPS takes [-1, 1]
        from kornia.metrics import ssim

        return 1 - ssim(encoded, cover, window_size=11).mean()


def bit_errors(logits: torch.Tensor, secret: torch.Tensor) -> torch.Tensor:
    """Wrong bits per secret, [B] (a logit > 0 reads as 1)."""
    return ((logits > 0) != secret.bool()).sum(-1)


def psnr(encoded: torch.Tensor, cover: torch.Tensor) -> torch.Tensor:
    """Mean PSNR in dB over the batch, images in [0, 1] (an identical pair is capped at 100 dB)."""
    mse = (encoded - cover).pow(2).flatten(1).mean(-1).clamp_min(1e-10)
    return (10 * torch.log10(1 / mse)).mean()


def _weights(ctx: StepContext) -> dict[str, float]:
    """The schedule's loss weights, with the defaults of a loss it does not name: the secret alone."""
    return {"secret": ctx.weights.get("secret", 1.0), **{k: ctx.weights.get(k, 0.0) for k in LOSS_NAMES[1:]}}


def _sized(image: int, bits: int, grid: int, channels: int, upsample: int) -> dict:
    return {"image_size": image, "secret_size": bits, "secret_grid": grid, "secret_channels": channels,
            "secret_upsample": upsample}


def _reference_ramps(total: int | None = None) -> dict:
    """The reference's base.sh schedule: the secret alone for 1,500 steps, then L2 (to 2), the perceptual
    term (to 1.5) and the critic (to 0.5) ramping over 15k steps; the edge gain 0 until 80k, then to 10
    over 10k.  In steps, or (total given) as fractions of `total`."""
    points = {"secret": [(0, 1.0)],
              "l2": [(0, 0.0), (1500, 0.0), (16500, 2.0)],
              "perceptual": [(0, 0.0), (1500, 0.0), (16500, 1.5)],
              "critic": [(0, 0.0), (1500, 0.0), (16500, 0.5)],
              "l2_edge": [(0, 0.0), (80000, 0.0), (90000, 10.0)]}
    if total is None:
        return {"loss_weights": {k: [list(p) for p in v] for k, v in points.items()}, "loss_weight_unit": "steps"}
    return {"loss_weights": {k: [[x / total, y] for x, y in v] for k, v in points.items()},
            "loss_weight_unit": "fraction"}


def _ramped_run(*, steps: int, batch: int, lr: float, penalties_from: int, l2: float, perceptual: float,
                critic: float, warp_ramp: int, log_every: int, eval_every: int, ckpt_every: int, model: dict,
                width: float) -> dict:
    """A small preset's overrides: the secret alone until `penalties_from`, then L2, SSIM and the
    critic ramping linearly to their weights at the last step (with the critic's training from
    `penalties_from`); the perturbations ramped in over 1000 steps (the warp over `warp_ramp`).
    Stronger penalties than the quick preset's killed the encoder at 64x64 (docs/experiments/stegastamp.md)."""
    def ramp(weight: float) -> list:
        return [[0, 0.0], [penalties_from, 0.0], [steps, weight]]

    return {"train": {"steps": steps, "micro_batch": batch, "clip": 0.0}, "optim": {"lr": lr},
            "schedule": {"warmup": 0, "decay": "constant", "loss_weight_unit": "steps", "loss_weights": {
                "secret": [[0, 1.0]], "l2": ramp(l2), "perceptual": ramp(perceptual), "critic": ramp(critic)}},
            "model": {**model, "width": width, "critic_start": penalties_from,
                      "perturb": {"warp_ramp": warp_ramp, "ramp": 1000}},
            "data": {"eval_crops": 64},
            "log": {"every": log_every}, "eval": {"every": eval_every}, "ckpt": {"every": ckpt_every},
            "health": _HEALTH}


# the StegaStamp readiness report's red flags: the residual collapsing to 0 (encoder dead; their
# directionality test checks > 0.01) or growing past 10 (the L2 schedule broken); the secret loss
# stuck at ln 2 is the stuck detector's, judging secret_loss
_HEALTH = {"loss_metric": "secret_loss", "bounds": {"residual_abs_mean": [0.01, 10.0]}}

_SEED_RUN = {
    "optim": {"name": "adamw", "lr": 1e-4, "weight_decay": 0.0},  # Adam, as the reference
    "train": {"micro_batch": 4, "clip": 0.0},  # the reference does not clip
    "log": {"every": 100}, "eval": {"every": 2000}, "ckpt": {"every": 5000, "keep": 3},
    "data": {"eval_crops": 32},
    "health": _HEALTH,
}


class StegaStampExperiment(Experiment):
    name = "stegastamp"
    description = ("StegaStamp: hide a bit string in a photograph, read it back after warps, blur, noise, colour "
                   "changes and JPEG (the StegaStamp readiness report's 100- and 256-bit runs)")
    default_preset = "smoke"
    train_metrics = ("secret_loss", "bit_acc", "l2_loss", "perceptual_loss", "critic_score", "residual_abs_mean",
                     "critic_gap")
    eval_metrics = (("val_secret_loss", "val_bit_acc", "val_bit_acc_all")
                    + tuple(f"val_bit_acc_{p}" for p in PERTURBATION_NAMES)
                    + ("val_exact", "val_within5", "val_psnr", "val_ssim", "val_residual_abs_mean", "val_residual_max"))
    goal = ""
    loss_lower_bound = 0.0  # of secret_loss, the loss preflight projects (health.loss_metric)
    presets = {
        "smoke": Preset("seconds on CPU: 32x32 images, 8 bits, a narrow network, every perturbation ramped in", {
            "train": {"steps": 30, "micro_batch": 4}, "optim": {"lr": 1e-3},
            "schedule": {"warmup": 0, "decay": "constant", "loss_weights": {
                "secret": [[0, 1.0]], "l2": [[0, 0.0], [10, 0.0], [30, 0.5]], "perceptual": [[0, 0.0], [10, 0.0], [30, 0.2]],
                "critic": [[0, 0.0], [10, 0.0], [30, 0.1]]}, "loss_weight_unit": "steps"},
            "model": {**_sized(32, 8, 4, 3, 8), "width": 0.125, "critic_start": 10,
                      "perturb": {"warp_ramp": 20, "ramp": 10}},
            "data": {"eval_crops": 8},
            "log": {"every": 5}, "eval": {"every": 15}, "ckpt": {"every": 10, "keep": 2}, "health": _HEALTH}),
        "quick": Preset("a few minutes on CPU: 64x64 crops, 32 bits, width 0.25, every perturbation ramped in over the "
                        "first steps, L2/SSIM/critic after the secret is found",
                        _ramped_run(steps=3000, batch=8, lr=1e-3, penalties_from=1000, l2=0.25, perceptual=0.1,
                                    critic=0.05, warp_ramp=1500, log_every=25, eval_every=250, ckpt_every=500,
                                    model=_sized(64, 32, 8, 3, 8), width=0.25)),
        "seed100": Preset("the reference (base.sh): 400x400, 100 bits (dense 7500 -> 50x50x3, x8), batch 4, Adam 1e-4, "
                          "140k steps, its loss ramps and perturbation ramps -- sized for a GPU", {
            **_SEED_RUN, "train": {**_SEED_RUN["train"], "steps": 140000},
            "schedule": {"warmup": 0, "decay": "constant", **_reference_ramps()},
            "model": {**_sized(400, 100, 50, 3, 8), "critic_start": 1500}}, sized_for="cuda"),
        "seed256": Preset("the StegaStamp readiness report's scaled 256-bit design: 400x400, dense 16384 -> 64x64x4, a "
                          "1x1 conv to 3 channels, x6 to 384 and resized to 400; 280k steps at lr 5e-5, its L2 schedule "
                          "(0 -> 0.5 over the first 10 %, -> 2.0 by 40 %) and the reference's other ramps -- sized for "
                          "a GPU", {
            **_SEED_RUN, "train": {**_SEED_RUN["train"], "steps": 280000}, "optim": {**_SEED_RUN["optim"], "lr": 5e-5},
            "schedule": {"warmup": 0, "decay": "constant", "loss_weights": {
                **_reference_ramps(280000)["loss_weights"], "l2": [[0.0, 0.0], [0.1, 0.5], [0.4, 2.0]]},
                "loss_weight_unit": "fraction"},
            "model": {**_sized(400, 256, 64, 4, 6), "critic_start": 1500}}, sized_for="cuda"),
        "gpu": Preset("minutes on one GPU: 128x128 crops, 64 bits, width 0.5, batch 32, 6k steps, the quick preset's "
                      "penalty weights (not yet measured on a GPU)",
                      _ramped_run(steps=6000, batch=32, lr=5e-4, penalties_from=1000, l2=0.25, perceptual=0.1,
                                  critic=0.05, warp_ramp=2000, log_every=50, eval_every=500, ckpt_every=1000,
                                  model=_sized(128, 64, 16, 3, 8), width=0.5), sized_for="cuda"),
    }

    # the sections' classes are imported on use: they need kornia, and `trainlab list` (or a user
    # without the stegastamp extra) must not
    @property
    def model_config(self):
        _require_extras()
        from trainlab.experiments.stegastamp.model import StegaStampModelConfig

        return StegaStampModelConfig

    @property
    def data_config(self):
        _require_extras()
        from trainlab.experiments.stegastamp.data import StegaStampDataConfig

        return StegaStampDataConfig

    loss_config = StegaStampLossConfig
    loss_names = LOSS_NAMES

    def check_config(self, cfg) -> None:
        super().check_config(cfg)  # refuses a loss weight not named in loss_names
        critic_weight = max((y for _, y in cfg.schedule.loss_weights.get("critic", [])), default=0.0)
        if critic_weight > 0 and not cfg.model.critic:
            raise ConfigError("model.critic", "is false but schedule.loss_weights.critic is above 0; set the critic "
                                              "weight to 0 or model.critic=true")

    def build_model(self, cfg) -> nn.Module:
        _require_extras()
        from trainlab.experiments.stegastamp.model import StegaStamp
        from trainlab.experiments.stegastamp.perturbations import Perturbations

        model = StegaStamp(cfg.model)
        # what loss() needs besides the batch, kept on the model (loss() sees no config); plain
        # attributes and a parameter-free module, so checkpoints hold only the networks
        model.perturbations = Perturbations(cfg.model.perturb)
        model.perceptual = Perceptual(cfg.loss)
        model.loss_options = cfg.loss
        return model

    def build_data(self, cfg, device: torch.device):
        from trainlab.experiments.stegastamp.data import ImageStream

        return ImageStream(cfg, device)

    def baseline_loss(self, cfg) -> float:
        return math.log(2)  # BCE of a fair coin per bit

    def items_per_sample(self, cfg) -> int:
        return 1

    # ------------------------------------------------------------------ losses
    def loss(self, model: nn.Module, batch, ctx: StepContext):
        cover, secret = batch["image"], batch["secret"]
        w = _weights(ctx)
        encoded, residual = model.encode(secret, cover)
        generator = torch.Generator(device=cover.device).manual_seed(int(batch["seed"]))
        perturbed = model.perturbations(encoded, model.perturbations.strengths(ctx.step), generator)
        logits = model.decoder(perturbed)
        secret_loss = F.binary_cross_entropy_with_logits(logits.float(), secret)
        opts = model.loss_options
        l2 = yuv_l2(encoded.float(), cover.float(), opts.yuv_scales, w["l2_edge"], opts.edge_width)
        # SSIM is cheap and worth logging before its weight ramps in; LPIPS runs only when it counts
        perceptual = model.perceptual(encoded.float(), cover.float()) if w["perceptual"] > 0 or opts.perceptual == "ssim" \
            else encoded.new_zeros(())
        total = w["secret"] * secret_loss + w["l2"] * l2 + w["perceptual"] * perceptual
        metrics = {"secret_loss": secret_loss.detach(),
                   "bit_acc": ((logits.detach() > 0) == secret.bool()).float().mean(),
                   "l2_loss": l2.detach(), "perceptual_loss": perceptual.detach(),
                   "residual_abs_mean": residual.detach().abs().mean()}
        if model.critic is not None and w["critic"] > 0:  # logged over the steps it counts in
            critic_score = model.critic(encoded).mean()
            total = total + w["critic"] * critic_score
            metrics["critic_score"] = critic_score.detach()
        return total, metrics

    def critic_loss(self, model: nn.Module, batch, ctx: StepContext):
        """The WGAN critic's loss (the reference's D_loss): its score of the covers minus that of the
        encoded images, which the encoder's critic term pushes the other way."""
        cover, secret = batch["image"], batch["secret"]
        with torch.no_grad():
            encoded, _ = model.encode(secret, cover)
        gap = model.critic(cover).mean() - model.critic(encoded).mean()
        return gap, {"critic_gap": gap.detach()}

    def extra_updates(self, cfg) -> list[ExtraUpdate]:
        if not cfg.model.critic:
            return []
        clip = cfg.model.critic_clip

        def clip_weights(model: nn.Module) -> None:
            for p in model.critic.parameters():
                p.clamp_(-clip, clip)

        lr = cfg.model.critic_lr
        return [ExtraUpdate("critic", parameters=lambda model: model.critic.parameters(),
                            optimizer=lambda params: torch.optim.RMSprop(params, lr=lr),
                            loss=self.critic_loss, every=cfg.model.critic_every, start=cfg.model.critic_start,
                            after_step=clip_weights)]

    def commands(self):
        from trainlab.experiment import RunCommand
        from trainlab.experiments.stegastamp import use

        return {"hide": RunCommand("hide a text in an image file with this run's encoder, write a PNG", use.hide),
                "reveal": RunCommand("read the text hidden in an image file (PNG, or re-saved as JPEG)", use.reveal)}

    # ------------------------------------------------------------------ held-out figures
    def evaluate(self, model: nn.Module, data, cfg, level=None) -> dict[str, torch.Tensor]:
        """On the fixed held-out crops: bit accuracy clean, under each perturbation alone and under all
        of them at full strength (a fixed generator: the same draws at every evaluation), the share of
        secrets recovered whole and with <= 5 wrong bits (what the reference's BCH code corrects), PSNR,
        SSIM and the residual's mean absolute value and maximum."""
        from kornia.metrics import ssim

        held = data.eval_batch()
        perturb = model.perturbations
        settings = {"": {}, "_all": {name: 1.0 for name in perturb.enabled}}
        settings.update({f"_{name}": {name: 1.0} for name in perturb.enabled})
        sums: dict[str, torch.Tensor] = {}
        n = held["image"].shape[0]

        def add(key: str, value: torch.Tensor, count: int) -> None:
            sums[key] = sums.get(key, 0) + value.float() * count

        for start in range(0, n, EVAL_CHUNK):
            cover, secret = held["image"][start:start + EVAL_CHUNK], held["secret"][start:start + EVAL_CHUNK]
            k = cover.shape[0]
            encoded, residual = model.encode(secret, cover)
            for suffix, strengths in settings.items():
                generator = torch.Generator(device=cover.device).manual_seed(cfg.data.eval_seed + start)
                logits = model.decoder(perturb(encoded, strengths, generator) if strengths else encoded).float()
                add(f"val_bit_acc{suffix}", ((logits > 0) == secret.bool()).float().mean(), k)
                if suffix == "":
                    errors = bit_errors(logits, secret)
                    add("val_secret_loss", F.binary_cross_entropy_with_logits(logits, secret), k)
                    add("val_exact", (errors == 0).float().mean(), k)
                    add("val_within5", (errors <= BCH_CORRECTABLE).float().mean(), k)
            add("val_psnr", psnr(encoded.float(), cover.float()), k)
            add("val_ssim", ssim(encoded.float(), cover.float(), window_size=11).mean(), k)
            add("val_residual_abs_mean", residual.abs().mean(), k)
            peak = residual.detach().abs().amax().float()
            sums["val_residual_max"] = peak if "val_residual_max" not in sums else torch.maximum(sums["val_residual_max"], peak)
        return {k: (v if k == "val_residual_max" else v / n) for k, v in sums.items()}


EXPERIMENT = StegaStampExperiment()
