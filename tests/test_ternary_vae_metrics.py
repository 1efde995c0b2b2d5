"""The latent-space metrics of the ternary_vae experiment, on hand-made latents."""

import math

import numpy as np
import pytest
import torch

from trainlab.experiments.ternary_vae.data import N_OPS, valuation
from trainlab.experiments.ternary_vae.metrics import (
    coverage,
    dist_corr,
    hierarchy,
    hierarchy_ceiling,
    pair_sample,
    quality,
    richness,
)


@pytest.fixture(scope="module")
def real_v():
    return valuation(torch.arange(N_OPS)).numpy()


def _perfect_radii(v, rng):
    """radius = f(v) strictly decreasing (levels 1 apart) plus distinct within-level offsets < 1."""
    offsets = rng.permutation(len(v)) / (2 * len(v))  # distinct, all in [0, 0.5)
    return (10.0 - v) + offsets


def test_coverage_on_hand_made_logits():
    rng = np.random.default_rng(0)
    target = rng.integers(0, 3, (50, 9))
    logits = np.full((50, 9, 3), -1.0)
    np.put_along_axis(logits, target[..., None], 2.0, axis=-1)
    assert coverage(logits, target) == 1.0
    assert coverage(torch.tensor(logits), torch.tensor(target)) == 1.0
    wrong = logits.copy()
    wrong[7, 4] = np.roll(wrong[7, 4], 1)  # moves the maximum to another class in one trit of one op
    assert coverage(wrong, target) == pytest.approx(49 / 50)
    # predicted classes instead of logits
    classes = target.copy()
    classes[[3, 9], [0, 8]] = (classes[[3, 9], [0, 8]] + 1) % 3
    assert coverage(classes, target) == pytest.approx(48 / 50)


def test_hierarchy_ceiling_of_the_real_valuations(real_v):
    ceiling = hierarchy_ceiling(real_v)
    assert round(ceiling, 5) == -0.83205
    # the closed form for ranks tied within levels of sizes n_k against all-distinct ranks
    sizes = np.bincount(real_v).astype(float)
    closed_form = -math.sqrt(1 - (sizes ** 3 - sizes).sum() / (N_OPS ** 3 - N_OPS))
    assert ceiling == pytest.approx(closed_form, abs=1e-12)
    assert ceiling == pytest.approx(-3 / math.sqrt(13), abs=1e-8)  # the infinite-level limit
    assert hierarchy_ceiling(real_v, distinct_within_levels=False) == pytest.approx(-1.0, abs=1e-12)


def test_perfect_layout_reaches_the_ceiling(real_v):
    radii = _perfect_radii(real_v, np.random.default_rng(1))
    assert len(np.unique(radii)) == N_OPS
    assert abs(hierarchy(real_v, radii) - hierarchy_ceiling(real_v)) < 1e-9
    assert hierarchy(torch.tensor(real_v), torch.tensor(radii)) == pytest.approx(hierarchy(real_v, radii))
    assert richness(real_v, radii) > 0


def test_identical_radii_within_levels_give_minus_one_and_no_richness(real_v):
    radii = 10.0 - real_v.astype(float)
    assert hierarchy(real_v, radii) == pytest.approx(-1.0, abs=1e-12)
    assert richness(real_v, radii) == 0.0


def test_random_radii_have_no_hierarchy(real_v):
    radii = np.random.default_rng(2).random(N_OPS)
    assert abs(hierarchy(real_v, radii)) < 0.05


def test_collapsed_latent_has_undefined_hierarchy(real_v):
    assert math.isnan(hierarchy(real_v, np.ones(N_OPS)))


def test_richness_by_hand():
    v = np.array([0, 0, 0, 1, 1, 5])
    radius = np.array([1.0, 2.0, 3.0, 4.0, 8.0, 100.0])
    # level 0: mean 2, variance (1 + 0 + 1) / 3 = 2/3; level 1: mean 6, variance (4 + 4) / 2 = 4;
    # level 5 has one member and is left out
    assert richness(v, radius) == pytest.approx((2 / 3 + 4) / 2)
    assert richness(torch.tensor(v), torch.tensor(radius)) == pytest.approx((2 / 3 + 4) / 2)


def test_pair_sample_is_fixed_and_distinct():
    i, j = pair_sample(N_OPS, 5000, seed=3)
    i2, j2 = pair_sample(N_OPS, 5000, seed=3)
    assert np.array_equal(i, i2) and np.array_equal(j, j2)
    assert len(i) == len(j) == 5000
    assert bool((i != j).all())
    assert i.min() >= 0 and max(i.max(), j.max()) < N_OPS
    assert not np.array_equal(pair_sample(N_OPS, 5000, seed=4)[0], i)
    # tiny n: every ordered distinct pair appears, never (k, k)
    a, b = pair_sample(3, 600, seed=0)
    assert set(zip(a.tolist(), b.tolist())) == {(0, 1), (0, 2), (1, 0), (1, 2), (2, 0), (2, 1)}
    with pytest.raises(ValueError):
        pair_sample(1, 10)


def test_dist_corr_sign(real_v):
    i, j = pair_sample(N_OPS, 4000, seed=0)
    v_i, v_j = real_v[i], real_v[j]
    noise = np.random.default_rng(5).random(4000) * 0.1
    growing = np.abs(v_i - v_j) + noise
    assert dist_corr(growing, v_i, v_j) > 0.5
    assert dist_corr(-growing, torch.tensor(v_i), torch.tensor(v_j)) < -0.5
    # distances from the perfect layout's radii (a 1-D "manifold"): positive
    radii = _perfect_radii(real_v, np.random.default_rng(6))
    assert dist_corr(np.abs(radii[i] - radii[j]), v_i, v_j) > 0.5


def test_quality():
    assert quality(0.4, -0.8) == pytest.approx(0.4 + 1.5 * 0.8)
    assert quality(0.4, 0.8) == quality(0.4, -0.8)
    assert isinstance(quality(0.1, 0.2), float)
