"""Detoxification data and utility measures: the contrastive-perplexity recipe on ToxiGen, and the
multiple-choice and perplexity figures every method is compared on.

Contrastive data ("Contrastive Perplexity for Controlled Generation", Klein & Nabi, arXiv
2401.08491), per ToxiGen seed statement (the anchor, `jtrust.data.toxigen_anchors`):

- positives: k paraphrases sampled from the model ("Paraphrase the following sentence ...",
  chat template, temperature 1, top-p 0.95) that the toxicity scorer rates non-toxic (p < 0.5);
- negatives: k "very toxic" paraphrases sampled the same way that the scorer rates toxic, and,
  because a small chat model rarely complies, the `nearest` human-rated toxic ToxiGen statements
  (mean rating >= 4) about the same group closest to the anchor by cosine similarity of the
  scorer's own features (the model's pooled activations), also rated toxic by the scorer;
- each side ranked by ROUGE-L F1 to the anchor (the paper keeps the 15 best of 20 by ROUGE-L);
  the best n_pos positives and n_neg negatives are kept; an anchor short of either is dropped.

The ToxiGen statements used as negatives are returned, so an evaluation can keep its prompts
out of them.
"""

from __future__ import annotations

from typing import NamedTuple, Sequence

import jax
import numpy as np

from jtrust.analysis import scorers as scorers_lib
from jtrust.analysis.rouge import rouge_l_f1, rouge_tokens
from jtrust.core.errors import InputError
from jtrust.core.stats import clopper_pearson
from jtrust.data import Anchor, MultipleChoice, toxigen_group
from jtrust.models.interventions import Intervention
from jtrust.models.model import Model
from jtrust.runtime.generate import Sampling, generate, sequence_logprobs

PARAPHRASE = {
    "plain": "Paraphrase the following sentence. Reply with the paraphrase only.\n\n{text}",
    "toxic": "Paraphrase the following sentence in a very toxic way. Reply with the paraphrase only.\n\n{text}",
}
TOXIC = 0.5  # a text is toxic when the scorer's p(toxic) reaches this


class ContrastiveSet(NamedTuple):
    anchors: list[Anchor]  # the anchors kept
    positives: list[list[str]]  # [A][n_pos]
    negatives: list[list[str]]  # [A][n_neg]
    negative_sources: list[list[str]]  # [A][n_neg] "generated" or "toxigen"
    used_statements: list[int]  # indices into the statement pool used as negatives (any anchor)
    counts: list[dict]  # per group: anchors, kept, candidates and survivors of each kind


def paraphrases(model: Model, texts: Sequence[str], style: str, k: int, key: jax.Array,
                max_new_tokens: int = 48, batch_size: int = 16) -> list[list[str]]:
    """[len(texts)][k] sampled paraphrases (first line, quotes stripped; empty ones dropped)."""
    if style not in PARAPHRASE:
        raise InputError(f"style must be one of {sorted(PARAPHRASE)}, not {style!r}")
    prompts = [PARAPHRASE[style].format(text=t) for t in texts]
    sampling = Sampling(temperature=1.0, top_p=0.95)
    out = []
    for start in range(0, len(prompts), batch_size):
        chunk = prompts[start:start + batch_size]
        padded = chunk + [chunk[0]] * (batch_size - len(chunk))  # one shape: one compiled program
        gen = generate(model, padded, max_new_tokens=max_new_tokens, chat=True, sampling=sampling,
                       n_samples=k, key=jax.random.fold_in(key, start), pad_prompts_to=160)
        out += [[c for c in map(_clean, row) if c] for row in gen.texts[: len(chunk)]]
    return out


def _clean(text: str) -> str:
    line = next((l for l in text.strip().splitlines() if l.strip()), "")
    return line.strip().strip('"').strip()


def cosine_neighbours(queries: np.ndarray, pool: np.ndarray, allowed: np.ndarray, k: int) -> np.ndarray:
    """[Q, k] indices into pool [P, d] of the k rows with the highest cosine similarity to each
    query [Q, d] among the rows allowed[q] [Q, P] (bool); -1 where fewer are allowed."""
    q = queries / np.maximum(np.linalg.norm(queries, axis=1, keepdims=True), 1e-12)
    p = pool / np.maximum(np.linalg.norm(pool, axis=1, keepdims=True), 1e-12)
    sim = np.where(allowed, q @ p.T, -np.inf)
    order = np.argsort(-sim, axis=1, kind="stable")[:, :k]
    return np.where(np.take_along_axis(sim, order, axis=1) > -np.inf, order, -1)


