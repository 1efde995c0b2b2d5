"""The StegaStamp networks (Tancik et al., CVPR 2020), after the reference's models.py
(tancik/StegaStamp, TensorFlow): a U-Net encoder that turns a bit string and a cover image into an
additive residual, a decoder (a spatial transformer, then a CNN) that reads the bits back as logits,
and a WGAN critic that scores how much an image looks encoded.

PyTorch, NCHW, images float in [0, 1].  Channel counts are the reference's, times `width`.
Where the reference's TensorFlow conventions matter, they are kept: 3x3 convs with 'same' padding
(a stride-2 conv gives ceil(n / 2), as PyTorch's padding 1 does), the U-Net's 2x2 up-convs padded
on the right and bottom as TensorFlow's 'same' pads an even kernel, He-normal initialisation in the
encoder, and the spatial transformer's last layer starting at the identity.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from trainlab.config import knob
from trainlab.errors import ConfigError
from trainlab.experiments.stegastamp.perturbations import PerturbConfig

# stride-2 stages of the encoder's U-Net: its upsampled levels meet their skips only when the image
# side halves exactly this often
UNET_DOWNSAMPLINGS = 4


@dataclass
class StegaStampModelConfig:
    secret_size: int = knob(100, "bits hidden in each image (the reference: 100; the 256-bit design: 256)", ge=1)
    image_size: int = knob(400, "side of the square images in pixels, a multiple of 16 (the reference: 400)", ge=16)
    secret_grid: int = knob(50, "side of the grid the secret's dense layer is reshaped to (the reference: 50; "
                                "256 bits: 64)", ge=1)
    secret_channels: int = knob(3, "channels of that grid; other than 3, a 1x1 conv maps them to 3 (the reference: "
                                   "3; 256 bits: 4)", ge=1)
    secret_upsample: int = knob(8, "nearest-neighbour upsampling of the grid; when grid x upsample is not the image "
                                   "side, the result is resized to it (the reference: 8, 50 x 8 = 400; 256 bits: 6, "
                                   "64 x 6 = 384 -> 400)", ge=1)
    width: float = knob(1.0, "multiplier of every channel count and hidden width of the encoder, decoder, spatial "
                             "transformer and critic (1 = the reference's; CPU presets use e.g. 0.25); rounded, at "
                             "least 1", gt=0)
    critic: bool = knob(True, "train a WGAN critic whose score of the encoded image is a loss (the reference's)")
    critic_lr: float = knob(1e-5, "learning rate of the critic's RMSProp (the reference: 1e-5)", gt=0)
    critic_clip: float = knob(0.01, "the critic's weights are clipped to +-this after each of its steps (WGAN; the "
                                    "reference: 0.01)", gt=0)
    critic_every: int = knob(1, "optimizer steps between two critic steps", ge=1)
    critic_start: int = knob(0, "first optimizer step at which the critic trains", ge=0)
    perturb: PerturbConfig = knob(factory=PerturbConfig, help="the image perturbations between encoder and decoder")

    def check(self, prefix: str) -> None:
        """Cross-field rules, after every field passed its own."""
        multiple = 2 ** UNET_DOWNSAMPLINGS
        if self.image_size % multiple:
            low = self.image_size // multiple * multiple
            shown = f"{low} or {low + multiple}" if low else f"{multiple}"
            raise ConfigError(f"{prefix}.image_size", f"must be a multiple of {multiple} (the encoder halves it "
                              f"{UNET_DOWNSAMPLINGS} times and its U-Net joins each level again), e.g. {shown}; got "
                              f"{self.image_size}")
        if self.secret_grid > self.image_size:
            raise ConfigError(f"{prefix}.secret_grid", f"{self.secret_grid} is above model.image_size="
                              f"{self.image_size}: resized to the image, some grid cells would cover no pixel")
        if self.perturb.blur_kernel // 2 >= self.image_size:
            # the blurs pad by reflection, which needs the padding to be smaller than the image
            raise ConfigError(f"{prefix}.perturb.blur_kernel", f"must be below 2 x model.image_size="
                              f"{2 * self.image_size}; got {self.perturb.blur_kernel}")
        self.perturb.check(f"{prefix}.perturb")


def scaled(channels: int, width: float) -> int:
    """A reference channel count times the width multiplier, rounded, at least 1."""
    return max(1, round(channels * width))


def halved(size: int, times: int) -> int:
    """The side after `times` stride-2 'same' convs: ceil(size / 2), `times` times."""
    for _ in range(times):
        size = (size + 1) // 2
    return size


def conv3x3(in_ch: int, out_ch: int, stride: int = 1, relu: bool = True) -> nn.Sequential:
    """A 3x3 conv with 'same' padding, and a ReLU."""
    layers: list[nn.Module] = [nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1)]
    if relu:
        layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class UpConv(nn.Module):
    """The U-Net's way up: nearest x2, then a 2x2 conv and a ReLU.  TensorFlow's 'same' pads an even
    kernel by one on the right and bottom; padded explicitly here (PyTorch's padding='same' for an even
    kernel does the same, with a warning and a padded copy on every call)."""

    def __init__(self, in_ch: int, out_ch: int):
        super().__init__()
        self.conv = nn.Conv2d(in_ch, out_ch, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.interpolate(x, scale_factor=2, mode="nearest")
        return F.relu(self.conv(F.pad(x, (0, 1, 0, 1))))


class Encoder(nn.Module):
    """(secret [B, S] of 0/1, image [B, 3, H, W]) -> residual [B, 3, H, W], no activation."""

    def __init__(self, cfg: StegaStampModelConfig):
        super().__init__()
        self.cfg = cfg
        c = lambda n: scaled(n, cfg.width)  # noqa: E731
        grid_units = cfg.secret_grid ** 2 * cfg.secret_channels
        self.secret_dense = nn.Linear(cfg.secret_size, grid_units)
        self.secret_to_rgb = nn.Conv2d(cfg.secret_channels, 3, 1) if cfg.secret_channels != 3 else None
        inputs = 3 + 3  # the secret's 3 channels and the image's
        self.conv1 = conv3x3(inputs, c(32))
        self.conv2 = conv3x3(c(32), c(32), stride=2)
        self.conv3 = conv3x3(c(32), c(64), stride=2)
        self.conv4 = conv3x3(c(64), c(128), stride=2)
        self.conv5 = conv3x3(c(128), c(256), stride=2)
        self.up6 = UpConv(c(256), c(128))
        self.conv6 = conv3x3(c(128) + c(128), c(128))
        self.up7 = UpConv(c(128), c(64))
        self.conv7 = conv3x3(c(64) + c(64), c(64))
        self.up8 = UpConv(c(64), c(32))
        self.conv8 = conv3x3(c(32) + c(32), c(32))
        self.up9 = UpConv(c(32), c(32))
        self.conv9 = conv3x3(c(32) + c(32) + inputs, c(32))
        self.conv10 = conv3x3(c(32), c(32))
        self.residual = nn.Conv2d(c(32), 3, 1)
        # the reference initialises the encoder He-normal (kernel_initializer='he_normal', fan-in, zero
        # biases); its 1x1 residual layer kept Keras' default, Glorot-uniform
        for module in self.modules():
            if isinstance(module, (nn.Conv2d, nn.Linear)):
                if module is self.residual:
                    nn.init.xavier_uniform_(module.weight)
                else:
                    nn.init.kaiming_normal_(module.weight, nonlinearity="relu")
                nn.init.zeros_(module.bias)

    def secret_image(self, secret: torch.Tensor) -> torch.Tensor:
        """The secret as a 3-channel image of the cover's size [B, 3, image_size, image_size]."""
        cfg = self.cfg
        grid = F.relu(self.secret_dense(secret - 0.5))
        grid = grid.view(-1, cfg.secret_channels, cfg.secret_grid, cfg.secret_grid)
        if self.secret_to_rgb is not None:
            grid = self.secret_to_rgb(grid)
        grid = F.interpolate(grid, scale_factor=cfg.secret_upsample, mode="nearest")
        if grid.shape[-1] != cfg.image_size:
            # resized rather than padded, so that no border of the image is left without the secret;
            # antialiased, so that a grid shrunk to the image still reaches every cell
            grid = F.interpolate(grid, size=(cfg.image_size, cfg.image_size), mode="bilinear",
                                 align_corners=False, antialias=grid.shape[-1] > cfg.image_size)
        return grid

    def forward(self, secret: torch.Tensor, image: torch.Tensor) -> torch.Tensor:
        inputs = torch.cat((self.secret_image(secret), image - 0.5), dim=1)
        conv1 = self.conv1(inputs)
        conv2 = self.conv2(conv1)
        conv3 = self.conv3(conv2)
        conv4 = self.conv4(conv3)
        conv5 = self.conv5(conv4)
        conv6 = self.conv6(torch.cat((conv4, self.up6(conv5)), dim=1))
        conv7 = self.conv7(torch.cat((conv3, self.up7(conv6)), dim=1))
        conv8 = self.conv8(torch.cat((conv2, self.up8(conv7)), dim=1))
        conv9 = self.conv9(torch.cat((conv1, self.up9(conv8), inputs), dim=1))
        return self.residual(self.conv10(conv9))


