"""The sampler's parts against numpy: the nucleus (membership and the bisection cutoff), the
two-level inverse CDF, and the rejection sampler's rows that fall back to the cutoff."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from scipy import stats

from jtrust.runtime.generate import _in_nucleus, _inverse_cdf, _nucleus_cutoff, _nucleus_sample


def numpy_nucleus(probs: np.ndarray, top_p: float) -> np.ndarray:
    """[R, V] bool: keep a token if the mass of the tokens more probable than it is < top_p (the
    smallest top set reaching top_p, tied tokens kept together), in float64."""
    p = probs.astype(np.float64)
    return np.stack([[row[row > x].sum() < top_p for x in row] for row in p])


def softmax_rows(scale: float, rows: int = 5, vocab: int = 1000) -> np.ndarray:
    logits = np.random.RandomState(0).randn(rows, vocab) * scale
    return np.asarray(jax.nn.softmax(logits.astype(np.float32), -1))


@pytest.mark.parametrize("scale", [0.5, 3.0, 12.0])  # flat to peaked distributions
@pytest.mark.parametrize("top_p", [0.5, 0.9])
def test_nucleus_matches_numpy(scale, top_p):
    """Random rows, and a row whose boundary is a tie: 0.4, 0.3, 0.3 (all three kept)."""
    ties = np.zeros((1, 1000), np.float32)
    ties[0, :3] = 0.4, 0.3, 0.3
    probs = np.concatenate([softmax_rows(scale), ties])
    want = numpy_nucleus(probs, top_p)
    assert want[-1, :3].all()
    np.testing.assert_array_equal(probs >= np.asarray(_nucleus_cutoff(probs, top_p)), want)
    every_token = np.broadcast_to(np.arange(probs.shape[1]), probs.shape)
    member = np.stack([np.asarray(_in_nucleus(probs, every_token[:, v], top_p)) for v in range(probs.shape[1])], 1)
    np.testing.assert_array_equal(member, want)


def test_inverse_cdf_matches_searchsorted():
    """Blocks of 7 over 50 tokens (the last block padded), zero-mass tokens included."""
    rng = np.random.RandomState(1)
    probs = rng.rand(64, 50).astype(np.float32) * (rng.rand(64, 50) > 0.3)
    u = (1.0 - rng.rand(64)).astype(np.float32)
    got = np.asarray(_inverse_cdf(probs, u, block=7))
    cdf = np.cumsum(probs.astype(np.float64), -1)
    want = [np.searchsorted(c, x * c[-1]) for c, x in zip(cdf, u)]  # first index with cdf >= u * total
    np.testing.assert_array_equal(got, want)
    assert (probs[np.arange(64), got] > 0).all()
    at_one = np.asarray(_inverse_cdf(probs, np.ones(64, np.float32), block=7))  # u = 1: the last positive token
    np.testing.assert_array_equal(at_one, [np.flatnonzero(row).max() for row in probs])


@pytest.mark.parametrize("rounds", [0, 1, 8])  # 0: every row through the cutoff; 1: about half
def test_nucleus_sample_distribution(rounds):
    probs = softmax_rows(1.5, rows=1, vocab=40)[0]
    n = 20000
    keys = jax.random.split(jax.random.key(0), n)
    tokens = np.asarray(_nucleus_sample(np.broadcast_to(probs, (n, probs.size)), keys, 0.6, rounds=rounds))
    kept = numpy_nucleus(probs[None], 0.6)[0]
    assert set(tokens.tolist()) == set(np.flatnonzero(kept).tolist())
    expected = probs[kept].astype(np.float64) / probs[kept].astype(np.float64).sum() * n
    observed = np.bincount(tokens, minlength=probs.size)[kept]
    assert stats.chisquare(observed, expected).pvalue > 1e-3


def test_nucleus_sample_rows_draw_alone():
    """A row's draw depends on its own key only, whether it was accepted or fell back to the cutoff."""
    probs = softmax_rows(1.0, rows=32, vocab=300)
    keys = jax.random.split(jax.random.key(1), 32)
    together = np.asarray(_nucleus_sample(probs, keys, 0.5, rounds=1))
    alone = [int(_nucleus_sample(probs[r:r + 1], keys[r:r + 1], 0.5, rounds=1)[0]) for r in range(32)]
    np.testing.assert_array_equal(together, alone)
