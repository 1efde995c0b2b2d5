#!/usr/bin/env python3
"""The Monte-Carlo figures of trainlab.health.stats that docs/health.md and the docstrings of
src/trainlab/health/stats.py state: false-alarm rates, interval coverage and resolution rates on
synthetic series whose truth is known.

Usage: python bench/stats_montecarlo.py [--only NAME ...]
Prints one line per figure (name, what was counted, seconds).  The series and seeds are the ones
tests/test_stats.py uses, with more seeds where the documents quote more.  The default set takes
about 2.5 minutes of one core (the projection coverage is most of it); run it with one thread,
e.g. OMP_NUM_THREADS=1, so the figures do not depend on the BLAS.  `--only pymannkendall` measures
that package's Hamed-Rao test on the same series as hamed_rao_lags (not in the default set: it
needs the package installed).
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import numpy as np

SRC = Path(__file__).resolve().parent.parent / "src"
if str(SRC) not in sys.path:  # `python3 bench/stats_montecarlo.py` from a checkout without an installed trainlab
    sys.path.insert(0, str(SRC))

from trainlab.health import stats  # noqa: E402


def ar1(seeds: range, n: int, phi: float, burn: int = 200) -> np.ndarray:
    """One stationary unit-innovation AR(1) series per seed, [len(seeds), n] (tests/test_stats.py uses it too)."""
    e = np.stack([np.random.default_rng(s).normal(size=n + burn) for s in seeds])
    x = np.empty_like(e)
    x[:, 0] = e[:, 0] / math.sqrt(1.0 - phi * phi)
    for t in range(1, n + burn):
        x[:, t] = phi * x[:, t - 1] + e[:, t]
    return x[:, burn:]


def rate(hits: int, total: int) -> str:
    return f"{hits}/{total} = {hits / total:.3f}"


def mk_white_noise() -> str:
    hits = sum(stats.mann_kendall(np.random.default_rng(s).normal(size=150)).significant for s in range(100))
    return f"white noise n 150, alpha 0.05: {rate(hits, 100)} called a trend"


def mk_ar1() -> str:
    series = ar1(range(100), 300, 0.9)
    corrected = sum(stats.mann_kendall(y).significant for y in series)
    plain = sum(stats.mann_kendall(y, hamed_rao=False).significant for y in series)
    return f"AR(1) phi 0.9 n 300, alpha 0.05: corrected {rate(corrected, 100)}, uncorrected {rate(plain, 100)}"


def hamed_rao_lags() -> str:
    """The figures of `_hamed_rao_ratio`'s docstring: contiguous vs all significant lags, 200 seeds."""
    parts = []
    for label, make in (("white noise", lambda n: np.stack([np.random.default_rng(s).normal(size=n)
                                                               for s in range(200)])),
                        ("AR(1) phi 0.9", lambda n: ar1(range(200), n, 0.9))):
        for n in (200, 500):
            series = make(n)
            counts = {lags: sum(stats.mann_kendall(y, lags=lags).significant for y in series)
                      for lags in ("contiguous", "all")}
            plain = sum(stats.mann_kendall(y, hamed_rao=False).significant for y in series)
            parts.append(f"{label} n {n}: contiguous {counts['contiguous'] / 200:.3f}, all {counts['all'] / 200:.3f}, "
                         f"uncorrected {plain / 200:.3f}")
    return "false-trend rate, 200 seeds, alpha 0.05: " + "; ".join(parts)


def pymannkendall() -> str:
    """The maintained package's Hamed-Rao test on the series of `hamed_rao_lags` (for the comparison
    in `_hamed_rao_ratio`'s docstring); needs pymannkendall importable, e.g. pip install pymannkendall."""
    try:
        import pymannkendall as pmk
    except ImportError:
        return "not measured: pymannkendall is not installed"
    import warnings
    parts = []
    for label, make in (("white noise", lambda n: np.stack([np.random.default_rng(s).normal(size=n)
                                                               for s in range(200)])),
                        ("AR(1) phi 0.9", lambda n: ar1(range(200), n, 0.9))):
        for n in (200, 500):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")   # the square root of its negative variances
                results = [pmk.hamed_rao_modification_test(y) for y in make(n)]
            hits = sum(bool(r.h) for r in results)
            nan = sum(not math.isfinite(r.z) for r in results)
            parts.append(f"{label} n {n}: {hits / 200:.3f} (z NaN in {nan})")
    return f"pymannkendall {pmk.__version__} hamed_rao_modification_test, 200 seeds, alpha 0.05: " + "; ".join(parts)


