"""`jtrust detox` end to end at a tiny budget: every method evaluated the same way, evaluation
prompts apart from the training data, intervals against scipy, a rerun that recomputes nothing;
and the bad inputs the pipeline must name. By default the tuned model is a tiny random Llama with
SmolLM2's tokenizer (the embedded model stays the toxicity scorer's reader); the same run on
SmolLM2 itself is marked slow."""

from __future__ import annotations

import dataclasses
import json

import pytest
from scipy import stats

import jtrust
from helpers import make_tiny_hf_dir, random_llama
from jtrust.core.errors import InputError
from jtrust.pipelines.detox import DetoxOptions, run_detox

TINY = DetoxOptions(methods=("cp_code", "dpo", "steer"), anchors=6, k=2, nearest=3, pool=24, n_pos=1, n_neg=2, steps=2,
                    batch_size=2, lora_rank=2, seq_len=24, steer_texts=16, eval_prompts=3, samples=2,
                    max_new_tokens=6, perplexity_texts=3, mc_questions=3, agreement_texts=4)


@pytest.fixture(scope="module")
def smollm2():
    return jtrust.load("smollm2")


@pytest.fixture(scope="module")
def tiny(smollm2):
    """A 2-block random Llama that reads and writes SmolLM2's tokens (and its chat template); an
    untied unembedding keeps its logits near 1 in scale, so it samples varied (nonsense) text."""
    config = dataclasses.replace(smollm2.config, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                                 d_ff=64, rotary_dim=8, max_positions=256, tie_embeddings=False)
    return random_llama(config, smollm2.tokenizer, name="tiny-smollm2-tokens")


def test_small_run_evaluates_every_method_alike_and_resumes(tiny, smollm2, tmp_path):
    # a larger pool of statements: nonsense paraphrases are never toxic, so negatives all come from it
    check_small_run(tiny, smollm2, dataclasses.replace(TINY, steer_layer=1, pool=200), tmp_path)


@pytest.mark.slow
def test_small_run_on_the_embedded_model(smollm2, tmp_path):
    check_small_run(smollm2, smollm2, TINY, tmp_path)


def check_small_run(model, scorer_model, options, tmp_path):
    out = tmp_path / "detox"
    report = run_detox(model, out, options, scorer_model=scorer_model, progress=False)
    results = json.loads((out / "results.json").read_text())
    res = results["results"]
    assert list(res) == ["base", "cp_code", "dpo", "steer"]
    data = json.loads((out / "cells" / "data.json").read_text())["result"]
    training = {a["text"] for a in data["anchors"]} | {t for row in data["positives"] + data["negatives"] for t in row}
    assert len(data["eval_prompts"]) == 3 and not training & set(data["eval_prompts"])
    assert all(len(p) == 1 for p in data["positives"]) and all(len(n) == 2 for n in data["negatives"])
    for name, r in res.items():
        k = round(r["toxic_ratio"] * 3)
        ci = stats.binomtest(k, 3).proportion_ci(0.95, method="exact")
        assert (r["toxic_low"], r["toxic_high"]) == pytest.approx((ci.low, ci.high), abs=1e-9)
        assert 0 <= r["toxic_ratio"] <= r["any_toxic"] + 1e-12 <= 1 and r["perplexity"] > 1
        assert r["mc"]["truthfulqa"]["n"] == 3 and r["mc"]["world_facts"]["n"] == 3
        assert (r["train_seconds"] > 0) == (name != "base")
    assert res["steer"]["perplexity"] != res["base"]["perplexity"]  # the vector is applied
    assert "toxic ratio" in report.read_text()
    cells = {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()}
    run_detox(model, out, options, scorer_model=scorer_model, progress=False)  # a rerun: every cell and run reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == cells
    assert json.loads((out / "results.json").read_text())["results"]["dpo"]["toxic_ratio"] == res["dpo"]["toxic_ratio"]


def test_bad_inputs_are_named(tiny, smollm2, tmp_path):
    make_tiny_hf_dir(tmp_path / "other", "llama")
    other = jtrust.load(tmp_path / "other")  # its own tokenizer
    with pytest.raises(InputError, match="tokenize differently"):
        run_detox(smollm2, tmp_path / "a", TINY, reference=other, progress=False)
    with pytest.raises(InputError, match="scorer_model=jtrust.load"):
        run_detox(tiny, tmp_path / "b", TINY, progress=False)
    with pytest.raises(InputError, match="no anchor has 5 non-toxic paraphrases"):
        run_detox(tiny, tmp_path / "c", dataclasses.replace(TINY, anchors=2, k=1, n_pos=5), scorer_model=smollm2,
                  progress=False)
    with pytest.raises(InputError, match="unknown methods"):
        DetoxOptions(methods=("cp",))
