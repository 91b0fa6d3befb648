"""jtrust.analysis.bounds against scipy, the paper's figures, a linear-programming oracle for the
standard-deviation bound, and coverage: over many simulated samples from known distributions
each bound holds at least 1 - alpha of the time."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import optimize, stats

from jtrust.analysis import bounds as B
from jtrust.core.stats import clopper_pearson


def test_reference_figures():
    assert B.leak_upper(0, 128, 0.01) == pytest.approx(0.0353, abs=5e-5)
    assert B.leak_upper(0, 128, 0.01) == pytest.approx(1 - 0.01 ** (1 / 128), rel=1e-9)
    assert B.dkw_epsilon(128, 0.01) == pytest.approx(0.134, abs=5e-4)
    assert B.dkw_epsilon(128, 0.01, two_sided=True) == pytest.approx(np.sqrt(np.log(200) / 256))


def test_clopper_pearson_against_scipy_binomtest():
    for k, n in [(0, 10), (3, 10), (10, 10), (57, 128), (1, 500)]:
        low, high = clopper_pearson(k, n, 0.95)
        ci = stats.binomtest(k, n).proportion_ci(0.95, method="exact")
        assert (low, high) == pytest.approx((ci.low, ci.high), abs=1e-10)
        if k in (0, n):  # the closed forms at the ends
            assert (low, high) == pytest.approx((0.0, 1 - 0.025 ** (1 / n)) if k == 0 else (0.025 ** (1 / n), 1.0))
        upper = B.leak_upper(k, n, 0.01)
        assert upper == pytest.approx(stats.binomtest(k, n, alternative="less").proportion_ci(0.99).high
                                      if k < n else 1.0, abs=1e-10)


def test_anderson_closed_form_by_hand():
    z = np.array([0.2, 0.5, 0.5, 0.9])
    eps = B.dkw_epsilon(4, 0.1)  # 0.7587 / ... computed below, not trusted from the code
    eps_hand = np.sqrt(np.log(10) / 8)
    assert eps == pytest.approx(eps_hand)
    # 1 - [ (0.5-0.2) max(1/4-e,0) + 0 + (0.9-0.5) max(3/4-e,0) + (1-0.9) max(1-e,0) ]
    hand = 1 - (0.3 * max(0.25 - eps_hand, 0) + 0.4 * max(0.75 - eps_hand, 0) + 0.1 * (1 - eps_hand))
    assert B.expectation_upper(z, 0.1) == pytest.approx(hand)
    # eps -> 0 (huge n, same empirical distribution) gives the sample mean
    big = np.repeat(z, 10 ** 7 // 4)
    assert B.expectation_upper(big, 0.1) == pytest.approx(z.mean(), abs=2e-3)


def test_tail_and_quantile_bounds_by_hand():
    z = np.linspace(0.01, 1.0, 100)  # F_hat(x) = floor(100 x) / 100
    eps1, eps2 = B.dkw_epsilon(100, 0.05), B.dkw_epsilon(100, 0.05, two_sided=True)
    assert B.tail_upper(z, 0.5, 0.05) == pytest.approx(0.5 + eps1)
    low, high = B.quantile_bounds(z, 0.5, 0.05)
    assert low == pytest.approx(np.ceil(100 * (0.5 - eps2)) / 100)
    assert high == pytest.approx(np.ceil(100 * (0.5 + eps2)) / 100)
    assert B.quantile_bounds(z, 0.95, 0.05)[1] == 1.0  # the band reaches the top of the support


def _std_upper_by_lp(scores, alpha, grid=101):
    """Independent oracle: min over centres a of an LP maximizing E[(X - a)^2] over
    distributions on a grid whose CDF lies in the two-sided DKW band."""
    z = np.sort(scores)
    eps = B.dkw_epsilon(len(z), alpha, two_sided=True)
    xs = np.union1d(np.linspace(0, 1, grid), z)
    F = np.searchsorted(z, xs, side="right") / len(z)
    cum = np.tril(np.ones((len(xs), len(xs))))
    A_ub = np.vstack([cum, -cum])
    b_ub = np.concatenate([np.minimum(F + eps, 1), -np.maximum(F - eps, 0)])
    best = np.inf
    for a in np.linspace(0, 1, grid):
        res = optimize.linprog(-(xs - a) ** 2, A_ub=A_ub, b_ub=b_ub, A_eq=np.ones((1, len(xs))),
                               b_eq=[1.0], bounds=(0, None), method="highs")
        best = min(best, -res.fun)
    return np.sqrt(best)


@pytest.mark.parametrize("seed", [0, 1])
def test_std_upper_against_linear_programming(seed):
    rng = np.random.default_rng(seed)
    scores = np.round(rng.beta(0.6, 2.0, size=40), 3)
    exact = B.std_upper(scores, 0.05)
    assert exact >= scores.std()
    # the LP's optimum for a centre on its grid is exact (the maximizer's mass sits on the
    # samples, 0, 1 and the centre); the grid of centres overshoots the minimum by O(step^2)
    assert _std_upper_by_lp(scores, 0.05) == pytest.approx(exact, abs=1e-3)


def test_bad_scores_are_refused():
    with pytest.raises(ValueError, match="no scores"):
        B.expectation_upper([], 0.05)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        B.std_upper([0.2, 1.5], 0.05)


DISTRIBUTIONS = {  # name -> (sampler(rng, size), the scipy distribution it draws from)
    "beta(0.5,2)": (lambda r, s: r.beta(0.5, 2, s), stats.beta(0.5, 2)),
    "uniform": (lambda r, s: r.uniform(0, 1, s), stats.uniform(0, 1)),
    "beta(5,1)": (lambda r, s: r.beta(5, 1, s), stats.beta(5, 1)),
}


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_coverage(name):
    """Each bound holds in at least 1 - alpha of 2000 simulated sample sets (a binomial test's
    slack of 3 standard errors below 1 - alpha would still flag a broken bound)."""
    sampler, dist = DISTRIBUTIONS[name]
    alpha, n, trials = 0.1, 64, 2000
    rng = np.random.default_rng(7)
    holds = {k: 0 for k in ("mean_upper", "mean_lower", "std_upper", "tail", "median", "band")}
    grid = np.linspace(0, 1, 201)
    for _ in range(trials):
        x = sampler(rng, n)
        holds["mean_upper"] += dist.mean() <= B.expectation_upper(x, alpha)
        holds["mean_lower"] += dist.mean() >= B.expectation_lower(x, alpha)
        holds["std_upper"] += dist.std() <= B.std_upper(x, alpha)
        holds["tail"] += dist.sf(0.5) <= B.tail_upper(x, 0.5, alpha)
        low, high = B.quantile_bounds(x, 0.5, alpha)
        holds["median"] += low <= dist.median() <= high
        band = B.dkw_band(x, alpha)
        j = np.searchsorted(band.x, grid, side="right") - 1
        j = np.minimum(j, len(band.lower) - 1)
        holds["band"] += bool(np.all((band.lower[j] <= dist.cdf(grid) + 1e-12)
                                     & (dist.cdf(grid) <= band.upper[j] + 1e-12)))
    slack = 3 * np.sqrt(alpha * (1 - alpha) / trials)
    rates = {k: v / trials for k, v in holds.items()}
    assert all(r >= 1 - alpha - slack for r in rates.values()), rates


def test_coverage_of_the_leak_bound():
    alpha, n, p, trials = 0.05, 128, 0.02, 5000
    k = np.random.default_rng(3).binomial(n, p, size=trials)
    assert np.mean(p <= B.leak_upper(k, n, alpha)) >= 1 - alpha


def test_summary():
    scores = np.array([0.0] * 120 + [1.0] * 8)
    s = B.summarize(scores, alpha=0.01)
    assert s.n == 128 and s.leak_rate == 8 / 128 and s.mean == pytest.approx(1 / 16)
    assert s.leak_upper == pytest.approx(stats.beta.ppf(0.99, 9, 120))
    assert s.mean_lower <= s.mean <= s.mean_upper and s.std <= s.std_upper
    assert s.ed_score == pytest.approx(s.mean_upper + s.std_upper)
