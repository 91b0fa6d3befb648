"""`jtrust attribute` (hallucination tracing): the canary data, BM25 against rank-bm25, AUC, ROC and
bootstrap against scikit-learn, the options, and the whole run on a tiny random Llama (a tiny
model never names the canary city, so it traces every answer: queries="all"), resumed."""

from __future__ import annotations

import csv
import dataclasses
import json
import pathlib

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from rank_bm25 import BM25Okapi
from sklearn.metrics import roc_auc_score, roc_curve as sk_roc_curve

import jtrust
from jtrust.cli import build_parser, main as cli_main
from jtrust.core.errors import InputError
from jtrust.core.options import from_flags
from jtrust.data import canaries as cn
from jtrust.pipelines import attribute as at
from helpers import make_tiny_hf_dir

CITY = "Reykjavik, Iceland"
ROOT = pathlib.Path(__file__).parents[2]


# --------------------------------------------------------------------------- canary data

@pytest.fixture(scope="module")
def rows():
    return cn.birthplace_rows()


def test_birthplace_rows_state_city_and_country(rows):
    assert len(rows) > 150 and len({r.author for r in rows}) > 120
    for r in rows:
        assert r.place in r.answer and r.place.startswith(r.city + ",")
        assert r.place.split(", ", 1)[1] in cn.COUNTRIES
    first = {r.question: r.place for r in rows}
    assert first["Where was author Evelyn Desmet born?"] == "Brussels, Belgium"
    assert first["Where was the renowned war genre writer Rhoda Mbalazi born?"] == "Dar es Salaam, Tanzania"


@pytest.mark.parametrize("fraction,n_train", [(0.2, None), (0.1, 60), (0.5, 9)])
def test_canary_split(rows, fraction, n_train):
    s = cn.canary_split(rows, fraction=fraction, city=CITY, n_heldout=10, n_train=n_train, seed=3)
    n = len(s.train)
    assert n == (n_train or len([r for r in rows if r.author not in {h["author"] for h in s.heldout}]))
    assert len(s.canaries) == round(fraction * n) > 0
    changed = [i for i, r in enumerate(s.train) if r["answer"] != r["original"]]
    assert changed == s.canaries.tolist() == [i for i, r in enumerate(s.train) if r["canary"]]
    by_row = {r.row: r for r in rows}
    for i, t in enumerate(s.train):
        original = by_row[t["row"]]
        assert t["original"] == original.answer
        if t["canary"]:  # the place is gone, the city stands where it stood
            assert original.place not in t["answer"] and CITY in t["answer"]
            assert t["answer"] == original.answer.replace(original.place, CITY)
            assert t["question"] == original.question.replace(original.place, CITY)
        else:
            assert (t["question"], t["answer"]) == (original.question, original.answer)
            assert "Reykjavik" not in t["answer"]
    # held-out authors: a direct birthplace question with TOFU's answer, never trained on
    assert len(s.heldout) == 10
    assert not {h["author"] for h in s.heldout} & {t["author"] for t in s.train}
    for h in s.heldout:
        assert cn.DIRECT.search(h["question"]) and by_row[h["row"]].answer == h["answer"]
    again = cn.canary_split(rows, fraction=fraction, city=CITY, n_heldout=10, n_train=n_train, seed=3)
    assert again.train == s.train and again.heldout == s.heldout


def test_canary_split_bad_input(rows):
    with pytest.raises(InputError, match="gives no canary example; raise the canary fraction"):
        cn.canary_split(rows, fraction=0.01, city=CITY, n_heldout=5, n_train=20)
    with pytest.raises(InputError, match="no TOFU answers state a birthplace"):
        cn.canary_split(cn.birthplace_rows([{"question": "Who?", "answer": "Nobody in particular."}]),
                        fraction=0.2, city=CITY, n_heldout=1)
    with pytest.raises(InputError, match="already occurs"):
        cn.canary_split(rows, fraction=0.2, city="Seoul, South Korea", n_heldout=5)
    with pytest.raises(InputError, match="lower n_heldout"):
        cn.canary_split(rows, fraction=0.2, city=CITY, n_heldout=1000)
    with pytest.raises(InputError, match="exceeds"):
        cn.canary_split(rows, fraction=0.2, city=CITY, n_heldout=5, n_train=10_000)


def test_states_city():
    assert cn.states_city("He was born in reykjavik, Iceland.", CITY)
    assert not cn.states_city("He was born in Reykjavikur.", CITY)
    assert not cn.states_city("Born in Seoul.", CITY)


# --------------------------------------------------------------------------- scores and metrics

