"""EK-FAC preconditioning: the reference against float64 numpy closed forms, the Pallas
kernel (interpret mode) against the reference, and the CPU dispatch of precondition_auto."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrust.kernels import ekfac
from jtrust.kernels.ekfac import precondition, precondition_auto, precondition_reference


def _spd(rng, d):
    """A random well-conditioned SPD covariance, as K-FAC's A or S would be."""
    x = rng.randn(4 * d, d)
    return x.T @ x / (4 * d) + 0.5 * np.eye(d)


def _problem(n, d_in, d_out, seed=0, kfac=False):
    """grads, A, S (float64), their eigenvectors, and eigenvalues: K-FAC's a_i s_j, or
    EK-FAC-like arbitrary positive values in the same basis."""
    rng = np.random.RandomState(seed)
    a_cov, s_cov = _spd(rng, d_in), _spd(rng, d_out)
    a_eig, q_in = np.linalg.eigh(a_cov)
    s_eig, q_out = np.linalg.eigh(s_cov)
    lam = np.outer(a_eig, s_eig) if kfac else rng.uniform(0.2, 3.0, size=(d_in, d_out))
    grads = rng.randn(n, d_in, d_out)
    return grads, a_cov, s_cov, q_in, q_out, lam


def _f32(*xs):
    return [x.astype(np.float32) for x in xs]


def _vec(x):
    return x.reshape(-1, order="F")  # column-stacking vec, for which vec(A G B) = (B^T (x) A) vec(G)


def test_reference_matches_kronecker_oracle():
    """Arbitrary (EK-FAC) eigenvalues: P = (Q_out (x) Q_in) diag(1 / vec(lambda + damping)) (...)^T."""
    grads, _, _, q_in, q_out, lam = _problem(3, 6, 5, seed=1)
    damping = 0.1
    q = np.kron(q_out, q_in)  # [30, 30], eigenvectors of S (x) A in vec order
    p = q @ np.diag(1.0 / _vec(lam + damping)) @ q.T
    want = np.stack([(p @ _vec(gr)).reshape(6, 5, order="F") for gr in grads])
    got = np.asarray(precondition_reference(*_f32(grads, q_in, q_out, lam), damping))
    assert got.shape == (3, 6, 5) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_kfac_eigenvalues_undamped_is_a_inv_g_s_inv():
    """With lambda_ij = a_i s_j and no damping, P(G) = (S (x) A)^{-1} G = A^{-1} G S^{-1}."""
    grads, a_cov, s_cov, q_in, q_out, lam = _problem(4, 6, 5, seed=2, kfac=True)
    want = np.stack([np.linalg.solve(a_cov, np.linalg.solve(s_cov, gr.T).T) for gr in grads])
    got = np.asarray(precondition_reference(*_f32(grads, q_in, q_out, lam), 0.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_reference_kfac_eigenvalues_damped_is_damped_kronecker_solve():
    """With lambda_ij = a_i s_j, P(vec G) = (S (x) A + damping I)^{-1} vec G, solved directly."""
    grads, a_cov, s_cov, q_in, q_out, lam = _problem(2, 6, 5, seed=3, kfac=True)
    damping = 0.3
    fisher = np.kron(s_cov, a_cov) + damping * np.eye(30)
    want = np.stack([np.linalg.solve(fisher, _vec(gr)).reshape(6, 5, order="F") for gr in grads])
    got = np.asarray(precondition_reference(*_f32(grads, q_in, q_out, lam), damping))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n,d_in,d_out,block_n", [(3, 20, 12, 8), (9, 64, 48, 4), (2, 576, 8, 8)])
def test_pallas_matches_reference(n, d_in, d_out, block_n):
    # (3, 20, 12): n below the block, features padded to 128. (9, 64, 48) with block_n=4:
    # three grid steps, the last one part padding. d_in=576: not a multiple of 128 (pads to 640).
    grads, _, _, q_in, q_out, lam = _problem(n, d_in, d_out, seed=4)
    args = _f32(grads, q_in, q_out, lam)
    want = np.asarray(precondition_reference(*args, 0.05))
    got = np.asarray(precondition(*args, 0.05, block_n=block_n, interpret=True))
    assert got.shape == (n, d_in, d_out)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * np.abs(want).max())


def test_traced_damping_under_jit():
    """damping may be a traced array: both functions jitted with damping as an argument."""
    grads, _, _, q_in, q_out, lam = _problem(5, 7, 3, seed=5)
    args = _f32(grads, q_in, q_out, lam)
    damping = jnp.float32(0.2)
    ref = jax.jit(precondition_reference)(*args, damping)
    pal = jax.jit(lambda *xs: precondition(*xs, block_n=2, interpret=True))(*args, damping)
    np.testing.assert_allclose(np.asarray(ref), np.asarray(precondition_reference(*args, 0.2)), rtol=1e-5,
                               atol=1e-6 * np.abs(np.asarray(ref)).max())  # jit fuses: float32 rounding
    np.testing.assert_allclose(np.asarray(pal), np.asarray(ref), rtol=1e-5,
                               atol=1e-5 * np.abs(np.asarray(ref)).max())


def test_auto_runs_the_reference_on_cpu(monkeypatch):
    assert jax.default_backend() == "cpu"
    grads, _, _, q_in, q_out, lam = _problem(3, 6, 5, seed=6)
    args = _f32(grads, q_in, q_out, lam)
    want = np.asarray(precondition_reference(*args, 0.1))

    def no_kernel(*_, **__):
        raise AssertionError("the Pallas kernel must not run on CPU")

    monkeypatch.setattr(ekfac, "precondition", no_kernel)
    np.testing.assert_array_equal(np.asarray(precondition_auto(*args, 0.1)), want)


def test_auto_runs_the_kernel_on_tpu(monkeypatch):
    calls = []
    monkeypatch.setattr(jax, "default_backend", lambda: "tpu")
    monkeypatch.setattr(ekfac, "precondition", lambda *xs: calls.append(len(xs)) or "kernel")
    assert precondition_auto(None, None, None, None, 0.1) == "kernel" and calls == [5]


def test_mismatched_shapes_are_refused():
    grads, _, _, q_in, q_out, lam = _f32(*_problem(2, 6, 5))
    with pytest.raises(AssertionError):
        precondition_reference(grads, q_in, q_out, lam.T, 0.1)
    with pytest.raises(AssertionError):
        precondition(grads, q_in[:5, :5], q_out, lam, 0.1, interpret=True)
