"""`jtrust trace` over a series of tiny checkpoints: every cell against features that transformers
computes independently, resume after a crash, and the report's files."""

from __future__ import annotations

import csv
import dataclasses
import json
import re

import numpy as np
import pytest
import torch

import jtrust
from jtrust.pipelines import trace as tr
from jtrust.data import load_texts
from jtrust.analysis.probe import probe_layers
from jtrust.core.store import safe_name
from helpers import make_tiny_hf_dir

DIMS = ("fairness", "toxicity")
LIMIT = 100
STEPS = (0, 20, 100)  # numeric order differs from alphabetical (step100 < step20)


@pytest.fixture(scope="module")
def series(tmp_path_factory):
    """A 3-checkpoint series directory (step0, step10, step100) and its torch models."""
    root = tmp_path_factory.mktemp("series")
    torch_models = {f"step{s}": make_tiny_hf_dir(root / f"step{s}", "llama", seed=k)
                    for k, s in enumerate(STEPS)}
    return root, torch_models


@pytest.fixture(scope="module")
def traced(series, tmp_path_factory):
    out = tmp_path_factory.mktemp("trace")
    options = tr.TraceOptions(limit=LIMIT, mi_samples=0, batch_size=16)
    report = tr.trace(jtrust.load(series[0]), DIMS, out, options, progress=False)
    return out, report, options


def hf_last_token_features(torch_model, tokenizer, texts) -> np.ndarray:
    """[n_layers - 1, n, d]: block outputs at the last token (the final block's output is
    returned by transformers after the final norm, so it is left out)."""
    rows = []
    for text in texts:
        with torch.no_grad():
            hidden = torch_model(torch.tensor([tokenizer.encode(text)]), output_hidden_states=True).hidden_states
        rows.append(np.stack([h[0, -1].numpy() for h in hidden[1:-1]]))
    return np.stack(rows, axis=1)


def nhsic_numpy(a: np.ndarray, b: np.ndarray, sigma=50.0, eps=1e-5) -> float:
    """TracingLLM's nHSIC, float64. b is used as given (labels stay 0/1, as in the closed form)."""
    def operator(z, standardize):
        if standardize:
            z = (z - z.mean(0)) / np.where(z.std(0) > 0, z.std(0), 1.0)
        sq = ((z[:, None] - z[None]) ** 2).sum(-1)
        k = np.exp(-sq / (2 * sigma ** 2 * z.shape[1]))
        n = len(z)
        kc = k @ (np.eye(n) - 1.0 / n)
        return kc @ np.linalg.inv(kc + eps * n * np.eye(n))
    return float(np.trace(operator(a, True) @ operator(b, b.shape[1] > 1)))


def test_cells_match_transformers_features(series, traced):
    from sklearn.linear_model import LogisticRegression
    root, torch_models = series
    out, _, options = traced
    rows = list(csv.DictReader(open(out / "results.csv")))
    assert len(rows) == len(STEPS) * len(DIMS) * 3
    tokenizer = jtrust.load(root / "step0").tokenizer
    for dim in DIMS:
        data = load_texts(dim)
        texts, labels = data.texts[:LIMIT], data.labels[:LIMIT]
        for name, torch_model in torch_models.items():
            feats = hf_last_token_features(torch_model, tokenizer, texts)
            got = {int(r["layer"]): r for r in rows if r["dimension"] == dim and r["checkpoint"] == name}
            expected = probe_layers(feats, labels)
            n_test, cut = expected.n_test, LIMIT - expected.n_test
            vectors = np.load(out / "cells" / name / f"{dim}.vectors.npz")
            half = LIMIT // 2  # mass-mean vectors from the first half (TracingLLM's split)
            d = feats[:, :half][:, labels[:half] == 1].mean(1) - feats[:, :half][:, labels[:half] == 0].mean(1)
            np.testing.assert_allclose(vectors["paper"][:-1], d, rtol=1e-3, atol=1e-4)
            for layer in range(feats.shape[0]):
                assert float(got[layer]["accuracy"]) == pytest.approx(expected.accuracy[layer])
                z = (feats[layer] - feats[layer].mean(0)) / feats[layer].std(0)
                sk = LogisticRegression(max_iter=1000).fit(z[:cut], labels[:cut])
                assert abs(float(got[layer]["accuracy"]) - sk.score(z[cut:], labels[cut:])) <= 1 / n_test + 1e-9
                x = feats[0][:cut]
                assert float(got[layer]["i_xt"]) == pytest.approx(nhsic_numpy(x, feats[layer][:cut]), rel=0.01)
                assert float(got[layer]["i_ty"]) == pytest.approx(
                    nhsic_numpy(feats[layer][:cut], labels[:cut, None].astype(float)), rel=0.01)


def test_report_links_existing_plots(traced):
    out, report, _ = traced
    page = report.read_text()
    images = re.findall(r'src="([^"]+)"', page)
    expected = {f"plots/{kind}_{dim}.png" for kind in ("accuracy", "mi", "infoplane") for dim in DIMS}
    assert expected | {"plots/accuracy_layers.png"} <= set(images)
    assert all((out / i).stat().st_size > 1000 for i in images)
    assert "stereoset (related vs unrelated)" in page
    md = (out / "report.md").read_text()
    assert all(f"]({i})" in md for i in images)
    results = json.loads((out / "results.json").read_text())
    assert results["checkpoints"] == [f"step{s}" for s in STEPS]
    assert not (out / "activations" / "step0" / "fairness").exists()  # removed unless kept


