"""experiments/tofu_unlearning.py end to end on a tiny random Llama (the default suite's small
version; the real run is `-m slow`): the saved checkpoints re-evaluate to the cached figures
(rouge_score as the ROUGE-L oracle), unlearning raises the forget loss, a re-run resumes."""

from __future__ import annotations

import json
import pathlib

import numpy as np
import pytest
from rouge_score import rouge_scorer

import jtrust
from jtrust.pipelines import tofu as tofu_unlearning
from helpers import make_tiny_hf_dir
from jtrust.data import tofu
from jtrust.runtime.generate import generate

ROOT = pathlib.Path(__file__).parents[2]

SMALL = {
    "model": None, "out": None,
    "data": {"retain_train": 4, "real_authors": 2, "world_facts": 2, "seq_len": 400,
             "prompt": "Question: {question}\nAnswer:"},
    "finetune": {"steps": 3, "batch_size": 4, "learning_rate": 0.003, "warmup_steps": 0,
                 "schedule": "constant", "log_every": 1, "seed": 0},
    # gradient ascent with and without entropy optimization: the pipeline's loop over methods and
    # entropy (every objective is checked against PyTorch in tests/training/test_unlearn.py)
    "unlearn": {"methods": ["ga"], "entropy": [False, True], "steps": 2, "batch_size": 2,
                "learning_rate": 0.003, "schedule": "constant", "log_every": 1, "seed": 0,
                "beta": 0.05, "lambda_forget": 1.0, "lambda_retain": -0.25},
    "evaluate": {"n": 8, "alpha": 0.05, "temperature": 1.0, "top_p": 0.9, "confident_p": 0.5,
                 "max_new_tokens": 4, "sampled_questions": 2, "prompts_per_batch": 2, "seed": 0},
}


def test_tofu_sets_match_their_readme_counts():
    assert [len(tofu(n)) for n in ("forget01", "retain99", "real_authors_perturbed", "world_facts_perturbed")] \
        == [40, 3960, 100, 117]
    assert not {r["question"] for r in tofu("forget01")} & {r["question"] for r in tofu("retain99")}


# the same small run unlearning with NPO too (two more training runs; -m slow)
SMALL_NPO = {**SMALL, "unlearn": {**SMALL["unlearn"], "methods": ["ga", "npo"]}}


@pytest.mark.parametrize("cfg", [SMALL, pytest.param(SMALL_NPO, marks=pytest.mark.slow, id="npo")])
def test_tofu_unlearning_small(tmp_path, cfg):
    make_tiny_hf_dir(tmp_path / "tiny", "llama")
    config = tmp_path / "small.json"
    config.write_text(json.dumps(cfg))
    out = tmp_path / "run"
    argv = ["--config", str(config), "--model", str(tmp_path / "tiny"), "--out", str(out)]
    tofu_unlearning.main(argv)
    names = ["base", "finetuned"] + [m + s for m in cfg["unlearn"]["methods"] for s in ("", "_eo")]
    cached = {n: json.loads((out / "eval" / f"{n}.json").read_text()) for n in names}
    report = (out / "report.md").read_text()
    assert all(f"| {n} |" in report for n in names) and (out / "plots" / "greedy_vs_sampled.png").exists()
    # the fine-tuned checkpoint on disk re-evaluates to the cached greedy forget ROUGE-L
    finetuned = jtrust.load(out / "finetune").checkpoints[-1].load()
    rows = tofu("forget01")
    answers = generate(finetuned, [f"Question: {r['question']}\nAnswer:" for r in rows], max_new_tokens=4).texts
    oracle = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    expected = np.mean([oracle.score(r["answer"], a[0].strip())["rougeL"].recall for r, a in zip(rows, answers)])
    assert cached["finetuned"]["forget"]["rougeL"] == pytest.approx(expected, abs=1e-12)
    # gradient ascent raised the forget loss it was given
    logs = [json.loads(x) for x in (out / "unlearn" / "ga" / "metrics.jsonl").read_text().splitlines()]
    train_logs = [m for m in logs if m["kind"] == "train"]
    assert train_logs[-1]["forget_nll"] > train_logs[0]["forget_nll"]
    for n in names:
        s = cached[n]["sampled"]
        assert s["prompts"] == 2 and 0 <= s["mean"] <= s["mean_upper"] <= 1
    # a re-run reads every stage back instead of recomputing it
    before = {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir()}
    tofu_unlearning.main(argv)
    assert {p: p.stat().st_mtime_ns for p in (out / "eval").iterdir()} == before


@pytest.mark.slow
def test_tofu_unlearning_full_config(tmp_path):
    """The README's case study (about 80 minutes here): fine-tuning must teach the forget set."""
    config = ROOT / "experiments" / "configs" / "tofu_smollm2.json"
    tofu_unlearning.main(["--config", str(config), "--out", str(tmp_path / "run")])
    finetuned = json.loads((tmp_path / "run" / "eval" / "finetuned.json").read_text())
    base = json.loads((tmp_path / "run" / "eval" / "base.json").read_text())
    assert finetuned["forget"]["rougeL"] > 0.9 > base["forget"]["rougeL"]
    assert (tmp_path / "run" / "report.md").exists()
