"""Mutual-information probing with kernel dependence measures (TracingLLM, REFERENCE.md section 1).

normalized HSIC (NOCCO), the released code's estimator and the default:
  K_ij = exp(-|z_i - z_j|^2 / (2 sigma^2 d))      d = feature dimension (1 for labels)
  Kc = K H, H = I - 11^T / n                       (right-centring only, as released)
  R = Kc (Kc + eps n I)^-1
  nHSIC(A, B) = trace(R_A R_B)
biased HSIC, the paper's text:
  HSIC(A, B) = (n - 1)^-2 trace(K_A H K_B H),      K_ij = exp(-|z_i - z_j|^2 / (2 sigma^2))

Costs: each operator R is an n x n float32 matrix (n = 10,000: 400 MB) and an O(n^3)
solve; `information_plane` holds three of them at a time (X, Y and the current layer).
nHSIC is far from 0 even for independent data (REFERENCE.md), so only trends are meaningful.
Precision: the solve runs in float32 and its regularizer (eps n) is small next to K's
near-constant entries, so values differ from a float64 evaluation by up to ~0.5% (tested
within 1%); the closed form for labels is met within 2e-4.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jtrust.features import standardize
from kernels.gaussian_gram import gaussian_gram, gaussian_gram_reference


def gram(z: jax.Array, sigma: float, per_dimension: bool = True) -> jax.Array:
    """Gaussian Gram matrix [n, n] of z [n, d]; bandwidth sigma^2 d when `per_dimension`.

    The Pallas kernel runs on GPU/TPU; on CPU its jax.numpy reference (the same function).
    """
    z = jnp.asarray(z, jnp.float32).reshape(z.shape[0], -1)
    scale = 1.0 / (2.0 * sigma**2 * (z.shape[1] if per_dimension else 1))
    if jax.default_backend() == "cpu":
        return gaussian_gram_reference(z, z, scale)
    return gaussian_gram(z, z, scale)


@functools.partial(jax.jit, static_argnames=("sigma", "eps"))
def nocco_operator(z: jax.Array, sigma: float = 50.0, eps: float = 1e-5) -> jax.Array:
    """R = Kc (Kc + eps n I)^-1 [n, n] for samples z [n, d] (labels: [n] or [n, 1])."""
    K = gram(z, sigma)
    n = K.shape[0]
    Kc = K - K.mean(axis=1, keepdims=True)  # K H
    # R A = Kc with A = Kc + eps n I, i.e. A^T R^T = Kc^T
    return jnp.linalg.solve((Kc + eps * n * jnp.eye(n, dtype=K.dtype)).T, Kc.T).T


def nhsic(a: jax.Array, b: jax.Array, sigma: float = 50.0, eps: float = 1e-5) -> float:
    """Normalized HSIC of paired samples a [n, ...] and b [n, ...]."""
    return float(_trace_of_product(nocco_operator(a, sigma, eps), nocco_operator(b, sigma, eps)))


@jax.jit
def _trace_of_product(ra: jax.Array, rb: jax.Array) -> jax.Array:
    return jnp.sum(ra * rb.T)  # trace(A B) without forming A B


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
    y: [n] binary labels, used as 0/1 values (the REFERENCE.md closed form assumes this).
    x and the layers are standardized here.
    """
    r_x = nocco_operator(standardize(x), sigma, eps)
    r_y = nocco_operator(np.asarray(y, np.float32)[:, None], sigma, eps)
    i_xt, i_ty = [], []
    for t in layers:
        r_t = nocco_operator(standardize(t), sigma, eps)
        i_xt.append(float(_trace_of_product(r_x, r_t)))
        i_ty.append(float(_trace_of_product(r_t, r_y)))
    return InformationPlane(np.array(i_xt), np.array(i_ty))
