"""Contrastive perplexity (CP): fine-tune so that the perplexity of an anchor's toxic
paraphrases moves away from that of its non-toxic ones.

"Contrastive Perplexity for Controlled Generation: An Application in Detoxifying Large Language
Models" (Klein & Nabi, arXiv 2401.08491). Data: one row per anchor prompt, holding its n_pos
positive (non-toxic) texts and then its n_neg negative (toxic) texts, each a whole text with a
loss weight on every predicted token (`contrastive_examples`, rows [A, G * T], G = n_pos + n_neg).
For each text x, m(x) = its mean token NLL (log-perplexity) under the model being tuned.

Two variants, both `Objective`s of the generic training step (`cp_objective`):

- "paper": phi(x) = exp(m(x)) (perplexity); prototype c_i = mean of phi over anchor i's
  positives; s(x) = exp(-|phi(x) - c_i|) / tau; weights w = 1 (positives), alpha (negatives);
  J_i = sum_P s / sum_{P u N} w s; loss_i = -log J_i. As the paper writes s, tau multiplies
  numerator and denominator alike and cancels from J_i (the tests check that).
- "code" (the authors' released training script): prototype r = mean of m over every positive
  of the micro-batch (one per batch, not per anchor); logits z(x) = exp(-|m(x) - r|) / tau,
  plus alpha on negatives; loss_i = -sum_{x in P_i} log softmax(z_i)(x) / (n_pos + 1). The
  script's divisor is num_pos + 1 + num_random_negatives; jtrust draws no random negatives.
  Unlike the script (labels = input ids, pads included in the mean), m covers real tokens only.

`cp_losses` computes both from m [A, G] alone, so the tests compare them with a transcription of
the formulas before any model is involved.
"""

from __future__ import annotations

import functools
from typing import Any, Sequence

import jax
import jax.numpy as jnp

from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.tokenizer import Tokenizer
from jtrust.training.lm import Examples, Objective, group_rows, token_examples, token_log_probs, ungroup

VARIANTS = ("paper", "code")


def contrastive_examples(tokenizer: Tokenizer, groups: Sequence[tuple[Sequence[str], Sequence[str]]],
                         seq_len: int) -> Examples:
    """One row per anchor from (positives, negatives) text lists, every anchor with the same
    counts: rows [A, (n_pos + n_neg) * seq_len], members in order positives then negatives.
    Each text (+ EOS) keeps its first seq_len + 1 tokens; the weight covers every predicted token."""
    if not groups:
        raise InputError("no anchors to build contrastive rows from")
    n_pos, n_neg = len(groups[0][0]), len(groups[0][1])
    for i, (pos, neg) in enumerate(groups):
        if (len(pos), len(neg)) != (n_pos, n_neg) or not n_pos or not n_neg:
            raise InputError(f"anchor {i} has {len(pos)} positives and {len(neg)} negatives; every anchor needs "
                             f"the same counts as the first ({n_pos}, {n_neg}), at least one of each")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    members = []
    for g in range(n_pos + n_neg):
        ids = []
        for i, (pos, neg) in enumerate(groups):
            text = (list(pos) + list(neg))[g]
            tokens = (tokenizer.encode(text) + eos)[: seq_len + 1]
            if len(tokens) < 2:
                raise InputError(f"anchor {i}: the text {text!r} is too short to have a perplexity (one token)")
            ids.append(tokens)
        members.append(token_examples([t[:1] for t in ids], [t[1:] for t in ids], seq_len, tokenizer.pad_id))
    return group_rows(members)


def sequence_nll(params: Any, batch: Examples, groups: int, *, config: ModelConfig, dtype=jnp.float32,
                 ) -> jax.Array:
    """[B, G] float32: mean next-token NLL over each text's weighted tokens (log-perplexity) of
    grouped rows [B, G * T]."""
    rows = ungroup(batch, groups)
    _, nll = token_log_probs(params, rows, config=config, dtype=dtype)
    w = rows.weights.astype(jnp.float32)
    mean = jnp.sum(nll * w, axis=1) / jnp.maximum(jnp.sum(w, axis=1), 1.0)
    return mean.reshape(groups, -1).T


def cp_losses(mean_nll: jax.Array, n_pos: int, variant: str = "paper", tau: float = 0.1,
              alpha: float = 1.0) -> jax.Array:
    """[A] loss per anchor from its texts' mean NLL [A, n_pos + n_neg] (positives first); the
    module docstring gives both variants."""
    pos = mean_nll[:, :n_pos]
    if variant == "paper":
        phi = jnp.exp(mean_nll)
        c = jnp.mean(phi[:, :n_pos], axis=1, keepdims=True)
        # log s = -|phi - c| - log tau; log-sum-exp keeps J finite when s underflows
        log_s = -jnp.abs(phi - c) - jnp.log(tau)
        log_w = jnp.where(jnp.arange(mean_nll.shape[1]) < n_pos, 0.0, jnp.log(alpha))
        return jax.nn.logsumexp(log_s + log_w, axis=1) - jax.nn.logsumexp(log_s[:, :n_pos], axis=1)
    if variant == "code":
        ref = jnp.mean(pos)
        logits = jnp.exp(-jnp.abs(mean_nll - ref)) / tau
        logits = logits + jnp.where(jnp.arange(mean_nll.shape[1]) < n_pos, 0.0, alpha)
        log_p = jax.nn.log_softmax(logits, axis=1)
        return -jnp.sum(log_p[:, :n_pos], axis=1) / (n_pos + 1)
    raise InputError(f"unknown CP variant {variant!r}; choose from {VARIANTS}")


def _cp(params, reference, batch, *, config, dtype, n_pos, n_neg, variant, tau, alpha):
    m = sequence_nll(params, batch, n_pos + n_neg, config=config, dtype=dtype)
    losses = cp_losses(m, n_pos, variant, tau, alpha)
    metrics = {"log_ppl_positive": m[:, :n_pos].mean(), "log_ppl_negative": m[:, n_pos:].mean(),
               "log_ppl_gap": m[:, n_pos:].mean() - m[:, :n_pos].mean()}
    return jnp.sum(losses), jnp.float32(m.shape[0]), metrics


def cp_objective(n_pos: int, n_neg: int, variant: str = "paper", tau: float = 0.1, alpha: float = 1.0,
                 ) -> Objective:
    """CP on rows from `contrastive_examples` with n_pos positives and n_neg negatives per anchor.
    Logs the mean log-perplexity of positives and negatives and their gap (negatives - positives)."""
    if variant not in VARIANTS:
        raise InputError(f"unknown CP variant {variant!r}; choose from {VARIANTS}")
    if n_pos < 1 or n_neg < 1:
        raise InputError(f"CP contrasts positives with negatives: n_pos and n_neg must be >= 1, got {n_pos}, {n_neg}")
    if not (tau > 0 and alpha > 0 if variant == "paper" else tau > 0):
        raise InputError(f"tau must be > 0 (and alpha > 0 for the paper's weights), got tau={tau}, alpha={alpha}")
    fn = functools.partial(_cp, n_pos=n_pos, n_neg=n_neg, variant=variant, tau=float(tau), alpha=float(alpha))
    return Objective(f"cp_{variant}(pos={n_pos},neg={n_neg},tau={tau},alpha={alpha})", fn)

