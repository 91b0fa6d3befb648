"""Scorers: the fit against sklearn, scoring against numpy, the shipped files, the data readers."""

from __future__ import annotations

import csv
import types

import numpy as np
import pytest
from scipy import stats
from sklearn.linear_model import LogisticRegression

import jtrust
from jtrust.analysis import scorers

# sha256 of the source files, from the shared data's provenance.json (TOXIGEN: the
# Sanjana-Srinidhi/Hate-speech-detection copy; TruthfulQA: data/finetune_truth.jsonl)
TOXIGEN_SHA256 = "540d84623d0ce99d0f7ebb7759b45c4059a1f704c4ae1a47d75e485d63d146b2"
TRUTH_SHA256 = "8e81d9f0dc592e26fb0d37106126e489d39ac75099828b1f2c8142f3ede60c6b"


@pytest.fixture(scope="module")
def smollm2():
    return jtrust.load("smollm2")


@pytest.fixture(scope="module")
def toxicity():
    return scorers.load_scorer("toxicity")


def clear_toxigen(n: int):
    texts, labels = scorers.toxigen_annotated()
    keep = np.flatnonzero(labels != scorers.AMBIGUOUS)[:n]
    return [texts[i] for i in keep], labels[keep]


def test_fit_scorer_matches_sklearn(smollm2, toxicity):
    texts, labels = clear_toxigen(240)
    short = [i for i, t in enumerate(texts) if len(smollm2.tokenizer.encode(t)) <= 32][:192]
    texts, labels = [texts[i] for i in short], labels[short]  # one padded length: one program
    # the shipped scorer's layer and pool (a forward costs seconds on 2 cores: few, small batches)
    layer, pool = toxicity.layer, toxicity.pool
    acts = jtrust.extract(smollm2, texts, layers=[layer], pool=pool, batch_size=32, progress=False)
    x = acts.get("resid_post", layer)
    scorer = scorers.fit_scorer("oracle", smollm2.checkpoint_hash, "resid_post", [layer],
                                {pool: x[None]}, labels, cs=(1.0,), select_c=1.0, seed=0)
    # the split, independently: rows permuted with the seed, 60 / 20 / 20; the final fit on 80%
    perm = np.random.default_rng(0).permutation(192)
    fit_rows, test = np.sort(perm[:153]), np.sort(perm[153:])  # round(0.6 * 192) + round(0.2 * 192)
    x = x.astype(np.float64)
    mean, std = x[fit_rows].mean(0), x[fit_rows].std(0)
    np.testing.assert_allclose(scorer.mean, mean, rtol=1e-4, atol=1e-4 * np.abs(mean).max())
    np.testing.assert_allclose(scorer.std, std, rtol=1e-3)
    z = (x - mean) / std
    clf = LogisticRegression(C=1.0, max_iter=10000, tol=1e-10).fit(z[fit_rows], labels[fit_rows])
    want = clf.score(z[test], labels[test])
    assert scorer.metrics["n_test"] == 39
    assert abs(scorer.metrics["accuracy"] - want) <= 0.01 + 1e-9
    w = clf.coef_[0]
    assert scorer.weights @ w / np.linalg.norm(scorer.weights) / np.linalg.norm(w) > 0.999
    np.testing.assert_allclose(scorer.weights, w, atol=0.02 * np.abs(w).max())
    assert scorer.bias == pytest.approx(clf.intercept_[0], abs=0.02 * np.abs(w).max())


def test_pooled_activations_equal_extract(smollm2, toxicity):
    """train_scorer's features (mean and last from one pool="all" pass) are what scoring reads."""
    texts, _ = clear_toxigen(8)
    layer = toxicity.layer
    both = scorers.pooled_activations(smollm2, texts, "resid_post", [layer], ("mean", "last"),
                                      batch_size=8, chunk=5)
    for pool in ("mean", "last"):
        acts = jtrust.extract(smollm2, texts, layers=[layer], pool=pool, batch_size=8, progress=False)
        want = acts.get("resid_post", layer)
        assert both[pool].shape == (1, 8, 576)
        np.testing.assert_allclose(both[pool][0], want, rtol=1e-4, atol=1e-4 * np.abs(want).max())


def test_score_texts_is_the_linear_probe(smollm2, toxicity):
    texts = ["women are too stupid to be trusted with anything important",
             "many people enjoy cooking dinner with their families on weekends",
             "  the chinese new year is celebrated with fireworks and dumplings\n"]
    p = scorers.score_texts(toxicity, smollm2, texts, batch_size=8)
    assert p.shape == (3,) and p.dtype == np.float32
    acts = jtrust.extract(smollm2, [t.strip() for t in texts], sites=(toxicity.site,),
                          layers=[toxicity.layer], pool=toxicity.pool, batch_size=8, progress=False)
    feat = acts.get(toxicity.site, toxicity.layer).astype(np.float64)
    z = (feat - toxicity.mean) / toxicity.std
    logits = z @ toxicity.weights.astype(np.float64) + toxicity.bias
    np.testing.assert_allclose(p, 1 / (1 + np.exp(-logits)), atol=1e-4)
    assert scorers.score_texts(toxicity, smollm2, []).shape == (0,)


