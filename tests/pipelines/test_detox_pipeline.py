"""`jtrust detox` end to end at a tiny budget on the embedded model: every method evaluated the
same way, evaluation prompts apart from the training data, intervals against scipy, a rerun that
recomputes nothing; and the bad inputs the pipeline must name."""

from __future__ import annotations

import json

import pytest
from scipy import stats

import jtrust
from helpers import make_tiny_hf_dir
from jtrust.core.errors import InputError
from jtrust.pipelines.detox import DetoxOptions, run_detox

TINY = DetoxOptions(methods=("cp_code", "dpo", "steer"), anchors=6, k=2, nearest=3, pool=24, n_pos=1, n_neg=2, steps=2,
                    batch_size=2, lora_rank=2, seq_len=24, steer_texts=16, eval_prompts=3, samples=2,
                    max_new_tokens=6, perplexity_texts=3, mc_questions=3, agreement_texts=4)


@pytest.fixture(scope="module")
def smollm2():
    return jtrust.load("smollm2")


def test_small_run_evaluates_every_method_alike_and_resumes(smollm2, tmp_path):
    out = tmp_path / "detox"
    report = run_detox(smollm2, out, TINY, progress=False)
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
    run_detox(smollm2, out, TINY, progress=False)  # a rerun: every cell and run reused
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").iterdir()} == cells
    assert json.loads((out / "results.json").read_text())["results"]["dpo"]["toxic_ratio"] == res["dpo"]["toxic_ratio"]


def test_bad_inputs_are_named(smollm2, tmp_path):
    make_tiny_hf_dir(tmp_path / "tiny", "llama")
    tiny = jtrust.load(tmp_path / "tiny")
    with pytest.raises(InputError, match="tokenize differently"):
        run_detox(smollm2, tmp_path / "a", TINY, reference=tiny, progress=False)
    with pytest.raises(InputError, match="scorer_model=jtrust.load"):
        run_detox(tiny, tmp_path / "b", TINY, progress=False)
    with pytest.raises(InputError, match="no anchor has 5 non-toxic paraphrases"):
        run_detox(smollm2, tmp_path / "c", DetoxOptions(**{**TINY.__dict__, "anchors": 2, "k": 1, "n_pos": 5}),
                  progress=False)
    with pytest.raises(InputError, match="unknown methods"):
        DetoxOptions(methods=("cp",))
