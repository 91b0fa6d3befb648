"""Probes against sklearn's LogisticRegression and scipy's binomial interval."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression

import jtrust
from jtrust.data import load_texts
from jtrust.core.stats import clopper_pearson
from jtrust.analysis.probe import fit_logistic, probe_layers, split_indices


def sklearn_accuracy(z, labels, train, test):
    clf = LogisticRegression(C=1.0, max_iter=5000, tol=1e-8).fit(z[train], labels[train])
    return clf.score(z[test], labels[test]), clf


def test_coefficients_equal_sklearn():
    rng = np.random.RandomState(0)
    x = rng.randn(300, 20).astype(np.float32)
    y = (x @ rng.randn(20) + 0.5 * rng.randn(300) > 0).astype(np.int32)
    theta = np.asarray(fit_logistic(x, y.astype(np.float32)))
    clf = LogisticRegression(C=1.0, max_iter=5000, tol=1e-10).fit(x, y)
    np.testing.assert_allclose(theta[:-1], clf.coef_[0], atol=2e-3)
    assert theta[-1] == pytest.approx(clf.intercept_[0], abs=2e-3)


def test_clopper_pearson_matches_scipy():
    low, high = clopper_pearson(np.array([0, 37, 80]), 80)
    for k, lo, hi in zip((0, 37, 80), low, high):
        ci = stats.binomtest(k, 80).proportion_ci(0.95, method="exact")
        assert (lo, hi) == pytest.approx((ci.low, ci.high), abs=1e-9)


@pytest.mark.parametrize("n", [160, pytest.param(400, marks=pytest.mark.slow)])
def test_real_activations_every_layer_within_one_point_of_sklearn(n):
    model = jtrust.load("smollm2")
    data = load_texts("reliability")
    texts, labels = data.texts[:n], data.labels[:n]
    layers = [0, 5, 10, 15, 20, 25, 29]
    acts = jtrust.extract(model, texts, layers=layers, pool="last", progress=False)
    features = np.stack([acts.get("resid_post", l) for l in layers])
    for split in ("order", "shuffled"):
        result = probe_layers(features, labels, split=split)
        train, test = split_indices(len(labels), split)
        for i in range(len(layers)):
            z = (features[i] - features[i].mean(0)) / np.where(features[i].std(0) > 0, features[i].std(0), 1)
            want, _ = sklearn_accuracy(z, labels, train, test)
            assert abs(result.accuracy[i] - want) <= 0.01 + 1e-9, (split, layers[i], result.accuracy[i], want)
            assert result.low[i] <= result.accuracy[i] <= result.high[i]


def test_refusals():
    with pytest.raises(ValueError, match="both classes"):
        probe_layers(np.zeros((1, 4, 2)), np.zeros(4, int))
    with pytest.raises(ValueError, match=r"\[n_layers, n, d\]"):
        probe_layers(np.zeros((4, 2)), np.array([0, 1, 0, 1]))


MESH_SCRIPT = """
import json
import numpy as np
from jtrust.analysis.probe import probe_layers
from jtrust.runtime.sharding import make_mesh
rng = np.random.RandomState(1)
labels = rng.randint(0, 2, 240)
# 5 layers (not a multiple of 8 devices: padded), signal growing with depth
features = np.stack([rng.randn(240, 16) + 0.3 * l * labels[:, None] * rng.randn(16) for l in range(5)])
out = {"none": probe_layers(features, labels, split="shuffled").weights.tolist()}
for name, sizes in [("8data", dict(data=8)), ("2data2fsdp2model", dict(data=2, fsdp=2, model=2))]:
    r = probe_layers(features, labels, split="shuffled", mesh=make_mesh(**sizes))
    out[name] = r.weights.tolist()
    out[name + "_accuracy"] = r.accuracy.tolist()
np.save("features.npy", features)
np.save("labels.npy", labels)
print(json.dumps(out))
"""


def test_layers_split_over_a_mesh_equal_one_device_and_sklearn(tmp_path):
    import json
    import os
    import subprocess
    import sys
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, cwd=tmp_path, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    features, labels = np.load(tmp_path / "features.npy"), np.load(tmp_path / "labels.npy")
    train, test = split_indices(len(labels), "shuffled")
    for name in ("8data", "2data2fsdp2model"):
        np.testing.assert_allclose(r[name], r["none"], rtol=1e-4, atol=1e-5, err_msg=name)
        for i, f in enumerate(features):
            z = (f - f.mean(0)) / f.std(0)
            want, _ = sklearn_accuracy(z, labels, train, test)
            assert abs(r[name + "_accuracy"][i] - want) <= 0.01 + 1e-9, (name, i)
