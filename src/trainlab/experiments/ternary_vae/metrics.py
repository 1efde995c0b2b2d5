"""Evaluation metrics of the ternary VAE's latent space (numpy + scipy; every one returns a float).

Inputs may be torch tensors (any device) or numpy arrays.  `radius` is each operation's latent
hyperbolic distance from the origin and `pair_dist` the latent distance of sampled pairs, both
computed by the caller on the manifold.  A Spearman correlation with a constant input (a collapsed
latent, say) is undefined and comes back as nan, without scipy's warning.
"""

from __future__ import annotations

from typing import Any

import numpy as np

# scipy.stats is imported where it is used: it costs half a second, and every trainlab command imports
# the built-in experiments (the registry), this module among them

HIERARCHY_WEIGHT = 1.5  # Q = dist_corr + 1.5 * |hierarchy|


def as_numpy(x: Any) -> np.ndarray:
    """A numpy copy of a tensor (detached, on the CPU) or array."""
    if hasattr(x, "detach"):
        x = x.detach().float().cpu() if x.is_floating_point() else x.detach().cpu()
        return x.numpy()
    return np.asarray(x)


def _spearman(a: Any, b: Any) -> float:
    a, b = as_numpy(a).ravel(), as_numpy(b).ravel()
    if a.shape != b.shape:
        raise ValueError(f"need equal lengths, got {a.shape[0]} and {b.shape[0]}")
    if a.size < 2 or np.all(a == a[0]) or np.all(b == b[0]):
        return float("nan")
    from scipy import stats

    return float(stats.spearmanr(a, b).statistic)  # ranks with ties averaged


def coverage(logits: Any, target: Any) -> float:
    """Share of operations whose 9 trits are all predicted exactly.  `logits` [N, 9, 3] (argmax
    taken) or predicted classes [N, 9]; `target` [N, 9] classes in {0, 1, 2}."""
    predicted = as_numpy(logits)
    if predicted.ndim == 3:
        predicted = predicted.argmax(-1)
    target = as_numpy(target)
    if predicted.shape != target.shape:
        raise ValueError(f"predictions {predicted.shape} and targets {target.shape} differ in shape")
    return float((predicted == target).all(axis=-1).mean())


def hierarchy(v: Any, radius: Any) -> float:
    """Spearman correlation of valuation and latent radius.  Negative is right: high valuation near
    the origin.  See hierarchy_ceiling for how negative it can get."""
    return _spearman(v, radius)


def richness(v: Any, radius: Any) -> float:
    """Mean over valuation levels with at least 2 members of the within-level variance (ddof=0) of
    the radii: how much room the layout leaves operations of one level to differ.  A level with one
    member (v = 9 is only the operation 0) has variance 0 by definition, not a measured spread, so
    counting it would pull the mean down for nothing the model did."""
    v, radius = as_numpy(v).ravel(), as_numpy(radius).ravel().astype(np.float64)
    levels, counts = np.unique(v, return_counts=True)
    variances = [radius[v == level].var() for level, count in zip(levels, counts) if count >= 2]
    return float(np.mean(variances)) if variances else float("nan")


def pair_sample(n: int, pairs: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`pairs` index pairs (i, j) with i != j drawn from [0, n), the same for the same arguments, so
    every evaluation scores the same pairs.  j is i plus a nonzero offset mod n: uniform over the
    ordered pairs of distinct indices, with no rejection loop."""
    if n < 2:
        raise ValueError(f"need at least 2 items to form a pair, got {n}")
    rng = np.random.default_rng(seed)
    i = rng.integers(0, n, pairs)
    j = (i + rng.integers(1, n, pairs)) % n
    return i, j


def dist_corr(pair_dist: Any, v_i: Any, v_j: Any) -> float:
    """Spearman correlation of pairwise latent distance and |v_i - v_j|.  Positive is right: pairs
    far apart in valuation far apart in the latent."""
    gap = np.abs(as_numpy(v_i).astype(np.int64) - as_numpy(v_j).astype(np.int64))
    return _spearman(pair_dist, gap)


def quality(dist_corr: float, hierarchy: float) -> float:
    """Q = dist_corr + 1.5 * |hierarchy|."""
    return float(dist_corr + HIERARCHY_WEIGHT * abs(hierarchy))


def hierarchy_ceiling(v: Any, distinct_within_levels: bool = True) -> float:
    """The most negative hierarchy any radii reach with these valuations.

    distinct_within_levels=True (radii all distinct, as a layout with richness > 0 has them): the
    Spearman of v against a strictly decreasing sequence in v order.  v's ranks are tied (averaged)
    within a level while the radii's ranks are not, and that spread within a level is variance no
    ordering can explain: rho^2 = 1 - sum_k (n_k^3 - n_k) / (N^3 - N) over level sizes n_k.  For
    the 19,683 operations it is -0.83205, because 2/3 of them share v = 0: with level shares
    2/3 * 3^-k the unexplained part is about sum share^3 = (8/27) / (1 - 1/27) = 4/13, so rho is
    about -3/sqrt(13) (equal to 1e-9).
    distinct_within_levels=False (radii equal within a level): -1, at the price of richness 0."""
    from scipy import stats

    v = as_numpy(v).ravel().astype(np.float64)
    if distinct_within_levels:
        # ordinal ranks break ties by position: all distinct, anti-ordered against v
        radii = -stats.rankdata(v, method="ordinal")
    else:
        radii = -v
    return _spearman(v, radii)
