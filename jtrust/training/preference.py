"""Direct preference optimization (DPO; Rafailov et al., arXiv 2305.18290) as an objective of
`jtrust.training.train`, and a held-out preference evaluation.

For a prompt x with a preferred reply y_c and a rejected reply y_r, the policy pi and a frozen
reference model pi_ref (the model before tuning; with LoRA, the base parameters):

    r(y)  = beta * (log pi(y | x) - log pi_ref(y | x))     implicit reward, log pi summed over y's tokens
    loss  = -log sigmoid(r(y_c) - r(y_r))                  mean over pairs
    margin = r(y_c) - r(y_r); accuracy = fraction of pairs with margin > 0

Pairs travel as one Examples whose rows are [2T]: the chosen sequence in columns [:T], the
rejected one in [T:] (`pair_examples`). `train` shuffles rows, so a row that holds its whole
pair keeps chosen and rejected together (two named streams would be shuffled apart). Inside
the objective the rows are unstacked into [2B, T] and run through one forward.

    ex = pair_examples(model.tokenizer, split.train, seq_len=96, max_response=32)
    held = pair_examples(model.tokenizer, split.heldout, seq_len=96, max_response=32)
    run = train(model, ex, TrainConfig(..., lora=LoraConfig(rank=16)), "runs/dpo",
                objective=dpo_objective(beta=0.1), reference=model.params,
                evals=[preference_eval(held, model.params, beta=0.1)])
"""

from __future__ import annotations

import functools
import re
from typing import Any, Callable, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtrust.core.errors import InputError
from jtrust.core.stats import clopper_pearson
from jtrust.data.preferences import HUMAN, PreferencePair
from jtrust.models.config import ModelConfig
from jtrust.models.model import Model
from jtrust.models.tokenizer import Tokenizer
from jtrust.training.lm import Examples, Objective, group_rows, take, token_examples, token_log_probs, ungroup

# ---------------------------------------------------------------------------------------------
# data


def pair_examples(tokenizer: Tokenizer, pairs: Sequence[PreferencePair | tuple[str, str, str]],
                  seq_len: int, max_response: int | None = None) -> Examples:
    """Preference pairs as Examples of rows [N, 2 * seq_len]: columns [:seq_len] hold prompt +
    chosen reply, [seq_len:] prompt + rejected reply, each right-padded; weights cover the reply
    tokens and the closing EOS, not the prompt.

    Each reply (+ EOS) keeps its first `max_response` tokens (default seq_len // 2). A prompt
    longer than the room left (seq_len + 1 - the longer reply) loses its earliest turns: it
    starts at the earliest "\\n\\nHuman:" from which it fits, or, if the last human turn alone
    is too long, keeps its last tokens."""
    max_response = seq_len // 2 if max_response is None else max_response
    if not 1 <= max_response < seq_len:
        raise InputError(f"max_response={max_response} must be in [1, seq_len={seq_len}); the prompt "
                         "needs at least one token")
    if not pairs:
        raise InputError("no preference pairs to build examples from")
    eos = [tokenizer.eos_id] if tokenizer.eos_id is not None else []
    reply = lambda text: (tokenizer.backend.encode(text, add_special_tokens=False).ids + eos)[:max_response]
    chosen, rejected = [], []
    for prompt, chosen_text, rejected_text in pairs:
        if not prompt:
            raise InputError(f"a pair has an empty prompt (replies {chosen_text[:40]!r} / {rejected_text[:40]!r}); "
                             "the replies' log-probabilities are conditioned on it: give every pair a prompt")
        c, r = reply(chosen_text), reply(rejected_text)
        p = fit_prompt(tokenizer, prompt, seq_len + 1 - max(len(c), len(r)))
        chosen.append((p, c))
        rejected.append((p, r))
    return group_rows([token_examples(*zip(*seqs), seq_len, tokenizer.pad_id) for seqs in (chosen, rejected)])


def fit_prompt(tokenizer: Tokenizer, prompt: str, budget: int) -> list[int]:
    """The prompt's token ids, at most `budget` of them: whole, else from the earliest
    "\\n\\nHuman:" turn from which it fits, else its last `budget` tokens (after BOS if it adds one)."""
    ids = tokenizer.encode(prompt)
    if len(ids) <= budget:
        return ids
    for start in (m.start() for m in re.finditer(re.escape(HUMAN), prompt) if m.start() > 0):
        ids = tokenizer.encode(prompt[start:])
        if len(ids) <= budget:
            return ids
    bos = [tokenizer.bos_id] if tokenizer.add_bos and tokenizer.bos_id is not None else []
    return bos + ids[len(ids) - (budget - len(bos)):]  # ids: the last turn's, or the whole prompt's


# ---------------------------------------------------------------------------------------------
# the objective

def pair_log_probs(params: Any, batch: Examples, *, config: ModelConfig, dtype=jnp.float32,
                   ) -> tuple[jax.Array, jax.Array]:
    """(log p(chosen reply | prompt) [B], log p(rejected reply | prompt) [B]) of pair rows
    [B, 2T]: next-token log-probabilities summed over the weighted (reply) tokens, float32."""
    rows = ungroup(batch, 2)  # the B chosen rows, then the B rejected rows
    _, nll = token_log_probs(params, rows, config=config, dtype=dtype)
    logp = -jnp.sum(nll * rows.weights.astype(jnp.float32), axis=1)
    B = batch.tokens.shape[0]
    return logp[:B], logp[B:]


class DPOTerms(NamedTuple):
    """Per pair [B]: the DPO loss, the implicit rewards of both replies and their margin."""
    losses: jax.Array
    chosen_rewards: jax.Array
    rejected_rewards: jax.Array
    margins: jax.Array


