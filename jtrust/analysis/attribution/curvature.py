"""Inverse-Hessian-vector products: the named options and what each costs.

Notation: N training rows, D subset parameters; per module (one linear kernel in one layer)
d_in x d_out parameters, T tokens a row; c = the cost of one forward + backward of a row.

Module methods (per-module block-diagonal; need `Task.modules`):
  identity   H = I. Scores are gradient dot products (TracIn when summed over checkpoints).
             Fitting: nothing. Per (query, train) pair: ghost inner products, T^2 (d_in + d_out)
             per module, no per-example gradient formed (`kernels.ghost`).
  diagonal   H = diag of the empirical Fisher, mean_n G_n^2. Fitting: one pass, N c.
             Applying: d_in d_out per gradient.
  kfac       H = A (x) S per module, A = E[a a^T], S = E[g g^T] over tokens (inputs, output
             gradients). Fitting: one pass (N c + N T (d_in^2 + d_out^2)), eigendecompositions
             in float64 (d_in^3 + d_out^3). Applying: 2 d_in d_out (d_in + d_out) per gradient.
  ekfac      kfac's eigenbases with eigenvalues refitted to the per-example gradients,
             Lambda = mean_n (Q_A^T G_n Q_S)^2 (George et al. 2018). Fitting: kfac plus a
             rotation of every training gradient. Applying: as kfac (`kernels.ekfac`).
  Damping is a fraction of the mean eigenvalue of each module (kronfluence's heuristic).

Matrix-free methods (any subset, `Task.modules` or everything; no projection):
  cg         conjugate gradient on (H + lambda I) x = v, `iterations` Hessian-vector products
             per query (each ~2-3 c per Hessian row).
  lissa      the Neumann series x <- v + x - (H + lambda I) x / s (Agarwal et al. 2017), with
             s above the largest eigenvalue (power iteration); `iterations` products per query.
  H is the mean over `hessian_rows` training rows of either the exact Hessian of the loss
  (`curvature="hessian"`, forward-over-reverse: `jax.jvp` of `jax.grad`; may be indefinite)
  or its Gauss-Newton part (`"gauss_newton"`: J^T (diag(p) - p p^T) J at the logits, PSD).
  lambda = damping x trace / D of the empirical Fisher (its mean eigenvalue).
"""

from __future__ import annotations

import functools
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from jtrust.analysis.attribution.task import Task, ravel_subset, row_nll
from jtrust.core.errors import InputError
from jtrust.kernels.ekfac import precondition_auto
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import forward
from jtrust.training.lm import Examples

MODULE_METHODS = ("identity", "diagonal", "kfac", "ekfac")
FREE_METHODS = ("cg", "lissa")
METHODS = MODULE_METHODS + FREE_METHODS
CURVATURES = ("gauss_newton", "hessian")


# ---------------------------------------------------------------------------------------------
# module methods: factors per module name, stacked over the chosen layers

def normalize_covariances(sums: dict[str, dict], tokens: float) -> dict[str, dict]:
    """Token covariances from summed outer products: name -> {"A": [l, d_in, d_in],
    "S": [l, d_out, d_out]} divided by the number of real tokens (float64; kronfluence's norm)."""
    if not tokens:
        raise InputError("no real tokens in the training rows to fit the curvature on")
    return {n: {"A": np.asarray(s["A"], np.float64) / tokens, "S": np.asarray(s["S"], np.float64) / tokens}
            for n, s in sums.items()}


def eigenbases(cov: dict[str, dict]) -> dict[str, dict]:
    """Eigendecompositions in float64: name -> {"q_in", "e_in", "q_out", "e_out"} (stacked [l, ...])."""
    out = {}
    for name, c in cov.items():
        e_in, q_in = np.linalg.eigh(c["A"])
        e_out, q_out = np.linalg.eigh(c["S"])
        out[name] = {"q_in": q_in, "e_in": np.maximum(e_in, 0.0), "q_out": q_out, "e_out": np.maximum(e_out, 0.0)}
    return out


