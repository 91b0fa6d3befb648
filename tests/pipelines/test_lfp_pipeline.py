"""The LFP pipeline end to end on a tiny random Llama (the embedded model's run is in docs/lfp.md):
the chosen layers, the raw-activation probe against transformers + sklearn + scipy, a resumed run
that recomputes nothing, both tasks."""

from __future__ import annotations

import json

import numpy as np
import pytest
import scipy.stats

import jtrust
from jtrust.analysis import feedback, lfp
from jtrust.pipelines.lfp import LfpOptions, run_lfp, task_data

from helpers import make_tiny_hf_dir

TINY = dict(steps=2, batch_size=4, k=2, n_prompts=8, n_heldout=4, eval_samples=2, probe_texts=40, widths=(1, 2),
            sae_steps=20, sae_batch=128, ce_texts=4, top_layers=2, top_features=5, contexts=5, permutations=200,
            seq_len=64, max_reply=16)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("lfp") / "llama"
    return make_tiny_hf_dir(path, "llama"), jtrust.load(path)


def test_sentiment_run_matches_transformers_and_sklearn_and_resumes(tiny, tmp_path, monkeypatch):
    import torch
    from sklearn.linear_model import Ridge
    torch_model, model = tiny
    # the tiny model writes byte soup with no lexicon word: a reward it can move instead
    monkeypatch.setattr(feedback, "sentiment_reward", lambda texts: np.array([t.count("e") - 2.0 for t in texts]))
    options = LfpOptions(**TINY)
    report = run_lfp(model, tmp_path / "run", options, progress=False)
    results = json.loads((report.parent / "results.json").read_text())

    tuned = jtrust.load(tmp_path / "run" / "tune").checkpoints[-1].load()
    assert results["layers"] == sorted(lfp.top_layers(lfp.layer_changes(model.params, tuned.params), 2))

    # the base model's raw-activation probe, recomputed: transformers' MLP outputs at the chosen
    # layers, each token's VADER word valence, sklearn's Ridge, scipy's Kendall tau
    texts = task_data(options)["probe_texts"]
    captured = {}
    hooks = [torch_model.model.layers[l].mlp.register_forward_hook(
        lambda m, i, o, l=l: captured.setdefault(l, []).append(o[0].detach().numpy())) for l in results["layers"]]
    valence, groups = [], []
    with torch.no_grad():
        for i, text in enumerate(texts):
            ids = model.tokenizer.encode(text)
            torch_model(torch.tensor([ids]))
            valence.append(feedback.token_valences(model.tokenizer, text).valence)
            groups.append(np.full(len(ids), i))
    for h in hooks:
        h.remove()
    x = np.concatenate([np.concatenate(captured[l]) for l in results["layers"]], axis=1)
    valence, groups = np.concatenate(valence), np.concatenate(groups)
    rows = np.flatnonzero(valence != 0)
    train, test = lfp.split_rows(len(rows), seed=options.seed, groups=groups[rows])
    predicted = Ridge(alpha=options.ridge_alpha).fit(x[rows][train], valence[rows][train]).predict(x[rows][test])
    tau = scipy.stats.kendalltau(predicted, valence[rows][test])[0]
    row = next(r for r in results["probes"] if r["model"] == "base" and r["features"] == "raw activations")
    assert row["n_tokens"] == len(rows)
    assert row["tau"] == pytest.approx(tau, abs=2e-3)
    assert {r["features"] for r in results["probes"]} == {"raw activations", "SAE 1x", "SAE 2x"}
    assert 0 <= results["validation"]["p_value"] <= 1 and len(results["validation"]["cards"]) == 5
    for name in ("report.html", "plots/layers.png", "plots/probes.png", "plots/tuning.png", "sae.csv"):
        assert (report.parent / name).is_file(), name

    cells = {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()}
    again = json.loads((run_lfp(model, tmp_path / "run", options, progress=False).parent / "results.json").read_text())
    assert {p: p.stat().st_mtime_ns for p in (tmp_path / "run" / "cells").iterdir()} == cells  # nothing recomputed
    assert {k: v for k, v in again.items() if k != "minutes"} == {k: v for k, v in results.items() if k != "minutes"}


@pytest.mark.slow  # the preference task's tiny run (DPO, reply-pooled logistic probes)
def test_preference_run(tiny, tmp_path):
    _, model = tiny
    report = run_lfp(model, tmp_path / "run", LfpOptions(task="preference", **TINY), progress=False)
    results = json.loads((report.parent / "results.json").read_text())
    assert {r["features"] for r in results["probes"]} == {"raw activations", "SAE 1x", "SAE 2x"}
    assert all(r["n_test"] > 0 and r["low"] <= r["accuracy"] <= r["high"] for r in results["probes"])
