"""Learned feedback patterns (LFP): which layers feedback tuning changed, probes from sparse
features to the feedback, and whether the features a probe leans on are feedback-related.

"Interpreting Learned Feedback Patterns in Large Language Models" (Marks et al., arXiv
2310.08164). The pieces, in the order the `jtrust lfp` pipeline runs them:

  layer_changes / top_layers   sum over a block's tensors of |theta_base - theta_tuned|_2, top 5
                               (the authors' code; LoRA runs are compared merged)
  reward_probe                 ridge regression from features to valence, Kendall tau on
                               held-out rows against an untrained random probe
  preference_probe             logistic regression on mean-pooled features, chosen vs rejected,
                               test accuracy with a Clopper-Pearson interval
  feature_valence / related_test   top-activating tokens of each feature, their valence, and a
                               permutation test: are the probe's top features feedback-related
                               more often than random live features?
"""

from __future__ import annotations

from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from jtrust.core.stats import clopper_pearson
from jtrust.analysis.features import standardize
from jtrust.analysis.probe import fit_logistic_lbfgs
from jtrust.core.errors import InputError


# ---------------------------------------------------------------------------------------------
# layer selection

def layer_changes(base_params: Any, tuned_params: Any) -> np.ndarray:
    """[n_layers] float64: sum over each block's tensors of the L2 (Frobenius) norm of the change.

    Both pytrees hold stacked blocks (leaves under "blocks" are [n_layers, ...]), e.g. two
    `Model.params`; a LoRA run's checkpoints are already merged (`jtrust.training.train`)."""
    if "blocks" not in base_params or "blocks" not in tuned_params:
        raise InputError("layer_changes needs two model parameter pytrees with stacked 'blocks'")
    base, tuned = jax.tree.leaves(base_params["blocks"]), jax.tree.leaves(tuned_params["blocks"])
    if [b.shape for b in base] != [t.shape for t in tuned]:
        raise InputError("the base and tuned parameters have different shapes: they are not the "
                         "same model family; compare a fine-tuning run with its own base model")
    total = 0.0
    for b, t in zip(base, tuned):
        diff = np.asarray(t, np.float64) - np.asarray(b, np.float64)
        total = total + np.sqrt(np.sum(diff.reshape(diff.shape[0], -1) ** 2, axis=1))
    return np.asarray(total)


def top_layers(changes: np.ndarray, k: int = 5) -> list[int]:
    """The k layers with the largest change, most changed first."""
    changes = np.asarray(changes)
    if not 1 <= k <= len(changes):
        raise InputError(f"k must be in 1..{len(changes)} (the model's layers), not {k}")
    if not np.any(changes > 0):
        raise InputError("the tuned parameters equal the base ones: nothing changed in training")
    return [int(i) for i in np.argsort(-changes, kind="stable")[:k]]


# ---------------------------------------------------------------------------------------------
# probes

def fit_ridge(x: np.ndarray, y: np.ndarray, alpha: float = 1.0) -> tuple[np.ndarray, float]:
    """sklearn's Ridge(alpha) with an unpenalized intercept, closed form in float64.

    x [n, d], y [n] -> (coef [d], intercept). Solves the d x d system, or the n x n (dual) one
    when there are fewer rows than features."""
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if x.ndim != 2 or len(x) != len(y) or len(x) < 2:
        raise InputError(f"ridge needs x [n, d] and y [n] with n >= 2, got {x.shape} and {y.shape}")
    mean_x, mean_y = x.mean(axis=0), y.mean()
    xc, yc = x - mean_x, y - mean_y
    n, d = xc.shape
    if n >= d:
        coef = np.linalg.solve(xc.T @ xc + alpha * np.eye(d), xc.T @ yc)
    else:
        coef = xc.T @ np.linalg.solve(xc @ xc.T + alpha * np.eye(n), yc)
    return coef, float(mean_y - mean_x @ coef)


class RewardProbe(NamedTuple):
    tau: float  # Kendall tau of held-out predictions against the true values
    p_value: float
    baseline_tau: float  # the same for an untrained probe (random weights)
    baseline_p: float
    coef: np.ndarray  # [d] ridge weights
    intercept: float
    test: np.ndarray  # [n_test] rows used for scoring
    predictions: np.ndarray  # [n_test]


def split_rows(n: int, train_fraction: float = 0.8, seed: int = 0, groups: np.ndarray | None = None,
               ) -> tuple[np.ndarray, np.ndarray]:
    """Seeded (train, test) split of n rows; with groups [n], a group's rows stay together."""
    groups = np.arange(n) if groups is None else np.asarray(groups)
    unique = np.random.default_rng(seed).permutation(np.unique(groups))
    train_groups = unique[: int(round(train_fraction * len(unique)))]
    in_train = np.isin(groups, train_groups)
    train, test = np.flatnonzero(in_train), np.flatnonzero(~in_train)
    if len(train) < 2 or len(test) < 2:
        raise InputError(f"{n} rows are too few to split into train and test sets")
    return train, test