def sen_coverage() -> str:
    covered = 0
    for s in range(400):
        y = 0.02 * np.arange(150) + np.random.default_rng(100 + s).normal(size=150)
        lo, hi = stats.mann_kendall(y).slope_ci
        covered += lo <= 0.02 <= hi
    return f"95 % Sen interval, slope 0.02 + white noise n 150: covered {rate(covered, 400)}"


def _naive_below(y: np.ndarray, baseline: float) -> bool:
    """The i.i.d. t-interval's verdict, the comparison the batch means are measured against."""
    from scipy.special import stdtrit
    half = float(stdtrit(len(y) - 1, 0.975)) * y.std(ddof=1) / math.sqrt(len(y))
    return y.mean() + half < baseline


def batch_means() -> str:
    series = 0.693 + 0.02 * ar1(range(100), 400, 0.95)
    below = sum(stats.mean_below(y, 0.693).below for y in series)
    naive = sum(_naive_below(y, 0.693) for y in series)
    parts = [f"AR(1) phi 0.95 n 400 at the baseline, 100 seeds: batch means 'below' {rate(below, 100)}, "
             f"i.i.d. t-interval {rate(naive, 100)}"]
    for n in (200, 400, 1000):   # the docstring of mean_below: 300 seeds, nominal one-sided 2.5 %
        ys = 0.693 + 0.02 * ar1(range(300), n, 0.95)
        parts.append(f"n {n}, 300 seeds: {sum(stats.mean_below(y, 0.693).below for y in ys) / 300:.3f}")
    return "; ".join(parts)


def steps_to_resolve() -> str:
    parts = []
    for sigma in (0.5, 1.0, 2.0):
        cases = []
        for s in range(40):
            y = -0.004 * np.arange(20000) + sigma * np.random.default_rng(s).normal(size=20000)
            t = stats.mann_kendall(y[:100])
            if t.trend == "no trend":
                m = stats.steps_to_resolve(t, 100)
                if m is not None:
                    cases.append((y, m))
        resolved = sum(stats.mann_kendall(y[:100 + m]).trend == "decreasing" for y, m in cases)
        parts.append(f"sigma {sigma}: {rate(resolved, len(cases))} resolved after the estimate "
                     f"(median estimate {np.median([m for _, m in cases]):.0f} more points)")
    return "slope -0.004 per point, 100 points, 40 seeds: " + "; ".join(parts)


STEPS = np.arange(10, 3001, 10.0)


def projection_coverage() -> str:
    at = 3 * STEPS[-1]
    cases = {"power": (lambda s: 0.5 + 3.0 * s ** -0.5),
             "exp": (lambda s: 0.3 + 2.0 * np.exp(-s / 600)),
             "flat": (lambda s: 0.69 + 0.0 * s)}
    parts = []
    for name, curve in cases.items():
        covered, picked = 0, 0
        truth = float(curve(np.array([at]))[0])
        for s in range(40):
            y = curve(STEPS) + (0.02 if name == "flat" else 0.01) * np.random.default_rng(s).normal(size=STEPS.size)
            p = stats.project(STEPS, y, at, seed=s)
            covered += p.interval[0] <= truth <= p.interval[1]
            picked += max(p.families, key=lambda k: p.families[k].weight) == name
        parts.append(f"{name} {rate(covered, 40)}" + ("" if name == "flat" else f" (own family picked {picked}/40)"))
    return "90 % projection interval at 3x the last step covered the truth: " + "; ".join(parts)


def change_point() -> str:
    hits = sum(stats.change_point(np.random.default_rng(s).normal(size=200)).significant for s in range(50))
    return f"white noise n 200: {rate(hits, 50)} significant"


FIGURES = {"mk_white_noise": mk_white_noise, "mk_ar1": mk_ar1, "hamed_rao_lags": hamed_rao_lags,
           "pymannkendall": pymannkendall,
           "sen_coverage": sen_coverage, "batch_means": batch_means, "steps_to_resolve": steps_to_resolve,
           "projection_coverage": projection_coverage, "change_point": change_point}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="+", choices=sorted(FIGURES), help="measure only these figures")
    args = ap.parse_args()
    import scipy
    print(f"# trainlab.health.stats Monte Carlo | numpy {np.__version__} | scipy {scipy.__version__} | "
          f"python {sys.version.split()[0]}")
    for name in args.only or [f for f in FIGURES if f != "pymannkendall"]:
        t0 = time.perf_counter()
        text = FIGURES[name]()
        print(f"{name}: {text} [{time.perf_counter() - t0:.1f} s]", flush=True)


if __name__ == "__main__":
    main()