@jax.jit
def rotated_square_sum(grads: jax.Array, q_in: jax.Array, q_out: jax.Array) -> jax.Array:
    """sum_b (Q_in^T G_b Q_out)^2 for grads [B, l, d_in, d_out], bases [l, d, d] -> [l, d_in, d_out].

    float32 on the device (as kronfluence's Lambda pass); the caller sums chunks in float64."""
    rotated = jnp.einsum("jia,bjio,jop->bjap", q_in, grads, q_out)
    return jnp.sum(jnp.square(rotated), axis=0)


def fit_module_factors(method: str, grads: Callable[[], Iterable[dict[str, np.ndarray]]],
                       cov: dict[str, dict] | None, damping: float) -> dict[str, dict]:
    """The preconditioner of each module for `method` (diagonal | kfac | ekfac).

    grads: a callable giving the training rows' kernel gradients again, chunk by chunk
      (name -> [B, l, d_in, d_out]); cov: `covariances` of the same rows (kfac, ekfac).
    Returns name -> {"q_in" [l, d_in, d_in] or None, "q_out", "eigenvalues" [l, d_in, d_out],
    "damping" [l]}: apply with `apply_module_factors`.
    """
    if method == "identity":
        return {}
    if method == "diagonal":
        sums, n = {}, 0
        for chunk in grads():
            for name, g in chunk.items():
                sums[name] = sums.get(name, 0.0) + np.sum(np.square(np.asarray(g, np.float64)), axis=0)
            n += len(next(iter(chunk.values())))
        factors = {name: {"q_in": None, "q_out": None, "eigenvalues": s / n} for name, s in sums.items()}
    elif method in ("kfac", "ekfac"):
        bases = eigenbases(cov)
        if method == "kfac":
            factors = {name: dict(b, eigenvalues=b["e_in"][:, :, None] * b["e_out"][:, None, :])
                       for name, b in bases.items()}
        else:
            sums, n = {}, 0
            device_bases = {name: (jnp.asarray(b["q_in"], jnp.float32), jnp.asarray(b["q_out"], jnp.float32))
                            for name, b in bases.items()}
            for chunk in grads():
                for name, g in chunk.items():
                    part = rotated_square_sum(jnp.asarray(g, jnp.float32), *device_bases[name])
                    sums[name] = sums.get(name, 0.0) + np.asarray(part, np.float64)
                n += len(next(iter(chunk.values())))
            factors = {name: dict(bases[name], eigenvalues=s / n) for name, s in sums.items()}
    else:
        raise InputError(f"unknown module method {method!r}; choose from {MODULE_METHODS}")
    for f in factors.values():  # damping: a fraction of each module's mean eigenvalue
        f["damping"] = damping * f["eigenvalues"].mean(axis=(1, 2))
    return factors


def apply_module_factors(grads: dict[str, jax.Array], factors: dict[str, dict]) -> dict[str, jax.Array]:
    """H^-1 G per module: name -> [B, l, d_in, d_out] (identity when `factors` is empty)."""
    if not factors:
        return grads
    out = {}
    for name, g in grads.items():
        f = factors[name]
        g = jnp.asarray(g, jnp.float32)
        layers = []
        for j in range(g.shape[1]):
            lam = jnp.asarray(f["eigenvalues"][j], jnp.float32)
            if f["q_in"] is None:  # diagonal: no rotation
                layers.append(g[:, j] / (lam + f["damping"][j]))
            else:
                layers.append(precondition_auto(g[:, j], jnp.asarray(f["q_in"][j], jnp.float32),
                                                jnp.asarray(f["q_out"][j], jnp.float32), lam,
                                                float(f["damping"][j])))
        out[name] = jnp.stack(layers, axis=1)
    return out


# ---------------------------------------------------------------------------------------------
# matrix-free methods