def reward_probe(features: np.ndarray, values: np.ndarray, *, alpha: float = 1.0,
                 train_fraction: float = 0.8, seed: int = 0, groups: np.ndarray | None = None,
                 ) -> RewardProbe:
    """Ridge from features [n, d] to values [n] (e.g. token valences), scored by Kendall tau on
    held-out rows; the baseline is an untrained probe, N(0, 1/d) weights (the authors' tau about
    -0.04). groups [n] (e.g. text index) keeps a text's rows on one side of the split."""
    features, values = np.asarray(features), np.asarray(values, np.float64)
    if len(features) != len(values):
        raise InputError(f"{len(features)} feature rows but {len(values)} values")
    if np.ptp(values) == 0:
        raise InputError("every value is the same: a probe has nothing to rank")
    train, test = split_rows(len(values), train_fraction, seed, groups)
    coef, intercept = fit_ridge(features[train], values[train], alpha)
    predictions = np.asarray(features[test], np.float64) @ coef + intercept
    tau, p = scipy.stats.kendalltau(predictions, values[test])
    random_coef = np.random.default_rng(seed + 1).normal(0.0, 1.0 / np.sqrt(features.shape[1]), features.shape[1])
    base_tau, base_p = scipy.stats.kendalltau(np.asarray(features[test], np.float64) @ random_coef, values[test])
    return RewardProbe(float(tau), float(p), float(base_tau), float(base_p), coef, intercept, test, predictions)


class PreferenceProbe(NamedTuple):
    accuracy: float  # held-out accuracy of telling the chosen response from the rejected one
    low: float  # 95% Clopper-Pearson interval
    high: float
    n_test: int  # held-out responses (two per pair)


def preference_probe(chosen: np.ndarray, rejected: np.ndarray, *, c: float = 1.0, seed: int = 0,
                     train_fraction: float = 0.8) -> PreferenceProbe:
    """Logistic regression (L2, C = c, features standardized over all rows as the trace probes)
    from mean-pooled features of chosen [n, d] (label 1) and rejected [n, d] (label 0) responses;
    a pair's two rows are on the same side of the seeded split."""
    chosen, rejected = np.asarray(chosen, np.float32), np.asarray(rejected, np.float32)
    if chosen.shape != rejected.shape or chosen.ndim != 2:
        raise InputError(f"chosen and rejected must both be [n_pairs, d], got {chosen.shape} and {rejected.shape}")
    n = len(chosen)
    z = standardize(np.concatenate([chosen, rejected]))
    y = np.concatenate([np.ones(n), np.zeros(n)]).astype(np.float32)
    train, test = split_rows(2 * n, train_fraction, seed, groups=np.tile(np.arange(n), 2))
    theta, _ = fit_logistic_lbfgs(jnp.asarray(z[train]), jnp.asarray(y[train]), c)
    theta = np.asarray(theta)
    correct = int(np.sum(((z[test] @ theta[:-1] + theta[-1]) > 0) == (y[test] > 0.5)))
    low, high = clopper_pearson(np.asarray([correct]), len(test))
    return PreferenceProbe(correct / len(test), float(low[0]), float(high[0]), len(test))


# ---------------------------------------------------------------------------------------------
# feature validation

def top_activating(latents: np.ndarray, features: Sequence[int], k: int = 10) -> np.ndarray:
    """[len(features), k] token rows where each feature of latents [n_tokens, F] fires most."""
    latents = np.asarray(latents)
    columns = latents[:, np.asarray(features)]
    k = min(k, len(latents))
    top = np.argpartition(-columns, k - 1, axis=0)[:k]  # [k, m], unordered
    order = np.argsort(-np.take_along_axis(columns, top, axis=0), axis=0, kind="stable")
    return np.take_along_axis(top, order, axis=0).T


def feature_valence(latents: np.ndarray, row_valence: np.ndarray, features: Sequence[int], k: int = 10,
                    ) -> tuple[np.ndarray, np.ndarray]:
    """For each feature: (mean valence of its k top-activating tokens [m], fraction of them that
    carry a valence [m]). row_valence [n_tokens]: each token row's lexicon valence (0 if none);
    a feature whose top tokens are not firing (activation 0) counts those rows as neutral."""
    top = top_activating(latents, features, k)
    values = np.asarray(row_valence, np.float64)[top]
    firing = np.take_along_axis(np.asarray(latents)[:, np.asarray(features)].T, top, axis=1) > 0
    values = np.where(firing, values, 0.0)
    return values.mean(axis=1), (values != 0).mean(axis=1)


def related_test(related: np.ndarray, chosen: Sequence[int], candidates: Sequence[int], *,
                 n_permutations: int = 10_000, seed: int = 0) -> tuple[float, float, float]:
    """Are the `chosen` features (the probe's top ones) feedback-related more often than random
    draws of as many `candidates` (e.g. every live feature)? related: [F] bool.

    Returns (fraction of chosen that are related, mean fraction under the null, one-sided
    permutation p-value (1 + #null >= observed) / (1 + n_permutations))."""
    related = np.asarray(related, bool)
    chosen, candidates = np.asarray(chosen), np.asarray(candidates)
    if len(chosen) == 0 or len(candidates) < len(chosen):
        raise InputError(f"need 1..{len(candidates)} chosen features, got {len(chosen)}")
    observed = related[chosen].mean()
    rng = np.random.default_rng(seed)
    draws = np.argsort(rng.random((n_permutations, len(candidates))), axis=1)[:, : len(chosen)]
    null = related[candidates][draws].mean(axis=1)
    p = (1 + np.sum(null >= observed - 1e-12)) / (1 + n_permutations)
    return float(observed), float(null.mean()), float(p)
