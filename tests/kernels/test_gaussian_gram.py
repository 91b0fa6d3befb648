"""The Pallas Gaussian Gram kernel (interpret mode) against its reference, and the reference against scipy."""

from __future__ import annotations

import ast
import functools
import pathlib

import chex
import numpy as np
import pytest
from scipy.spatial.distance import cdist

from jtrust.kernels.gaussian_gram import gaussian_gram, gaussian_gram_reference

SHAPES = [(7, 5, 3), (130, 257, 64), (256, 128, 576)]


def _scales(d):
    """TracingLLM's scale 1 / (2 sigma^2 d) at sigma = 50, and a sharp one (sigma = 1) where K varies a lot."""
    return [1.0 / (2 * 50.0**2 * d), 1.0 / (2 * 1.0**2 * d)]


def _data(n, m, d, seed=0):
    rng = np.random.RandomState(seed)
    return rng.randn(n, d).astype(np.float32), rng.randn(m, d).astype(np.float32)


@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("which", [0, 1])
def test_pallas_matches_reference(n, m, d, which):
    x, y = _data(n, m, d)
    scale = _scales(d)[which]
    got = np.asarray(gaussian_gram(x, y, scale, interpret=True))
    want = np.asarray(gaussian_gram_reference(x, y, scale))
    assert got.shape == (n, m)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=0)


@pytest.mark.parametrize("n,m,d", SHAPES)
@pytest.mark.parametrize("which", [0, 1])
def test_reference_matches_scipy(n, m, d, which):
    x, y = _data(n, m, d, seed=1)
    scale = _scales(d)[which]
    got = np.asarray(gaussian_gram_reference(x, y, scale))
    want = np.exp(-cdist(x.astype(np.float64), y.astype(np.float64), "sqeuclidean") * scale)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)


def test_pallas_small_blocks_and_self_gram():
    # Many tiles plus x == y (zero diagonal distance, where the clamp at 0 matters).
    x, _ = _data(20, 1, 8, seed=2)
    got = np.asarray(gaussian_gram(x, x, 0.1, block_n=8, block_m=16, interpret=True))
    np.testing.assert_allclose(got, np.asarray(gaussian_gram_reference(x, x, 0.1)), rtol=1e-5, atol=0)
    np.testing.assert_allclose(np.diag(got), 1.0, atol=1e-5)


class ReferenceJitted(chex.TestCase):
    """The reference is the kernels' spec: the same values traced under jit and run eagerly."""

    @chex.variants(with_jit=True, without_jit=True)
    def test_reference_jit_and_eager(self):
        x, y = _data(9, 6, 4, seed=3)
        got = self.variant(functools.partial(gaussian_gram_reference, scale=0.2))(x, y)
        chex.assert_shape(got, (9, 6))
        want = np.exp(-cdist(x.astype(np.float64), y.astype(np.float64), "sqeuclidean") * 0.2)
        chex.assert_trees_all_close(np.asarray(got), want, atol=1e-6)


def test_mismatched_feature_dims_are_refused():
    x, y = _data(4, 4, 3)
    with pytest.raises(AssertionError):
        gaussian_gram_reference(x, y[:, :2], 0.1)


def test_kernels_import_only_jax_and_jtrust_core():
    """import-linter cannot see kernels/ (installed as jtrust.kernels from the repository's top
    level), so the layer rule for kernels is checked here: no import of jtrust above core."""
    import jtrust.kernels
    folder = pathlib.Path(jtrust.kernels.__file__).parent
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([a.name for a in node.names] if isinstance(node, ast.Import)
                     else [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert not name.startswith("jtrust") or name.startswith(("jtrust.core", "jtrust.kernels")), \
                    f"{path.name} imports {name}"