def contrastive_set(model: Model, scorer_model: Model, anchors: Sequence[Anchor], statements: Sequence[str],
                    statement_groups: Sequence[str], *, k: int = 8, nearest: int = 8, n_pos: int = 2,
                    n_neg: int = 4, key: jax.Array, scorer: str = "toxicity") -> ContrastiveSet:
    """The module docstring's recipe. statements / statement_groups: the pool of human-rated toxic
    statements and their ToxiGen target groups; `scorer_model` is the model the scorer reads."""
    if not anchors:
        raise InputError("no anchors to build contrastive data from")
    judge = scorers_lib.load_scorer(scorer)
    texts = [a.text for a in anchors]
    k_plain, k_toxic = jax.random.split(key)
    plain = paraphrases(model, texts, "plain", k, k_plain)
    toxic = paraphrases(model, texts, "toxic", k, k_toxic)

    # the scorer's features serve for both its verdicts and the similarity of anchors to statements
    feats = lambda xs: scorers_lib.pooled_activations(scorer_model, [x.strip() for x in xs], judge.site,
                                                      [judge.layer], [judge.pool])[judge.pool][0]
    scorers_lib.check_scorer_model(judge, scorer_model)
    flat = [x for row in plain + toxic for x in row]
    p_flat = scorers_lib.probability(judge, feats(flat)) if flat else np.zeros(0)
    pool_feats = feats(list(statements))
    p_pool = scorers_lib.probability(judge, pool_feats)
    groups = np.array([g or "" for g in statement_groups])
    allowed = np.array([[toxigen_group(a.group) in (None, g) for g in groups] for a in anchors]) & (p_pool >= TOXIC)
    near = cosine_neighbours(feats(texts), pool_feats, allowed, nearest)

    kept, positives, negatives, sources = [], [], [], []
    per_group: dict[str, dict] = {}
    offset = 0
    for i, anchor in enumerate(anchors):
        n_plain, n_toxic = len(plain[i]), len(toxic[i])
        p_plain, p_toxic = p_flat[offset:offset + n_plain], p_flat[offset + n_plain:offset + n_plain + n_toxic]
        offset += n_plain + n_toxic
        pos = _ranked([t for t, p in zip(plain[i], p_plain) if p < TOXIC and _differs(t, anchor.text)], anchor.text)
        gen_neg = [(t, "generated") for t, p in zip(toxic[i], p_toxic) if p >= TOXIC]
        tox_neg = [(statements[j], "toxigen") for j in near[i] if j >= 0]
        neg = sorted(gen_neg + tox_neg, key=lambda x: -rouge_l_f1(x[0], anchor.text))
        c = per_group.setdefault(anchor.group, dict(group=anchor.group, anchors=0, kept=0, plain=0, plain_kept=0,
                                                    toxic=0, toxic_kept=0, toxigen=0))
        c["anchors"] += 1
        c["plain"] += n_plain
        c["plain_kept"] += len(pos)
        c["toxic"] += n_toxic
        c["toxic_kept"] += len(gen_neg)
        c["toxigen"] += len(tox_neg)
        if len(pos) < n_pos or len(neg) < n_neg:
            continue
        c["kept"] += 1
        kept.append(anchor)
        positives.append(pos[:n_pos])
        negatives.append([t for t, _ in neg[:n_neg]])
        sources.append([s for _, s in neg[:n_neg]])
    # statement indices used as negatives, for keeping evaluation prompts apart
    index = {s: j for j, s in enumerate(statements)}
    used = sorted({index[t] for row, src in zip(negatives, sources) for t, s in zip(row, src) if s == "toxigen"})
    if not kept:
        raise InputError(f"no anchor has {n_pos} non-toxic paraphrases and {n_neg} toxic negatives "
                         f"(counts per group: {list(per_group.values())}); sample more (k) or lower n_pos / n_neg")
    return ContrastiveSet(kept, positives, negatives, sources, used, list(per_group.values()))


def _ranked(texts: list[str], anchor: str) -> list[str]:
    unique = list(dict.fromkeys(texts))
    return sorted(unique, key=lambda t: -rouge_l_f1(t, anchor))


def _differs(text: str, anchor: str) -> bool:
    """A paraphrase, not a copy: its words differ from the anchor's."""
    return rouge_tokens(text) != rouge_tokens(anchor)


# ---------------------------------------------------------------------------------------------
# utility

def choice_logprobs(model: Model, tasks: Sequence[MultipleChoice], interventions: Sequence[Intervention] = (),
                    batch_size: int = 16) -> list[np.ndarray]:
    """Per task, [n_choices] float64: log p(" " + choice | "Q: question\nA:") summed over the
    choice's tokens; every task's choices go through fixed-size batches together."""
    prompts = [f"Q: {t.question}\nA:" for t in tasks]
    n_prompt = [len(model.tokenizer.encode(p)) for p in prompts]
    seqs = [model.tokenizer.encode(p + " " + c) for p, t in zip(prompts, tasks) for c in t.choices]
    lps = iter(sequence_logprobs(model, seqs, interventions=interventions, batch_size=batch_size))
    return [np.array([float(next(lps)[n - 1:].sum()) for _ in t.choices]) for n, t in zip(n_prompt, tasks)]


def multiple_choice_accuracy(model: Model, tasks: Sequence[MultipleChoice],
                             interventions: Sequence[Intervention] = ()) -> dict:
    """Accuracy (the most likely choice is the correct one) with a 95% Clopper-Pearson interval."""
    if not tasks:
        raise InputError("no multiple-choice questions to score")
    scores = choice_logprobs(model, tasks, interventions)
    correct = sum(int(np.argmax(s) == t.answer) for s, t in zip(scores, tasks))
    low, high = clopper_pearson(correct, len(tasks))
    return {"accuracy": correct / len(tasks), "low": float(low), "high": float(high), "n": len(tasks)}
