"""The image perturbations a StegaStamp decoder must read through: what printing a code and
photographing it, or re-saving a file, does to an image (Tancik et al., CVPR 2020, section 3.2).

Each perturbation has a strength s in [0, 1] that scales its random parameters; s = 0 skips it, so
a pipeline at strength 0 is exactly the identity, and `Perturbations.strengths(step)` ramps each one
in over the first optimizer steps as the reference does (the secret is found on clean images first).
Every operation is differentiable -- JPEG included, kornia's codec of Reich et al. 2024 -- because the
encoder learns through them.  All randomness comes from the caller's torch.Generator, so the same
seed gives the same images and a resumed run repeats its perturbations exactly.

Every random parameter is drawn per image, the blur's kind too: both blurs of a batch are computed and
each image takes one of them (a per-batch coin would need a host sync to branch on, every step).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from trainlab.config import knob
from trainlab.errors import ConfigError

PERTURBATIONS = ("warp", "blur", "noise", "contrast", "brightness", "hue", "saturation", "jpeg")


@dataclass
class PerturbConfig:
    # beyond 0.25 of the side a moved corner can reach the diagonal through the two corners beside
    # it, and the quadrilateral folds over (the homography mirrors part of the image)
    warp: float = knob(0.1, "perspective warp: each corner moves up to this fraction of the image side in x and y "
                            "(the reference: 0.1); below 0.25, where the warped image could fold over", ge=0, lt=0.25)
    blur_kernel: int = knob(7, "side of the blur kernels in pixels, odd (the reference: 7)", ge=3)
    blur_sigma: tuple[float, float] = knob((1.0, 3.0), "range of the Gaussian blur's sigma in pixels, low <= high "
                                                       "(the reference: 1 to 3)", gt=0)
    noise: float = knob(0.02, "largest sigma of the additive Gaussian noise, image range 0..1 (the reference: 0.02)",
                        ge=0)
    contrast: tuple[float, float] = knob((0.5, 1.5), "range of the contrast factor (multiplies pixel values), low <= 1 "
                                                     "<= high (the reference: 0.5 to 1.5)", ge=0)
    brightness: float = knob(0.3, "largest brightness offset added to all pixels of an image, image range 0..1 (the "
                                  "reference: 0.3)", ge=0, le=1)
    hue: float = knob(0.1, "largest hue rotation, as a fraction of the hue circle (0.1 = 36 degrees; 0.5, the most, "
                           "gives complementary colours) -- a unit free of radians vs degrees, kornia takes radians "
                           "(the reference's 0.1 was a per-channel colour offset; this is a true hue shift)",
                      ge=0, le=0.5)
    saturation: float = knob(1.0, "largest desaturation: an image is blended this far toward its greyscale (luma) "
                                  "version; 1 = fully grey at most (the reference: 1)", ge=0, le=1)
    jpeg_quality: float = knob(50.0, "lowest JPEG quality, 1..100 (the reference: 50); each image draws a quality "
                                     "between this and 100", ge=1, le=100)
    warp_ramp: int = knob(10000, "optimizer steps over which the warp ramps in from 0 to full strength; 0 = full at "
                                 "once (the reference: 10000)", ge=0)
    ramp: int = knob(1000, "optimizer steps over which every other perturbation ramps in from 0 to full strength; "
                           "0 = full at once (the reference: 1000)", ge=0)
    off: list[str] = knob(factory=list, help="perturbations switched off in training, from: "
                                             f"{', '.join(PERTURBATIONS)}")

    def check(self, prefix: str) -> None:
        """Cross-field rules, after every field passed its own."""
        for i, name in enumerate(self.off):
            if name not in PERTURBATIONS:
                raise ConfigError(f"{prefix}.off[{i}]", f"unknown perturbation {name!r}; allowed: "
                                  f"{', '.join(PERTURBATIONS)}")
        if self.blur_kernel % 2 == 0:
            raise ConfigError(f"{prefix}.blur_kernel", f"must be odd (a kernel centred on its pixel), got "
                                                       f"{self.blur_kernel}")
        low, high = self.blur_sigma
        if low > high:
            raise ConfigError(f"{prefix}.blur_sigma", f"low must be <= high, got ({low:g}, {high:g})")
        low, high = self.contrast
        if not low <= 1 <= high:
            raise ConfigError(f"{prefix}.contrast", f"must satisfy low <= 1 <= high (strength 0 is factor 1), got "
                                                    f"({low:g}, {high:g})")


def full_strength(name: str) -> dict[str, float]:
    """The strengths that apply perturbation `name` alone at full strength (evaluation per perturbation)."""
    if name not in PERTURBATIONS:
        raise ValueError(f"unknown perturbation {name!r}; allowed: {', '.join(PERTURBATIONS)}")
    return {name: 1.0}


def _uniform(low, high, shape: tuple[int, ...], generator: torch.Generator, like: torch.Tensor) -> torch.Tensor:
    """U(low, high) of `shape`, in `like`'s device and dtype, drawn from `generator`."""
    u = torch.rand(shape, generator=generator, device=like.device, dtype=like.dtype)
    return low + (high - low) * u


