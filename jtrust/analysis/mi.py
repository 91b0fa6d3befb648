"""Mutual-information probing with kernel dependence measures (TracingLLM, arXiv 2402.19465).

normalized HSIC (NOCCO), the released code's estimator and the default:
  K_ij = exp(-|z_i - z_j|^2 / (2 sigma^2 d))      d = feature dimension (1 for labels)
  Kc = K H, H = I - 11^T / n                       (right-centring only, as released)
  R = Kc (Kc + eps n I)^-1
  nHSIC(A, B) = trace(R_A R_B)
biased HSIC, the paper's text:
  HSIC(A, B) = (n - 1)^-2 trace(K_A H K_B H),      K_ij = exp(-|z_i - z_j|^2 / (2 sigma^2))

How nHSIC is computed: with G = H K H (symmetric, positive semi-definite) and lam = eps n,
trace(R_A R_B) = trace(F_A F_B) for the symmetric F = G (G + lam I)^-1 = I - lam (G + lam I)^-1.
(In an orthonormal basis [U, 1/sqrt(n)], Kc + lam I is block lower triangular with the block
U^T K U + lam I, so R is block lower triangular with diagonal blocks (F restricted to U, 0).)
So each operator is one inverse of a symmetric positive definite matrix, done by recursive
2 x 2 blocking (4/3 n^3 flops, almost all in matrix products; `spd_inverse`) instead of an LU
solve with n right-hand sides (8/3 n^3, mostly triangular solves). G is built as H (K - 11^T) H with
K - 1 = expm1(-|z_i - z_j|^2 / (2 sigma^2 d)): K's entries are all close to 1 at sigma = 50,
so centring K itself in float32 would cancel away ~4 of its ~7 digits; expm1 keeps them.

Costs: each operator F is an n x n float32 matrix (n = 10,000: 400 MB), built from the Gram
matrix (2 n^2 d flops) and the inverse (4/3 n^3); `information_plane` holds three of them at a
time (X, Y and the current layer). Precision: float32 values match a float64 evaluation of the
formula to a few 1e-6 relative at n = 2000, on Gaussian data and on real activations (eps n =
0.02 keeps G + eps n I well conditioned for kernels this smooth). nHSIC is far from 0 even for independent data, so only
trends are meaningful.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import chex
import jax
import jax.numpy as jnp
import numpy as np

from jtrust.analysis.features import standardize
from jtrust.kernels.gaussian_gram import gaussian_gram, gaussian_gram_reference

_HIGHEST = jax.lax.Precision.HIGHEST  # full float32 products on GPU/TPU too (no bf16 passes)


def gram(z: jax.Array, sigma: float, per_dimension: bool = True) -> jax.Array:
    """Gaussian Gram matrix [n, n] of z [n, d]; bandwidth sigma^2 d when `per_dimension`.

    The Pallas kernel runs on GPU/TPU; on CPU its jax.numpy reference (the same function).
    """
    z = jnp.asarray(z, jnp.float32).reshape(z.shape[0], -1)
    scale = 1.0 / (2.0 * sigma**2 * (z.shape[1] if per_dimension else 1))
    if jax.default_backend() == "cpu":
        return gaussian_gram_reference(z, z, scale)
    return gaussian_gram(z, z, scale)


def centred_gram(z: jax.Array, sigma: float) -> jax.Array:
    """G = H K H [n, n] for z [n, d], K_ij = exp(-|z_i - z_j|^2 / (2 sigma^2 d)), computed as
    H (K - 11^T) H (H 1 = 0) with K - 1 by expm1, so no digits are lost to K's near-1 entries."""
    z = jnp.asarray(z, jnp.float32).reshape(z.shape[0], -1)
    z = z - z.mean(axis=0)  # distances do not change; smaller norms, less rounding in them
    sq = jnp.sum(z * z, axis=1)
    d2 = jnp.maximum(sq[:, None] + sq[None, :] - 2.0 * jnp.dot(z, z.T, precision=_HIGHEST), 0.0)
    e = jnp.expm1(-d2 / (2.0 * sigma**2 * z.shape[1]))
    e = e - e.mean(axis=0, keepdims=True)
    return e - e.mean(axis=1, keepdims=True)


def spd_inverse(m: jax.Array, block: int = 128) -> jax.Array:
    """Inverse of a symmetric positive definite [n, n] matrix by recursive 2 x 2 blocking.

    [[A, B], [B^T, C]]^-1 from A^-1, W = A^-1 B and the Schur complement S = C - B^T W:
    [[A^-1 + W S^-1 W^T, -W S^-1], [-(W S^-1)^T, S^-1]]. 4/3 n^3 flops, all but the leaves
    (n <= block, Gauss-Jordan) in matrix products. Stable for SPD input (the Schur complements
    and the pivots are positive); accuracy ~ condition number x float32 epsilon, like Cholesky.
    Pure XLA: no LAPACK call, whose OpenBLAS threads stall when other processes hold the cores.
    """
    n = m.shape[0]
    if n <= block:
        return _gauss_jordan_inverse(m)
    k = n // 2
    a, b, c = m[:k, :k], m[:k, k:], m[k:, k:]
    a_inv = spd_inverse(a, block)
    w = jnp.dot(a_inv, b, precision=_HIGHEST)
    s = c - jnp.dot(b.T, w, precision=_HIGHEST)
    s_inv = spd_inverse(0.5 * (s + s.T), block)
    top_right = -jnp.dot(w, s_inv, precision=_HIGHEST)
    top_left = a_inv - jnp.dot(top_right, w.T, precision=_HIGHEST)
    return jnp.block([[top_left, top_right], [top_right.T, s_inv]])


