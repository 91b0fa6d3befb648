"""Ghost (factored) inner products of per-example gradients of one linear layer.

For a linear layer y_t = x_t W with W [d_in, d_out], the gradient of example i is
a_i^T g_i, where a_i [T, d_in] are its inputs and g_i [T, d_out] the gradients at its
outputs (one row per token). The inner product of two such gradients factors through
token Gram matrices (the "ghost" trick of Goodfellow 2015, arXiv 1510.01799; ghost
clipping and gradient-similarity data attribution use the same identity):

    <a_i^T g_i, b_j^T h_j>_F = sum_{t,s} (a_i[t] . b_j[s]) * (g_i[t] . h_j[s])
                             = sum( (a_i b_j^T) * (g_i h_j^T) ),

which costs O(T S (d_in + d_out)) per pair instead of O(d_in d_out) memory per example.

Three entry points with one signature:
  * `ghost_dot_reference`: plain jax.numpy, the specification (also factored);
  * `ghost_dot`: a Pallas kernel tiled over (i, j) example blocks (tested in interpret mode only);
  * `ghost_dot_auto`: calls `ghost_dot` when `jax.default_backend()` is "gpu" or "tpu" and
    `ghost_dot_reference` otherwise, so on CPU the reference runs.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Full float32 matmuls: GPU/TPU defaults (bf16 passes) would lose precision in the token Grams.
_PRECISION = jax.lax.Precision.HIGHEST
# TPU vregs are (8, 128): token axes are sublanes (pad to 8), feature axes lanes (pad to 128).
_SUBLANE, _LANE = 8, 128


def _check(a, g, a2, g2):
    chex.assert_rank([a, g, a2, g2], 3)
    chex.assert_equal_shape_prefix([a, g], 2)  # same examples i and tokens T
    chex.assert_equal_shape_prefix([a2, g2], 2)  # same examples j and tokens S
    chex.assert_equal_shape_suffix([a, a2], 1)  # d_in
    chex.assert_equal_shape_suffix([g, g2], 1)  # d_out


def ghost_dot_reference(a: jax.Array, g: jax.Array, a2: jax.Array, g2: jax.Array) -> jax.Array:
    """Inner products of per-example linear-layer gradients, in factored form, in jax.numpy.

    out[i, j] = sum_{t,s} (a[i,t] . a2[j,s]) * (g[i,t] . g2[j,s]) = <a_i^T g_i, a2_j^T g2_j>_F,
    computed from the two [T, S] token Grams of each pair; no [d_in, d_out] gradient is formed.

    Args:
      a: [n, T, d_in] float32, layer inputs of examples i.
      g: [n, T, d_out] float32, gradients at the layer outputs of examples i.
      a2: [m, S, d_in] float32, layer inputs of examples j.
      g2: [m, S, d_out] float32, gradients at the layer outputs of examples j.

    Returns:
      [n, m] float32.
    """
    _check(a, g, a2, g2)
    a, g, a2, g2 = (jnp.asarray(t, jnp.float32) for t in (a, g, a2, g2))

    def one_row(ag):
        # One example i against all j at a time: peak memory m*T*S instead of n*m*T*S.
        ai, gi = ag
        gram_a = jnp.einsum("td,jsd->jts", ai, a2, precision=_PRECISION)  # [m, T, S]
        gram_g = jnp.einsum("te,jse->jts", gi, g2, precision=_PRECISION)  # [m, T, S]
        return jnp.sum(gram_a * gram_g, axis=(1, 2))  # [m]

    return jax.lax.map(one_row, (a, g))


def _ghost_kernel(a_ref, g_ref, a2_ref, g2_ref, o_ref, *, t: int, s: int):
    """One output tile. a_ref [bn*t, d_in], g_ref [bn*t, d_out] (bn examples, t tokens each,
    flattened); a2_ref [bm*s, d_in], g2_ref [bm*s, d_out]; o_ref [bn, bm]."""
    bn, bm = o_ref.shape

    def dot_t(x, y):
        # x @ y.T by contracting the feature axes: no transposed copy of y.
        return jax.lax.dot_general(x, y, (((1,), (1,)), ((), ())), precision=_PRECISION,
                                   preferred_element_type=jnp.float32)

    # All token Grams of the tile at once: the [t, s] block (p, q) of each is the pair (p, q).
    prod = dot_t(a_ref[...], a2_ref[...]) * dot_t(g_ref[...], g2_ref[...])  # [bn*t, bm*s]
    # Sum each [t, s] block with two indicator matmuls (rows of example p, columns of example q)
    # instead of a reshape to [bn, t, bm, s], which would need a relayout on TPU.
    row = jax.lax.broadcasted_iota(jnp.int32, (bn, bn * t), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (bn, bn * t), 1)
    left = ((col >= row * t) & (col < (row + 1) * t)).astype(jnp.float32)  # [bn, bn*t]
    row = jax.lax.broadcasted_iota(jnp.int32, (bm * s, bm), 0)
    col = jax.lax.broadcasted_iota(jnp.int32, (bm * s, bm), 1)
    right = ((row >= col * s) & (row < (col + 1) * s)).astype(jnp.float32)  # [bm*s, bm]
    out = jnp.dot(jnp.dot(left, prod, precision=_PRECISION), right, precision=_PRECISION)
    o_ref[...] = out.astype(o_ref.dtype)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


def _flat(x, n_p, t_p, d_p):
    """[n, t, d] -> zero-padded [n_p * t_p, d_p]: zero tokens/features/examples add 0 to every dot."""
    n, t, d = x.shape
    return jnp.pad(x, ((0, n_p - n), (0, t_p - t), (0, d_p - d))).reshape(n_p * t_p, d_p)


@functools.partial(jax.jit, static_argnames=("block_n", "block_m", "interpret"))
def ghost_dot(a: jax.Array, g: jax.Array, a2: jax.Array, g2: jax.Array, *, block_n: int = 8,
              block_m: int = 128, interpret: bool = False) -> jax.Array:
    """Inner products of per-example linear-layer gradients as a Pallas kernel.

    Same result as `ghost_dot_reference`. Grid step (i, j) loads the tokens of block_n
    examples i and block_m examples j (flattened to [block * tokens, features]), forms all
    their [T, S] token Grams on chip for inputs and for output gradients, multiplies them
    elementwise and sums each pair's [T, S] block into the [block_n, block_m] output tile.

    Padding: tokens to a multiple of 8, features to a multiple of 128, examples to a multiple
    of the block (all with zeros, which add nothing); blocks are clamped to the padded
    example counts, so a small n or m gives one whole-axis tile. On TPU the output tile obeys
    the (8, 128) rule with the defaults, or whenever a block covers its whole axis.
    On-chip footprint per step is dominated by the Grams, about
    3 * 4 * (block_n * T) * (block_m * S) bytes after padding; lower the blocks for long
    sequences (no token tiling yet).

    Args:
      a: [n, T, d_in] float32, layer inputs of examples i.
      g: [n, T, d_out] float32, gradients at the layer outputs of examples i.
      a2: [m, S, d_in] float32, layer inputs of examples j.
      g2: [m, S, d_out] float32, gradients at the layer outputs of examples j.
      block_n: examples i per tile.
      block_m: examples j per tile.
      interpret: run in Pallas interpret mode (needed on CPU).

    Returns:
      [n, m] float32, as `ghost_dot_reference`.
    """
    _check(a, g, a2, g2)
    a, g, a2, g2 = (jnp.asarray(x, jnp.float32) for x in (a, g, a2, g2))
    n, t, d_in = a.shape
    m, s, d_out = g2.shape
    block_n = min(block_n, _round_up(n, _SUBLANE))
    block_m = min(block_m, _round_up(m, _SUBLANE))
    n_p, m_p = _round_up(n, block_n), _round_up(m, block_m)
    t_p, s_p = _round_up(t, _SUBLANE), _round_up(s, _SUBLANE)
    din_p, dout_p = _round_up(d_in, _LANE), _round_up(d_out, _LANE)
    out = pl.pallas_call(
        functools.partial(_ghost_kernel, t=t_p, s=s_p),
        out_shape=jax.ShapeDtypeStruct((n_p, m_p), jnp.float32),
        grid=(n_p // block_n, m_p // block_m),
        in_specs=[pl.BlockSpec((block_n * t_p, din_p), lambda i, j: (i, 0)),
                  pl.BlockSpec((block_n * t_p, dout_p), lambda i, j: (i, 0)),
                  pl.BlockSpec((block_m * s_p, din_p), lambda i, j: (j, 0)),
                  pl.BlockSpec((block_m * s_p, dout_p), lambda i, j: (j, 0))],
        out_specs=pl.BlockSpec((block_n, block_m), lambda i, j: (i, j)),
        interpret=interpret,
    )(_flat(a, n_p, t_p, din_p), _flat(g, n_p, t_p, dout_p),
      _flat(a2, m_p, s_p, din_p), _flat(g2, m_p, s_p, dout_p))
    return out[:n, :m]


def ghost_dot_auto(a: jax.Array, g: jax.Array, a2: jax.Array, g2: jax.Array) -> jax.Array:
    """`ghost_dot` on "gpu"/"tpu" backends, `ghost_dot_reference` otherwise (CPU).

    Args and returns as `ghost_dot_reference`. The backend is read in Python at call time.
    """
    if jax.default_backend() in ("gpu", "tpu"):
        return ghost_dot(a, g, a2, g2)
    return ghost_dot_reference(a, g, a2, g2)
