"""The main job (`jtrust trace --steer` on the embedded model): a small version by default, the
full one (all 30 layers x 5 dimensions, README figures) marked slow."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from jtrust.cli import main
from jtrust.runtime.extract import load_activations


def run(out, *args):
    main(["trace", "--model", "smollm2", "--out", str(out), *args])
    rows = list(csv.DictReader(open(out / "results.csv")))
    steering = list(csv.DictReader(open(out / "steering.csv")))
    return rows, steering


def sklearn_accuracy(features: np.ndarray, labels: np.ndarray) -> float:
    """The released code's probe: StandardScaler over the set, row-order 80/20, sklearn defaults."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler
    z = StandardScaler().fit_transform(features)
    cut = int(round(0.8 * len(labels)))
    return LogisticRegression(max_iter=1000).fit(z[:cut], labels[:cut]).score(z[cut:], labels[cut:])


def check_against_sklearn(out, rows, dims, limit=None):
    from jtrust.data import load_texts
    for dim in dims:
        labels = load_texts(dim).labels[:limit]
        acts = load_activations(out / "activations" / "smollm2" / dim)
        for r in (r for r in rows if r["dimension"] == dim):
            expected = sklearn_accuracy(acts.get("resid_post", int(r["layer"])), labels)
            assert abs(float(r["accuracy"]) - expected) <= 0.01 + 1e-9, (dim, r["layer"])


# (rows per dimension, traced layers, steered layer, prompts, new tokens, held-out texts): the
# default suite's version stops the forward at block 15; the earlier small version runs with -m slow
SMALL = (60, (0, 8, 15), 15, 2, 8, 2)
LARGER = (120, (0, 15, 29), 15, 4, 12, 4)


@pytest.mark.parametrize("size", [SMALL, pytest.param(LARGER, marks=pytest.mark.slow, id="larger")])
def test_small_trace_with_steering(tmp_path, monkeypatch, size):
    from jtrust.analysis import steer as st
    from jtrust.data import load_texts
    limit, layers, steer_layer, n_prompts, n_tokens, n_heldout = size
    used = {}
    real_evaluate = st.evaluate

    def recording(model, metric, prompts, steer, *args, **kwargs):
        if steer is not None:
            used[metric] = steer
        return real_evaluate(model, metric, prompts, steer, *args, **kwargs)

    monkeypatch.setattr(st, "evaluate", recording)
    dims = ("toxicity", "reliability")
    rows, steering = run(tmp_path, "--dims", ",".join(dims), "--layers", ",".join(map(str, layers)),
                         "--limit", str(limit), "--keep-activations", "--steer", "--steer-layers", str(steer_layer),
                         "--steer-strengths", "2", "--steer-prompts", str(n_prompts),
                         "--steer-tokens", str(n_tokens), "--steer-heldout", str(n_heldout))
    assert [(r["dimension"], r["layer"]) for r in rows] == [(d, str(l)) for d in dims for l in layers]
    check_against_sklearn(tmp_path, rows, dims, limit=limit)
    assert sorted((s["metric"], s["layer"]) for s in steering) == [
        ("toxicity", ""), ("toxicity", str(steer_layer)), ("truthfulness", ""), ("truthfulness", str(steer_layer))]
    # toxicity steers from toxic (1) to benign (0), truthfulness from false (0) to true (1)
    half = limit // 2  # the vectors come from the first half of the rows
    for metric, dim, toward in (("toxicity", "toxicity", 0), ("truthfulness", "reliability", 1)):
        acts = load_activations(tmp_path / "activations" / "smollm2" / dim).get("resid_post", steer_layer)
        labels = load_texts(dim).labels[:limit]
        expected = st.mass_mean_vector(acts[:half], labels[:half], "code", toward=toward)
        np.testing.assert_allclose(used[metric].vector, expected, rtol=1e-4, atol=1e-5)
        assert used[metric].layer == steer_layer and used[metric].strength == 2.0
    cells = {(s["metric"], s["layer"]): s for s in steering}
    for metric in ("toxicity", "truthfulness"):  # the vector changes what the model says
        base, steered = cells[(metric, "")], cells[(metric, str(steer_layer))]
        assert float(steered["perplexity"]) != pytest.approx(float(base["perplexity"]), rel=1e-3)
    page = (tmp_path / "report.html").read_text()
    assert "plots/steering_toxicity_code.png" in page
    assert (tmp_path / "plots/steering_truthfulness_code.png").exists()


@pytest.mark.slow
def test_main_job(tmp_path):
    """README's first command: all 30 layers x 5 dimensions with the default steering sweep."""
    dims = ("reliability", "toxicity", "privacy", "fairness", "robustness")
    rows, steering = run(tmp_path, "--keep-activations", "--steer")
    assert len(rows) == 30 * 5
    check_against_sklearn(tmp_path, rows, dims)
    assert len(steering) == 2 * (1 + 3 * 3)
    assert json.loads((tmp_path / "results.json").read_text())["checkpoints"] == ["smollm2"]