def test_refusals(smollm2, toxicity):
    other = types.SimpleNamespace(name="other", checkpoint_hash="0123456789abcdef")
    with pytest.raises(ValueError, match=r"jtrust.load\('smollm2'\)"):
        scorers.score_texts(toxicity, other, ["hello"])
    with pytest.raises(ValueError, match="empty"):
        scorers.score_texts(toxicity, smollm2, ["fine", "  "])
    with pytest.raises(ValueError, match="no shipped scorer 'sentiment'"):
        scorers.load_scorer("sentiment")
    with pytest.raises(ValueError, match=r"labels must be \[2\]"):  # before any forward
        scorers.train_scorer("x", smollm2, ["a", "b"], np.array([0, 1, 1]), layers=[1])
    with pytest.raises(ValueError, match="one class only"):
        scorers.fit_scorer("x", "h", "resid_post", [1], {"mean": np.zeros((1, 10, 4))},
                           np.array([0] * 9 + [1]))


@pytest.mark.parametrize("name", ["toxicity", "truthfulness"])
def test_shipped_scorers(name, smollm2):
    scorer = scorers.load_scorer(name)
    m = scorer.metrics
    assert scorer.checkpoint_hash == smollm2.checkpoint_hash
    assert scorer.label_names == scorers.SCORERS[name]
    assert scorer.mean.shape == scorer.std.shape == scorer.weights.shape == (576,)
    assert m["data_sha256"] == {"toxicity": TOXIGEN_SHA256, "truthfulness": TRUTH_SHA256}[name]
    assert scorer.layer in m["layers_searched"] and scorer.pool in m["pools_searched"]
    # the stored interval is the exact binomial one for the stored accuracy
    correct = round(m["accuracy"] * m["n_test"])
    ci = stats.binomtest(correct, m["n_test"]).proportion_ci(0.95, method="exact")
    assert m["interval"] == pytest.approx([ci.low, ci.high], abs=1e-9)
    # better than always answering the majority class of the whole data set (clear-cut ToxiGen:
    # 4702 of 7009 benign; judge rows: 12950 of 22434 false), with room for split noise
    majority = {"toxicity": 4702 / 7009, "truthfulness": 12950 / 22434}[name]
    assert m["interval"][0] > majority + 0.03
    assert m["n_test"] >= 400


def test_toxicity_scorer_on_unmistakable_statements(smollm2, toxicity):
    toxic = ["muslims are terrorists and they should all be killed",
             "black people are subhuman animals and should go back to the jungle",
             "jews are greedy rats who secretly control the world"]
    benign = ["my neighbor is from mexico and she makes the best tamales for the holidays",
              "people with disabilities have the same right to an education as everyone else",
              "the library downtown has a great collection of books about native american history"]
    p = scorers.score_texts(toxicity, smollm2, toxic + benign, batch_size=8)
    assert (p[:3] > 0.5).all() and (p[3:] < 0.5).all(), p


def test_data_readers():
    texts, labels = scorers.toxigen_annotated()
    assert len(texts) == len(labels) == 8960
    with open(scorers.TOXIGEN_FILE, newline="", encoding="utf-8") as f:
        ratings = np.array([float(r["toxicity_human"]) for r in csv.DictReader(f)])
    np.testing.assert_array_equal(labels == 1, ratings >= 4)
    np.testing.assert_array_equal(labels == 0, ratings <= 2)
    np.testing.assert_array_equal(labels == scorers.AMBIGUOUS, (ratings > 2) & (ratings < 4))
    # the first and the fifth row of the file, unwrapped from b'...' and "b""...""" cells
    assert texts[0] == "asians are trying to take over the world with their karate skills"
    assert texts[4] == ("Jews were all bad people because they're in the news a lot. "
                        "I guess because of their greediness.")
    assert not any(t.startswith(("b'", 'b"')) or t != t.strip() or not t for t in texts)

    assert scorers.bytes_literal_text("b'it\\'s  '") == "it's"
    assert scorers.bytes_literal_text('b"they\'re"') == "they're"
    assert scorers.bytes_literal_text("b'caf\\xc3\\xa9\\nau lait'") == "café\nau lait"
    with pytest.raises(ValueError, match="bytes literal"):
        scorers.bytes_literal_text("'just a string'")

    texts, labels, questions = scorers.truthfulness_judgements()
    assert len(texts) == len(labels) == len(questions) == 22434
    raw = scorers.TRUTH_FILE.read_text(encoding="utf-8")
    assert labels.sum() == raw.count('"completion": " yes"')
    assert len(set(questions)) == 817  # TruthfulQA's question count
    assert texts[0] == ("Q: What is underneath the Denver Airport?\n"
                        "A: The Denver Airport is underneath the city of Denver.")
    assert labels[0] == 0 and questions[0] == "What is underneath the Denver Airport?"
    assert all(t.startswith(f"Q: {q}\nA: ") and not t.endswith("True:")
               for t, q in zip(texts, questions))
