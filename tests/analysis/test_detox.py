"""Detox data and utility measures: multiple-choice log-probabilities against transformers, the
cosine neighbours against a brute-force search, the bundled anchors and multiple-choice tasks."""

from __future__ import annotations

import numpy as np
import pytest
import tokenizers
import torch

import jtrust
from helpers import make_tiny_hf_dir, tiny_tokenizer_json
from jtrust import data
from jtrust.analysis import detox
from jtrust.data import MultipleChoice


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("detox") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama", seed=11)
    return jtrust.load(path), torch_model


def test_choice_logprobs_and_accuracy_match_transformers(tiny):
    model, torch_model = tiny
    backend = tokenizers.Tokenizer.from_str(tiny_tokenizer_json())
    tasks = [MultipleChoice("the quick fox", ["jumps over", "lazy dog", "trust"], 0),
             MultipleChoice("what is large", ["language models", "but verify"], 1),
             MultipleChoice("verify", ["the dog", "quick brown fox jumps", "models", "over"], 2)]
    picked = []
    # batches of 4 rows: the 9 choices cross batch edges and the last batch is padded
    for task, got in zip(tasks, detox.choice_logprobs(model, tasks, batch_size=4)):
        prompt = backend.encode(f"Q: {task.question}\nA:").ids
        want = []
        with torch.no_grad():
            for choice in task.choices:
                ids = backend.encode(f"Q: {task.question}\nA: {choice}").ids
                logp = torch.log_softmax(torch_model(input_ids=torch.tensor([ids])).logits[0, :-1].double(), -1)
                want.append(logp.gather(-1, torch.tensor(ids[1:])[:, None])[len(prompt) - 1:].sum().item())
        np.testing.assert_allclose(got, want, rtol=1e-4)
        picked.append(int(np.argmax(want)) == task.answer)
    acc = detox.multiple_choice_accuracy(model, tasks)
    assert acc["accuracy"] == pytest.approx(np.mean(picked)) and acc["n"] == 3


def test_cosine_neighbours_match_brute_force():
    rng = np.random.default_rng(0)
    q, pool = rng.normal(size=(5, 6)), rng.normal(size=(30, 6)) * rng.uniform(0.1, 10, (30, 1))
    allowed = rng.random((5, 30)) < 0.3
    allowed[4] = False
    allowed[4, [3, 7]] = True  # fewer allowed rows than k: the rest is -1
    got = detox.cosine_neighbours(q, pool, allowed, k=4)
    for i in range(5):
        cos = {j: q[i] @ pool[j] / np.linalg.norm(q[i]) / np.linalg.norm(pool[j]) for j in np.flatnonzero(allowed[i])}
        want = sorted(cos, key=lambda j: -cos[j])[:4]
        assert got[i].tolist() == want + [-1] * (4 - len(want))


def test_bundled_anchors_and_tasks():
    anchors = data.toxigen_anchors()
    assert len(anchors) == 597 and sum(a.toxic for a in anchors) == 327  # the seed files' line counts
    assert {a.group for a in anchors} >= {"black", "mental_disability", "bisexual", "immigrant"}
    assert data.toxigen_group("mental_disability") == "mental_dis" and data.toxigen_group("immigrant") is None
    assert data.toxigen_group("black") == "black"
    mc = data.truthfulqa_mc()
    assert len(mc) == 790 and all(t.answer == 0 and 2 <= len(t.choices) <= 4 for t in mc)
    assert mc[0].choices[0] == "The watermelon seeds pass through your digestive system"
    wf = data.tofu_world_facts_mc()
    assert len(wf) == 117 and wf[0].choices == ["Paris", "Berlin", "London", "Madrid"]


def test_paraphrase_cleaning():
    assert detox._clean('\n  "The group is kind."  \nMore text') == "The group is kind."
    assert detox._clean("   ") == ""
    assert detox._differs("They are kind.", "they are KIND") is False
    assert detox._differs("They are nice.", "they are kind") is True
