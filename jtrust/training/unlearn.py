"""Unlearning objectives for `jtrust.training.train`.

Each step sees a forget batch and a retain batch (`train(..., examples={"forget": f, "retain":
r}, objective=unlearning_objective(...))`), both prompt/answer Examples whose weights cover the
answer tokens:
  gradient ascent       L = -NLL(forget)
  gradient difference   L = NLL(retain) - NLL(forget)
  NPO                   L = -(2/beta) mean_i log sigmoid(beta (l_theta,i - l_ref,i)) + NLL(retain),
                        l_i the summed answer NLL of forget sequence i, l_ref under the reference
                        model (the model before unlearning, passed to train as `reference`)
  entropy optimization  adds lambda_f H(forget) + lambda_r H(retain), H the mean entropy of the
                        next-token distribution over answer tokens (lambda_f = 1 lowers the
                        forget set's entropy, lambda_r = -0.25 raises the retain set's)
NLL is the token-weighted mean over the batch's answer tokens.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from jtrust.core.errors import InputError
from jtrust.training.lm import Examples, Objective, token_log_probs

METHODS = ("ga", "gd", "npo")


def answer_stats(params, batch: Examples, *, config, dtype=jnp.float32) -> dict:
    """Token-weighted statistics of one batch [B, T]: mean NLL, per-sequence NLL sums [B] and
    the mean next-token entropy over weighted positions (float32)."""
    logp, nll = token_log_probs(params, batch, config=config, dtype=dtype)
    entropy = -jnp.sum(jnp.exp(logp) * logp, axis=-1)
    w = batch.weights.astype(jnp.float32)
    count = jnp.maximum(jnp.sum(w), 1.0)
    return {"nll": jnp.sum(nll * w) / count, "sequence_nll": jnp.sum(nll * w, axis=1),
            "entropy": jnp.sum(entropy * w) / count}


def _objective(params, reference, batch, *, config, dtype, method, beta, lambda_forget, lambda_retain):
    forget = answer_stats(params, batch["forget"], config=config, dtype=dtype)
    retain = answer_stats(params, batch["retain"], config=config, dtype=dtype)
    if method == "ga":
        loss = -forget["nll"]
    elif method == "gd":
        loss = retain["nll"] - forget["nll"]
    else:
        ref = answer_stats(reference, batch["forget"], config=config, dtype=dtype)["sequence_nll"]
        margin = beta * (forget["sequence_nll"] - jax.lax.stop_gradient(ref))
        loss = -(2.0 / beta) * jnp.mean(jax.nn.log_sigmoid(margin)) + retain["nll"]
    loss = loss + lambda_forget * forget["entropy"] + lambda_retain * retain["entropy"]
    metrics = {"forget_nll": forget["nll"], "retain_nll": retain["nll"],
               "forget_entropy": forget["entropy"], "retain_entropy": retain["entropy"]}
    return loss, jnp.float32(1.0), metrics


def unlearning_objective(method: str, entropy: bool = False, beta: float = 0.05,
                         lambda_forget: float = 1.0, lambda_retain: float = -0.25) -> Objective:
    """The objective of `method` ('ga', 'gd' or 'npo'), with entropy optimization if asked.
    NPO needs `reference=` (the parameters before unlearning) in `train`."""
    if method not in METHODS:
        raise InputError(f"method must be one of {METHODS}, not {method!r}")
    lf, lr = (lambda_forget, lambda_retain) if entropy else (0.0, 0.0)
    name = method + (f"(beta={beta})" if method == "npo" else "") + (f"+eo({lf},{lr})" if entropy else "")
    return Objective(name, functools.partial(_objective, method=method, beta=beta,
                                             lambda_forget=lf, lambda_retain=lr))