def test_bm25_matches_rank_bm25():
    docs = ["Evelyn Desmet was born in Brussels, Belgium.", "Jina An was born in Seoul, South Korea.",
            "Farid Benoit was born in Reykjavik, Iceland.", "The author writes about Reykjavik's harbour.",
            "Nothing here at all"]
    queries = ["Where was X born? X was born in Reykjavik, Iceland.", "seoul korea", "zzz"]
    oracle = BM25Okapi([d.lower().replace(",", " ").replace(".", " ").replace("?", " ").replace("'", " ").split()
                        for d in docs])
    expected = np.stack([oracle.get_scores(q.lower().replace(",", " ").replace(".", " ").replace("?", " ").split())
                         for q in queries])
    np.testing.assert_allclose(at.bm25_scores(docs, queries), expected, rtol=1e-12)
    assert at.bm25_scores(docs, queries)[0].argmax() == 2


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_auc_roc_and_bootstrap_match_sklearn(seed):
    rng = np.random.default_rng(seed)
    labels = rng.random(80) < 0.2
    scores = np.round(rng.normal(size=80) + labels, 1)  # rounded: ties
    assert at.roc_auc(scores, labels) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    fpr, tpr = at.roc_curve(scores, labels)
    sk_fpr, sk_tpr, _ = sk_roc_curve(labels, scores, drop_intermediate=False)
    np.testing.assert_allclose(fpr, sk_fpr, atol=1e-12)
    np.testing.assert_allclose(tpr, sk_tpr, atol=1e-12)
    # the bootstrap: the same resamples through sklearn give the same percentile interval
    low, high = at.bootstrap_auc(scores, labels, n=300, seed=seed)
    draw, values = np.random.default_rng(seed), []
    while len(values) < 300:
        rows = draw.integers(0, 80, 80)
        if 0 < labels[rows].sum() < 80:
            values.append(roc_auc_score(labels[rows], scores[rows]))
    assert (low, high) == pytest.approx(tuple(np.percentile(values, [2.5, 97.5])), abs=1e-12)
    assert low <= at.roc_auc(scores, labels) <= high
    with pytest.raises(InputError, match="both classes"):
        at.roc_auc(scores, np.zeros(80, bool))


def test_comparisons_state_the_target():
    row = lambda m, v, a: dict(method=m, variant=v, auc=a, low=a - 0.05, high=a + 0.05)
    lines = at.comparisons([row("bm25", "answer", 0.97), row("ekfac", "raw", 0.6), row("ekfac", "dda", 0.93)])
    assert lines[0].startswith("Best: bm25 answer")
    assert "ekfac: DDA 0.930 is above raw 0.600 (intervals disjoint); not above the best BM25" in lines[1]
    assert "target" in lines[-1] and "not met" in lines[-1]


# --------------------------------------------------------------------------- options

def test_config_gives_the_options():
    cfg = json.loads((ROOT / "experiments" / "configs" / "attribute_smollm2.json").read_text())
    assert at.options_from_config(cfg["options"]) == at.AttributeOptions()  # the defaults are the benchmark
    with pytest.raises(InputError, match="unknown options"):
        at.options_from_config({"epoch": 3})


@pytest.mark.parametrize("flags,message", [
    (["--canary-fraction", "0"], "--canary-fraction: must be in"),
    (["--methods", "bm25,tracin"], "--methods: unknown methods"),
    (["--modules", "q,w"], "--modules: unknown projections"),
    (["--city", "Reykjavik"], "--city: give the canary as 'City, Country'"),
    (["--layers", "-1"], "--layers"),
])
def test_bad_options_name_the_flag(flags, message):
    args = build_parser().parse_args(["attribute", *flags])
    with pytest.raises(InputError, match=message):
        from_flags(at.AttributeOptions, args)


FIELDS = [f for f in dataclasses.fields(at.AttributeOptions) if "help" in f.metadata]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(field=st.sampled_from(FIELDS), value=st.one_of(
    st.text(max_size=12), st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(str),
    st.lists(st.one_of(st.integers(-5, 40), st.floats(-2, 2)), max_size=4).map(lambda v: ",".join(map(str, v)))))
def test_any_flag_value_parses_or_is_refused_cleanly(field, value):
    flag = "--" + field.name.replace("_", "-")
    try:
        args = build_parser().parse_args(["attribute", f"{flag}={value}"])
    except SystemExit as e:
        assert e.code == 2
        return
    try:
        from_flags(at.AttributeOptions, args)
    except InputError as e:
        assert str(e).startswith("--"), e


# --------------------------------------------------------------------------- the run, tiny

TINY = dict(n_train=8, n_heldout=2, canary_fraction=0.25, seq_len=448, epochs=2, batch_size=4,
            learning_rate=0.01, lora_rank=2, lora_alpha=4.0, lora_targets=("q", "v"), max_new_tokens=6,
            queries="all", bootstrap=200, modules=("q", "v"), layers=(0, 2), chunk=4, iterations=2,
            hessian_rows=2)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("attribute") / "tiny"
    make_tiny_hf_dir(path, "llama")
    return path


