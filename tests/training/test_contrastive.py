"""Contrastive perplexity: both variants against a PyTorch transcription of their formulas (the
paper's J_i; the released script's compute_loss), values and gradients, first on given
log-perplexities, then through a tiny transformers Llama; the row layout; training with LoRA."""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
import torch

import jtrust
from helpers import assert_grads_match_torch, make_tiny_hf_dir, tiny_tokenizer_json
from jtrust import training as T
from jtrust.core.errors import InputError
from jtrust.models.lora import LoraConfig
from jtrust.training import contrastive as C

WORDS = "the quick brown fox jumps over lazy dog trust but verify large language models".split()


def torch_paper(m, n_pos, tau, alpha):
    """The paper: phi = exp(m); c_i = mean_P phi; s = exp(-|phi - c_i|) / tau; J_i = sum_P s /
    (sum_P s + alpha sum_N s); per-anchor -log J_i."""
    phi = torch.exp(m)
    c = phi[:, :n_pos].mean(1, keepdim=True)
    s = torch.exp(-torch.abs(phi - c)) / tau
    w = torch.cat([torch.ones(n_pos, dtype=m.dtype), alpha * torch.ones(m.shape[1] - n_pos, dtype=m.dtype)])
    return -torch.log(s[:, :n_pos].sum(1) / (w * s).sum(1))


def torch_code(m, n_pos, tau, alpha):
    """The released script's compute_loss with no random negatives: ref = mean of the positives'
    mean losses; final_scores = exp(-|m - ref|) / tau + alpha on negatives; CrossEntropyLoss
    with labels 1 (positives) / 0 (negatives), mean over anchors, / (num_pos + 1 + 0)."""
    ref = torch.mean(m[:, :n_pos])
    scores = torch.exp(-torch.abs(m - ref)) / tau
    scores = scores + torch.cat([torch.zeros(n_pos, dtype=m.dtype), alpha * torch.ones(m.shape[1] - n_pos, dtype=m.dtype)])
    labels = torch.cat([torch.ones(n_pos), torch.zeros(m.shape[1] - n_pos)]).to(m.dtype).expand_as(scores)
    return torch.nn.CrossEntropyLoss()(scores, labels) / (n_pos + 1)


TORCH = {"paper": torch_paper, "code": torch_code}


@pytest.mark.parametrize("variant,tau,alpha", [("paper", 0.1, 1.0), ("paper", 0.2, 1.1), ("code", 1.0, 100.0),
                                               ("code", 0.1, 1.0)])
def test_losses_and_gradients_match_a_torch_transcription(variant, tau, alpha):
    rng = np.random.default_rng(0)
    m = rng.uniform(1.0, 3.5, (4, 7))  # log-perplexities: perplexities 3-33
    n_pos = 3
    mt = torch.tensor(m, dtype=torch.float64, requires_grad=True)
    want = TORCH[variant](mt, n_pos, tau, alpha)
    want = want.mean() if want.ndim else want
    want.backward()
    mean_loss = lambda x: jnp.mean(C.cp_losses(x, n_pos, variant, tau, alpha))
    with jax.enable_x64():
        got, grad = jax.value_and_grad(mean_loss)(jnp.asarray(m))
    assert float(got) == pytest.approx(want.item(), rel=1e-12)
    np.testing.assert_allclose(np.asarray(grad), mt.grad.numpy(), rtol=1e-10, atol=1e-14)


def test_paper_loss_closed_forms():
    # every text at the prototype's perplexity: J = P / (P + alpha N) whatever tau is
    m = jnp.full((2, 5), 1.7)
    for tau in (0.1, 0.2, 3.0):
        np.testing.assert_allclose(C.cp_losses(m, 2, "paper", tau, 1.1), math.log((2 + 1.1 * 3) / 2), rtol=1e-6)
    # negatives far from the prototype (perplexity 20 vs 1): J -> 1, no loss; and the sum of
    # underflowing s stays finite
    m = jnp.log(jnp.array([[1.0, 1.0, 1e3, 1e3]]))
    assert float(C.cp_losses(m, 2, "paper")[0]) == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# through a model

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("contrastive") / "llama"
    torch_model = make_tiny_hf_dir(path, "llama", seed=3)
    return jtrust.load(path), torch_model


def _groups(n, n_pos, n_neg, seed):
    rng = np.random.default_rng(seed)
    text = lambda: " ".join(rng.choice(WORDS, int(rng.integers(2, 7))))
    return [([text() for _ in range(n_pos)], [text() + " dog dog" for _ in range(n_neg)]) for _ in range(n)]


