"""EK-FAC preconditioning of per-example gradients of one linear layer.

For a kernel W [d_in, d_out], K-FAC approximates the Fisher/GGN of vec(W) by
A (x) S, where A [d_in, d_in] is the input-activation covariance and S
[d_out, d_out] the output-gradient covariance. With A = Q_in diag(a) Q_in^T and
S = Q_out diag(s) Q_out^T, EK-FAC (George et al. 2018; Grosse et al. 2023,
arXiv 2308.03296) keeps the Kronecker eigenbasis but replaces the eigenvalues
a_i s_j by corrected ones lambda_ij. Preconditioning a gradient G [d_in, d_out]:

    P(G) = Q_in @ ((Q_in^T @ G @ Q_out) / (lambda + damping)) @ Q_out^T.

Three entry points with one signature:
  * `precondition_reference`: plain jax.numpy, the specification;
  * `precondition`: a Pallas kernel tiled over examples (tested in interpret mode only);
  * `precondition_auto`: calls `precondition` when `jax.default_backend()` is
    "gpu" or "tpu" and `precondition_reference` otherwise, so on CPU the
    reference runs.
"""

from __future__ import annotations

import functools

import chex
import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

# Full float32 matmuls: GPU/TPU defaults (bf16 passes) would lose the precision of the
# small-eigenvalue directions, which the division by (lambda + damping) amplifies.
_PRECISION = jax.lax.Precision.HIGHEST
# TPU vregs are (8, 128): feature axes are padded to the lane width, because each of
# d_in and d_out is the lane (last) axis of at least one operand (q_in, q_out, G).
_LANE = 128


def _check(grads, q_in, q_out, eigenvalues):
    chex.assert_rank(grads, 3)
    _, d_in, d_out = grads.shape
    chex.assert_shape(q_in, (d_in, d_in))
    chex.assert_shape(q_out, (d_out, d_out))
    chex.assert_shape(eigenvalues, (d_in, d_out))


def precondition_reference(grads: jax.Array, q_in: jax.Array, q_out: jax.Array,
                           eigenvalues: jax.Array, damping) -> jax.Array:
    """EK-FAC preconditioned per-example gradients in plain jax.numpy.

    Args:
      grads: [n, d_in, d_out] float32, per-example gradients G of a kernel W [d_in, d_out].
      q_in: [d_in, d_in], orthogonal eigenvectors (columns) of the input covariance A.
      q_out: [d_out, d_out], orthogonal eigenvectors (columns) of the output-gradient covariance S.
      eigenvalues: [d_in, d_out], corrected eigenvalues lambda in the (q_in, q_out) basis.
      damping: float scalar (Python float or traced array) added to every eigenvalue.

    Returns:
      [n, d_in, d_out] float32: q_in @ ((q_in^T @ G @ q_out) / (eigenvalues + damping)) @ q_out^T
      for each example G.
    """
    _check(grads, q_in, q_out, eigenvalues)
    grads, q_in, q_out, eigenvalues = (jnp.asarray(t, jnp.float32)
                                       for t in (grads, q_in, q_out, eigenvalues))
    damping = jnp.asarray(damping, jnp.float32)
    chex.assert_rank(damping, 0)
    # Rotate into the Kronecker eigenbasis, rescale, rotate back (matmul broadcasts over n).
    rotated = jnp.matmul(jnp.matmul(q_in.T, grads, precision=_PRECISION), q_out,
                         precision=_PRECISION)
    scaled = rotated / (eigenvalues + damping)
    return jnp.matmul(jnp.matmul(q_in, scaled, precision=_PRECISION), q_out.T,
                      precision=_PRECISION)


def _precondition_kernel(g_ref, q_in_ref, q_out_ref, inv_ref, o_ref, *, block_n: int):
    """One block of examples: g_ref, o_ref [block_n, d_in, d_out]; q_in_ref [d_in, d_in];
    q_out_ref [d_out, d_out]; inv_ref [d_in, d_out] = 1 / (lambda + damping)."""
    q_in = q_in_ref[...]
    q_out = q_out_ref[...]
    inv = inv_ref[...]

    def dot(x, y, contract_x, contract_y):
        # dot_general contracting chosen axes: transposes q_in / q_out without materialising them.
        return jax.lax.dot_general(x, y, (((contract_x,), (contract_y,)), ((), ())),
                                   precision=_PRECISION, preferred_element_type=jnp.float32)

    def one_example(k, carry):
        # A loop of 2-D matmuls rather than one batched 3-D contraction: 2-D dots are what
        # every Pallas backend lowers. The rotated gradient lives only in registers/VMEM.
        g = g_ref[k]  # [d_in, d_out]
        rotated = dot(dot(q_in, g, 0, 0), q_out, 1, 0)  # q_in^T G q_out
        scaled = rotated * inv
        o_ref[k] = dot(dot(q_in, scaled, 1, 0), q_out, 1, 1).astype(o_ref.dtype)  # q_in R q_out^T
        return carry

    jax.lax.fori_loop(0, block_n, one_example, 0)


