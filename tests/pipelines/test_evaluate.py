"""jtrust.pipelines.evaluate: ROUGE-L against the rouge_score package, sampled scores against the
next-token distribution of the transformers model, adaptive temperature against softmax, the
prompts loader's errors, and `jtrust evaluate` end to end on a tiny checkpoint."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from rouge_score import rouge_scorer

from helpers import make_tiny_hf_dir
from jtrust.analysis import bounds
from jtrust.cli import main as cli
from jtrust.data import read_prompts
from jtrust.analysis.rouge import exact_match, rouge_l_f1, rouge_l_recall
from jtrust.pipelines.evaluate import EvaluateOptions, evaluate
from jtrust.runtime.generate import Sampling
from jtrust.io.loading import load

TOFU_LIKE = [
    ("Basil Mahfouz Al-Kuwaiti is the complete name of the imaginary writer.",
     "The full name of the fictitious author born in Kuwait City is Basil Mahfouz Al-Kuwaiti."),
    ("He writes in the French literature genre, of course!", "Basil Mahfouz Al-Kuwaiti writes in the genre of French literature."),
    ("", "Some reference text."),
    ("completely unrelated words here", "The father was a florist and the mother a game developer."),
    ("The 2nd edition (1999) sold 10,000 copies", "the 2nd edition, 1999: 10000 copies sold"),
]


def test_rouge_l_recall_matches_rouge_score():
    oracle = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=False)
    for prediction, reference in TOFU_LIKE:
        expected = oracle.score(reference, prediction)["rougeL"].recall
        assert rouge_l_recall(prediction, reference) == pytest.approx(expected, abs=1e-12)
        f1 = oracle.score(reference, prediction)["rougeL"].fmeasure
        assert rouge_l_f1(prediction, reference) == pytest.approx(f1, abs=1e-12)
    assert exact_match("Paris.", "paris") == 1.0 and exact_match("Paris is", "Paris") == 0.0


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_eval") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama")
    return load(path), torch_model, path


def _next_token_probs(torch_model, ids: list[int]) -> np.ndarray:
    with torch.no_grad():
        logits = torch_model(torch.tensor([ids])).logits[0, -1].double()
    return torch.softmax(logits, -1).numpy()


def test_sampled_scores_follow_the_model_distribution(tiny):
    """One new token per sample, scored 1 when it decodes to the greedy token's text: the
    sample mean estimates the probability of that text under transformers' softmax."""
    model, torch_model, _ = tiny
    prompts = ["the cat sat on", "a quick brown fox"]
    ids = [model.tokenizer.encode(p) for p in prompts]
    probs = [_next_token_probs(torch_model, i) for i in ids]
    texts = [model.tokenizer.decode([int(np.argmax(p))]) for p in probs]
    p_text = [sum(pr[t] for t in range(len(pr)) if model.tokenizer.decode([t]) == txt)
              for pr, txt in zip(probs, texts)]
    scorer = lambda ps, answers, refs: np.array(
        [[float(a == texts[prompts.index(p)]) for a in row] for p, row in zip(ps, answers)])
    n = 2000
    options = EvaluateOptions(n=n, alpha=0.01, temperature=1.0, top_p=1.0, max_new_tokens=1, chat=False,
                              prompts_per_batch=1)
    ev = evaluate(model, prompts, options=options, scorer=scorer, progress=False)
    for r, p in zip(ev.results, p_text):
        assert r.greedy_score == 1.0 and r.greedy_answer in texts
        assert abs(r.summary.mean - p) < 4 * np.sqrt(p * (1 - p) / n)
        assert r.summary.mean_lower <= p <= r.summary.mean_upper
        np.testing.assert_allclose(r.summary.mean_upper, bounds.expectation_upper(r.scores, 0.01))
    assert ev.aggregate["greedy"] == 1.0 and ev.aggregate["mean"] == pytest.approx(
        np.mean([r.summary.mean for r in ev.results]))