def _torch_mean_nll(model, groups, eos):
    """[A, G] mean next-token NLL of each text (+ EOS), each run alone from the tokenizer file's ids."""
    backend = tokenizers.Tokenizer.from_str(tiny_tokenizer_json())
    rows = []
    for pos, neg in groups:
        row = []
        for text in list(pos) + list(neg):
            ids = torch.tensor(backend.encode(text).ids + [eos])
            logp = torch.log_softmax(model(input_ids=ids[None]).logits[0, :-1].double(), -1)
            row.append(-logp.gather(-1, ids[1:, None]).mean())
        rows.append(torch.stack(row))
    return torch.stack(rows)


@pytest.mark.parametrize("variant,tau,alpha", [("paper", 0.1, 1.1), ("code", 1.0, 100.0)])
def test_objective_value_and_gradient_match_pytorch(tiny, variant, tau, alpha):
    model, torch_model = tiny
    groups = _groups(3, 2, 3, seed=1)
    batch = C.contrastive_examples(model.tokenizer, groups, seq_len=48)
    assert batch.weights.reshape(3, 5, 48)[:, :, -1].max() == 0  # no text cut
    objective = C.cp_objective(2, 3, variant, tau, alpha)

    def loss_fn(params):
        total, weight, metrics = objective.fn(params, None, batch, config=model.config, dtype=np.float32)
        return total / weight, metrics
    (loss, metrics), grads = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))(model.params)
    m = jax.jit(lambda p: C.sequence_nll(p, batch, 5, config=model.config))(model.params)

    torch_model.zero_grad()
    m_torch = _torch_mean_nll(torch_model, groups, torch_model.config.eos_token_id)
    expected = TORCH[variant](m_torch, 2, tau, alpha)
    expected = expected.mean() if expected.ndim else expected
    expected.backward()
    np.testing.assert_allclose(np.asarray(m), m_torch.detach().numpy(), rtol=1e-5)
    assert float(loss) == pytest.approx(expected.item(), rel=1e-5, abs=1e-7)
    assert float(metrics["log_ppl_gap"]) == pytest.approx(
        (m_torch[:, 2:].mean() - m_torch[:, :2].mean()).item(), rel=1e-5)
    assert_grads_match_torch(grads, torch_model, model.config, rtol=5e-5)


def test_rows_hold_each_anchor_positives_then_negatives(tiny):
    model, _ = tiny
    tok = model.tokenizer
    L = 16
    texts = ["the fox", "a dog", "lazy dog dog"]
    ex = C.contrastive_examples(tok, [(texts[:2], texts[2:])], seq_len=L)
    assert ex.tokens.shape == (1, 3 * L)
    rows = T.ungroup(ex, 3)
    for g, text in enumerate(texts):
        ids = (tok.encode(text) + [tok.eos_id])[: L + 1]  # the tiny tokenizer spells words out: cut at L + 1
        n = len(ids) - 1
        np.testing.assert_array_equal(rows.tokens[g, :n], ids[:-1])
        np.testing.assert_array_equal(rows.targets[g, :n], ids[1:])
        np.testing.assert_array_equal(rows.weights[g], [1.0] * n + [0.0] * (L - n))
    with pytest.raises(InputError, match="anchor 1 has 1 positives and 2 negatives"):
        C.contrastive_examples(tok, [(["a"], ["b"]), (["trust"], ["but verify", "no"])], seq_len=6)
    with pytest.raises(InputError, match="at least one of each"):
        C.contrastive_examples(tok, [(["the fox"], [])], seq_len=6)
    with pytest.raises(InputError, match="unknown CP variant"):
        C.cp_objective(1, 1, "papr")


def test_training_with_lora_moves_negatives_away_from_the_prototype(tiny, tmp_path):
    """CP scores a text by |m - prototype|, blind to the direction: what training must do is move
    the negatives' log-perplexity away from the positives' (here they move down: the negatives
    all end in "dog dog", which LoRA learns to predict), and lower the loss."""
    model, _ = tiny
    groups = _groups(16, 2, 2, seed=5)
    ex = C.contrastive_examples(model.tokenizer, groups, seq_len=32)
    objective = C.cp_objective(2, 2, "code", tau=1.0, alpha=1.0)
    config = T.TrainConfig(steps=30, batch_size=8, learning_rate=1e-2, warmup_steps=0, schedule="constant",
                           lora=LoraConfig(rank=4, alpha=8.0), seed=0, log_every=1, save_steps=(30,))
    run = T.train(model, ex, config, tmp_path / "cp", objective=objective, progress=False)

    def distance(params):  # mean over anchors of |mean m(negatives) - mean m(positives)|
        m = np.asarray(C.sequence_nll(params, ex, 4, config=model.config)).reshape(-1, 2, 2).mean(2)
        return float(np.abs(m[:, 1] - m[:, 0]).mean())
    before, after = distance(model.params), distance(run.model.params)
    losses = [m["loss"] for m in run.metrics if m.get("kind") == "train"]
    assert after > before + 0.2, (before, after)
    assert np.mean(losses[-5:]) < np.mean(losses[:5]) - 0.01