def test_rerun_resumes_and_recomputes_only_missing_cells(series, traced, tmp_path, monkeypatch):
    out, _, options = traced
    cells = sorted((out / "cells").rglob("*.json"))
    before = {p: (p.stat().st_mtime_ns, p.read_text()) for p in cells}
    removed = out / "cells" / "step20" / "toxicity.mi.json"
    removed.unlink()
    calls = []
    real = tr.information_plane
    monkeypatch.setattr(tr, "information_plane", lambda *a, **k: calls.append(1) or real(*a, **k))
    tr.trace(jtrust.load(series[0]), DIMS, out, options, progress=False)
    assert len(calls) == 1
    for p, (mtime, text) in before.items():
        assert p.read_text() == text
        if p != removed:
            assert p.stat().st_mtime_ns == mtime

    # a crash in the third cell keeps the two finished ones; the re-run completes the rest
    fresh = tmp_path / "crash"
    real_probe = tr.probe_layers
    count = []

    def crashing(*a, **k):
        count.append(1)
        if len(count) == 3:
            raise RuntimeError("simulated crash")
        return real_probe(*a, **k)

    monkeypatch.setattr(tr, "probe_layers", crashing)
    with pytest.raises(RuntimeError, match="simulated"):
        tr.trace(jtrust.load(series[0]), DIMS, fresh, options, progress=False)
    done = sorted((fresh / "cells").rglob("*.json"))
    assert len(done) == 4  # probe + MI of step0 x (fairness, toxicity)
    monkeypatch.setattr(tr, "probe_layers", real_probe)
    tr.trace(jtrust.load(series[0]), DIMS, fresh, options, progress=False)
    for p in (out / "cells").rglob("*.json"):
        assert (fresh / p.relative_to(out)).read_text() == p.read_text()


def test_bad_dimension_and_single_class_limit(series, tmp_path):
    model = jtrust.load(series[0] / "step0")
    with pytest.raises(ValueError, match="unknown dimensions"):
        tr.trace(model, ["honesty"], tmp_path, progress=False)
    with pytest.raises(ValueError, match="one class"):
        tr.trace(model, ["reliability"], tmp_path, tr.TraceOptions(limit=1), progress=False)


def test_mi_on_a_seeded_subset_of_training_rows(series, tmp_path):
    root, torch_models = series
    model = jtrust.load(root / "step0")
    options = tr.TraceOptions(limit=LIMIT, mi_samples=40, batch_size=16, keep_activations=True)
    tr.trace(model, ["fairness"], tmp_path, options, progress=False)
    ckpt = safe_name(model.name)  # a single checkpoint is named by its path
    mi = json.loads((tmp_path / "cells" / ckpt / "fairness.mi.json").read_text())["result"]
    data = load_texts("fairness")
    feats = hf_last_token_features(torch_models["step0"], model.tokenizer, data.texts[:LIMIT])
    rows = np.sort(np.random.default_rng(0).choice(int(0.8 * LIMIT), 40, replace=False))
    assert mi["n"] == 40
    assert mi["i_xt"][1] == pytest.approx(nhsic_numpy(feats[0][rows], feats[1][rows]), rel=0.01)
    labels = data.labels[:LIMIT][rows, None].astype(float)
    assert mi["i_ty"][1] == pytest.approx(nhsic_numpy(feats[1][rows], labels), rel=0.01)

    # other settings into the same --out: stale scratch activations are replaced, cells recomputed
    (tmp_path / "cells" / ckpt / "fairness.probe.json").unlink()
    tr.trace(model, ["fairness"], tmp_path, dataclasses.replace(options, batch_size=8), progress=False)
    assert json.loads((tmp_path / "activations" / ckpt / "fairness" / "manifest.json").read_text())[
        "batch_size"] == 8


def test_a_users_labelled_file_is_traced_like_a_bundled_dimension(series, tmp_path):
    """A researcher's own concept: a .jsonl with text and label, named by its stem, probed on the
    same features transformers computes, and shown in the report and results beside a bundled set."""
    root, torch_models = series
    model = jtrust.load(root / "step0")
    source = load_texts("toxicity")
    texts, labels = source.texts[:60], source.labels[:60]
    mine = tmp_path / "my_concept.jsonl"
    mine.write_text("".join(json.dumps({"text": t, "label": int(y)}) + "\n" for t, y in zip(texts, labels)))
    out = tmp_path / "out"
    options = tr.TraceOptions(limit=LIMIT, mi_samples=0, batch_size=16)
    tr.trace(model, ["fairness", str(mine)], out, options, progress=False)
    ckpt = safe_name(model.name)
    probe = json.loads((out / "cells" / ckpt / "my_concept.probe.json").read_text())["result"]
    feats = hf_last_token_features(torch_models["step0"], model.tokenizer, texts)
    expected = probe_layers(feats, labels)
    np.testing.assert_allclose(probe["accuracy"][:-1], expected.accuracy)
    results = json.loads((out / "results.json").read_text())
    assert results["dimensions"] == ["fairness", "my_concept"]
    assert "plots/accuracy_my_concept.png" in (out / "report.html").read_text()
    clash = tmp_path / "toxicity.csv"  # a file may not take a bundled dimension's name
    clash.write_text("text,label\na,0\nb,1\n")
    with pytest.raises(ValueError, match="rename the file"):
        tr.trace(model, ["toxicity", str(clash)], tmp_path / "clash", options, progress=False)
