"""Feature preprocessing shared by the analyses."""

from __future__ import annotations

import numpy as np


def standardize(z: np.ndarray) -> np.ndarray:
    """Zero mean, unit variance per feature over the samples axis (-2); constant features stay 0.

    z [..., n, d] -> float32 [..., n, d]
    """
    z = np.asarray(z, np.float32)
    std = z.std(-2, keepdims=True)
    return (z - z.mean(-2, keepdims=True)) / np.where(std > 0, std, 1)
