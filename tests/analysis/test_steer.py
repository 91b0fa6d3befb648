"""Steering: mass-mean vectors against closed forms, and steered generation and
perplexity against transformers with the same vector added by a forward hook."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import jtrust
from jtrust.analysis import steer as st
from jtrust.runtime.generate import generate

LAYER, STRENGTH = 1, 3.0


@pytest.fixture(scope="module")
def llama(tiny_checkpoints):
    path, torch_model = tiny_checkpoints["llama"]
    return jtrust.load(path), torch_model


@pytest.fixture(scope="module")
def vector(llama):
    return np.random.RandomState(3).randn(llama[0].config.d_model).astype(np.float32) * 0.5


def test_mass_mean_vector_variants():
    rng = np.random.RandomState(0)
    a = rng.randn(50, 7)
    y = (rng.rand(50) > 0.4).astype(int)
    d = a[y == 1].mean(0) - a[y == 0].mean(0)
    np.testing.assert_allclose(st.mass_mean_vector(a, y, "paper"), d, rtol=1e-5)
    u = d / np.sqrt((d ** 2).sum())
    proj = a @ u
    std = np.sqrt(((proj - proj.mean()) ** 2).sum() / (len(proj) - 1))  # unbiased, as released
    np.testing.assert_allclose(st.mass_mean_vector(a, y, "code"), std * u, rtol=1e-5)
    np.testing.assert_allclose(st.mass_mean_vector(a, y, "paper", toward=0), -d, rtol=1e-5)
    with pytest.raises(ValueError, match="both labels"):
        st.mass_mean_vector(a, np.ones(50, int))


def _hook(torch_model, vector, strength, last_only):
    """Add strength * vector to decoder layer LAYER's output (all positions or the last)."""
    v = torch.tensor(vector) * strength

    def add(module, inputs, output):
        hidden = output[0] if isinstance(output, tuple) else output
        hidden = hidden.clone()
        if last_only:
            hidden[:, -1] += v
        else:
            hidden += v
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    return torch_model.model.layers[LAYER].register_forward_hook(add)


def test_steered_generation_matches_transformers_hook(llama, vector):
    model, torch_model = llama
    prompt = model.tokenizer.encode("Trust, but verify.")
    steer = st.Steer(LAYER, vector, STRENGTH)
    out = generate(model, [prompt], max_new_tokens=6, interventions=st.intervention(model, steer),
                   return_logits=True)
    handle = _hook(torch_model, vector, STRENGTH, last_only=True)  # each cached step feeds one token
    try:
        with torch.no_grad():
            ref = torch_model.generate(torch.tensor([prompt]), max_new_tokens=6, do_sample=False,
                                       output_logits=True, return_dict_in_generate=True, pad_token_id=0)
    finally:
        handle.remove()
    np.testing.assert_array_equal(out.tokens[0, 0], ref.sequences[0, len(prompt):].numpy())
    ref_logits = torch.stack(ref.logits, 1)[0].numpy()
    np.testing.assert_allclose(out.logits[0, 0], ref_logits, atol=1e-4)
    unsteered = generate(model, [prompt], max_new_tokens=6, return_logits=True)
    assert np.abs(unsteered.logits - out.logits).max() > 1e-2  # the vector did act


def test_perplexity_matches_transformers(llama, vector):
    model, torch_model = llama
    texts = ["The quick brown fox jumps over the lazy dog.", "What is the capital of France?"]
    steer = st.Steer(LAYER, vector, STRENGTH)

    def torch_perplexity():
        nll, count = 0.0, 0
        for t in texts:
            ids = torch.tensor([model.tokenizer.encode(t)])
            with torch.no_grad():
                loss = torch_model(ids, labels=ids).loss.item()
            nll += loss * (ids.shape[1] - 1)
            count += ids.shape[1] - 1
        return np.exp(nll / count)

    assert st.perplexity(model, texts) == pytest.approx(torch_perplexity(), rel=1e-4)
    handle = _hook(torch_model, vector, STRENGTH, last_only=False)
    try:
        expected = torch_perplexity()
    finally:
        handle.remove()
    assert st.perplexity(model, texts, steer) == pytest.approx(expected, rel=1e-4)


def test_vector_width_must_match(llama):
    with pytest.raises(ValueError, match="d_model"):
        st.intervention(llama[0], st.Steer(0, np.zeros(5, np.float32), 1.0))


def test_choose_point_keeps_perplexity_within_a_third():
    base = dict(rate=0.30, perplexity=10.0)
    cells = [dict(layer=1, strength=2.0, rate=0.20, perplexity=12.0),
             dict(layer=1, strength=8.0, rate=0.05, perplexity=14.0),  # 1.4x: over budget
             dict(layer=2, strength=2.0, rate=0.25, perplexity=11.0)]
    assert st.choose_point(cells, base, "toxicity") is cells[0]
    assert st.choose_point(cells, base, "truthfulness") is None  # nothing raises the rate
    assert st.choose_point(cells, dict(rate=0.1, perplexity=10.0), "truthfulness") is cells[2]


def test_heldout_texts_are_detokenized_paragraphs():
    texts = st.heldout_texts(5)
    assert len(texts) == 5
    assert texts[0].startswith("Homarus gammarus, known as the European lobster or common lobster,")
    assert not any("@-@" in t or t.startswith("=") for t in texts)