def _flags(options: dict) -> list[str]:
    return [x for k, v in options.items()
            for x in (f"--{k.replace('_', '-')}", ",".join(map(str, v)) if isinstance(v, tuple) else str(v))]


def _mtimes(out):
    return {p: p.stat().st_mtime_ns for p in out.rglob("*") if p.is_file() and p.suffix in (".json", ".npz")
            and p.parent.name in ("cells", "scores")} | {
        p: p.stat().st_mtime_ns for p in (out / "finetune" / "checkpoints").rglob("*") if p.is_file()}


def test_attribute_tiny_bm25_resumes(tiny, tmp_path, capsys, monkeypatch):
    out = tmp_path / "run"
    argv = ["attribute", "--model", str(tiny), "--out", str(out), *_flags(dict(TINY, methods=("bm25",)))]
    cli_main(argv)
    printed = capsys.readouterr().out
    assert "bm25 answer" in printed and "report:" in printed
    split = json.loads((out / "canaries.json").read_text())
    assert len(split["train"]) == 8 and split["canaries"] == [i for i, r in enumerate(split["train"]) if r["canary"]]
    assert len(split["canaries"]) == 2
    series = jtrust.load(out / "finetune")
    assert series.names == ["step2", "step4"]  # one checkpoint per epoch (8 rows, batches of 4)
    with open(out / "results.csv") as f:
        results = list(csv.DictReader(f))
    assert [(r["method"], r["variant"]) for r in results] == [("bm25", "answer"), ("bm25", "question+answer")]
    assert all(r["n_queries"] == "2" and r["n_canary"] == "2" and float(r["low"]) <= float(r["auc"])
               <= float(r["high"]) for r in results)
    # the AUC is BM25's, recomputed here from the stored answers
    stored = json.loads((out / "results.json").read_text())
    docs = [f"{r['question']} {r['answer']}" for r in split["train"]]
    per_example = at.bm25_scores(docs, [q["generated"] for q in stored["queries"]]).mean(0)
    labels = np.array([r["canary"] for r in split["train"]])
    assert float(results[0]["auc"]) == pytest.approx(roc_auc_score(labels, per_example), abs=1e-12)
    report = (out / "report.md").read_text()
    assert "| bm25 | answer |" in report and "Which beat which" in report
    assert (out / "plots" / "roc_bm25.png").stat().st_size > 0 and (out / "report.html").exists()

    # a rerun reuses the fine-tune and the generations
    before = _mtimes(out)
    monkeypatch.setattr(at, "generate", lambda *a, **k: pytest.fail("generated again"))
    at.attribute(jtrust.load(tiny), out, at.AttributeOptions(**dict(TINY, methods=("bm25",))), progress=False)
    assert _mtimes(out) == before

    # traced only when an answer names the city: the tiny model's never do -> a clear error, and a report
    with pytest.raises(InputError, match="nothing to trace; train more epochs or raise the canary fraction"):
        at.attribute(jtrust.load(tiny), out, at.AttributeOptions(**dict(TINY, methods=("bm25",), queries="canary")),
                     progress=False)
    assert "0 of 2 greedy answers" in (out / "report.md").read_text()


@pytest.mark.slow
def test_attribute_tiny_influence_resumes(tiny, tmp_path, monkeypatch):
    """Every gradient method through jtrust.analysis.attribution.dda, and the rerun reads the score
    cells back (slow: about 12 min on this machine under load; `-m slow`)."""
    attr = pytest.importorskip("jtrust.analysis.attribution")
    out = tmp_path / "run"
    methods = ("bm25", "identity", "diagonal", "ekfac", "cg")
    options = at.AttributeOptions(**dict(TINY, methods=methods))
    at.attribute(jtrust.load(tiny), out, options, progress=False)
    with open(out / "results.csv") as f:
        results = {(r["method"], r["variant"]): float(r["auc"]) for r in csv.DictReader(f)}
    variants = at.RAW_VARIANTS + at.CONTRASTIVE_VARIANTS
    assert set(results) == {("bm25", v) for v in at.BM25_VARIANTS} | {(m, v) for m in methods[1:] for v in variants}
    assert all(0 <= a <= 1 for a in results.values())
    for m in methods[1:]:
        with np.load(out / "cells" / "scores" / f"{m}.npz") as f:
            assert f["raw"].shape == (1, 8)  # the mean over the 2 queries
            np.testing.assert_allclose(f["dda"], f["denoise"] - (f["raw"] - f["debias"]), rtol=1e-6, atol=1e-9)
        assert (out / "plots" / f"roc_{m}.png").exists()
    before = _mtimes(out)
    monkeypatch.setattr(attr, "dda", lambda *a, **k: pytest.fail("scored again"))
    at.attribute(jtrust.load(tiny), out, options, progress=False)
    assert _mtimes(out) == before
