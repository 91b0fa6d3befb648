"""Ghost inner products: the reference against explicit per-example gradients (float64 numpy),
the Pallas kernel (interpret mode) against the reference, and the CPU dispatch of ghost_dot_auto."""

from __future__ import annotations

import jax
import numpy as np
import pytest

from jtrust.kernels import ghost
from jtrust.kernels.ghost import ghost_dot, ghost_dot_auto, ghost_dot_reference


def _data(n, m, t, s, d_in, d_out, seed=0):
    rng = np.random.RandomState(seed)
    return [rng.randn(*shape).astype(np.float32)
            for shape in ((n, t, d_in), (n, t, d_out), (m, s, d_in), (m, s, d_out))]


def _explicit(a, g, a2, g2):
    """The definition: form every per-example gradient a_i^T g_i in float64, then Frobenius dots."""
    a, g, a2, g2 = (x.astype(np.float64) for x in (a, g, a2, g2))
    grads = np.einsum("ntd,nte->nde", a, g)
    grads2 = np.einsum("msd,mse->mde", a2, g2)
    return np.einsum("nde,mde->nm", grads, grads2)


@pytest.mark.parametrize("n,m,t,s,d_in,d_out", [(5, 3, 7, 4, 10, 6), (4, 6, 1, 9, 3, 8)])
def test_reference_matches_explicit_gradients(n, m, t, s, d_in, d_out):
    data = _data(n, m, t, s, d_in, d_out, seed=1)
    got = np.asarray(ghost_dot_reference(*data))
    want = _explicit(*data)
    assert got.shape == (n, m) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_reference_self_products_are_squared_norms():
    a, g, _, _ = _data(4, 1, 5, 1, 6, 3, seed=2)
    got = np.asarray(ghost_dot_reference(a, g, a, g))
    norms = np.sum(np.einsum("ntd,nte->nde", a.astype(np.float64), g.astype(np.float64)) ** 2,
                   axis=(1, 2))
    np.testing.assert_allclose(np.diag(got), norms, rtol=1e-5)
    np.testing.assert_allclose(got, got.T, rtol=1e-5, atol=1e-5 * np.abs(got).max())


@pytest.mark.parametrize("n,m,t,s,d_in,d_out,block_n,block_m", [
    (5, 3, 7, 4, 10, 6, 8, 128),   # one tile, every axis padded
    (17, 9, 16, 5, 24, 40, 8, 8),  # 3 x 2 tiles, the last ones part padding
])
def test_pallas_matches_reference(n, m, t, s, d_in, d_out, block_n, block_m):
    data = _data(n, m, t, s, d_in, d_out, seed=3)
    want = np.asarray(ghost_dot_reference(*data))
    got = np.asarray(ghost_dot(*data, block_n=block_n, block_m=block_m, interpret=True))
    assert got.shape == (n, m)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_pallas_under_jit():
    data = _data(3, 2, 3, 2, 4, 5, seed=4)
    got = jax.jit(lambda *xs: ghost_dot(*xs, interpret=True))(*data)
    want = _explicit(*data)
    np.testing.assert_allclose(np.asarray(got), want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    data = _data(5, 3, 7, 4, 10, 6, seed=5)
    want = np.asarray(ghost_dot_reference(*data))

    def no_kernel(*_, **__):
        raise AssertionError("the Pallas kernel must not run on CPU")

    monkeypatch.setattr(ghost, "ghost_dot", no_kernel)
    np.testing.assert_array_equal(np.asarray(ghost_dot_auto(*data)), want)


def test_auto_runs_the_kernel_on_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    monkeypatch.setattr(ghost, "ghost_dot", lambda *xs: calls.append(len(xs)) or "kernel")
    assert ghost_dot_auto(None, None, None, None) == "kernel" and calls == [4]


def test_mismatched_shapes_are_refused():
    a, g, a2, g2 = _data(2, 2, 3, 4, 5, 6)
    with pytest.raises(AssertionError):
        ghost_dot_reference(a, g, a2[:, :, :4], g2)  # d_in differs
    with pytest.raises(AssertionError):
        ghost_dot(a, g[:, :2], a2, g2, interpret=True)  # a and g disagree on T
