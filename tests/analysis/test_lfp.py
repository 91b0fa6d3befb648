"""LFP analysis against independent oracles: torch norms of a transformers model's layers,
sklearn's Ridge and LogisticRegression, scipy's Kendall tau and hypergeometric tail."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.stats

import jtrust
from jtrust.analysis import lfp
from jtrust.core.errors import InputError

from helpers import make_tiny_hf_dir


def test_layer_changes_match_torch_norms_of_each_layer(tmp_path):
    import torch
    base_torch = make_tiny_hf_dir(tmp_path / "base", "llama", seed=0)
    tuned_torch = make_tiny_hf_dir(tmp_path / "tuned", "llama", seed=0)
    with torch.no_grad():  # change layer 1 a lot, layer 2 a little, layer 0 not at all
        tuned_torch.model.layers[1].mlp.down_proj.weight.add_(0.5)
        tuned_torch.model.layers[2].self_attn.q_proj.weight.add_(0.01)
        tuned_torch.model.layers[2].input_layernorm.weight.add_(0.02)
    tuned_torch.save_pretrained(tmp_path / "tuned")
    base, tuned = jtrust.load(tmp_path / "base"), jtrust.load(tmp_path / "tuned")

    changes = lfp.layer_changes(base.params, tuned.params)

    expected = [sum(float(torch.norm(a.detach() - b.detach())) for a, b in zip(la.parameters(), lb.parameters()))
                for la, lb in zip(base_torch.model.layers, tuned_torch.model.layers)]
    np.testing.assert_allclose(changes, expected, rtol=1e-5, atol=1e-6)
    assert lfp.top_layers(changes, k=2) == [1, 2]
    with pytest.raises(InputError, match="nothing changed"):
        lfp.top_layers(lfp.layer_changes(base.params, base.params), k=2)


@pytest.mark.parametrize("n, d", [(200, 30), (20, 50)])  # primal and dual solves
def test_fit_ridge_matches_sklearn(n, d):
    from sklearn.linear_model import Ridge
    rng = np.random.default_rng(0)
    x, y = rng.normal(size=(n, d)) + 3.0, rng.normal(size=n) + 1.0
    coef, intercept = lfp.fit_ridge(x, y, alpha=2.0)
    oracle = Ridge(alpha=2.0).fit(x, y)
    np.testing.assert_allclose(coef, oracle.coef_, rtol=1e-7, atol=1e-9)
    assert intercept == pytest.approx(oracle.intercept_, rel=1e-7, abs=1e-9)


def test_reward_probe_recovers_a_planted_linear_reward_and_the_baseline_does_not():
    from sklearn.linear_model import Ridge
    rng = np.random.default_rng(1)
    x = rng.normal(size=(600, 40))
    y = x @ rng.normal(size=40) + 0.1 * rng.normal(size=600)
    groups = np.repeat(np.arange(150), 4)
    probe = lfp.reward_probe(x, y, seed=3, groups=groups)
    train = np.setdiff1d(np.arange(600), probe.test)
    assert set(groups[train]).isdisjoint(groups[probe.test])
    oracle = Ridge(alpha=1.0).fit(x[train], y[train]).predict(x[probe.test])
    assert probe.tau == pytest.approx(scipy.stats.kendalltau(oracle, y[probe.test])[0], abs=1e-12)
    assert probe.tau > 0.9
    assert abs(probe.baseline_tau) < 0.2


def test_preference_probe_matches_sklearn_logistic_regression():
    from sklearn.linear_model import LogisticRegression
    rng = np.random.default_rng(2)
    direction = rng.normal(size=12)
    chosen = rng.normal(size=(100, 12)) + 0.3 * direction
    rejected = rng.normal(size=(100, 12)) - 0.3 * direction
    probe = lfp.preference_probe(chosen, rejected, seed=5)

    x = np.concatenate([chosen, rejected])
    z = (x - x.mean(0)) / x.std(0)
    y = np.r_[np.ones(100), np.zeros(100)]
    train, test = lfp.split_rows(200, seed=5, groups=np.tile(np.arange(100), 2))
    oracle = LogisticRegression(C=1.0, tol=1e-8, max_iter=10_000).fit(z[train], y[train])
    assert probe.n_test == len(test) == 40
    assert probe.accuracy == pytest.approx(oracle.score(z[test], y[test]), abs=1 / 40 + 1e-9)
    low, high = scipy.stats.binomtest(round(probe.accuracy * 40), 40).proportion_ci(method="exact")
    assert (probe.low, probe.high) == pytest.approx((low, high), abs=1e-9)


def test_related_test_matches_the_exact_hypergeometric_tail():
    related = np.zeros(200, bool)
    related[:30] = True  # 30 of 200 live features are feedback-related
    chosen = np.r_[0:6, 100:110]  # the probe's top 16 features: 6 related
    observed, null_mean, p = lfp.related_test(related, chosen, np.arange(200), n_permutations=40_000)
    exact = scipy.stats.hypergeom(200, 30, 16).sf(6 - 1)  # P(X >= 6)
    assert observed == pytest.approx(6 / 16)
    assert null_mean == pytest.approx(30 / 200, abs=0.005)
    assert p == pytest.approx(exact, abs=0.004)


def test_top_activating_and_feature_valence():
    rng = np.random.default_rng(3)
    latents = np.maximum(rng.normal(size=(50, 8)), 0)
    valence = np.where(np.arange(50) % 5 == 0, 2.0, 0.0)
    latents[::5, 2] += 10.0  # feature 2 fires on the valenced rows
    top = lfp.top_activating(latents, [2, 4], k=5)
    np.testing.assert_array_equal(top[1], np.argsort(-latents[:, 4], kind="stable")[:5])
    assert set(top[0]) <= set(range(0, 50, 5))
    mean, fraction = lfp.feature_valence(latents, valence, [2, 4], k=5)
    assert mean[0] == 2.0 and fraction[0] == 1.0
    expected = valence[top[1]] * (latents[top[1], 4] > 0)
    assert mean[1] == pytest.approx(expected.mean()) and fraction[1] == pytest.approx((expected != 0).mean())