def _round_up(a: int, b: int) -> int:
    return -(-a // b) * b


@functools.partial(jax.jit, static_argnames=("block_n", "interpret"))
def precondition(grads: jax.Array, q_in: jax.Array, q_out: jax.Array, eigenvalues: jax.Array,
                 damping, *, block_n: int = 8, interpret: bool = False) -> jax.Array:
    """EK-FAC preconditioned per-example gradients as a Pallas kernel tiled over examples.

    Same result as `precondition_reference`. Grid step i loads block_n whole gradients
    [block_n, d_in, d_out] plus q_in, q_out and 1 / (lambda + damping) (the same block every
    step), rotates, rescales and rotates back each gradient on chip, and writes only the
    preconditioned gradients. Rows are not tiled: every output row needs the whole rotated
    gradient, so row tiles would recompute it. Feature axes are zero-padded to multiples of
    128 and n to a multiple of block_n; the padding is sliced off.

    On-chip footprint per step (float32, double-buffered inputs and output) is about
    4 * (4 * block_n * d_in * d_out + 2 * (d_in^2 + d_out^2 + d_in * d_out)) bytes after
    padding; lower block_n for wide layers.

    Args:
      grads: [n, d_in, d_out] float32, per-example gradients G of a kernel W [d_in, d_out].
      q_in: [d_in, d_in], orthogonal eigenvectors (columns) of the input covariance A.
      q_out: [d_out, d_out], orthogonal eigenvectors (columns) of the output-gradient covariance S.
      eigenvalues: [d_in, d_out], corrected eigenvalues lambda in the (q_in, q_out) basis.
      damping: float scalar (Python float or traced array) added to every eigenvalue.
      block_n: examples per grid step (clamped to n).
      interpret: run in Pallas interpret mode (needed on CPU).

    Returns:
      [n, d_in, d_out] float32, as `precondition_reference`.
    """
    _check(grads, q_in, q_out, eigenvalues)
    grads, q_in, q_out, eigenvalues = (jnp.asarray(t, jnp.float32)
                                       for t in (grads, q_in, q_out, eigenvalues))
    damping = jnp.asarray(damping, jnp.float32)
    chex.assert_rank(damping, 0)
    n, d_in, d_out = grads.shape
    block_n = min(block_n, n)
    n_p, din_p, dout_p = _round_up(n, block_n), _round_up(d_in, _LANE), _round_up(d_out, _LANE)
    # Damping folded into the eigenvalues once outside the kernel: one [d_in, d_out] op, and the
    # kernel needs no scalar operand. Padded entries of the inverse are 0 (not 1 / 0), and the
    # zero-padded rows/columns of q_in, q_out keep the padding out of the real block.
    inv = jnp.pad(1.0 / (eigenvalues + damping), ((0, din_p - d_in), (0, dout_p - d_out)))
    g_p = jnp.pad(grads, ((0, n_p - n), (0, din_p - d_in), (0, dout_p - d_out)))
    q_in_p = jnp.pad(q_in, ((0, din_p - d_in), (0, din_p - d_in)))
    q_out_p = jnp.pad(q_out, ((0, dout_p - d_out), (0, dout_p - d_out)))
    out = pl.pallas_call(
        functools.partial(_precondition_kernel, block_n=block_n),
        out_shape=jax.ShapeDtypeStruct((n_p, din_p, dout_p), jnp.float32),
        grid=(n_p // block_n,),
        in_specs=[pl.BlockSpec((block_n, din_p, dout_p), lambda i: (i, 0, 0)),
                  pl.BlockSpec((din_p, din_p), lambda i: (0, 0)),
                  pl.BlockSpec((dout_p, dout_p), lambda i: (0, 0)),
                  pl.BlockSpec((din_p, dout_p), lambda i: (0, 0))],
        out_specs=pl.BlockSpec((block_n, din_p, dout_p), lambda i: (i, 0, 0)),
        interpret=interpret,
    )(g_p, q_in_p, q_out_p, inv)
    return out[:n, :d_in, :d_out]


def precondition_auto(grads: jax.Array, q_in: jax.Array, q_out: jax.Array,
                      eigenvalues: jax.Array, damping) -> jax.Array:
    """`precondition` on "gpu"/"tpu" backends, `precondition_reference` otherwise (CPU).

    Args and returns as `precondition_reference`. The backend is read in Python at call time.
    """
    if jax.default_backend() in ("gpu", "tpu"):
        return precondition(grads, q_in, q_out, eigenvalues, damping)
    return precondition_reference(grads, q_in, q_out, eigenvalues, damping)