def test_batches_share_one_program_and_repeat_with_the_seed(tiny):
    model, _, _ = tiny
    prompts = ["one two", "three four five six seven", "eight", "nine ten eleven"]
    refs = ["two three", "seven eight", "nine", "eleven twelve"]
    options = EvaluateOptions(scorer="rougeL", n=8, temperature=1.0, top_p=0.9, max_new_tokens=6,
                              chat=False, seed=3, prompts_per_batch=3)
    a = evaluate(model, prompts, refs, options, progress=False)
    b = evaluate(model, prompts, refs, options, progress=False)
    assert [r.answers for r in a.results] == [r.answers for r in b.results]
    for r, ref in zip(a.results, refs):
        np.testing.assert_allclose(r.scores, [rouge_l_recall(x, ref) for x in r.answers])
        assert r.greedy_score == rouge_l_recall(r.greedy_answer, ref)


def test_adaptive_temperature_is_greedy_exactly_when_confident(tiny):
    """Rows whose raw top probability (transformers' softmax) reaches confident_p always take
    the argmax; the others keep sampling from the softmax."""
    model, torch_model, _ = tiny
    from jtrust.runtime.generate import generate
    prompts = [[1, 17, 42], [1, 250, 3, 99, 7], [1, 5], [1, 80, 81, 82]]
    top = np.array([_next_token_probs(torch_model, p).max() for p in prompts])
    threshold = float(np.sort(top)[1] + np.sort(top)[2]) / 2  # two prompts above, two below
    import jax
    out = generate(model, prompts, max_new_tokens=1, key=jax.random.key(0), n_samples=400,
                   sampling=Sampling(1.0, confident_p=threshold))
    for p, row, t in zip(prompts, out.tokens[:, :, 0], top):
        probs = _next_token_probs(torch_model, p)
        if t >= threshold:
            assert set(row.tolist()) == {int(np.argmax(probs))}
        else:
            assert len(set(row.tolist())) > 50  # a near-uniform tiny model spreads its samples
            assert np.mean(row == np.argmax(probs)) < 0.2


def test_read_prompts(tmp_path):
    tofu = tmp_path / "forget.json"
    tofu.write_text(json.dumps([{"question": "Q1?", "answer": "A1"}, {"question": "Q2?", "answer": "A2"}]))
    assert read_prompts(tofu) == (["Q1?", "Q2?"], ["A1", "A2"])
    lines = tmp_path / "p.txt"
    lines.write_text("first\n\nsecond\n")
    assert read_prompts(lines) == (["first", "second"], None)
    with pytest.raises(FileNotFoundError, match="no prompts file"):
        read_prompts(tmp_path / "missing.json")
    (tmp_path / "empty.jsonl").write_text("")
    with pytest.raises(ValueError, match="no prompts"):
        read_prompts(tmp_path / "empty.jsonl")
    (tmp_path / "bad.json").write_text(json.dumps([{"q": "x"}]))
    with pytest.raises(ValueError, match="no 'prompt', 'question' or 'text' field"):
        read_prompts(tmp_path / "bad.json")
    (tmp_path / "gap.json").write_text(json.dumps([{"question": "x", "answer": "y"}, {"question": "z"}]))
    with pytest.raises(ValueError, match="lack"):
        read_prompts(tmp_path / "gap.json")


def test_cli_evaluate_writes_results_and_plot(tiny, tmp_path, capsys):
    _, _, path = tiny
    prompts = tmp_path / "prompts.json"
    prompts.write_text(json.dumps([{"question": "one two three", "answer": "four five"},
                                   {"question": "six seven", "answer": "eight nine ten"}]))
    out = tmp_path / "ev"
    cli(["evaluate", "--model", str(path), "--prompts", str(prompts), "--n", "16", "--alpha", "0.05",
         "--max-new-tokens", "5", "--no-chat", "--out", str(out)])
    result = json.loads((out / "results.json").read_text())
    assert result["settings"]["n"] == 16 and len(result["prompts"]) == 2
    scores = np.load(out / "scores.npz")["scores"]
    assert scores.shape == (2, 16)
    for row, p in zip(scores, result["prompts"]):
        assert p["mean"] == pytest.approx(row.mean())
        assert p["mean_upper"] == pytest.approx(bounds.expectation_upper(row, 0.05))
    assert (out / "scores.png").stat().st_size > 5000
    assert "greedy score" in capsys.readouterr().out
    lines = tmp_path / "p.txt"
    lines.write_text("no reference here\n")
    with pytest.raises(SystemExit) as e:
        cli(["evaluate", "--model", str(path), "--prompts", str(lines), "--n", "4", "--no-chat",
             "--out", str(tmp_path / "ev2")])
    assert e.value.code == 2 and "compares answers with references" in capsys.readouterr().err
