"""Statistics behind trainlab's health verdicts on noisy, autocorrelated training curves.

A loss logged every few steps is neither independent nor stationary: neighbouring points share most
of their parameters, so ordinary tests that assume independent samples call noise "significant"
far too often.  Every verdict here is therefore a test or an interval whose assumptions are stated
and which accounts for that dependence -- never a comparison of two points.

All functions are pure: numpy arrays or lists in, frozen dataclasses (or floats) out.  The normal
and Student-t distributions are scipy.special's and the curve fits' optimisers scipy.optimize's,
both imported where first needed (see "distribution functions" below for why not scipy.stats).
What remains written here is what no maintained package has in the form these verdicts need, each
with its reason at the place: the Hamed-Rao correction with contiguous lags (`_hamed_rao_ratio`),
Sen's interval from the corrected variance (`mann_kendall`), the batch means sized by the
autocorrelation time (`mean_below`), the curve families with their shape constraints and start grid
(`_fit_family`).  tests/test_stats.py checks the pieces that scipy.stats also has (kendalltau,
theilslopes, rankdata, the distributions) against it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, NamedTuple, Sequence

import numpy as np

__all__ = [
    "TrendTest", "BaselineTest", "FamilyFit", "CurveFit", "Projection", "ProjectionPath", "Plateau",
    "ChangePoint", "Jump", "mann_kendall", "mean_below", "steps_to_resolve", "fit_curve", "project",
    "project_path", "plateau", "rank_me", "change_point", "robust_z", "jump_z", "normal_sf",
    "normal_quantile", "t_quantile",
]


# ------------------------------------------------------------------------------------------------
# distribution functions: scipy.special
# ------------------------------------------------------------------------------------------------
# scipy.special.ndtr, ndtri and stdtrit are the functions scipy.stats.norm (cdf, sf as ndtr(-x),
# ppf) and scipy.stats.t (ppf) evaluate themselves, so the values are scipy.stats' to the last bit.
# They come from scipy.special and not scipy.stats because scipy.stats costs about 1.7 s per process
# against about 0.4 s for scipy.special, and every `trainlab run` whose detectors judge a window
# pays it.  Imported inside the functions: a process that imports this module (every run does,
# through the detectors) and never asks for a quantile loads no scipy at all.

def normal_sf(x: float) -> float:
    """1 - Phi(x), computed as Phi(-x) so the upper tail keeps its relative precision."""
    from scipy.special import ndtr
    return float(ndtr(-x))


def normal_quantile(p: float) -> float:
    """Phi^-1(p) for 0 < p < 1 (ValueError otherwise: a quantile at 0 or 1 is infinite, which no
    caller here can use)."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"normal quantile needs 0 < p < 1, got {p}")
    from scipy.special import ndtri
    return float(ndtri(p))


def t_quantile(p: float, df: float) -> float:
    """Quantile of Student's t with `df` > 0 degrees of freedom, for 0 < p < 1 (else ValueError)."""
    if not (df > 0 and math.isfinite(df)):
        raise ValueError(f"t quantile needs a positive finite df, got {df}")
    if not 0.0 < p < 1.0:
        raise ValueError(f"t quantile needs 0 < p < 1, got {p}")
    from scipy.special import stdtrit
    return float(stdtrit(df, p))


def mean_t_interval(values: Sequence[float]) -> tuple[float, float, float] | None:
    """The mean of `values` and its 95 % Student t interval (mean -+ t(0.975, n - 1) sd / sqrt n), for
    differences paired over seeds; None under two values."""
    if len(values) < 2:
        return None
    mean = float(np.mean(values))
    half = t_quantile(0.975, len(values) - 1) * float(np.std(values, ddof=1)) / math.sqrt(len(values))
    return mean, mean - half, mean + half


# ------------------------------------------------------------------------------------------------
# small helpers
# ------------------------------------------------------------------------------------------------

def _series(y: Any, name: str = "y") -> np.ndarray:
    """A 1-D float64 copy; non-finite values are refused rather than dropped, because a NaN loss is
    itself a health event the caller must see, not something a statistic should hide."""
    a = np.asarray(y, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(a)):
        raise ValueError(f"{name} contains non-finite values; filter them (and report them) first")
    return a