def curvature_product(params: Any, rows: Examples, *, config: ModelConfig, task: Task,
                      curvature: str) -> tuple[jax.Array, Callable[[jax.Array], jax.Array]]:
    """(the subset raveled [D], v [D] -> H v) with H the mean over `rows` of the training loss's
    Hessian or Gauss-Newton matrix in the subset's coordinates."""
    flat, full = ravel_subset(params, task, config)
    n = rows.tokens.shape[0]

    def logits_of(v):
        return forward(full(v), rows.tokens, rows.mask, config=config).logits

    if curvature == "hessian":
        mean_loss = lambda v: jnp.sum(task.loss(logits_of(v), rows)) / n
        grad = jax.grad(mean_loss)
        return flat, lambda t: jax.jvp(grad, (flat,), (t,))[1]
    if curvature != "gauss_newton":
        raise InputError(f"unknown curvature {curvature!r}; choose from {CURVATURES}")
    if task.loss is not row_nll:
        raise InputError("the Gauss-Newton product is written for the NLL loss; use curvature='hessian'")

    def gn(t):
        logits, jt = jax.jvp(logits_of, (flat,), (t,))  # [B, T, V] each
        p = jax.nn.softmax(logits, axis=-1)
        w = rows.weights.astype(jnp.float32)[..., None]
        hjt = w * (p * jt - p * jnp.sum(p * jt, axis=-1, keepdims=True)) / n  # softmax-CE Hessian
        return jax.vjp(logits_of, flat)[1](hjt)[0]

    return flat, gn


def solve(method: str, hvp: Callable, vectors: jax.Array, damping: float, *, iterations: int,
          scale: float | None = None) -> jax.Array:
    """(H + damping I)^-1 v for each row of vectors [M, D] by `cg` or `lissa` (vmapped)."""
    hvps = jax.vmap(hvp)
    damped = lambda x: hvps(x) + damping * x
    if method == "cg":
        def step(state, _):
            x, r, p, rr = state
            ap = damped(p)
            alpha = rr / jnp.maximum(jnp.sum(p * ap, axis=1), 1e-30)
            x = x + alpha[:, None] * p
            r = r - alpha[:, None] * ap
            rr_new = jnp.sum(r * r, axis=1)
            p = r + (rr_new / jnp.maximum(rr, 1e-30))[:, None] * p
            return (x, r, p, rr_new), None

        x0 = jnp.zeros_like(vectors)
        state = (x0, vectors, vectors, jnp.sum(vectors * vectors, axis=1))
        return jax.lax.scan(step, state, None, length=iterations)[0][0]
    if method == "lissa":
        if scale is None:
            raise InputError("lissa needs a scale above the largest eigenvalue of H + damping")
        def step(x, _):
            return vectors + x - damped(x) / scale, None
        return jax.lax.scan(step, vectors, None, length=iterations)[0] / scale
    raise InputError(f"unknown matrix-free method {method!r}; choose from {FREE_METHODS}")


def top_eigenvalue(hvp: Callable, dim: int, *, iterations: int = 20, seed: int = 0) -> jax.Array:
    """The largest |eigenvalue| of H by power iteration (LiSSA's scale); traceable."""
    v = jax.random.normal(jax.random.key(seed), (dim,), jnp.float32)
    v = jax.lax.fori_loop(0, iterations, lambda _, v: hvp(v / jnp.linalg.norm(v)), v)
    return jnp.linalg.norm(v)


@functools.partial(jax.jit, static_argnames=("config", "task", "curvature", "method", "iterations", "seed"))
def damped_solve(params: Any, rows: Examples, vectors: jax.Array, damping: jax.Array, *, config: ModelConfig,
                 task: Task, curvature: str, method: str, iterations: int, seed: int = 0) -> jax.Array:
    """(H + damping I)^-1 v for vectors [M, D], H the curvature of the mean loss over `rows`
    (one compiled program per model shape and setting, reused across checkpoints)."""
    flat, hvp = curvature_product(params, rows, config=config, task=task, curvature=curvature)
    scale = None
    if method == "lissa":  # the series converges when the scale exceeds the top eigenvalue of H + damping
        scale = 1.5 * (top_eigenvalue(hvp, flat.shape[0], seed=seed) + damping)
    return solve(method, hvp, vectors, damping, iterations=iterations, scale=scale)