class Perturbations:
    """The perturbation pipeline of a PerturbConfig.  Holds no parameters and no state: what it does
    to a batch is a function of the strengths and the generator alone."""

    def __init__(self, cfg: PerturbConfig):
        self.cfg = cfg
        self.enabled = tuple(name for name in PERTURBATIONS if name not in cfg.off)

    def strengths(self, step: int) -> dict[str, float]:
        """Each enabled perturbation's strength at optimizer step `step`: a linear ramp from 0 at step 0
        to 1 at its ramp length (warp_ramp for the warp, ramp for the others), 1 after."""
        def ramped(length: int) -> float:
            return 1.0 if length == 0 else min(max(step, 0) / length, 1.0)

        return {name: ramped(self.cfg.warp_ramp if name == "warp" else self.cfg.ramp) for name in self.enabled}

    def __call__(self, images: torch.Tensor, strengths: dict[str, float], generator: torch.Generator) -> torch.Tensor:
        """Perturb `images` [B, 3, H, W] in [0, 1]: every perturbation named in `strengths` with a
        strength above 0, in PERTURBATIONS order (names switched off in the config too: evaluation
        may ask for any).  `generator` must live on the images' device."""
        unknown = sorted(set(strengths) - set(PERTURBATIONS))
        if unknown:
            raise ValueError(f"unknown perturbation {unknown[0]!r}; allowed: {', '.join(PERTURBATIONS)}")
        ops = {"warp": self._warp, "blur": self._blur, "noise": self._noise, "contrast": self._contrast,
               "brightness": self._brightness, "hue": self._hue, "saturation": self._saturation, "jpeg": self._jpeg}
        out = images
        for name in PERTURBATIONS:
            strength = float(strengths.get(name, 0.0))
            if strength > 0:
                out = ops[name](out, strength, generator)
        return out

    # Each op below takes and returns images in [0, 1]; those whose result can leave the range clamp it.

    def _warp(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """A random perspective warp: each corner moved by U(-d, d) x the side, d = s x warp.  Pixels
        from outside the image are black (zeros): the background of a photographed print is no part of
        the code, and a decoder must not rely on what it holds."""
        from kornia.geometry.transform import get_perspective_transform, warp_perspective

        B, _, H, W = x.shape
        corners = torch.tensor([[0.0, 0.0], [W - 1.0, 0.0], [W - 1.0, H - 1.0], [0.0, H - 1.0]],
                               device=x.device, dtype=x.dtype).expand(B, 4, 2)
        side = torch.tensor([W, H], device=x.device, dtype=x.dtype)
        reach = s * self.cfg.warp
        moved = corners + _uniform(-reach, reach, (B, 4, 2), generator, x) * side
        homography = get_perspective_transform(corners, moved)
        return warp_perspective(x, homography, (H, W), mode="bilinear", padding_mode="zeros", align_corners=True)

    def _blur(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """A Gaussian blur (sigma in blur_sigma) or a motion blur (random angle and direction), half
        the images each on average; blended as x + s (blurred - x), since a blur has no natural zero."""
        from kornia.filters import gaussian_blur2d, motion_blur

        B = x.shape[0]
        k = self.cfg.blur_kernel
        sigma = _uniform(*self.cfg.blur_sigma, (B, 1), generator, x).expand(B, 2)
        angle = _uniform(0.0, 360.0, (B,), generator, x)
        direction = _uniform(-1.0, 1.0, (B,), generator, x)
        use_motion = torch.rand((B, 1, 1, 1), generator=generator, device=x.device) < 0.5
        gaussian = gaussian_blur2d(x, (k, k), sigma, border_type="reflect")
        motion = motion_blur(x, k, angle, direction, border_type="reflect")
        blurred = torch.where(use_motion, motion, gaussian)
        # both kernels are non-negative and sum to 1, so the blend stays in range for s <= 1; a caller's
        # s above 1 extrapolates
        return (x + s * (blurred - x)).clamp(0, 1)

    def _noise(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """Additive Gaussian noise, sigma ~ U(0, s x noise) per image."""
        B = x.shape[0]
        sigma = _uniform(0.0, s * self.cfg.noise, (B, 1, 1, 1), generator, x)
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        return (x + sigma * noise).clamp(0, 1)

    def _contrast(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """Pixel values x a factor ~ U(1 - (1 - low) s, 1 + (high - 1) s) per image (clipped to [0, 1])."""
        from kornia.enhance import adjust_contrast

        low, high = self.cfg.contrast
        factor = _uniform(1 - (1 - low) * s, 1 + (high - 1) * s, (x.shape[0],), generator, x)
        return adjust_contrast(x, factor, clip_output=True)

    def _brightness(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """An offset ~ U(-s b, s b) per image added to every pixel (clipped to [0, 1])."""
        from kornia.enhance import adjust_brightness

        reach = s * self.cfg.brightness
        offset = _uniform(-reach, reach, (x.shape[0],), generator, x)
        return adjust_brightness(x, offset, clip_output=True)

    def _hue(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """A hue rotation ~ U(-s h, s h) of the hue circle per image."""
        from kornia.enhance import adjust_hue

        reach = s * self.cfg.hue
        turns = _uniform(-reach, reach, (x.shape[0],), generator, x)
        # the round trip through HSV can land a rounding error outside [0, 1]
        return adjust_hue(x, 2 * math.pi * turns).clamp(0, 1)

    def _saturation(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """A blend toward the image's luma, by a desaturation ~ U(0, s x saturation) per image (kornia's
        gray-subtraction form, as PIL and torchvision: the reference too blends with a luma, where kornia's
        HSV adjust_saturation would grey a pixel to max(R, G, B))."""
        from kornia.enhance import adjust_saturation_with_gray_subtraction

        desaturation = _uniform(0.0, s * self.cfg.saturation, (x.shape[0],), generator, x)
        return adjust_saturation_with_gray_subtraction(x, 1 - desaturation).clamp(0, 1)

    def _jpeg(self, x: torch.Tensor, s: float, generator: torch.Generator) -> torch.Tensor:
        """JPEG compression at a quality ~ U(100 - (100 - q) s, 100) per image, kornia's differentiable
        codec (any H and W: it pads to multiples of 16 itself and crops back)."""
        from kornia.enhance import jpeg_codec_differentiable

        lowest = 100 - (100 - self.cfg.jpeg_quality) * s
        quality = _uniform(lowest, 100.0, (x.shape[0],), generator, x)
        return jpeg_codec_differentiable(x, quality).clamp(0, 1)
