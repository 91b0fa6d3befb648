"""Bounds that hold with probability >= 1 - alpha, from n sampled scores in [0, 1].

The metrics of "A Probabilistic Perspective on Unlearning and Alignment" (Scholten et al.
2025): a model's output is a distribution, so a trust score is reported
as bounds on that distribution's leak probability, CDF, quantiles, mean and spread rather than
as the score of one greedy answer. Everything here is numpy/scipy on host: n is in the hundreds.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
from scipy import optimize, stats

from jtrust.core.errors import InputError


def check_alpha(alpha: float) -> None:
    """A bound holds with probability 1 - alpha: alpha must lie strictly between 0 and 1."""
    if not 0 < alpha < 1:
        raise InputError(f"alpha must be in (0, 1) (each bound holds with probability 1 - alpha), "
                         f"not {alpha}; 0.01 or 0.05 are usual")


def leak_upper(k: np.ndarray, n: int, alpha: float) -> np.ndarray:
    """One-sided Clopper-Pearson upper bound on a leak probability: k of n samples leaked.
    BetaInv(1 - alpha; k + 1, n - k); at k = 0 this is 1 - alpha^(1/n)."""
    check_alpha(alpha)
    k = np.asarray(k)
    return np.where(k == n, 1.0, stats.beta.ppf(1 - alpha, k + 1, np.maximum(n - k, 1)))


def dkw_epsilon(n: int, alpha: float, two_sided: bool = False) -> float:
    """Half-width of the Dvoretzky-Kiefer-Wolfowitz band (Massart's constant)."""
    if n < 1:
        raise InputError("need at least one sample")
    check_alpha(alpha)
    return float(np.sqrt(np.log((2 if two_sided else 1) / alpha) / (2 * n)))


class Band(NamedTuple):
    """The CDF band F_hat +- eps as step functions: on [x[j], x[j+1]) the CDF lies in
    [lower[j], upper[j]]; x [m + 1] starts at 0 and ends at 1, lower/upper [m]."""
    x: np.ndarray
    lower: np.ndarray
    upper: np.ndarray
    eps: float


def _sorted_scores(scores) -> np.ndarray:
    z = np.sort(np.asarray(scores, np.float64).ravel())
    if z.size == 0:
        raise InputError("no scores: draw at least one sample")
    if z[0] < 0 or z[-1] > 1 or np.isnan(z).any():
        raise InputError(f"scores must lie in [0, 1], got range [{z[0]}, {z[-1]}]; rescale the scorer")
    return z


def dkw_band(scores, alpha: float, two_sided: bool = True) -> Band:
    """The band on the score CDF that holds everywhere with probability >= 1 - alpha.
    One-sided bands (two_sided=False) give each side its own 1 - alpha guarantee."""
    z = _sorted_scores(scores)
    n = len(z)
    eps = dkw_epsilon(n, alpha, two_sided)
    x = np.unique(np.concatenate([[0.0], z, [1.0]]))
    F = np.searchsorted(z, x[:-1], side="right") / n  # F_hat on [x[j], x[j+1])
    return Band(x, np.clip(F - eps, 0, 1), np.clip(F + eps, 0, 1), eps)


def tail_upper(scores, threshold: float, alpha: float) -> float:
    """P(X > threshold) <= 1 - F_hat(threshold) + eps (one-sided DKW)."""
    z = _sorted_scores(scores)
    eps = dkw_epsilon(len(z), alpha)
    return float(min(1.0, 1 - np.searchsorted(z, threshold, side="right") / len(z) + eps))


def quantile_bounds(scores, q: float, alpha: float) -> tuple[float, float]:
    """(lower, upper) bounds on the q-quantile inf{x: F(x) >= q} from the two-sided DKW band:
    the band's own quantiles, 0 / 1 where the band reaches the edge of the support."""
    z = _sorted_scores(scores)
    n, eps = len(z), dkw_epsilon(len(z), alpha, two_sided=True)
    low = 0.0 if q - eps <= 0 else z[int(np.ceil(n * (q - eps) - 1e-12)) - 1]
    high = 1.0 if q + eps > 1 else z[int(np.ceil(n * (q + eps) - 1e-12)) - 1]
    return float(low), float(high)


def expectation_upper(scores, alpha: float) -> float:
    """Anderson's bound: with sorted z_(1..n) and z_(n+1) = 1,
    E[X] <= 1 - sum_i (z_(i+1) - z_(i)) max(i/n - eps, 0), eps one-sided."""
    z = _sorted_scores(scores)
    n = len(z)
    eps = dkw_epsilon(n, alpha)
    gaps = np.diff(np.append(z, 1.0))
    return float(1 - np.sum(gaps * np.maximum(np.arange(1, n + 1) / n - eps, 0)))


def expectation_lower(scores, alpha: float) -> float:
    """Anderson's lower bound, the upper bound of 1 - X turned around."""
    return 1 - expectation_upper(1 - np.asarray(scores, np.float64), alpha)


def _second_moment_about(a: float, band: Band) -> float:
    """max over CDFs G in the band of E_G[(X - a)^2], with E[g(X)] = g(1) - int_0^1 g'(x) G(x) dx
    for g = (x - a)^2. Mass goes away from a: G = min(U, c) below a and max(L, c) from a on,
    for the level c = G(a) in [L(a-), U(a)] that is best; the objective is piecewise linear
    and concave in c, so its maximum sits at one of the band's values."""
    x0, x1 = band.x[:-1], band.x[1:]
    # each piece split at a into its part below a and its part above
    s0, s1 = np.minimum(x0, a), np.minimum(x1, a)
    t0, t1 = np.maximum(x0, a), np.maximum(x1, a)
    w_below = (s1 - a) ** 2 - (s0 - a) ** 2   # int of g' over the part below a (<= 0)
    w_above = (t1 - a) ** 2 - (t0 - a) ** 2   # and above a (>= 0)
    c_min = band.lower[s1 > s0].max(initial=0.0)
    c_max = band.upper[t1 > t0].min(initial=1.0)
    c = np.clip(np.concatenate([band.lower, band.upper, [c_min, c_max]]), c_min, c_max)[:, None]
    below = np.sum(np.minimum(band.upper, c) * w_below, axis=1)
    above = np.sum(np.maximum(band.lower, c) * w_above, axis=1)
    return float(np.max((1 - a) ** 2 - below - above))


def std_upper(scores, alpha: float) -> float:
    """Upper bound on the standard deviation: the largest variance of a distribution on [0, 1]
    whose CDF lies in the two-sided DKW band. Var = min_a E[(X - a)^2]; the objective is linear
    in the CDF and convex in a, so max_G min_a = min_a max_G (Sion's minimax theorem): the inner
    maximum is exact for each a, the outer minimum a bounded scalar search."""
    band = dkw_band(scores, alpha, two_sided=True)
    best = optimize.minimize_scalar(lambda a: _second_moment_about(a, band), bounds=(0.0, 1.0),
                                    method="bounded", options={"xatol": 1e-9})
    return float(np.sqrt(max(best.fun, 0.0)))


def ed_score(scores, alpha: float, lam: float = 1.0) -> float:
    """Expectation-deviation score: the expectation bound plus lam times the std bound. Both
    bounds hold at 1 - alpha, so the pair holds at 1 - 2 alpha (union bound)."""
    return expectation_upper(scores, alpha) + lam * std_upper(scores, alpha)


class Summary(NamedTuple):
    """Every bound for one prompt's n scores (alpha per bound)."""
    n: int
    mean: float
    mean_upper: float
    mean_lower: float
    std: float
    std_upper: float
    ed_score: float
    leak_rate: float
    leak_upper: float
    median_bounds: tuple[float, float]


def summarize(scores, alpha: float, leak_threshold: float = 1.0, lam: float = 1.0) -> Summary:
    """The bounds of one sample set; a sample "leaks" when its score >= leak_threshold."""
    z = _sorted_scores(scores)
    k = int(np.sum(z >= leak_threshold))
    return Summary(len(z), float(z.mean()), expectation_upper(z, alpha), expectation_lower(z, alpha),
                   float(z.std()), std_upper(z, alpha), ed_score(z, alpha, lam), k / len(z),
                   float(leak_upper(k, len(z), alpha)), quantile_bounds(z, 0.5, alpha))
