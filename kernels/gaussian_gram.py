"""Gaussian (RBF) Gram matrix: a jax.numpy reference and a tiled Pallas kernel.

K_ij = exp(-|x_i - y_j|^2 * scale). For the TracingLLM nHSIC kernel pass
scale = 1 / (2 sigma^2 d) (TracingLLM's kernel, arXiv 2402.19465).
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Full float32 matmuls: TPU/GPU defaults (bf16 passes) would spoil the distance cancellation.
_PRECISION = jax.lax.Precision.HIGHEST


def gaussian_gram_reference(x: jax.Array, y: jax.Array, scale: float) -> jax.Array:
    """Gaussian Gram matrix in plain jax.numpy.

    Args:
      x: [n, d] float32.
      y: [m, d] float32.
      scale: positive float; K_ij = exp(-|x_i - y_j|^2 * scale).

    Returns:
      K: [n, m] float32.
    """
    chex.assert_rank([x, y], 2)
    chex.assert_equal_shape_suffix([x, y], 1)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    xx = jnp.sum(x * x, axis=1)[:, None]  # [n, 1]
    yy = jnp.sum(y * y, axis=1)[None, :]  # [1, m]
    xy = jnp.dot(x, y.T, precision=_PRECISION)  # [n, m]
    # Rounding in |x|^2 + |y|^2 - 2 x.y can go slightly negative for near-identical rows.
    d2 = jnp.maximum(xx + yy - 2.0 * xy, 0.0)
    return jnp.exp(-d2 * scale)


def _gram_kernel(x_ref, y_ref, o_ref, *, scale: float):
    """One output tile: x_ref [block_n, d], y_ref [block_m, d] -> o_ref [block_n, block_m]."""
    x = x_ref[...]
    y = y_ref[...]
    xx = jnp.sum(x * x, axis=1, keepdims=True)  # [block_n, 1]
    yy = jnp.sum(y * y, axis=1, keepdims=True).T  # [1, block_m]
    # Contract the feature axis of both tiles directly: avoids materializing y.T.
    xy = jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=_PRECISION,
                             preferred_element_type=jnp.float32)  # [block_n, block_m]
    d2 = jnp.maximum(xx + yy - 2.0 * xy, 0.0)
    o_ref[...] = jnp.exp(-d2 * scale).astype(o_ref.dtype)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@functools.partial(jax.jit, static_argnames=("scale", "block_n", "block_m", "interpret"))
def gaussian_gram(x: jax.Array, y: jax.Array, scale: float, *, block_n: int = 128,
                  block_m: int = 128, interpret: bool = False) -> jax.Array:
    """Gaussian Gram matrix as a Pallas kernel tiled over the output.

    Same result as `gaussian_gram_reference`. Each grid step (i, j) loads a
    [block_n, d] tile of x and a [block_m, d] tile of y and writes the
    [block_n, block_m] tile of K; d is kept whole per tile.

    Args:
      x: [n, d] float32.
      y: [m, d] float32.
      scale: positive Python float (static); K_ij = exp(-|x_i - y_j|^2 * scale).
      block_n: rows of x per tile.
      block_m: rows of y per tile.
      interpret: run in Pallas interpret mode (needed on CPU).

    Returns:
      K: [n, m] float32.
    """
    chex.assert_rank([x, y], 2)
    chex.assert_equal_shape_suffix([x, y], 1)
    x = jnp.asarray(x, jnp.float32)
    y = jnp.asarray(y, jnp.float32)
    n, d = x.shape
    m = y.shape[0]
    n_pad, m_pad = _round_up(n, block_n), _round_up(m, block_m)
    # Zero rows are harmless: their outputs fall in the padding and are sliced off.
    x_p = jnp.pad(x, ((0, n_pad - n), (0, 0)))
    y_p = jnp.pad(y, ((0, m_pad - m), (0, 0)))
    out = pl.pallas_call(
        functools.partial(_gram_kernel, scale=float(scale)),
        out_shape=jax.ShapeDtypeStruct((n_pad, m_pad), jnp.float32),
        grid=(n_pad // block_n, m_pad // block_m),
        in_specs=[pl.BlockSpec((block_n, d), lambda i, j: (i, 0)),
                  pl.BlockSpec((block_m, d), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((block_n, block_m), lambda i, j: (i, j)),
        interpret=interpret,
    )(x_p, y_p)
    return out[:n, :m]
