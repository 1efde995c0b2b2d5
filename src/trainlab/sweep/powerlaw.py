"""Fit L(N) = E + A * N^-alpha to final losses against parameter counts, with an interval on alpha.

Method: for a fixed alpha the model is linear in (E, A), so (E, A) come from least squares and only
alpha is searched -- the variable-projection approach, robust where a joint nonlinear solver wanders
off with 3 to 6 points.  A dense log grid of alpha finds the basin (the profile can have more than
one with a few points) and the set of alphas inside the interval; scipy.optimize.minimize_scalar
(bounded Brent) refines the best grid bracket and scipy.optimize.brentq the interval's ends.
Constraints: A > 0 (loss falls with size) and E >= `floor` (0 for cross-entropy); a fit that needs
A <= 0 is reported as "loss does not fall with size", not forced.

Interval: the profile-likelihood interval of alpha at level 1 - `alpha_level` -- the alphas whose
best residual sum of squares stays below RSS_min * (1 + t^2 / dof), t the Student quantile with
dof = n - 3; each end is the root of RSS(alpha) = that limit between the last grid alpha inside and
the first outside.  With 3 points no degree of freedom is left (the curve passes through them
unless E sits at its bound): no interval exists and the fit says so instead of inventing one.  The
interval of E is the range of E over that alpha interval.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from trainlab.health.stats import t_quantile

ALPHA_GRID = np.geomspace(1e-3, 4.0, 800)


@dataclass
class PowerLawFit:
    n_points: int
    E: float | None
    A: float | None
    alpha: float | None
    rss: float | None
    dof: int
    alpha_interval: tuple[float, float] | None  # None: not determined (dof 0) or unbounded on the grid
    E_interval: tuple[float, float] | None
    level: float
    note: str  # why a number is missing, in words

    def predict(self, n: np.ndarray | float) -> np.ndarray:
        return self.E + self.A * np.asarray(n, dtype=float) ** -self.alpha

    def describe(self) -> str:
        if self.alpha is None:
            return self.note
        text = f"L = {self.E:.4g} + {self.A:.4g} x N^-{self.alpha:.3g} ({self.n_points} points, RSS {self.rss:.3g})"
        if self.alpha_interval is not None:
            lo, hi = self.alpha_interval
            text += f"; alpha in [{lo:.3g}, {hi:.3g}] and E in [{self.E_interval[0]:.4g}, {self.E_interval[1]:.4g}] " \
                    f"at {self.level:.0%} (profile likelihood, {self.dof} degree{'s' if self.dof != 1 else ''} of freedom)"
        if self.note:
            text += f"; {self.note}"
        return text


def _solve(x: np.ndarray, y: np.ndarray, alpha: float, floor: float) -> tuple[float, float, float]:
    """Least-squares (E, A, rss) for fixed alpha with E >= floor; A unconstrained here."""
    basis = x ** -alpha
    design = np.stack([np.ones_like(basis), basis], axis=1)
    (E, A), *_ = np.linalg.lstsq(design, y, rcond=None)
    if E < floor:  # the constrained optimum sits on the bound: E = floor, A by least squares
        E = floor
        A = float(np.dot(basis, y - E) / np.dot(basis, basis))
    resid = y - E - A * basis
    return float(E), float(A), float(np.dot(resid, resid))


def fit_power_law(params: list[float], losses: list[float], floor: float = 0.0,
                  alpha_level: float = 0.05) -> PowerLawFit:
    x = np.asarray(params, dtype=float)
    y = np.asarray(losses, dtype=float)
    n = len(x)
    level = 1.0 - alpha_level
    empty = dict(E=None, A=None, alpha=None, rss=None, alpha_interval=None, E_interval=None, level=level)
    if n < 3 or len(set(x.tolist())) < 3:
        return PowerLawFit(n, dof=max(n - 3, 0), note=f"not fitted: needs 3 or more distinct sizes, has "
                                                      f"{len(set(x.tolist()))}", **empty)
    if not np.all(np.isfinite(y)):
        return PowerLawFit(n, dof=n - 3, note="not fitted: a final loss is not finite", **empty)
    from scipy.optimize import brentq, minimize_scalar

    x = x / x.min()  # scaled sizes keep N^-alpha in range; A is rescaled back below
    scale = float(np.asarray(params, dtype=float).min())
    solutions = [(a, *_solve(x, y, a, floor)) for a in ALPHA_GRID]
    valid = [s for s in solutions if s[2] > 0]
    if not valid:
        return PowerLawFit(n, dof=n - 3, note="no fit with A > 0: the final loss does not fall with size", **empty)
    best = min(valid, key=lambda s: s[3])
    i = int(np.searchsorted(ALPHA_GRID, best[0]))
    lo, hi = ALPHA_GRID[max(i - 1, 0)], ALPHA_GRID[min(i + 1, len(ALPHA_GRID) - 1)]
    found = minimize_scalar(lambda a: _solve(x, y, a, floor)[2], bounds=(lo, hi), method="bounded",
                            options={"xatol": 1e-10 * hi})
    alpha = float(found.x)
    E, A, rss = _solve(x, y, alpha, floor)
    if not (found.success and A > 0 and rss <= best[3]):  # the grid's best stands when Brent did not better it
        alpha, E, A, rss = best
    dof = n - 3
    interval = e_interval = None
    note = ""
    if dof == 0:
        note = ("3 sizes for 3 parameters: no degree of freedom is left for an interval (add sizes for one)"
                + ("" if E > floor else f"; E sits at its bound {floor:g}, so the fit is not exact"))
    else:
        t = t_quantile(1 - alpha_level / 2, dof)
        limit = rss * (1 + t * t / dof) + 1e-15 * max(float(np.dot(y, y)), 1.0)
        inside = [s for s in valid if s[3] <= limit] + [(alpha, E, A, rss)]
        excess = lambda a: _solve(x, y, a, floor)[2] - limit
        low, high = min(s[0] for s in inside), max(s[0] for s in inside)
        next_out = (int(np.searchsorted(ALPHA_GRID, low)) - 1, int(np.searchsorted(ALPHA_GRID, high, side="right")))
        ends = []
        for end, j in zip((low, high), next_out):
            # the end lies between the outermost alpha inside and the next grid alpha out, where the
            # profile RSS crosses the limit; on the grid's edge, or next to an alpha with A <= 0, it stays
            if 0 <= j < len(ALPHA_GRID) and solutions[j][2] > 0 and solutions[j][3] > limit:
                end = brentq(excess, *sorted((end, float(ALPHA_GRID[j]))), xtol=1e-12)
                inside.append((end, *_solve(x, y, end, floor)))
            ends.append(float(end))
        interval = (ends[0], ends[1])
        e_interval = (min(s[1] for s in inside), max(s[1] for s in inside))
        if interval[0] <= ALPHA_GRID[0] or interval[1] >= ALPHA_GRID[-1]:
            note = (f"the interval reaches the searched range [{ALPHA_GRID[0]:g}, {ALPHA_GRID[-1]:g}] of alpha: "
                    "alpha is poorly determined by these sizes")
    return PowerLawFit(n, E, A * scale ** alpha, alpha, rss, dof, interval, e_interval, level, note)