def _average_ranks(a: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank (the usual convention for rank statistics):
    scipy.stats.rankdata(a, method="average"), in three numpy lines because scipy.stats' import
    (1.7 s) would be paid by every run that judges a trend."""
    _, inverse, counts = np.unique(a, return_inverse=True, return_counts=True)
    upper = np.cumsum(counts)
    return (upper - (counts - 1) / 2.0)[inverse]


def _pairwise_slopes(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """All n(n-1)/2 slopes (y_j - y_i)/(x_j - x_i), i < j, for strictly increasing x.

    Built in row blocks of about 2^20 elements so memory stays at the output array (100 MB for the
    5000-point cap) plus one block."""
    n = len(y)
    out = np.empty(n * (n - 1) // 2)
    rows = max(1, (1 << 20) // max(n, 1))
    pos = 0
    for i0 in range(0, n - 1, rows):
        i1 = min(i0 + rows, n - 1)
        i = np.arange(i0, i1)[:, None]
        j = np.arange(i0 + 1, n)[None, :]
        mask = j > i
        dy = y[None, i0 + 1:] - y[i0:i1, None]
        dx = x[None, i0 + 1:] - x[i0:i1, None]
        block = (dy[mask] / dx[mask])
        out[pos:pos + block.size] = block
        pos += block.size
    return out


def _order_stat(sorted_at: dict[int, float], rank: float, count: int) -> float:
    """Linear interpolation between order statistics at a possibly fractional 1-based rank."""
    r = min(max(rank, 1.0), float(count)) - 1.0
    lo = int(math.floor(r))
    hi = min(lo + 1, count - 1)
    frac = r - lo
    return sorted_at[lo] + frac * (sorted_at[hi] - sorted_at[lo])


# ------------------------------------------------------------------------------------------------
# 1. Mann-Kendall trend test with the Hamed & Rao variance correction
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class TrendTest:
    """Result of `mann_kendall`.

    n: points used; s: Mann-Kendall S; var_s: Var(S) with tie and (if enabled) Hamed-Rao
    corrections; n_eff_ratio: the Hamed-Rao factor n/n* that multiplied Var(S) (1.0 when the
    correction is off); z: continuity-corrected normal score; p_value: two-sided; tau: Kendall's
    tau-a = S / (n(n-1)/2); trend: "decreasing" | "increasing" | "no trend" at `alpha`;
    sen_slope: Theil-Sen slope per index of the ORIGINAL series; slope_ci: (lo, hi) at 1-alpha;
    subsampled_from: the original length when the series was thinned to `max_points`, else None."""
    n: int
    s: int
    var_s: float
    n_eff_ratio: float
    z: float
    p_value: float
    tau: float
    trend: str
    sen_slope: float
    slope_ci: tuple[float, float]
    alpha: float
    subsampled_from: int | None = None

    @property
    def significant(self) -> bool:
        return self.trend != "no trend"


def _hamed_rao_ratio(x: np.ndarray, y: np.ndarray, slope: float, lags: str = "contiguous",
                     level: float = 0.05) -> float:
    """The factor n/n* of Hamed & Rao (1998), their approximation for the corrected variance:

        n/n* = 1 + 2 / (n(n-1)(n-2)) * sum_k (n-k)(n-k-1)(n-k-2) rho_s(k)

    where rho_s(k) is the lag-k autocorrelation of the RANKS of the series detrended with Sen's
    slope (detrending first, so that the trend itself is not mistaken for autocorrelation), and
    only lags whose autocorrelation is significant enter the sum.  Significance: Anderson's (1941)
    95 % limits for a serial correlation, (-1 +- z sqrt(n-k-1)) / (n-k), with the lag-k estimator
    (1/(n-k)) sum (R_t - Rbar)(R_t+k - Rbar) / ((1/n) sum (R_t - Rbar)^2) those limits belong to.

    lags="contiguous" (default) sums the significant lags 1, 2, ... up to the first lag that is NOT
    significant; lags="all" sums every significant lag up to n-1, the literal reading of the paper.
    Why the default departs from the literal reading: sample autocorrelations are strongly
    correlated across lags (Bartlett 1946), so beyond the real correlation length they cross the
    5 % band in runs of spurious "significant" values, about half of them negative.  Summed with
    cubic weights they make n/n* noisy (10-90 % range 0.5-1.4 on white noise, n = 200..500) and,
    for a slowly decaying dependence, pull it far below the truth.  Measured on 200 seeds each
    (alpha = 0.05, bench/stats_montecarlo.py --only hamed_rao_lags): white noise n = 200/500,
    false-positive rate 0.04/0.07 contiguous vs 0.09/0.11 all; AR(1) phi = 0.9 n = 200/500,
    0.12/0.085 contiguous vs 0.345/0.365 all (uncorrected: 0.61/0.695).
    Truncating an autocorrelation sum at its first insignificant lag is the usual window for
    integrated autocorrelation times (cf. Geyer (1992) Statistical Science 7:473, initial sequences).

    Why not pymannkendall (1.4.3, 2023), the maintained package with this test: its
    hamed_rao_modification_test takes every lag outside the white-noise band +-z/sqrt(n) (the "all"
    reading, with a coarser band) and does not floor n/n*, so a negative variance gives z = NaN.
    Measured with bench/stats_montecarlo.py --only pymannkendall on the series above: white noise
    n = 200/500 false-positive rate 0.075/0.125 (ours 0.04/0.07); AR(1) phi = 0.9 n = 200/500
    0.285/0.29 (ours 0.12/0.085); z NaN in 4 and 1 of the 200 white-noise and AR(1) series at
    n = 200.

    Assumes the dependence is stationary once the linear trend is removed.  Known bias, not removed:
    sample autocorrelations of a short, strongly dependent series are biased towards 0 (more so
    after detrending), so for phi near 1 and n in the hundreds the correction is still too small
    and the test somewhat liberal (the AR(1) figures above)."""
    n = len(y)
    if n < 4:
        return 1.0
    if lags not in ("contiguous", "all"):
        raise ValueError(f"lags must be 'contiguous' or 'all', got {lags!r}")
    ranks = _average_ranks(y - slope * x)
    rc = ranks - ranks.mean()
    denom = float(np.dot(rc, rc))
    if denom == 0.0:                          # everything tied after detrending: nothing to correct
        return 1.0
    size = 1 << (2 * n - 1).bit_length()      # zero-padded FFT gives every lag's sum in O(n log n)
    f = np.fft.rfft(rc, size)
    acov = np.fft.irfft(f * np.conj(f), size)[1:n]
    k = np.arange(1, n, dtype=np.float64)
    acf = (acov / (n - k)) / (denom / n)
    z = normal_quantile(1.0 - level / 2.0)
    root = np.sqrt(np.maximum(n - k - 1.0, 0.0))
    significant = (acf < (-1.0 - z * root) / (n - k)) | (acf > (-1.0 + z * root) / (n - k))
    if lags == "contiguous":
        stop = int(np.argmin(significant)) if not significant.all() else len(significant)
        significant = np.arange(len(significant)) < stop
    weight = (n - k) * (n - k - 1.0) * (n - k - 2.0)   # zero for the last two lags
    ratio = 1.0 + 2.0 / (n * (n - 1.0) * (n - 2.0)) * float(np.sum(weight[significant] * acf[significant]))
    # Strong negative estimates can push the sum below zero, which is no variance at all; the floor
    # keeps Var(S) positive (it allows an up-to-n-fold *smaller* variance, never a negative one).
    return max(ratio, 1.0 / n)


def mann_kendall(y: Sequence[float] | np.ndarray, alpha: float = 0.05, hamed_rao: bool = True,
                 max_points: int = 5000, lags: str = "contiguous") -> TrendTest:
    """Mann-Kendall test for a monotone trend, corrected for autocorrelation, with Sen's slope.

    Sources: Mann (1945) Econometrica 13:245; Kendall (1975) "Rank Correlation Methods" (S, its
    variance with the tie correction, continuity correction); Hamed & Rao (1998) J. Hydrology
    204:182 (variance correction for autocorrelated data, see `_hamed_rao_ratio`); Sen (1968)
    JASA 63:1379 (median pairwise slope); the rank-based confidence interval for Sen's slope as in
    Gilbert (1987) "Statistical Methods for Environmental Pollution Monitoring" ch. 16:
    C = z_{1-alpha/2} sqrt(Var S), M1 = (N - C)/2, M2 = (N + C)/2 over the N ordered pairwise slopes,
    CI = (slope at rank M1, slope at rank M2 + 1), interpolated between neighbouring ranks -- using
    the CORRECTED Var(S), so the interval widens with the autocorrelation as the test does.

    Assumes: points equally spaced in time (an index series); under H0 no trend and a stationary
    dependence that the significant rank autocorrelations describe.  The normal approximation for
    S is good from about n = 10; below that p-values are approximate.  Series longer than
    `max_points` are thinned to `max_points` evenly spaced points (the O(n^2) pairwise slopes would
    otherwise grow without bound); `subsampled_from` records it and the slope stays per ORIGINAL
    index.  `hamed_rao=False` gives the uncorrected test (for comparison only); `lags` chooses which
    significant autocorrelation lags enter the correction (see `_hamed_rao_ratio` for why the
    default is the contiguous run from lag 1 and what that measured).

    Why not a library: scipy.stats.kendalltau gives tau-b and a p-value without the continuity
    correction or any autocorrelation correction, scipy.stats.theilslopes an interval from the
    uncorrected variance; pymannkendall (1.4.3, the maintained Mann-Kendall package) corrects with
    every lag outside a white-noise band and no floor, which is too liberal (see
    `_hamed_rao_ratio`).  Without the correction, S, Var(S), p and Sen's slope and interval equal
    kendalltau's, theilslopes' and pymannkendall.original_test's (tests/test_stats.py checks the
    scipy ones).  S is counted from the pairwise slopes that Sen's slope needs anyway."""
    a = _series(y)
    if len(a) < 3:
        raise ValueError(f"Mann-Kendall needs at least 3 points, got {len(a)}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    subsampled_from = None
    x = np.arange(len(a), dtype=np.float64)
    if len(a) > max_points:
        idx = np.unique(np.round(np.linspace(0, len(a) - 1, max_points)).astype(np.int64))
        subsampled_from = len(a)
        a, x = a[idx], x[idx]
    n = len(a)

    slopes = _pairwise_slopes(x, a)           # sign(slope) = sign(y_j - y_i) since x_j > x_i
    s = int(np.count_nonzero(slopes > 0)) - int(np.count_nonzero(slopes < 0))
    count = slopes.size

    _, ties = np.unique(a, return_counts=True)
    ties = ties[ties > 1].astype(np.float64)
    var_raw = (n * (n - 1.0) * (2.0 * n + 5.0) - float(np.sum(ties * (ties - 1.0) * (2.0 * ties + 5.0)))) / 18.0

    # order statistics needed: the median and the two CI ranks (each with its upper neighbour)
    half = (count - 1) / 2.0
    zc = normal_quantile(1.0 - alpha / 2.0)
    # the CI ranks depend on the corrected variance, which needs the slope first: median first
    mid = sorted({int(math.floor(half)), int(math.ceil(half))})
    part = np.partition(slopes, mid)
    sen = 0.5 * (part[mid[0]] + part[mid[-1]])

    ratio = _hamed_rao_ratio(x, a, sen, lags) if hamed_rao else 1.0
    var_s = max(var_raw * ratio, 1e-300)

    c = zc * math.sqrt(var_s)
    r_lo, r_hi = (count - c) / 2.0, (count + c) / 2.0 + 1.0
    ks = set()
    for r in (r_lo, r_hi):
        r0 = min(max(r, 1.0), float(count)) - 1.0
        ks.update({int(math.floor(r0)), min(int(math.floor(r0)) + 1, count - 1)})
    kth = sorted(ks)
    part = np.partition(part, kth)
    at = {k: float(part[k]) for k in kth}
    ci = (_order_stat(at, r_lo, count), _order_stat(at, r_hi, count))

    if s > 0:
        z = (s - 1) / math.sqrt(var_s)
    elif s < 0:
        z = (s + 1) / math.sqrt(var_s)
    else:
        z = 0.0
    p = min(1.0, 2.0 * normal_sf(abs(z)))
    trend = "no trend" if p >= alpha else ("increasing" if z > 0 else "decreasing")
    return TrendTest(n=n, s=s, var_s=var_s, n_eff_ratio=ratio, z=z, p_value=p, tau=s / (n * (n - 1) / 2.0),
                     trend=trend, sen_slope=float(sen), slope_ci=ci, alpha=alpha, subsampled_from=subsampled_from)


# ------------------------------------------------------------------------------------------------
# 2. level versus a baseline: batch means
# ------------------------------------------------------------------------------------------------

def _integrated_autocorr_time(a: np.ndarray, level: float = 0.05) -> float:
    """tau_int = 1 + 2 sum_k rho(k): how many consecutive points carry the information of one
    independent point.  The sample autocorrelations (the usual 1/n estimator) are summed over the
    contiguous run of lags 1, 2, ... that exceed the white-noise band z/sqrt(n), stopping at the
    first one that does not -- the truncated-window idea of Geyer (1992) Statistical Science 7:473
    (initial sequences) and of Sokal's automatic window (Sokal (1997) "Monte Carlo Methods in
    Statistical Mechanics", Cargese lectures), here with a significance cut-off.  Assumes a
    stationary series; like every such estimate it is biased low for short, strongly dependent
    series.  At least 1."""
    n = len(a)
    c = a - a.mean()
    c0 = float(np.dot(c, c))
    if n < 4 or c0 == 0.0:
        return 1.0
    size = 1 << (2 * n - 1).bit_length()
    f = np.fft.rfft(c, size)
    acf = np.fft.irfft(f * np.conj(f), size)[1:n] / c0
    significant = acf > normal_quantile(1.0 - level / 2.0) / math.sqrt(n)
    stop = int(np.argmin(significant)) if not significant.all() else len(significant)
    return max(1.0, 1.0 + 2.0 * float(acf[:stop].sum()))


@dataclass(frozen=True)
class BaselineTest:
    """Result of `mean_below`: mean of the points used, its (1-alpha) batch-means t-interval `ci`,
    the `baseline`, three mutually exclusive verdicts (below: ci[1] < baseline; above: ci[0] >
    baseline; indistinguishable: the interval contains it), `n_batches`, `batch_size` and the
    estimated integrated autocorrelation time `tau_int` that set the batch size."""
    mean: float
    ci: tuple[float, float]
    baseline: float
    below: bool
    above: bool
    indistinguishable: bool
    n_batches: int
    batch_size: int
    tau_int: float
    alpha: float


_BATCH_TAU_MULTIPLE = 3.0


def mean_below(y: Sequence[float] | np.ndarray, baseline: float, alpha: float = 0.05,
               min_batches: int = 5) -> BaselineTest:
    """Is the level of a series below (or above) `baseline` beyond its noise?

    Method of non-overlapping batch means (e.g. Schmeiser (1982) Operations Research 30:556,
    "Batch size effects in the analysis of simulation output"; Law & Carson (1979) Operations
    Research 27:1011): the series is cut into k contiguous batches of equal size b (the n - k*b
    OLDEST points are dropped so the latest are kept) and a Student-t interval with k-1 degrees of
    freedom is put on the mean of the k batch means.  Averaging over a batch absorbs
    autocorrelation shorter than the batch, so a slowly wandering series widens the interval instead
    of faking significance.

    Batch count: k = max(min_batches, floor(sqrt(n))) -- batch size and count both grow with n --
    unless the batches would then be shorter than 3 tau_int (tau_int from
    `_integrated_autocorr_time`); then b = ceil(3 tau_int) and k = max(min_batches, n // b).  Why:
    with sqrt(n) batches alone, AR(1) noise with phi = 0.95 (tau_int ~ 39) around the baseline was
    called "below" in 11 % of 300 seeds at n = 200 and 400 (nominal 2.5 %); with the tau_int rule
    2.0 / 3.3 / 2.3 % at n = 200 / 400 / 1000 (bench/stats_montecarlo.py --only batch_means; white
    noise unchanged: sqrt(n) batches are kept).
    Growing the batches until their means look independent is the idea of Fishman (1978)
    Management Science 24:510 and of Law & Carson (1979); here the batch size is read off the
    autocorrelation time instead of a test on a few batch means, which has little power (Adam &
    Klein (1989) European J. Operational Research 43:206).

    Assumes the series is (approximately) stationary over the window.  When n is only a few
    tau_int no method rescues it: with min_batches batches shorter than tau_int the interval is
    too narrow (the t quantile with 4 df softens this).  The t quantile is scipy's (see `t_quantile`).
    With fewer than `min_batches` points every point is its own batch (the ordinary t-interval)."""
    a = _series(y)
    n = len(a)
    if n < 2:
        raise ValueError(f"mean_below needs at least 2 points, got {n}")
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    floor_k = min(n, int(min_batches))
    k = min(n, max(int(min_batches), math.isqrt(n)))
    tau = _integrated_autocorr_time(a)
    b = max(n // k, int(math.ceil(_BATCH_TAU_MULTIPLE * tau)))
    k = max(floor_k, min(k, n // b))
    b = n // k
    used = a[n - k * b:]
    means = used.reshape(k, b).mean(axis=1)
    m = float(means.mean())
    se = float(means.std(ddof=1)) / math.sqrt(k)
    half = t_quantile(1.0 - alpha / 2.0, k - 1) * se
    lo, hi = m - half, m + half
    below, above = hi < baseline, lo > baseline
    return BaselineTest(mean=m, ci=(lo, hi), baseline=float(baseline), below=below, above=above,
                        indistinguishable=not (below or above), n_batches=k, batch_size=b, tau_int=tau,
                        alpha=alpha)


# ------------------------------------------------------------------------------------------------
# 3. how much longer until an unresolved trend resolves
# ------------------------------------------------------------------------------------------------

def steps_to_resolve(trend: TrendTest, n_points: int | None = None, alpha: float = 0.05) -> int | None:
    """Estimated number of MORE points (logged rows, not optimiser steps) after which the slope CI
    would exclude 0 -- a planning figure, not a promise.

    Assumes the slope estimate and the noise (including its autocorrelation, i.e. the Hamed-Rao
    factor) stay as measured as the series grows.  Then for points equally spaced in time the
    standard error of a slope falls like n^(-3/2) (Var of a least-squares or Sen slope is
    sigma^2 / sum (t - tbar)^2 = 12 sigma^2 / (n^3 - n)), so a CI half-width d shrinks to
    d (n / N)^(3/2) and excludes 0 once N >= n (d / |slope|)^(2/3).  The same scaling holds for the
    Mann-Kendall z of a weak trend (E S ~ n^3 slope / sigma, sd S ~ n^(3/2)), giving
    N >= n (z_crit / |z|)^(2/3); the larger of the two estimates is returned, so a series the test
    still calls "no trend" never gets 0.  d is the distance from the slope to the CI bound on the
    side of 0, rescaled from the test's alpha to `alpha`.

    Returns 0 if the trend is already significant at `alpha`; None if the slope is exactly 0 (no
    amount of the same data resolves a zero slope).  `n_points` defaults to the original length of
    the series (`subsampled_from` or `n`)."""
    n = int(n_points if n_points is not None else (trend.subsampled_from or trend.n))
    slope = trend.sen_slope
    if slope == 0.0:
        return None
    z_crit = normal_quantile(1.0 - alpha / 2.0)
    if trend.p_value < alpha and trend.z != 0.0:
        return 0
    lo, hi = trend.slope_ci
    d = (slope - lo) if slope > 0 else (hi - slope)
    d *= z_crit / normal_quantile(1.0 - trend.alpha / 2.0)
    need = []
    if d > 0:
        need.append(n * (d / abs(slope)) ** (2.0 / 3.0))
    if trend.z != 0.0:
        need.append(n * (z_crit / abs(trend.z)) ** (2.0 / 3.0))
    if not need:
        return None
    return max(1, int(math.ceil(max(need) - n)))


# ------------------------------------------------------------------------------------------------
# 4. learning-curve fits and projection (small version of Domhan et al. 2015)
# ------------------------------------------------------------------------------------------------

FAMILY_PARAMS = {"power": 4, "exp": 3, "log": 2}   # fitted parameters, without the noise variance

# Search ranges in normalised steps x = s / s_last (so they do not depend on the step unit):
# exponent a of the power law, scale c = s0 / s_last of its offset, rate k of the exponential.
_A_RANGE = (0.01, 4.0)
_C_SPAN, _C_EPS = 10.0, 1e-3
_K_RANGE = (0.01, 100.0)
# Start grid of the nonlinear parameters (points per coordinate); it only picks the basin that
# scipy's optimiser then descends (see `_fit_family`).
_GRID = {"power": (40, 24), "exp": (64,)}


class FamilyFit(NamedTuple):
    """One family of the ensemble: (params, value, aic, weight, rmse).

    params: the fitted parameters in raw step units (power: E, A, a, s0 for E + A (s + s0)^-a;
    exp: E, A, k for E + A exp(-k s); log: c0, c1 for c0 + c1 log(s + 1)); value: the family's
    value at the projected step (in `CurveFit`: at the last fitted step); aic: AICc; weight:
    Akaike weight in the ensemble; rmse: root-mean-square residual on the fitted points."""
    params: dict
    value: float
    aic: float
    weight: float
    rmse: float


def _predict(name: str, params: dict, steps: Any) -> np.ndarray:
    """Family `name` at `steps`; params may hold scalars or [m] arrays (then the result is [m, q])."""
    s = np.asarray(steps, dtype=np.float64)
    p = {k: np.asarray(v, dtype=np.float64) for k, v in params.items()}
    if p[next(iter(p))].ndim:                 # replicate axis first, steps second
        p = {k: v[:, None] for k, v in p.items()}
        s = s[None, :]
    with np.errstate(over="ignore", under="ignore", invalid="ignore"):
        if name == "power":
            return p["E"] + p["A"] * np.exp(-p["a"] * np.log(s + p["s0"]))
        if name == "exp":
            return p["E"] + p["A"] * np.exp(-p["k"] * s)
        if name == "log":
            return p["c0"] + p["c1"] * np.log1p(s)
    raise ValueError(f"unknown curve family {name!r}; known: {sorted(FAMILY_PARAMS)}")


def _linear_fit(B: np.ndarray, Yc: np.ndarray, ymean: np.ndarray, ssy: np.ndarray, sign: np.ndarray,
                shared: bool, lower_bound: float | None = None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Least squares of y = E + A b for many candidate bases b at once, with A of each replicate
    constrained to that replicate's sign (sign [m]: +1 A >= 0, -1 A <= 0, 0 free).  The model is
    linear in (E, A), so the solution is closed form: A = cov(b, y) / var(b); if A has the wrong
    sign the constrained optimum is on the boundary A = 0 (a flat line at the mean).
    shared: B is [G, n] for every replicate; else B is [m, L, n].  Returns (E, A, rss), each
    [m, G] or [m, L]."""
    bmean = B.mean(axis=-1, keepdims=True)
    Bc = B - bmean
    var = np.einsum("...n,...n->...", Bc, Bc)
    scale = np.einsum("...n,...n->...", B, B)
    if shared:
        cov = Yc @ Bc.T                                  # [m, G]
        var, scale, bm = var[None, :], scale[None, :], bmean[None, :, 0]
    else:
        cov = np.einsum("mln,mn->ml", Bc, Yc)             # [m, L]
        bm = bmean[..., 0]
    # a basis that is constant to 1e-5 relative over the data is collinear with the intercept
    ok = var > 1e-10 * np.maximum(scale, 1e-300)
    A = np.where(ok, cov / np.where(ok, var, 1.0), 0.0)
    A = np.where(A * sign[:, None] < 0.0, 0.0, A)
    rss = np.maximum(ssy[:, None] - A * (2.0 * cov - A * var), 0.0)
    E = ymean[:, None] - A * bm
    if lower_bound is not None:
        # a decaying curve may not settle below `lower_bound` (a loss below 0, say): where the free
        # floor E falls under it, the constrained optimum has E on the bound and A from the 1-D
        # least squares of (y - bound) on b (still A >= 0)
        n = Yc.shape[-1]
        shift = (ymean - lower_bound)[:, None]
        by = cov + shift * n * bm            # b . (y - bound); b . Yc = cov because Yc sums to zero
        A_b = np.maximum(np.where(scale > 0, by / np.where(scale > 0, scale, 1.0), 0.0), 0.0)
        rss_b = np.maximum(ssy[:, None] + n * shift ** 2 - A_b * (2.0 * by - A_b * scale), 0.0)
        hit = (E < lower_bound) & (sign[:, None] > 0)
        E = np.where(hit, lower_bound, E)
        A = np.where(hit, A_b, A)
        rss = np.where(hit, rss_b, rss)
    return E, A, rss


def _nonlinear_theta(name: str, u: np.ndarray, c_min: float) -> tuple[np.ndarray, ...]:
    """Map search coordinates u in [0, 1]^d to the family's nonlinear parameters (normalised units).
    Log-spaced maps, because the plausible exponents and rates span decades."""
    if name == "power":
        a = _A_RANGE[0] * (_A_RANGE[1] / _A_RANGE[0]) ** u[..., 0]
        c = c_min + _C_EPS * ((1.0 + _C_SPAN / _C_EPS) ** u[..., 1] - 1.0)   # u = 0 gives c_min exactly
        return a, c
    return (_K_RANGE[0] * (_K_RANGE[1] / _K_RANGE[0]) ** u[..., 0],)


def _basis(name: str, x: np.ndarray, theta: tuple[np.ndarray, ...]) -> np.ndarray:
    with np.errstate(over="ignore", under="ignore"):
        if name == "power":
            a, c = theta
            return np.exp(-a[..., None] * np.log(x + c[..., None]))
        (k,) = theta
        return np.exp(-k[..., None] * x)


def _profile(name: str, x: np.ndarray, u: np.ndarray, c_min: float, Yc: np.ndarray, ymean: np.ndarray,
             ssy: np.ndarray, sign: np.ndarray, lower_bound: float | None,
             shared: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(E, A, rss, basis) of family `name` at search coordinates u, the linear parameters solved
    exactly: the variable-projection profile (Golub & Pereyra (1973) SIAM J. Numer. Anal. 10:413).
    shared: u is [G, d] for every row of Yc; else u is [m, L, d], L points per row."""
    B = _basis(name, x, _nonlinear_theta(name, u, c_min))
    E, A, rss = _linear_fit(B, Yc, ymean, ssy, sign, shared=shared, lower_bound=lower_bound)
    return E, A, rss, B


def _fit_family(name: str, s: np.ndarray, Y: np.ndarray, sign: np.ndarray,
                lower_bound: float | None = None) -> tuple[dict, np.ndarray]:
    """Fit family `name` to every row of Y [m, n] at steps s [n]; returns (raw params of [m] arrays,
    rss [m]).

    The linear parameters (E, A) are solved exactly for given nonlinear ones (`_profile`), so only
    the exp family's rate k (1-D) and the power family's exponent and offset (a, s0; 2-D) are
    searched, in the log-spaced coordinates u in [0, 1]^d of `_nonlinear_theta`.  Start: the best
    point of the `_GRID` grid, one vectorised evaluation for all rows.  Why a grid first: the
    profile can have more than one basin and a local optimiser stays in the basin of its start --
    on flat noisy 10-point windows a descent from the middle of the range ended up to 3 % above the
    grid-started one (2 of 20 windows), and scipy.optimize.curve_fit from its default start (every
    raw parameter 1) ends 20 to 5000 times above it on 10-point curves (both in tests/test_stats.py).
    Then scipy.optimize descends from it: exp by scipy.optimize.elementwise.find_minimum
    (Chandrupatla's bracketing minimiser, every row at once) inside the grid bracket around the
    start; power by scipy.optimize.least_squares (trust-region reflective, bounds u in [0, 1]^2) on
    the projected residuals, one row at a time.  Guard: a row keeps its grid point unless the RSS at
    the optimiser's answer, recomputed here, is below the start's (find_minimum has no bracket when
    the start sits at the end of the range, and any optimiser may stop early or fail)."""
    from scipy.optimize import elementwise, least_squares

    ymean = Y.mean(axis=1)
    Yc = Y - ymean[:, None]
    ssy = np.einsum("mn,mn->m", Yc, Yc)
    if name == "log":
        E, A, rss = _linear_fit(np.log1p(s)[None, :], Yc, ymean, ssy, np.zeros(len(Y)), shared=True)
        return {"c0": E[:, 0], "c1": A[:, 0]}, rss[:, 0]
    S = float(s[-1])
    x = s / S
    # (s + s0) must stay positive: with a step 0 in the data the offset starts at one logging interval
    c_min = 0.0 if x[0] > 0 else float(np.median(np.diff(x)))
    sizes = _GRID[name]
    axes = [np.linspace(0.0, 1.0, g) for g in sizes]
    grid = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1).reshape(-1, len(sizes))
    E_grid, A_grid, rss_grid, _ = _profile(name, x, grid, c_min, Yc, ymean, ssy, sign, lower_bound, shared=True)
    best = np.argmin(rss_grid, axis=1)
    rows = np.arange(Y.shape[0])
    start = grid[best]
    E, A, rss = E_grid[rows, best], A_grid[rows, best], rss_grid[rows, best]

    if name == "exp":
        def profile_rss(uk: np.ndarray, row: np.ndarray) -> np.ndarray:
            r = row.astype(np.int64)              # find_minimum passes only the rows still active
            return _profile(name, x, uk[:, None, None], c_min, Yc[r], ymean[r], ssy[r], sign[r], lower_bound,
                            shared=False)[2][:, 0]
        j = np.clip(best, 1, sizes[0] - 2)
        found = elementwise.find_minimum(profile_rss, (axes[0][j - 1], axes[0][j], axes[0][j + 1]),
                                         args=(rows.astype(np.float64),))
        u = found.x[:, None]
    else:
        u = start.copy()
        for i in rows:
            one = slice(i, i + 1)

            def residuals(ui: np.ndarray) -> np.ndarray:
                E1, A1, _, B1 = _profile(name, x, ui[None, :], c_min, Yc[one], ymean[one], ssy[one], sign[one],
                                         lower_bound, shared=True)
                return Y[i] - E1[0, 0] - A1[0, 0] * B1[0]

            # ftol 1e-6: the RSS to 1e-6 relative moves an AICc by n * 1e-6, far below any weight's change
            u[i] = least_squares(residuals, start[i], bounds=(0.0, 1.0), ftol=1e-6).x
    E_opt, A_opt, rss_opt, _ = _profile(name, x, u[:, None, :], c_min, Yc, ymean, ssy, sign, lower_bound,
                                        shared=False)
    better = rss_opt[:, 0] < rss                  # False where the optimiser's answer is NaN
    u = np.where(better[:, None], u, start)
    E, A, rss = (np.where(better, new[:, 0], old) for new, old in ((E_opt, E), (A_opt, A), (rss_opt, rss)))
    theta = _nonlinear_theta(name, u, c_min)
    if name == "power":
        a, c = theta
        # back to raw steps: A (x + c)^-a = A S^a (s + c S)^-a
        return {"E": E, "A": A * np.exp(a * math.log(S)), "a": a, "s0": c * S}, rss
    (k,) = theta
    return {"E": E, "A": A, "k": k / S}, rss


def _aicc(rss: np.ndarray, n: int, p: int, floor: float) -> np.ndarray:
    """Gaussian AICc (Hurvich & Tsai (1989) Biometrika 76:297): n log(RSS/n) + 2K + 2K(K+1)/(n-K-1),
    K = p + 1 (the noise variance counts).  The small-sample term matters at the tens of points a
    preflight has and vanishes for long series, where this is Akaike's AIC.  RSS is floored so an
    exact fit gives a finite (very low) value instead of -inf."""
    K = p + 1
    return n * np.log(np.maximum(rss, floor) / n) + 2.0 * K + 2.0 * K * (K + 1.0) / (n - K - 1.0)


def _akaike_weights(aic: np.ndarray) -> np.ndarray:
    """exp(-delta/2) normalised over families (Burnham & Anderson (2002) "Model Selection and
    Multimodel Inference" sec. 2.9); aic is [..., F] and infinities get weight 0."""
    finite = np.isfinite(aic)
    best = np.min(np.where(finite, aic, np.inf), axis=-1, keepdims=True)
    w = np.where(finite, np.exp(-0.5 * (np.where(finite, aic, 0.0) - best)), 0.0)
    return w / w.sum(axis=-1, keepdims=True)


@dataclass(frozen=True)
class CurveFit:
    """Result of `fit_curve`.  families: {name: FamilyFit} (value = the family at `last_step`);
    steps / losses: the points actually fitted (after the warm-up skip); sign: +1 when the curve was
    fitted as decreasing (A >= 0), -1 as increasing (A <= 0)."""
    families: dict
    steps: np.ndarray
    losses: np.ndarray
    first_step: float
    last_step: float
    n_points: int
    skip_fraction: float
    sign: float

    def predict(self, at_step: Any) -> np.ndarray | float:
        """Akaike-weighted ensemble at `at_step` (scalar or array)."""
        total = sum(f.weight * _predict(name, f.params, np.atleast_1d(at_step))
                    for name, f in self.families.items() if f.weight > 0)
        return float(total[0]) if np.ndim(at_step) == 0 else total


def _prepare(steps: Any, losses: Any, skip_fraction: float) -> tuple[np.ndarray, np.ndarray]:
    """Sorted by step, the first `skip_fraction` of the points dropped, repeated steps averaged."""
    s = _series(steps, "steps")
    y = _series(losses, "losses")
    if s.shape != y.shape:
        raise ValueError(f"steps and losses differ in length: {s.size} vs {y.size}")
    if not 0.0 <= skip_fraction < 1.0:
        raise ValueError(f"skip_fraction must be in [0, 1), got {skip_fraction}")
    order = np.argsort(s, kind="stable")
    s, y = s[order], y[order]
    skip = int(len(s) * skip_fraction)
    s, y = s[skip:], y[skip:]
    if len(s) < 5:
        raise ValueError(f"curve fitting needs at least 5 points after the warm-up skip, got {len(s)}")
    if s[0] < 0 or s[-1] <= 0:
        raise ValueError("steps must be >= 0 with a positive last step")
    if np.any(np.diff(s) == 0):
        # a step logged twice (e.g. replayed after a resume) is one observation of the curve, not two
        s, inverse, counts = np.unique(s, return_inverse=True, return_counts=True)
        y = np.bincount(inverse, weights=y) / counts
        if len(s) < 5:
            raise ValueError(f"curve fitting needs at least 5 distinct steps, got {len(s)}")
    return s, y


def _fit_many(s: np.ndarray, Y: np.ndarray, families: Sequence[str], floor: float,
              lower_bound: float | None = None) -> tuple[list[str], dict, np.ndarray, np.ndarray]:
    """Every usable family on every row of Y: (names, params, rss [m, F], aicc [m, F]).  Each row's
    shape constraint follows its own direction (`_direction`)."""
    n = len(s)
    names = [f for f in families if n - FAMILY_PARAMS[f] - 2 > 0]   # AICc needs n > K + 1
    if not names:
        raise ValueError(f"{n} points are too few for any of the families {tuple(families)}")
    params, rss = {}, []
    sign = _direction(s, Y)
    for name in names:
        p, r = _fit_family(name, s, Y, sign, lower_bound)
        params[name] = p
        rss.append(r)
    rss_a = np.stack(rss, axis=1)
    aic = np.stack([_aicc(rss_a[:, i], n, FAMILY_PARAMS[f], floor) for i, f in enumerate(names)], axis=1)
    return names, params, rss_a, aic


def _direction(s: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Per row of Y [m, n]: +1 if the least-squares line through the points falls (or is flat), -1 if
    it rises."""
    sc = s - s.mean()
    return np.where((Y - Y.mean(axis=-1, keepdims=True)) @ sc <= 0.0, 1.0, -1.0)


def fit_curve(steps: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray,
              families: Sequence[str] = ("power", "exp", "log"), skip_fraction: float = 0.1) -> CurveFit:
    """Fit parametric learning-curve families and weight them by AICc (a small version of the
    ensemble of Domhan, Springenberg & Hutter (2015) IJCAI, "Speeding up Automatic Hyperparameter
    Optimization of Deep Neural Networks by Extrapolation of Learning Curves", which combines
    families such as pow3 and exp3 -- here by Akaike weights instead of MCMC).

    Families (s = step): power E + A (s + s0)^-a; exp E + A exp(-k s); log c0 + c1 log(s + 1).  The
    log family is a straight line in log-step and, unlike the other two, has no floor: extrapolated
    far it can go below any bound (even below zero); it is fitted and weighted as-is, nothing clipped.

    Method: for fixed nonlinear parameters (a, s0; k) each model is linear in (E, A), solved in
    closed form (variable projection); the nonlinear ones start from the best point of a log-spaced
    grid and are refined by scipy.optimize (see `_fit_family`).  Shape constraints:
    a, k > 0 always; A >= 0 when the data fall (decaying curves), A <= 0 when they rise (the fit is
    then reported honestly as a rising curve).  The first `skip_fraction` of the points (warm-up)
    are dropped.  Assumes Gaussian, homoscedastic residuals for the AICc; with autocorrelated
    residuals AICc overstates the evidence and so favours the more flexible family -- the weights
    are a ranking device, not posterior probabilities."""
    s, y = _prepare(steps, losses, skip_fraction)
    unknown = [f for f in families if f not in FAMILY_PARAMS]
    if unknown:
        raise ValueError(f"unknown curve families {unknown}; known: {sorted(FAMILY_PARAMS)}")
    sign = float(_direction(s, y[None, :])[0])
    floor = len(y) * (1e-12 * (float(np.max(np.abs(y))) + 1e-300)) ** 2
    names, params, rss, aic = _fit_many(s, y[None, :], families, floor)
    w = _akaike_weights(aic)[0]
    fams = {}
    for i, name in enumerate(names):
        p = {k: float(v[0]) for k, v in params[name].items()}
        fams[name] = FamilyFit(p, float(_predict(name, p, s[-1:])[0]), float(aic[0, i]), float(w[i]),
                               math.sqrt(float(rss[0, i]) / len(y)))
    return CurveFit(families=fams, steps=s, losses=y, first_step=float(s[0]), last_step=float(s[-1]),
                    n_points=len(y), skip_fraction=skip_fraction, sign=sign)


@dataclass(frozen=True)
class Projection:
    """Result of `project`: a PROJECTION, not a measurement (`label` says so for the caller).

    value: AICc-weighted ensemble at `at_step`; interval: value -+ z_{1-alpha/2} times the standard
    deviation of the ensemble over block-bootstrap refits (nominal coverage 1-alpha); families:
    {name: FamilyFit(params, value, aic, weight, rmse)} (a NamedTuple, so [3] is the weight);
    n_points: points fitted (after the warm-up skip); extrapolation_ratio: at_step / last observed
    step; block_length: the bootstrap's block length."""
    at_step: float
    value: float
    interval: tuple[float, float]
    families: dict
    n_points: int
    extrapolation_ratio: float
    alpha: float
    n_boot: int
    block_length: int
    label: str = "projection"


def project(steps: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray, at_step: float,
            alpha: float = 0.1, n_boot: int = 200, seed: int = 0,
            families: Sequence[str] = ("power", "exp", "log"), skip_fraction: float = 0.1,
            block_length: int | None = None, lower_bound: float | None = None) -> Projection:
    """Project the loss to `at_step` with an interval, from the `fit_curve` ensemble.

    Interval: residual moving-block bootstrap (Kuensch (1989) Annals of Statistics 17:1217).  The
    ensemble's residuals are centred and resampled in contiguous blocks of length ~ n^(1/3) (the
    order Hall, Horowitz & Jing (1995) Biometrika 82:561 give for distribution estimates), so the
    replicates keep the residuals' short-range autocorrelation; every family is refitted on every
    replicate (each under the shape constraint of its own direction) and re-weighted by its own
    AICc, so the interval carries fit AND model-choice uncertainty.

    The interval is the "standard" bootstrap interval value -+ z_{1-alpha/2} sd* (Efron & Tibshirani
    (1993) "An Introduction to the Bootstrap" ch. 13), not the percentile interval: the constrained,
    model-averaged estimator is biased under resampling, which shifts the percentile interval off
    the estimate.  Measured coverage of the true curve at 3x the last step, 40 seeds, alpha = 0.1
    (bench/stats_montecarlo.py --only projection_coverage): power-law data 0.925, exponential 0.875,
    flat noise 0.925; the percentile interval, measured with the earlier grid-searched fits (0.90,
    0.875, 0.925 there): 0.90, 0.875, 0.825.

    Assumes the chosen families describe the curve beyond the data.  Nothing in the data can check
    that: the interval covers noise, not misspecification, and grows less trustworthy with
    `extrapolation_ratio`.  It is an interval for the curve's level, not for a single logged point
    (which adds the logging noise).

    lower_bound: a level the curve cannot go below (0 for a loss): the power and exp floors are
    constrained to it, and every family's projection (the log family has no floor) is clipped at it."""
    s, y = _prepare(steps, losses, skip_fraction)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be at least 10, got {n_boot}")
    unknown = [f for f in families if f not in FAMILY_PARAMS]
    if unknown:
        raise ValueError(f"unknown curve families {unknown}; known: {sorted(FAMILY_PARAMS)}")
    n = len(y)
    floor = n * (1e-12 * (float(np.max(np.abs(y))) + 1e-300)) ** 2
    at = np.array([float(at_step)])

    names, params, rss, aic = _fit_many(s, y[None, :], families, floor, lower_bound)
    w = _akaike_weights(aic)[0]
    fitted = sum(w[i] * _predict(name, {k: v[0] for k, v in params[name].items()}, s)
                 for i, name in enumerate(names))
    clip = (lambda v: np.maximum(v, lower_bound)) if lower_bound is not None else (lambda v: v)
    values = {name: float(clip(_predict(name, {k: v[0] for k, v in params[name].items()}, at))[0]) for name in names}
    value = float(sum(w[i] * values[name] for i, name in enumerate(names)))

    b_names, b_params, b_w, L = _bootstrap_refits(s, y, fitted, names, floor, lower_bound, n_boot, seed,
                                                  block_length)
    b_vals = np.stack([clip(_predict(name, b_params[name], at))[:, 0] for name in b_names], axis=1)
    b_vals = np.where(b_w > 0, b_vals, 0.0)   # a weight-0 family may project to inf; it must not poison the sum
    ens = np.sum(b_w * b_vals, axis=1)
    half = normal_quantile(1.0 - alpha / 2.0) * float(np.std(ens, ddof=1))
    lo, hi = value - half, value + half
    if lower_bound is not None:
        lo = max(lo, lower_bound)

    fams = {name: FamilyFit({k: float(v[0]) for k, v in params[name].items()}, values[name], float(aic[0, i]),
                            float(w[i]), math.sqrt(float(rss[0, i]) / n)) for i, name in enumerate(names)}
    last = float(s[-1])
    return Projection(at_step=float(at_step), value=value, interval=(float(lo), float(hi)), families=fams,
                      n_points=n, extrapolation_ratio=float(at_step) / last, alpha=alpha, n_boot=n_boot,
                      block_length=L)


def _bootstrap_refits(s: np.ndarray, y: np.ndarray, fitted: np.ndarray, names: list[str], floor: float,
                      lower_bound: float | None, n_boot: int, seed: int,
                      block_length: int | None) -> tuple[list[str], dict, np.ndarray, int]:
    """The residual moving-block bootstrap of `project`: every family refitted on n_boot
    replicates fitted + resampled residual blocks; (names, params, Akaike weights [n_boot, F],
    block length)."""
    n = len(y)
    resid = y - fitted
    resid = resid - resid.mean()
    L = int(block_length) if block_length else max(1, int(math.ceil(n ** (1.0 / 3.0))))
    L = min(L, n)
    rng = np.random.default_rng(seed)
    n_blocks = -(-n // L)
    starts = rng.integers(0, n - L + 1, size=(n_boot, n_blocks))
    idx = (starts[:, :, None] + np.arange(L)[None, None, :]).reshape(n_boot, -1)[:, :n]
    Y = fitted[None, :] + resid[idx]
    b_names, b_params, _, b_aic = _fit_many(s, Y, names, floor, lower_bound)
    return b_names, b_params, _akaike_weights(b_aic), L


@dataclass(frozen=True)
class ProjectionPath:
    """Result of `project_path`: `project` at many steps at once, from ONE fit and ONE set of
    bootstrap replicates (so the interval at each step belongs to the same curves).  A PROJECTION,
    not a measurement.  at_steps, values, lo, hi: arrays of equal length; weights: {family: Akaike
    weight}; last_step: the last fitted step."""
    at_steps: np.ndarray
    values: np.ndarray
    lo: np.ndarray
    hi: np.ndarray
    weights: dict
    n_points: int
    last_step: float
    alpha: float
    n_boot: int
    block_length: int
    label: str = "projection"

    def first_step_where(self, meets) -> dict[str, float | None]:
        """The first projected step at which `meets(level)` holds for the central value, the
        optimistic and the pessimistic end of the interval, for a goal that `meets` decides: keys
        value, early, late (None where it never holds up to the last projected step).  Which end
        is optimistic is read off the goal: the end that meets it first."""
        def first(arr: np.ndarray) -> float | None:
            ok = np.flatnonzero([bool(meets(float(v))) for v in arr])
            return float(self.at_steps[ok[0]]) if ok.size else None

        lo, hi = first(self.lo), first(self.hi)
        ends = [t for t in (lo, hi) if t is not None]
        early = min(ends) if ends else None
        late = max(ends) if len(ends) == 2 else None
        return {"value": first(self.values), "early": early, "late": late}


def project_path(steps: Sequence[float] | np.ndarray, losses: Sequence[float] | np.ndarray,
                 at_steps: Sequence[float] | np.ndarray, alpha: float = 0.1, n_boot: int = 200, seed: int = 0,
                 families: Sequence[str] = ("power", "exp", "log"), skip_fraction: float = 0.1,
                 block_length: int | None = None, lower_bound: float | None = None) -> ProjectionPath:
    """`project` evaluated along `at_steps` (e.g. from the last measured step to a planned one), for
    the step at which a projected curve crosses a level, with an interval for that step: the same
    AICc-weighted ensemble, the same bootstrap replicates and the same standard interval at every
    step (value -+ z_{1-alpha/2} sd* of the replicates' ensemble there), the same `lower_bound`.
    At a single step it equals `project` (same seed: same replicates; tests/test_stats.py).  Every
    caveat of `project` holds, and more so far beyond the data."""
    s, y = _prepare(steps, losses, skip_fraction)
    if not 0.0 < alpha < 1.0:
        raise ValueError(f"alpha must be in (0, 1), got {alpha}")
    if n_boot < 10:
        raise ValueError(f"n_boot must be at least 10, got {n_boot}")
    at = np.atleast_1d(np.asarray(at_steps, dtype=np.float64))
    if at.ndim != 1 or at.size == 0 or not np.all(np.isfinite(at)):
        raise ValueError("at_steps must be a non-empty 1-D array of finite steps")
    n = len(y)
    floor = n * (1e-12 * (float(np.max(np.abs(y))) + 1e-300)) ** 2
    names, params, _, aic = _fit_many(s, y[None, :], families, floor, lower_bound)
    w = _akaike_weights(aic)[0]
    fitted = sum(w[i] * _predict(name, {k: v[0] for k, v in params[name].items()}, s)
                 for i, name in enumerate(names))
    clip = (lambda v: np.maximum(v, lower_bound)) if lower_bound is not None else (lambda v: v)
    values = sum(w[i] * clip(_predict(name, {k: v[0] for k, v in params[name].items()}, at))
                 for i, name in enumerate(names))
    b_names, b_params, b_w, L = _bootstrap_refits(s, y, fitted, names, floor, lower_bound, n_boot, seed,
                                                  block_length)
    b_vals = np.stack([clip(_predict(name, b_params[name], at)) for name in b_names], axis=1)  # [boot, F, m]
    b_vals = np.where(b_w[:, :, None] > 0, b_vals, 0.0)
    ens = np.sum(b_w[:, :, None] * b_vals, axis=1)                                             # [boot, m]
    z = normal_quantile(1.0 - alpha / 2.0)
    half = np.array([z * float(np.std(ens[:, j], ddof=1)) for j in range(at.size)])  # per step, as project
    lo, hi = values - half, values + half
    if lower_bound is not None:
        lo = np.maximum(lo, lower_bound)
    return ProjectionPath(at_steps=at, values=np.asarray(values, dtype=np.float64), lo=lo, hi=hi,
                          weights={name: float(w[i]) for i, name in enumerate(names)}, n_points=n,
                          last_step=float(s[-1]), alpha=alpha, n_boot=n_boot, block_length=L)


# ------------------------------------------------------------------------------------------------
# 4b. where a series stopped moving
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Plateau:
    """Result of `plateau`: the series is flat from index `start` on.  mean and ci: the level of
    y[start:] with its (1-alpha) batch-means interval (`mean_below`); half_width: (ci[1] - ci[0]) / 2;
    trend: the Mann-Kendall test on y[start:] (no significant trend at alpha, by construction)."""
    start: int
    n: int
    mean: float
    ci: tuple[float, float]
    half_width: float
    trend: TrendTest


def _line_rss(x: np.ndarray, y: np.ndarray) -> float:
    """Residual sum of squares of the least-squares line through (x, y)."""
    xc, yc = x - x.mean(), y - y.mean()
    sxx = float(np.dot(xc, xc))
    slope = float(np.dot(xc, yc)) / sxx if sxx > 0 else 0.0
    r = yc - slope * xc
    return float(np.dot(r, r))


def plateau(y: Sequence[float] | np.ndarray, alpha: float = 0.05, min_points: int = 10) -> Plateau | None:
    """Where a series stopped moving: the index from which it is flat, or None while it still moves.

    Three models compete by BIC (Schwarz 1978; n log(RSS/n) + k log n): a constant (k = 1), a
    straight line (k = 2) and a "broken stick" -- a line up to a knee M, constant after it (k = 3:
    level, slope, knee; the knee searched over every index that leaves `min_points` after it; the
    two-phase regression of e.g. Hinkley (1969) Biometrika 56:495, with the plateau as its second
    phase).  The constant wins: flat from index 0; the line wins: still moving, None; the broken
    stick wins: flat from its knee.  Then the flat part must show no monotone trend in the
    autocorrelation-corrected Mann-Kendall test at `alpha`, else None (a curve that bends but is
    still rising, such as an exponential approach, is not a plateau).

    Why not "the longest tail without a significant Mann-Kendall trend": the Hamed-Rao correction
    reads a rise followed by a flat stretch as strong autocorrelation and inflates the variance,
    so tails that still hold the rise were called trend-free (measured while building this, on
    tests/test_preflight_goal.py's 30-point rise to 0.88 and 70 flat points, seeds 0-4: that rule
    put the start at 39, 0, 24, 25 and 24; the knee puts it at 30 in all five, which the test checks).
    Assumes the noise is roughly homoscedastic; "no significant trend" is not "no trend": a drift
    within the noise counts as flat, and a caller that projects past the data should say so.
    Returns None for fewer than `min_points` points."""
    a = _series(y)
    n = len(a)
    min_points = max(3, int(min_points))
    if n < min_points:
        return None
    x = np.arange(n, dtype=np.float64)
    rss_const = float(np.dot(a - a.mean(), a - a.mean()))
    rss_line = _line_rss(x, a)
    best_rss, knee = math.inf, 0
    for m in range(1, n - min_points + 1):
        r = _line_rss(np.minimum(x - m, 0.0), a)     # slope before the knee, flat after it
        if r < best_rss:
            best_rss, knee = r, m

    def bic(rss: float, k: int) -> float:
        return n * math.log(max(rss, 1e-300) / n) + k * math.log(n)

    scores = [bic(rss_const, 1), bic(rss_line, 2), bic(best_rss, 3) if knee else math.inf]
    choice = int(np.argmin(scores))
    if choice == 1:
        return None
    start = 0 if choice == 0 else knee
    tail = a[start:]
    trend = mann_kendall(tail, alpha=alpha)
    if trend.significant:
        return None
    level = mean_below(tail, float(tail.mean()), alpha=alpha)
    return Plateau(start=start, n=len(tail), mean=level.mean, ci=level.ci,
                   half_width=(level.ci[1] - level.ci[0]) / 2.0, trend=trend)


# ------------------------------------------------------------------------------------------------
# 5. RankMe
# ------------------------------------------------------------------------------------------------

def rank_me(features: Any, eps: float = 1e-7) -> float:
    """RankMe effective rank of a representation matrix [N, D] (Garrido, Balestriero, Najman &
    LeCun (2023) ICML, "RankMe: Assessing the downstream performance of pretrained self-supervised
    representations by their rank"; the smooth rank of Roy & Vetterli (2007) EUSIPCO):

        p_k = sigma_k / ||sigma||_1 + eps,   RankMe = exp(-sum_k p_k log p_k)

    over the min(N, D) singular values sigma_k, with eps = 1e-7 as in the paper.  Features are used
    as given (not centred), as in the paper.  A numpy array or a torch tensor (any device/dtype) is
    accepted.  Assumes N >= D for the value to approach D on isotropic features: with N < D the
    rank is at most N.  An all-zero matrix returns 0.0 (no direction is used at all)."""
    if hasattr(features, "detach"):           # torch tensor, without importing torch here
        features = features.detach().to("cpu").double().numpy()
    a = np.asarray(features, dtype=np.float64)
    if a.ndim != 2 or a.size == 0:
        raise ValueError(f"rank_me needs a non-empty [N, D] matrix, got shape {a.shape}")
    if not np.all(np.isfinite(a)):
        raise ValueError("rank_me: features contain non-finite values")
    sv = np.linalg.svd(a, compute_uv=False)
    total = float(sv.sum())
    if total == 0.0:
        return 0.0
    p = sv / total + eps
    return float(math.exp(-float(np.sum(p * np.log(p)))))


# ------------------------------------------------------------------------------------------------
# 6. a single change point in level and scale
# ------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ChangePoint:
    """Result of `change_point`.  index: first point of the new regime (y[index:] is "after");
    mean/std before and after (maximum-likelihood std, ddof=0); llr: the maximised log-likelihood
    ratio; threshold: the BIC penalty 2*llr must exceed; significant: 2*llr > threshold."""
    index: int
    mean_before: float
    std_before: float
    mean_after: float
    std_after: float
    llr: float
    threshold: float
    significant: bool


def change_point(y: Sequence[float] | np.ndarray, min_segment: int = 5) -> ChangePoint | None:
    """The single split of a series into two Gaussian segments with their own mean and variance
    that best beats one Gaussian segment (e.g. a gradient-norm regime change).

    For a split at t the log-likelihood ratio at the maximum-likelihood estimates is
        LLR(t) = n/2 log s0^2 - t/2 log s1^2 - (n-t)/2 log s2^2
    (s^2 the ML variances of the whole series, of y[:t] and of y[t:]), maximised over
    min_segment <= t <= n - min_segment, all splits at once via cumulative sums.  Significance by
    Schwarz's (1978) BIC, as used for this mean-and-variance model by Chen & Gupta ("Parametric
    Statistical Change Point Analysis", 2nd ed. 2012, ch. 2): the two-segment model has three more
    parameters (second mean, second variance, change location), so the change is significant when
    2 LLR > 3 log n.  No permutations are needed; the BIC penalty grows with log n, which keeps the
    false-alarm rate of the maximum over all splits low for stationary series (it is a model-choice
    rule, not an exact alpha-level test).  Assumes independent Gaussian noise within each segment;
    strong autocorrelation will look like level changes.

    Returns None when the series is shorter than 2 * min_segment.  Segment variances are floored at
    1e-12 of the whole series' variance so an exactly flat segment gives a large but finite LLR."""
    a = _series(y)
    n = len(a)
    min_segment = max(2, int(min_segment))
    if n < 2 * min_segment:
        return None
    c = a - a.mean()                          # centring keeps the cumulative sums well conditioned
    cs = np.concatenate([[0.0], np.cumsum(c)])
    cs2 = np.concatenate([[0.0], np.cumsum(c * c)])
    t = np.arange(min_segment, n - min_segment + 1)
    m1 = cs[t] / t
    m2 = (cs[n] - cs[t]) / (n - t)
    v1 = cs2[t] / t - m1 * m1
    v2 = (cs2[n] - cs2[t]) / (n - t) - m2 * m2
    v0 = cs2[n] / n
    floor = max(v0, 1e-300) * 1e-12
    v1, v2, v0f = np.maximum(v1, floor), np.maximum(v2, floor), max(v0, floor)
    llr = 0.5 * (n * math.log(v0f) - t * np.log(v1) - (n - t) * np.log(v2))
    j = int(np.argmax(llr))
    tau = int(t[j])
    threshold = 3.0 * math.log(n)
    best = float(llr[j])
    return ChangePoint(index=tau, mean_before=float(a[:tau].mean()), std_before=float(a[:tau].std()),
                       mean_after=float(a[tau:].mean()), std_after=float(a[tau:].std()), llr=best,
                       threshold=threshold, significant=2.0 * best > threshold)


# ------------------------------------------------------------------------------------------------
# 7. robust z-score
# ------------------------------------------------------------------------------------------------

def robust_z(value: float, history: Sequence[float] | np.ndarray) -> float:
    """(value - median) / (1.4826 MAD) of `history`: a z-score a spike cannot inflate, for spike
    detection.  1.4826 = 1 / Phi^-1(3/4) makes 1.4826 MAD a consistent estimate of sigma for Gaussian
    data (Rousseeuw & Croux (1993) JASA 88:1273; the modified z-score of Iglewicz & Hoaglin (1993)).

    Assumes the history is mostly spike-free (the MAD tolerates up to 50 % outliers).  Non-finite
    history values are ignored.  Fallbacks when MAD = 0 (over half the history identical): the
    standard deviation; if that is 0 too (a constant history), 0.0 for a value equal to it and
    +-inf otherwise -- any departure from a perfectly constant history is infinitely surprising.
    A non-finite `value` returns nan; an empty history raises ValueError."""
    h = np.asarray(history, dtype=np.float64).reshape(-1)
    h = h[np.isfinite(h)]
    if h.size == 0:
        raise ValueError("robust_z needs a non-empty finite history")
    v = float(value)
    if not math.isfinite(v):
        return float("nan")
    med = float(np.median(h))
    return _standardise(v - med, _robust_sigma(h))


def _robust_sigma(a: np.ndarray) -> float:
    """1.4826 MAD of `a`, its standard deviation when over half of it is identical (MAD 0)."""
    scale = 1.4826 * float(np.median(np.abs(a - np.median(a))))
    return scale if scale != 0.0 else float(np.std(a))


def _standardise(diff: float, scale: float) -> float:
    """diff / scale; against a scale of 0 (a constant history) 0 for no departure, else +-inf."""
    if scale == 0.0:
        return 0.0 if diff == 0.0 else math.copysign(math.inf, diff)
    return diff / scale


class Jump(NamedTuple):
    """How far a value sits above where a series is now: `z` in units of the series' own
    row-to-row noise, `reference` the local level it is compared with, `scale` that noise."""

    z: float
    reference: float
    scale: float


def jump_z(value: float, history: Sequence[float] | np.ndarray, reference_rows: int = 5) -> Jump:
    """A spike statistic that a trend cannot hide.  `robust_z` against a whole window fails on a
    falling curve: the window's median lags far behind the curve's level and its MAD spans the
    whole descent, so a loss that jumps 80x above the last few rows can still score below 6.
    Here the reference is the median of the last `reference_rows` values (it follows the curve)
    and the scale is the noise of row-to-row changes, 1.4826 MAD(first differences) / sqrt(2):
    a smooth trend only shifts the differences' median, which the MAD subtracts, and a past spike
    inflates two differences, which the MAD tolerates.  Fallbacks for a zero MAD as robust_z's.

    Values are used as given: callers that judge multiplicative changes (losses near zero) pass
    logarithms.  Needs at least 3 finite history values (2 differences); else ValueError."""
    h = np.asarray(history, dtype=np.float64).reshape(-1)
    h = h[np.isfinite(h)]
    if h.size < 3:
        raise ValueError("jump_z needs at least 3 finite history values")
    v = float(value)
    reference = float(np.median(h[-reference_rows:]))
    if not math.isfinite(v):
        return Jump(float("nan"), reference, float("nan"))
    return Jump(_standardise(v - reference, row_noise(h)), reference, row_noise(h))


def row_noise(history: Sequence[float] | np.ndarray) -> float:
    """The noise of one row about the series' local level, robust to a trend and to a few outliers:
    1.4826 MAD(first differences) / sqrt(2) (a difference of two rows has sqrt(2) x their noise).
    Non-finite values are ignored; 0.0 for fewer than 3 finite values."""
    h = np.asarray(history, dtype=np.float64).reshape(-1)
    h = h[np.isfinite(h)]
    if h.size < 3:
        return 0.0
    return _robust_sigma(np.diff(h)) / math.sqrt(2.0)
