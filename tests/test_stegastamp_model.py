"""The StegaStamp experiment's networks and perturbations: shapes at the reference's sizes, strength 0
as the exact identity, gradients through every perturbation, seeded determinism, config refusals."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from trainlab.config import from_dict
from trainlab.errors import ConfigError
from trainlab.experiments.stegastamp.model import StegaStamp, StegaStampModelConfig, parameter_summary
from trainlab.experiments.stegastamp.perturbations import (PERTURBATIONS, PerturbConfig, Perturbations,
                                                           full_strength)

pytest.importorskip("kornia")


def small_config(**overrides) -> StegaStampModelConfig:
    """32x32 images, 8 bits, a narrow network: every code path, in milliseconds."""
    sizes = dict(secret_size=8, image_size=32, secret_grid=4, secret_channels=3, secret_upsample=8, width=0.125)
    return StegaStampModelConfig(**{**sizes, **overrides})


def photo_like(batch: int = 4, side: int = 32, seed: int = 0) -> torch.Tensor:
    """Coloured images with smooth regions and texture, inside (0, 1) -- a constant or grey image would
    let some perturbations (hue, saturation, blur) do nothing."""
    g = torch.Generator().manual_seed(seed)
    coarse = torch.rand(batch, 3, 4, 4, generator=g)
    smooth = F.interpolate(coarse, size=(side, side), mode="bilinear", align_corners=False)
    return (0.1 + 0.7 * smooth + 0.2 * torch.rand(batch, 3, side, side, generator=g)).clamp(0, 1)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


@pytest.mark.parametrize("bits,grid,channels,upsample", [(100, 50, 3, 8), (256, 64, 4, 6)])
def test_shapes_at_the_reference_size(bits, grid, channels, upsample):
    cfg = StegaStampModelConfig(secret_size=bits, image_size=400, secret_grid=grid, secret_channels=channels,
                                secret_upsample=upsample, width=1.0)
    cfg.check("model")
    torch.manual_seed(0)
    model = StegaStamp(cfg)
    counts = parameter_summary(model)
    image = torch.rand(1, 3, 400, 400)
    secret = torch.randint(0, 2, (1, bits)).float()
    with torch.no_grad():
        secret_image = model.encoder.secret_image(secret)
        encoded, residual = model.encode(secret, image)
        logits = model.decoder(encoded)
        score = model.critic(encoded)
    shown = f"{bits} bits, parameters {counts}"
    assert secret_image.shape == (1, 3, 400, 400), shown
    assert residual.shape == image.shape and encoded.shape == image.shape, shown
    assert 0 <= encoded.min() and encoded.max() <= 1, shown
    assert logits.shape == (1, bits) and score.shape == (1,), shown
    # the secret's dense layer is the one part whose size the bit count sets: S x G^2 C weights and biases
    assert model.encoder.secret_dense.weight.numel() == bits * grid * grid * channels, shown
    assert (channels != 3) == (model.encoder.secret_to_rgb is not None), shown
    assert all(n > 0 for n in counts.values()), shown


def test_width_scales_every_part_and_critic_can_be_left_out():
    narrow = parameter_summary(StegaStamp(small_config(width=0.25)))
    wide = parameter_summary(StegaStamp(small_config(width=0.5)))
    assert all(wide[part] > narrow[part] for part in ("encoder", "decoder", "critic")), (narrow, wide)
    without = StegaStamp(small_config(critic=False))
    assert without.critic is None and parameter_summary(without)["critic"] == 0


def test_a_secret_grid_larger_than_the_image_is_resized_down():
    cfg = small_config(secret_grid=8, secret_upsample=8)  # 64 pixels, resized to 32
    cfg.check("model")
    model = StegaStamp(cfg)
    with torch.no_grad():
        encoded, residual = model.encode(torch.ones(2, 8), photo_like(2))
    assert residual.shape == (2, 3, 32, 32)


def test_the_spatial_transformer_starts_as_the_identity():
    model = StegaStamp(small_config())
    image = photo_like(2) - 0.5
    with torch.no_grad():
        assert torch.allclose(model.decoder.stn(image), image, atol=1e-5)


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_strength_zero_is_exactly_the_identity(name):
    perturb = Perturbations(PerturbConfig())
    images = photo_like()
    assert torch.equal(perturb(images, {name: 0.0}, seeded(0)), images)


def test_the_pipeline_at_strength_zero_is_exactly_the_identity():
    perturb = Perturbations(PerturbConfig())
    images = photo_like()
    at_start = perturb.strengths(0)
    assert set(at_start) == set(PERTURBATIONS) and not any(at_start.values())
    assert torch.equal(perturb(images, at_start, seeded(0)), images)
    assert torch.equal(perturb(images, {}, seeded(0)), images)


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_full_strength_changes_the_image_within_range(name):
    perturb = Perturbations(PerturbConfig())
    images = photo_like()
    out = perturb(images, full_strength(name), seeded(0))
    assert out.shape == images.shape
    assert 0 <= out.min() and out.max() <= 1, name
    assert (out - images).abs().max() > 1e-3, f"{name} at full strength left the images unchanged"


def test_strengths_ramp_in_and_off_switches_off():
    perturb = Perturbations(PerturbConfig(warp_ramp=100, ramp=10, off=["jpeg"]))
    assert perturb.enabled == tuple(n for n in PERTURBATIONS if n != "jpeg")
    halfway = perturb.strengths(5)
    assert "jpeg" not in halfway and halfway["noise"] == 0.5 and halfway["warp"] == 0.05
    later = perturb.strengths(50)
    assert later["noise"] == 1.0 and later["warp"] == 0.5
    assert all(v == 1.0 for v in Perturbations(PerturbConfig(warp_ramp=0, ramp=0)).strengths(0).values())


def test_gradients_reach_the_encoder_through_every_perturbation():
    torch.manual_seed(0)
    model = StegaStamp(small_config())
    perturb = Perturbations(model.cfg.perturb)
    secret = torch.randint(0, 2, (4, 8)).float()
    encoded, _ = model.encode(secret, photo_like())
    logits = model.decoder(perturb(encoded, {name: 1.0 for name in PERTURBATIONS}, seeded(0)))
    F.binary_cross_entropy_with_logits(logits, secret).backward()
    for name, param in model.encoder.named_parameters():
        assert param.grad is not None, name
        assert torch.isfinite(param.grad).all(), name
        assert param.grad.abs().sum() > 0, f"no gradient reached encoder.{name}"


@pytest.mark.parametrize("name", PERTURBATIONS)
def test_gradients_flow_to_the_input_through_each_perturbation(name):
    perturb = Perturbations(PerturbConfig())
    images = photo_like().requires_grad_(True)
    out = perturb(images, full_strength(name), seeded(0))
    # random weights: a plain sum could be blind to a perturbation that moves values around
    (out * torch.rand(out.shape, generator=seeded(1))).sum().backward()
    assert images.grad is not None, name
    assert torch.isfinite(images.grad).all(), name
    assert images.grad.abs().sum() > 0, name


def test_the_same_seed_gives_the_same_images():
    perturb = Perturbations(PerturbConfig())
    images = photo_like()
    everything = {name: 1.0 for name in PERTURBATIONS}
    first = perturb(images, everything, seeded(7))
    assert torch.equal(first, perturb(images, everything, seeded(7)))
    assert not torch.equal(first, perturb(images, everything, seeded(8)))


def test_unknown_perturbation_names_are_refused():
    with pytest.raises(ConfigError, match=r"model\.perturb\.off\[1\].*'blurr'.*allowed: warp, blur"):
        from_dict(StegaStampModelConfig, {"perturb": {"off": ["jpeg", "blurr"]}}, "model")
    with pytest.raises(ValueError, match="allowed"):
        Perturbations(PerturbConfig())(photo_like(), {"jpg": 1.0}, seeded(0))
    with pytest.raises(ValueError, match="allowed"):
        full_strength("jpg")


@pytest.mark.parametrize("section,match", [
    ({"image_size": 100}, r"model\.image_size: must be a multiple of 16.*96 or 112"),
    ({"image_size": 32, "secret_grid": 40}, r"model\.secret_grid"),
    ({"perturb": {"blur_kernel": 6}}, r"model\.perturb\.blur_kernel: must be odd"),
    ({"image_size": 16, "secret_grid": 4, "perturb": {"blur_kernel": 33}}, r"model\.perturb\.blur_kernel"),
    ({"perturb": {"contrast": [1.2, 1.5]}}, r"model\.perturb\.contrast"),
    ({"perturb": {"blur_sigma": [3.0, 1.0]}}, r"model\.perturb\.blur_sigma"),
    ({"perturb": {"warp": 0.3}}, r"model\.perturb\.warp"),
    ({"perturb": {"jpeg_quality": 0}}, r"model\.perturb\.jpeg_quality"),
    ({"width": 0}, r"model\.width"),
])
def test_bad_sizes_are_refused(section, match):
    with pytest.raises(ConfigError, match=match):
        from_dict(StegaStampModelConfig, section, "model")


def test_the_reference_configs_pass():
    from_dict(StegaStampModelConfig, {}, "model")
    from_dict(StegaStampModelConfig, {"secret_size": 256, "secret_grid": 64, "secret_channels": 4,
                                      "secret_upsample": 6}, "model")