def _gauss_jordan_inverse(m: jax.Array) -> jax.Array:
    """In-place Gauss-Jordan inverse without pivoting (the pivots of an SPD matrix are > 0)."""
    index = jnp.arange(m.shape[0])

    def eliminate(k, a):
        pivot, column = a[k, k], a[:, k]
        row = a[k] / pivot
        a = (a - jnp.outer(column, row)).at[k].set(row)
        return a.at[:, k].set(jnp.where(index == k, 1.0 / pivot, -column / pivot))

    return jax.lax.fori_loop(0, m.shape[0], eliminate, m)


@functools.partial(jax.jit, static_argnames=("sigma", "eps"))
def nocco_operator(z: jax.Array, sigma: float = 50.0, eps: float = 1e-5) -> jax.Array:
    """F = G (G + eps n I)^-1 [n, n], G = H K H, for samples z [n, d] (labels: [n] or [n, 1]).

    Symmetric; trace(F_A F_B) equals the released code's trace(R_A R_B) with
    R = K H (K H + eps n I)^-1 (module docstring).
    """
    g = centred_gram(z, sigma)
    n = g.shape[0]
    lam = eps * n
    eye = jnp.eye(n, dtype=g.dtype)
    return eye - lam * spd_inverse(g + lam * eye)


def nhsic(a: jax.Array, b: jax.Array, sigma: float = 50.0, eps: float = 1e-5) -> float:
    """Normalized HSIC of paired samples a [n, ...] and b [n, ...]."""
    chex.assert_equal_shape_prefix([a, b], 1)  # the same n samples, paired
    return float(_trace_of_product(nocco_operator(a, sigma, eps), nocco_operator(b, sigma, eps)))


@jax.jit
def _trace_of_product(fa: jax.Array, fb: jax.Array) -> jax.Array:
    return jnp.sum(fa * fb)  # trace(A B) = sum(A * B^T) = sum(A * B) for symmetric B


@functools.partial(jax.jit, static_argnames=("sigma",))
def hsic_biased(a: jax.Array, b: jax.Array, sigma: float) -> jax.Array:
    """(n - 1)^-2 trace(K_a H K_b H) with kernel exp(-|x - y|^2 / (2 sigma^2))."""
    Ka, Kb = gram(a, sigma, per_dimension=False), gram(b, sigma, per_dimension=False)
    n = Ka.shape[0]
    centre = lambda K: K - K.mean(axis=0, keepdims=True)  # H K
    # trace(Ka H Kb H) = sum((H Ka)^T * (H Kb)) elementwise, using symmetry of the Grams
    return jnp.sum(centre(Ka) * centre(Kb).T) / (n - 1) ** 2


class InformationPlane(NamedTuple):
    i_xt: np.ndarray  # [n_layers] nHSIC(X, T_l)
    i_ty: np.ndarray  # [n_layers] nHSIC(T_l, Y)


def information_plane(x: np.ndarray, layers: np.ndarray, y: np.ndarray, sigma: float = 50.0,
                      eps: float = 1e-5) -> InformationPlane:
    """I(X;T) and I(T;Y) for every layer, as TracingLLM computes them.

    x: [n, d] the input's stand-in (block-0 output); layers: [n_layers, n, d] representations;
    y: [n] binary labels, used as 0/1 values (the closed form for binary labels assumes this).
    x and the layers are standardized here.
    """
    chex.assert_rank([x, layers, y], [2, 3, 1])
    chex.assert_axis_dimension(layers, 1, x.shape[0])
    chex.assert_axis_dimension(y, 0, x.shape[0])
    r_x = nocco_operator(standardize(x), sigma, eps)
    r_y = nocco_operator(np.asarray(y, np.float32)[:, None], sigma, eps)
    i_xt, i_ty = [], []
    for t in layers:
        r_t = nocco_operator(standardize(t), sigma, eps)
        i_xt.append(float(_trace_of_product(r_x, r_t)))
        i_ty.append(float(_trace_of_product(r_t, r_y)))
    return InformationPlane(np.array(i_xt), np.array(i_ty))


class Phases(NamedTuple):
    """A layer's path through the information plane over training (see `fitting_compression`)."""

    two_phases: bool
    peak_step: int  # the step where I(X;T) is largest: end of fitting, start of compression
    rise: float  # I(X;T) at the peak minus at the first checkpoint, relative to the peak
    fall: float  # I(X;T) at the peak minus at the last checkpoint, relative to the peak
    ty_change: float  # I(T;Y) at the last checkpoint minus at the peak (>= 0: kept rising)


def fitting_compression(steps, i_xt, i_ty, min_change: float = 0.05) -> Phases:
    """The two phases of TracingLLM (arXiv 2402.19465) in one layer's trajectories [K] over
    training steps: I(X;T) rises to an interior peak by at least `min_change` of the peak
    (fitting), then falls by at least as much (compression), while I(T;Y) at the end is not
    below its value at the peak."""
    i_xt, i_ty = np.asarray(i_xt, float), np.asarray(i_ty, float)
    k = int(np.argmax(i_xt))
    peak = i_xt[k]
    rise = (peak - i_xt[0]) / abs(peak)
    fall = (peak - i_xt[-1]) / abs(peak)
    ty_change = float(i_ty[-1] - i_ty[k])
    found = 0 < k < len(i_xt) - 1 and rise >= min_change and fall >= min_change and ty_change >= 0
    return Phases(bool(found), int(steps[k]), float(rise), float(fall), ty_change)
