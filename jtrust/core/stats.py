"""Small exact statistics every layer reports with (numpy/scipy on host)."""

from __future__ import annotations

import numpy as np
from scipy import stats


def clopper_pearson(k, n: int, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Two-sided exact binomial interval for k successes of n trials (k a number or an array;
    the bounds have k's shape)."""
    k = np.asarray(k)
    a = (1 - confidence) / 2
    low = np.where(k == 0, 0.0, stats.beta.ppf(a, np.maximum(k, 1), n - k + 1))
    high = np.where(k == n, 1.0, stats.beta.ppf(1 - a, k + 1, np.maximum(n - k, 1)))
    return low, high