def dpo_terms(policy_chosen, policy_rejected, reference_chosen, reference_rejected, beta: float,
              ) -> DPOTerms:
    """The DPO sigmoid loss from sequence log-probabilities (each [B]): rewards
    beta * (policy - reference), loss -log sigmoid(chosen reward - rejected reward)."""
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    margins = chosen - rejected
    return DPOTerms(-jax.nn.log_sigmoid(margins), chosen, rejected, margins)


def _dpo(params, reference, batch, *, config, dtype, beta):
    if reference is None:
        raise InputError("DPO measures the policy against a frozen reference: pass "
                         "train(..., reference=model.params) (with LoRA: the base parameters)")
    policy_c, policy_r = pair_log_probs(params, batch, config=config, dtype=dtype)
    ref_c, ref_r = jax.lax.stop_gradient(pair_log_probs(reference, batch, config=config, dtype=dtype))
    t = dpo_terms(policy_c, policy_r, ref_c, ref_r, beta)
    metrics = {"reward_margin": t.margins.mean(), "reward_accuracy": (t.margins > 0).mean(),
               "reward_chosen": t.chosen_rewards.mean(), "reward_rejected": t.rejected_rewards.mean(),
               "logp_chosen": policy_c.mean(), "logp_rejected": policy_r.mean()}
    return jnp.sum(t.losses), jnp.float32(policy_c.shape[0]), metrics


def dpo_objective(beta: float = 0.1) -> Objective:
    """DPO (sigmoid loss) on pair rows from `pair_examples`; `train` needs `reference=` (the
    frozen parameters the implicit rewards are measured against). Logs reward_margin,
    reward_accuracy, reward_chosen, reward_rejected, logp_chosen, logp_rejected (batch means)."""
    if not beta > 0:
        raise InputError(f"beta must be > 0 (the inverse temperature of the implicit reward), not {beta}; "
                         "0.1 is usual")
    return Objective(f"dpo(beta={beta})", functools.partial(_dpo, beta=beta))


# ---------------------------------------------------------------------------------------------
# evaluation

@functools.partial(jax.jit, static_argnames=("config",))
def _pair_log_probs(params, batch, config):
    return pair_log_probs(params, batch, config=config)


def score_pairs(params: Any, examples: Examples, *, config: ModelConfig, batch_size: int = 16,
                ) -> np.ndarray:
    """[N, 2] float64: log p(chosen reply), log p(rejected reply) of every pair row [N, 2T]."""
    out = []
    for start in range(0, len(examples.tokens), batch_size):
        rows = np.minimum(start + np.arange(batch_size), len(examples.tokens) - 1)  # one shape: one compile
        c, r = _pair_log_probs(params, take(examples, rows), config)
        out.append(np.stack([np.asarray(c), np.asarray(r)], axis=1)[: len(examples.tokens) - start])
    return np.concatenate(out).astype(np.float64)


def preference_metrics(policy: np.ndarray, reference: np.ndarray, beta: float = 0.1,
                       name: str = "pref", confidence: float = 0.95) -> dict[str, float]:
    """Held-out preference figures from [N, 2] (chosen, rejected) log-probabilities of the
    current model and of the reference:
      {name}_accuracy (+ _low, _high): pairs with implicit reward margin > 0 (0 when the model
        is the reference: every margin is 0);
      {name}_margin, {name}_reward_chosen, {name}_reward_rejected: means;
      {name}_logp_accuracy (+ _low, _high): pairs with log p(chosen) > log p(rejected) under
        the current model; {name}_reference_logp_accuracy (+ _low, _high): under the reference.
    Intervals: Clopper-Pearson at `confidence`."""
    n = len(policy)
    chosen, rejected = beta * (policy[:, 0] - reference[:, 0]), beta * (policy[:, 1] - reference[:, 1])
    out = {f"{name}_n": n, f"{name}_margin": float(np.mean(chosen - rejected)),
           f"{name}_reward_chosen": float(np.mean(chosen)), f"{name}_reward_rejected": float(np.mean(rejected))}
    for key, wins in (("accuracy", chosen > rejected), ("logp_accuracy", policy[:, 0] > policy[:, 1]),
                      ("reference_logp_accuracy", reference[:, 0] > reference[:, 1])):
        k = int(np.sum(wins))
        low, high = (float(b) for b in clopper_pearson(k, n, confidence))
        out.update({f"{name}_{key}": k / n, f"{name}_{key}_low": low, f"{name}_{key}_high": high})
    return out


def preference_eval(examples: Examples, reference: Any, beta: float = 0.1, batch_size: int = 16,
                    name: str = "pref", confidence: float = 0.95) -> Callable[[Model], dict]:
    """An evaluation callback for `train(..., evals=[...])`: `preference_metrics` of the held-out
    pair rows `examples` [N, 2T] for the current model against `reference` (parameters; their
    log-probabilities are computed once, at the first call, and stand for the current model's
    when its parameters equal the reference's, as at step 0 of a LoRA run)."""
    if len(examples.tokens) == 0:
        raise InputError("the held-out preference set is empty")
    cache = {}

    def evaluate(model: Model) -> dict[str, float]:
        if "reference" not in cache:
            cache["reference"] = score_pairs(reference, examples, config=model.config, batch_size=batch_size)
        policy = (cache["reference"] if _equal(model.params, reference) else  # step 0: one pass, not two
                  score_pairs(model.params, examples, config=model.config, batch_size=batch_size))
        return preference_metrics(policy, cache["reference"], beta, name, confidence)

    return evaluate


def _equal(a: Any, b: Any) -> bool:
    """Whether two parameter pytrees hold the same values (a few ms next to a forward pass)."""
    if jax.tree.structure(a) != jax.tree.structure(b):
        return False
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))
