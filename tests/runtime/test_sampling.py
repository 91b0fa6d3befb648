"""The nucleus cutoff's two paths (top candidates, bisection) against a numpy sort."""

from __future__ import annotations

import numpy as np
import pytest

from jtrust.runtime.generate import _nucleus_cutoff


def numpy_cutoff(logits: np.ndarray, top_p: float) -> np.ndarray:
    """Smallest kept logit per row: keep a token if the mass ranked before it is < top_p."""
    out = []
    for row in logits.astype(np.float64):
        desc = np.sort(row)[::-1]
        p = np.exp(desc - desc.max())
        p /= p.sum()
        before = np.cumsum(p) - p
        out.append(desc[before < top_p].min())
    return np.array(out)[:, None]


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked distributions
@pytest.mark.parametrize("top_p", [0.3, 0.9])
@pytest.mark.parametrize("candidates", [4, 1000])  # 4 forces bisection, 1000 always fits
def test_nucleus_cutoff_matches_sort(scale, top_p, candidates):
    logits = (np.random.RandomState(0).randn(5, 1000) * scale).astype(np.float32)
    got = np.asarray(_nucleus_cutoff(logits, top_p, candidates))
    want = numpy_cutoff(logits, top_p)
    # the kept sets must be identical; a cutoff value only matters through them
    np.testing.assert_array_equal(logits >= got, logits >= want.astype(np.float32))
