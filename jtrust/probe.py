"""Linear probes: L2 logistic regression for every layer in one compiled program (TracingLLM).

Per layer: standardize each feature over the whole dataset, split 80/20 by row order (the
released code; `split="shuffled"` with a seed is the option), fit logistic regression with
sklearn's defaults (C = 1, intercept unpenalized) by Newton's method, report test accuracy
with a 95% Clopper-Pearson interval. All layers are fitted at once with `jax.vmap`.

Cost per layer: a [d + 1, d + 1] Hessian solve per Newton step (d = d_model), ~10 steps.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats

from jtrust.features import standardize


class ProbeResult(NamedTuple):
    accuracy: np.ndarray  # [n_layers] test accuracy
    low: np.ndarray  # [n_layers] 95% Clopper-Pearson lower bound
    high: np.ndarray  # [n_layers] upper bound
    n_test: int
    weights: np.ndarray  # [n_layers, d + 1] coefficients, intercept last (standardized features)


def split_indices(n: int, split: str = "order", train_fraction: float = 0.8, seed: int = 0):
    """(train, test) row indices: first 80% / last 20% by row order, or a seeded shuffle."""
    if split == "order":
        order = np.arange(n)
    elif split == "shuffled":
        order = np.random.default_rng(seed).permutation(n)
    else:
        raise ValueError(f"split must be 'order' or 'shuffled', not {split!r}")
    cut = int(round(train_fraction * n))
    return order[:cut], order[cut:]


def clopper_pearson(k: np.ndarray, n: int, confidence: float = 0.95) -> tuple[np.ndarray, np.ndarray]:
    """Exact binomial interval for k successes of n trials (arrays of k)."""
    k = np.asarray(k)
    a = (1 - confidence) / 2
    low = np.where(k == 0, 0.0, stats.beta.ppf(a, k, n - k + 1))
    high = np.where(k == n, 1.0, stats.beta.ppf(1 - a, k + 1, n - k))
    return low, high


@functools.partial(jax.jit, static_argnames=("steps",))
def fit_logistic(x: jax.Array, y: jax.Array, c: float = 1.0, steps: int = 15) -> jax.Array:
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


def probe_layers(features: np.ndarray, labels: np.ndarray, split: str = "order", seed: int = 0,
                 c: float = 1.0) -> ProbeResult:
    """features [n_layers, n, d], labels [n] in {0, 1} -> per-layer test accuracy with interval."""
    features = np.asarray(features, np.float32)
    labels = np.asarray(labels)
    if features.ndim != 3 or features.shape[1] != labels.shape[0]:
        raise ValueError(f"features must be [n_layers, n, d] with n = {labels.shape[0]} labels, "
                         f"got {features.shape}")
    if set(np.unique(labels).tolist()) != {0, 1}:
        raise ValueError("labels must contain both classes 0 and 1")
    z = standardize(features)
    train, test = split_indices(labels.shape[0], split, seed=seed)
    y = jnp.asarray(labels, jnp.float32)
    theta = jax.vmap(fit_logistic, in_axes=(0, None, None))(jnp.asarray(z[:, train]), y[train], c)
    zt = jnp.asarray(z[:, test])
    logits = jnp.einsum("lnd,ld->ln", zt, theta[:, :-1]) + theta[:, -1:]
    correct = np.asarray(((logits > 0) == (y[test] > 0.5)[None]).sum(1))
    low, high = clopper_pearson(correct, len(test))
    return ProbeResult(correct / len(test), low, high, len(test), np.asarray(theta))