class SpatialTransformer(nn.Module):
    """Learns an affine transform of the image that undoes geometric distortion before decoding
    (Jaderberg et al. 2015); it starts as the identity: its last layer has zero weights and the
    identity's bias."""

    def __init__(self, cfg: StegaStampModelConfig):
        super().__init__()
        c = lambda n: scaled(n, cfg.width)  # noqa: E731
        side = halved(cfg.image_size, 3)
        self.features = nn.Sequential(conv3x3(3, c(32), stride=2), conv3x3(c(32), c(64), stride=2),
                                      conv3x3(c(64), c(128), stride=2), nn.Flatten(),
                                      nn.Linear(c(128) * side * side, c(128)), nn.ReLU())
        self.affine = nn.Linear(c(128), 6)
        nn.init.zeros_(self.affine.weight)
        with torch.no_grad():
            self.affine.bias.copy_(torch.tensor([1.0, 0.0, 0.0, 0.0, 1.0, 0.0]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        theta = self.affine(self.features(x)).view(-1, 2, 3)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


class Decoder(nn.Module):
    """image [B, 3, H, W] -> secret logits [B, S]."""

    def __init__(self, cfg: StegaStampModelConfig):
        super().__init__()
        c = lambda n: scaled(n, cfg.width)  # noqa: E731
        self.stn = SpatialTransformer(cfg)
        side = halved(cfg.image_size, 5)
        self.convs = nn.Sequential(conv3x3(3, c(32), stride=2), conv3x3(c(32), c(32)), conv3x3(c(32), c(64), stride=2),
                                   conv3x3(c(64), c(64)), conv3x3(c(64), c(64), stride=2),
                                   conv3x3(c(64), c(128), stride=2),
                                   conv3x3(c(128), c(128), stride=2))
        self.head = nn.Sequential(nn.Flatten(), nn.Linear(c(128) * side * side, c(512)), nn.ReLU(),
                                  nn.Linear(c(512), cfg.secret_size))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.convs(self.stn(image - 0.5)))


class Critic(nn.Module):
    """image [B, 3, H, W] -> a WGAN score [B] (the mean of a 1-channel map)."""

    def __init__(self, cfg: StegaStampModelConfig):
        super().__init__()
        c = lambda n: scaled(n, cfg.width)  # noqa: E731
        self.convs = nn.Sequential(conv3x3(3, c(8), stride=2), conv3x3(c(8), c(16), stride=2),
                                   conv3x3(c(16), c(32), stride=2), conv3x3(c(32), c(64), stride=2),
                                   conv3x3(c(64), 1, relu=False))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.convs(image - 0.5).flatten(1).mean(-1)


class StegaStamp(nn.Module):
    def __init__(self, cfg: StegaStampModelConfig):
        super().__init__()
        self.cfg = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.critic = Critic(cfg) if cfg.critic else None

    def encode(self, secret: torch.Tensor, image: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(encoded, residual): encoded = clamp(image + residual, 0, 1).  Clamped before anything reads
        it: unclamped, the decoder learns to read values outside [0, 1] that no saved image can hold."""
        residual = self.encoder(secret, image)
        return (image + residual).clamp(0, 1), residual


def parameter_summary(model: StegaStamp) -> dict[str, int]:
    """Parameters of each part: encoder, decoder (its spatial transformer included) and critic (0 when
    there is none)."""
    def count(module: nn.Module | None) -> int:
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    return {"encoder": count(model.encoder), "decoder": count(model.decoder), "critic": count(model.critic)}
