"""Linear probes: L2 logistic regression for every layer in one compiled program (TracingLLM).

Per layer: standardize each feature over the whole dataset, split 80/20 by row order (the
released code; `split="shuffled"` with a seed is the option), fit logistic regression with
sklearn's defaults (C = 1, intercept unpenalized), report test accuracy with a 95%
Clopper-Pearson interval. Standardization, split, fits and scoring run on the device in one
program; the layers are fitted one after another (`jax.lax.map`) so each layer's rows stay in
cache.

Solvers (`solver=`), both to the same optimum:
  lbfgs   (default) L-BFGS, 10 pairs, with an exact line search: the margins along a direction
          are one matrix-vector product, after which the 1-d convex search costs O(n). Stops
          when max |gradient| / (C n) <= tol (sklearn's lbfgs criterion with gtol = tol; sklearn
          defaults to 1e-4, here 1e-5). Cost per iteration: two passes over the layer's
          [n, d] rows (4 n d flops), memory-bound; ~40-200 iterations on real activations.
  newton  Newton's method, 15 steps, all layers vmapped: exact to float32 precision, but each
          step forms a [d + 1, d + 1] Hessian (2 n d^2 flops) and solves it, i.e. ~d / 2
          L-BFGS iterations' worth of flops per step. Worth it only for small d.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from jtrust.core.errors import InputError
from jtrust.core.stats import clopper_pearson
from jtrust.runtime import distributed

HISTORY = 10  # L-BFGS correction pairs (scipy's and so sklearn's default)
NEWTON_STEPS = 15
SOLVERS = ("lbfgs", "newton")


class ProbeResult(NamedTuple):
    accuracy: np.ndarray  # [n_layers] test accuracy
    low: np.ndarray  # [n_layers] 95% Clopper-Pearson lower bound
    high: np.ndarray  # [n_layers] upper bound
    n_test: int
    weights: np.ndarray  # [n_layers, d + 1] coefficients, intercept last (standardized features)
    iterations: np.ndarray | None = None  # [n_layers] L-BFGS iterations (max_iter: not converged)
    #                                       or Newton steps


def split_indices(n: int, split: str = "order", train_fraction: float = 0.8, seed: int = 0):
    """(train, test) row indices: first 80% / last 20% by row order, or a seeded shuffle."""
    if split == "order":
        order = np.arange(n)
    elif split == "shuffled":
        order = np.random.default_rng(seed).permutation(n)
    else:
        raise InputError(f"split must be 'order' or 'shuffled', not {split!r}")
    cut = int(round(train_fraction * n))
    return order[:cut], order[cut:]


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_logistic(x: jax.Array, y: jax.Array, c: float = 1.0, steps: int = NEWTON_STEPS) -> jax.Array:
    """argmin 0.5 |w|^2 + C sum_i log(1 + exp(-s_i (w.x_i + b))), s = 2y - 1, by Newton.

    x [n, d], y [n] in {0, 1} -> [d + 1] (w, b). The objective is strictly convex, so Newton
    from zero converges quadratically; the intercept b is not penalized (sklearn).
    """
    n, d = x.shape
    xb = jnp.concatenate([x, jnp.ones((n, 1), x.dtype)], 1)
    reg = jnp.ones(d + 1, x.dtype).at[-1].set(0.0)

    def step(theta, _):
        p = jax.nn.sigmoid(xb @ theta)
        grad = c * xb.T @ (p - y) + reg * theta
        hess = c * (xb * (p * (1 - p))[:, None]).T @ xb + jnp.diag(reg) + 1e-8 * jnp.eye(d + 1)
        return theta - jnp.linalg.solve(hess, grad), None

    return jax.lax.scan(step, jnp.zeros(d + 1, x.dtype), None, length=steps)[0]


class _LbfgsState(NamedTuple):
    w: jax.Array  # [d] weights
    b: jax.Array  # [] intercept
    margins: jax.Array  # [n] x w + b
    grad: jax.Array  # [d + 1] gradient of the objective (w part, then b)
    s: jax.Array  # [HISTORY, d + 1] steps (circular buffer)
    y: jax.Array  # [HISTORY, d + 1] gradient changes
    rho: jax.Array  # [HISTORY] 1 / (s . y)
    pairs: jax.Array  # [] pairs stored so far
    iteration: jax.Array  # []


@functools.partial(jax.jit, static_argnames=("max_iter",))
def fit_logistic_lbfgs(x: jax.Array, y: jax.Array, c: float = 1.0, tol: float = 1e-5,
                       max_iter: int = 1000) -> tuple[jax.Array, jax.Array]:
    """The `fit_logistic` objective by L-BFGS: x [n, d], y [n] in {0, 1} -> ([d + 1] (w, b), iterations).

    Stops when max |gradient| <= tol * C * n or after max_iter iterations.
    """
    n, d = x.shape

    def gradient(w, margins):
        r = c * (jax.nn.sigmoid(margins) - y)
        return jnp.concatenate([r @ x + w, jnp.sum(r)[None]])  # r @ x: rows streamed once

    zero = jnp.zeros((), x.dtype)
    state = _LbfgsState(jnp.zeros(d, x.dtype), zero, jnp.zeros(n, x.dtype),
                        gradient(jnp.zeros(d, x.dtype), jnp.zeros(n, x.dtype)),
                        jnp.zeros((HISTORY, d + 1), x.dtype), jnp.zeros((HISTORY, d + 1), x.dtype),
                        jnp.zeros(HISTORY, x.dtype), jnp.zeros((), jnp.int32), jnp.zeros((), jnp.int32))

    def running(st):
        return (jnp.max(jnp.abs(st.grad)) > tol * c * n) & (st.iteration < max_iter)

    def step(st):
        p = _lbfgs_direction(st)
        p = jnp.where(p @ st.grad < 0, p, -st.grad)  # a descent direction, whatever rounding did
        q = x @ p[:-1] + p[-1]  # margins move by a q along p
        a = _line_search(st.margins, q, y, st.w, p[:-1], c)
        w, b, margins = st.w + a * p[:-1], st.b + a * p[-1], st.margins + a * q
        grad = gradient(w, margins)
        s, dg = a * p, grad - st.grad
        sy = s @ dg
        keep = sy > 1e-10 * (dg @ dg)  # positive curvature (always, up to rounding: convex)
        slot = st.pairs % HISTORY
        return _LbfgsState(w, b, margins, grad,
                           jnp.where(keep, st.s.at[slot].set(s), st.s),
                           jnp.where(keep, st.y.at[slot].set(dg), st.y),
                           jnp.where(keep, st.rho.at[slot].set(1.0 / sy), st.rho),
                           st.pairs + keep, st.iteration + 1)

    state = jax.lax.while_loop(running, step, state)
    return jnp.concatenate([state.w, state.b[None]]), state.iteration


def _lbfgs_direction(st: _LbfgsState) -> jax.Array:
    """-H grad by the two-loop recursion over the stored pairs (oldest overwritten first)."""
    used = jnp.minimum(st.pairs, HISTORY)

    def newest_first(i, carry):
        q, alpha = carry
        j = (st.pairs - 1 - i) % HISTORY
        a = jnp.where(i < used, st.rho[j] * (st.s[j] @ q), 0.0)
        return q - a * st.y[j], alpha.at[j].set(a)

    q, alpha = jax.lax.fori_loop(0, HISTORY, newest_first, (st.grad, jnp.zeros(HISTORY, st.grad.dtype)))
    last = (st.pairs - 1) % HISTORY
    scale = jnp.where(st.pairs > 0, (st.s[last] @ st.y[last]) / (st.y[last] @ st.y[last]),
                      1.0 / jnp.linalg.norm(st.grad))

    def oldest_first(i, r):
        j = (st.pairs - used + i) % HISTORY
        beta = st.rho[j] * (st.y[j] @ r)
        return jnp.where(i < used, r + st.s[j] * (alpha[j] - beta), r)

    return -jax.lax.fori_loop(0, HISTORY, oldest_first, scale * q)


def _line_search(margins, q, y, w, pw, c, steps: int = 4):
    """argmin over a > 0 of C sum_i loss(margins + a q) + 0.5 |w + a pw|^2 (convex in a).

    Safeguarded Newton from a = 1 (L-BFGS's natural step) inside a bracket [lo, hi] on the
    sign of the derivative; each step costs O(n), no pass over the features.
    """
    def newton(_, carry):
        a, lo, hi = carry
        p = jax.nn.sigmoid(margins + a * q)
        d1 = c * jnp.sum((p - y) * q) + pw @ (w + a * pw)
        d2 = c * jnp.sum(p * (1 - p) * q * q) + pw @ pw
        lo, hi = jnp.where(d1 < 0, a, lo), jnp.where(d1 < 0, hi, a)
        candidate = a - d1 / d2
        inside = (candidate > lo) & (candidate < hi)
        return jnp.where(inside, candidate, jnp.where(jnp.isfinite(hi), 0.5 * (lo + hi), 2 * a)), lo, hi

    one = jnp.ones((), margins.dtype)
    return jax.lax.fori_loop(0, steps, newton, (one, 0 * one, jnp.inf * one))[0]


def probe_layers(features: np.ndarray, labels: np.ndarray, split: str = "order", seed: int = 0,
                 c: float = 1.0, solver: str = "lbfgs", tol: float = 1e-5,
                 max_iter: int = 1000, mesh: Mesh | None = None) -> ProbeResult:
    """features [n_layers, n, d], labels [n] in {0, 1} -> per-layer test accuracy with interval.

    solver / tol / max_iter: see the module docstring (tol and max_iter apply to lbfgs).
    mesh: layers are split over all its devices (every axis), each device fitting its own layers
      (same results); with several processes, every process passes the same features.
    """
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    if features.ndim != 3 or features.shape[1] != labels.shape[0]:
        raise InputError(f"features must be [n_layers, n, d] with n = {labels.shape[0]} labels, "
                         f"got {features.shape}")
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise InputError("labels must contain both classes 0 and 1")
    if solver not in SOLVERS:
        raise InputError(f"solver must be one of {SOLVERS}, not {solver!r}")
    train, test = split_indices(labels.shape[0], split, seed=seed)
    order = None if split == "order" else np.concatenate([train, test])
    program = functools.partial(_probe_program, order=order, c=c, tol=tol, n_train=len(train),
                                solver=solver, max_iter=max_iter)
    y = labels.astype(np.float32)
    if mesh is None:
        theta, iterations, correct = program(jax.device_put(features), jnp.asarray(y))
    else:
        theta, iterations, correct = _on_mesh(program, features, y, mesh)
    correct = np.asarray(correct)
    low, high = clopper_pearson(correct, len(test))
    return ProbeResult(correct / len(test), low, high, len(test), np.asarray(theta), np.asarray(iterations))


def _on_mesh(program, features: np.ndarray, labels: np.ndarray, mesh: Mesh):
    """`program` with the layer axis split over every device of `mesh` (padded with copies of
    layer 0 to a multiple of the device count; the copies' results are dropped)."""
    n_layers, axes = features.shape[0], tuple(mesh.axis_names)
    padded = -(-n_layers // mesh.size) * mesh.size
    features = np.concatenate([features, np.repeat(features[:1], padded - n_layers, axis=0)])
    layers, whole = NamedSharding(mesh, P(axes)), NamedSharding(mesh, P())
    features, labels = distributed.put(features, layers), distributed.put(labels, whole)
    per_device = jax.shard_map(program, mesh=mesh, in_specs=(P(axes), P()), out_specs=P(axes), check_vma=False)
    return [x[:n_layers] for x in distributed.to_host(jax.jit(per_device)(features, labels))]


@functools.partial(jax.jit, static_argnames=("n_train", "solver", "max_iter"))
def _probe_program(features, labels, order, c, tol, n_train: int, solver: str, max_iter: int):
    """Standardize, split, fit, count test hits, layer by layer.

    Standardizes as `jtrust.analysis.features.standardize` but on the device, per layer inside the loop,
    so a layer's rows are read from memory once and then stay in cache for its fit (numpy's
    passes over all of [n_layers, n, d] on the host cost about as much as all the fits).
    """
    if order is not None:
        labels = labels[order]
    y_train, y_test = labels[:n_train], labels[n_train:]

    def standardized_split(x):
        std = x.std(axis=0)
        z = (x - x.mean(axis=0)) / jnp.where(std > 0, std, 1)
        if order is not None:
            z = z[order]
        return z[:n_train], z[n_train:]

    def hits(z_test, theta):
        return jnp.sum(((z_test @ theta[:-1] + theta[-1]) > 0) == (y_test > 0.5))

    if solver == "newton":  # all layers at once: the Hessians are batched matrix products
        z_train, z_test = jax.vmap(standardized_split)(features)
        theta = jax.vmap(fit_logistic, in_axes=(0, None, None))(z_train, y_train, c)
        return theta, jnp.full(features.shape[0], NEWTON_STEPS), jax.vmap(hits)(z_test, theta)

    def one_layer(x):
        z_train, z_test = standardized_split(x)
        theta, iterations = fit_logistic_lbfgs(z_train, y_train, c, tol, max_iter)
        return theta, iterations, hits(z_test, theta)

    return jax.lax.map(one_layer, features)
