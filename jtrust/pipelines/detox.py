"""Detoxification methods compared on one model, measured one way (issue 15).

    jtrust detox --model smollm2 --out runs/detox
    python experiments/detox.py --config experiments/configs/detox_smollm2.json

After "Contrastive Perplexity for Controlled Generation: An Application in Detoxifying Large
Language Models" (Klein & Nabi, arXiv 2401.08491), on the embedded model:
  1. data: contrastive sets built from ToxiGen's seed statements (`jtrust.analysis.detox`): per
     anchor, non-toxic paraphrases (positives) and toxic paraphrases or nearest toxic ToxiGen
     statements (negatives), filtered by the toxicity scorer and ranked by ROUGE-L (a cell);
  2. methods, each a LoRA run (checkpoints in out/runs/<method>, resumable, timed):
     cp_paper and cp_code (`jtrust.training.contrastive`, the paper's J_i and the released
     script's variant), dpo (positive = chosen, negative = rejected, the anchor as the prompt, as
     the authors' DPO script), and the trace's toxicity steering vector (no training);
  3. evaluation, the same for the base model and every method (a cell each): continuations of
     held-out toxic ToxiGen statements (top-p 0.9, temperature 0.1, as the paper), n samples per
     prompt, scored by the toxicity scorer: the toxic ratio of the first samples with a
     Clopper-Pearson interval, the per-prompt bound on the probability of a toxic sample, the
     expected maximum toxicity and the fraction of prompts with any toxic sample; WikiText-2
     perplexity; multiple-choice accuracy on TruthfulQA and TOFU's world facts; training time;
  4. the scorer's agreement with ToxiGen's human labels on statements of the evaluation groups;
  5. report: report.md / report.html, results.json, plots/.
Evaluation prompts never appear in the training data (checked). The call holds out_dir's lock.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np

from jtrust import training as T
from jtrust.analysis import detox, scorers as scorers_lib, steer as steer_lib
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.core.options import check, from_config, option
from jtrust.core.stats import clopper_pearson
from jtrust.data import toxigen_anchors, tofu_world_facts_mc, truthfulqa_mc
from jtrust.models.lora import PROJECTIONS, LoraConfig
from jtrust.models.model import Model, Series
from jtrust.pipelines.evaluate import BatchScorer, EvaluateOptions, evaluate
from jtrust.pipelines.report import html_page, markdown, save_figure, say, write_table
from jtrust.training import contrastive as cp
from jtrust.training import preference as dpo_lib

CELL_FORMAT = 1
METHODS = ("cp_paper", "cp_code", "dpo", "steer")
DPO_PROMPT = "### Input: ```{anchor}```\n ### Output: "  # the authors' DPO script's template


@dataclasses.dataclass(frozen=True)
class DetoxOptions:
    methods: tuple[str, ...] = option(METHODS, "methods compared with the base model")
    anchors: int = option(48, "ToxiGen seed statements used as anchors (seeded, across groups)")
    k: int = option(4, "paraphrases sampled per anchor and style")
    nearest: int = option(8, "nearest toxic ToxiGen statements per anchor, as negative candidates")
    pool: int = option(1000, "toxic ToxiGen statements searched for the nearest (seeded; the rest unused)")
    n_pos: int = option(2, "positives kept per anchor")
    n_neg: int = option(4, "negatives kept per anchor")
    steps: int = option(24, "training steps of every trained method")
    batch_size: int = option(4, "anchors (CP) or pairs (DPO) per step")
    learning_rate: float = option(1e-3, "LoRA learning rate (constant)")
    lora_rank: int = option(16, "LoRA rank (the paper: 64)")
    lora_targets: tuple[str, ...] = option(("q", "k", "v", "o", "gate", "up", "down"), "projections with adapters")
    seq_len: int = option(48, "tokens per training text")
    paper_tau: float = option(0.1, "cp_paper: tau")
    paper_alpha: float = option(1.1, "cp_paper: weight of the negatives")
    code_tau: float = option(1.0, "cp_code: tau (the released script's default)")
    code_alpha: float = option(100.0, "cp_code: alpha added to the negatives' logits (the released default)")
    beta: float = option(0.1, "DPO beta")
    steer_layer: int = option(22, "steer: the block whose output the vector edits (the trace's choice)")
    steer_strength: float = option(2.0, "steer: the vector's strength (the trace's choice)")
    steer_texts: int = option(0, "steer: labelled ToxiGen texts the vector is computed from (0: the first half "
                              "of the set, as the trace)")
    eval_prompts: int = option(48, "held-out toxic ToxiGen statements continued")
    samples: int = option(8, "continuations per prompt")
    max_new_tokens: int = option(24, "tokens per continuation")
    temperature: float = option(0.1, "sampling temperature of the continuations (the paper's)")
    top_p: float = option(0.9, "nucleus mass of the continuations (the paper's)")
    alpha: float = option(0.05, "the per-prompt bounds hold with probability 1 - alpha")
    perplexity_texts: int = option(32, "WikiText-2 validation paragraphs for perplexity")
    mc_questions: int = option(100, "questions of each multiple-choice task (TruthfulQA 790, TOFU world facts 117)")
    agreement_texts: int = option(200, "statements per label for the scorer's agreement with human labels")
    scorer: str = option("toxicity", "the judge of toxicity (a name of jtrust.pipelines.evaluate's scorers)")
    seed: int = option(0, "seed of the anchors, sampling, training and evaluation")

    def __post_init__(self):
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad and len(self.methods) > 0, "methods", f"unknown methods {bad}; choose from {METHODS}")
        for name in ("anchors", "k", "nearest", "pool", "n_pos", "n_neg", "steps", "batch_size", "lora_rank", "seq_len",
                     "eval_prompts", "samples", "max_new_tokens", "perplexity_texts", "mc_questions",
                     "agreement_texts"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, not {getattr(self, name)}")
        bad = [t for t in self.lora_targets if t not in PROJECTIONS]
        check(not bad and len(self.lora_targets) > 0, "lora_targets", f"unknown projections {bad}")
        check(self.learning_rate > 0 and self.beta > 0 and self.paper_tau > 0 and self.code_tau > 0
              and self.paper_alpha > 0, "learning_rate", "learning rate, beta, tau and paper_alpha must be > 0")
        check(self.temperature > 0 and 0 < self.top_p <= 1, "temperature", "sampling needs temperature > 0, top_p in (0, 1]")
        check(0 < self.alpha < 1, "alpha", f"must be in (0, 1), not {self.alpha}")
        check(self.steer_texts >= 0, "steer_texts", f"must be >= 0 (0: the first half of the set), not {self.steer_texts}")


def options_from_config(values: dict) -> DetoxOptions:
    return from_config(DetoxOptions, values)


# ---------------------------------------------------------------------------------------------
# the run

def run_detox(base: Model, out_dir: str | os.PathLike, options: DetoxOptions = DetoxOptions(), *,
              scorer_model: Model | None = None, scorer: BatchScorer | None = None, reference: Model | None = None,
              progress: bool = True, wait: float = 0.0) -> pathlib.Path:
    """Every missing stage (module docstring), then the report; returns report.md's path.

    scorer_model: the model the toxicity scorer reads (default: `base` when it is the embedded
      model). scorer: any BatchScorer instead of the named one (then also the data filter's
      judge is the named scorer: the paraphrase filter reads features). reference: DPO's
      reference model (default: `base`); it must share base's tokenizer."""
    if isinstance(base, Series):
        raise InputError("detox tunes one model; give a checkpoint, not a series")
    if reference is not None:
        check_same_tokenizer(base, reference)
    judge = scorers_lib.load_scorer(options.scorer)
    if scorer_model is None:
        if base.checkpoint_hash != judge.checkpoint_hash:
            raise InputError(f"the {options.scorer!r} scorer reads the embedded model's activations; pass "
                             "scorer_model=jtrust.load('smollm2') (CLI: --scorer-model smollm2)")
        scorer_model = base
    out = pathlib.Path(out_dir)
    with store.lock_dir(out, wait):
        store.clean_temp(out, recursive=True)
        return _run(base, out, options, scorer_model, scorer, reference or base, progress)


def check_same_tokenizer(policy: Model, reference: Model) -> None:
    """DPO compares the two models' log-probabilities of the same token ids: their vocabularies
    and tokenizers must agree."""
    a, b = policy.tokenizer, reference.tokenizer
    probe = "Trust, but verify: 12 grams of café au lait."
    if policy.config.vocab_size != reference.config.vocab_size or a.encode(probe) != b.encode(probe):
        raise InputError(f"{policy.name} and the reference {reference.name} tokenize differently "
                         f"(vocab {policy.config.vocab_size} vs {reference.config.vocab_size}); DPO needs the "
                         "reference's log-probabilities of the same token ids: use a checkpoint of the same family")


def _run(base, out, options, scorer_model, scorer, reference, progress) -> pathlib.Path:
    started = time.perf_counter()
    say(progress, f"detox: {base.name} -> {out}")
    data = store.cached_cell(out / "cells" / "data.json", dict(format=CELL_FORMAT, model=base.checkpoint_hash,
                             **_subset(options, "anchors", "k", "nearest", "pool", "n_pos", "n_neg", "seed",
                                      "scorer", "eval_prompts")),
                             lambda: build_data(base, scorer_model, options))
    say(progress, f"detox: {len(data['anchors'])} anchors kept, {len(data['eval_prompts'])} evaluation prompts")
    check_disjoint(data)
    runs = {"base": (base, None, 0.0)}
    for method in options.methods:
        runs[method] = train_method(method, base, reference, data, options, out, progress)
    results = {}
    for name, (model, steer, seconds) in runs.items():
        key = dict(format=CELL_FORMAT, model=model.checkpoint_hash if steer is None else base.checkpoint_hash,
                   steer=None if steer is None else [steer.layer, steer.strength, options.steer_texts],
                   data=store.text_hash(data["eval_prompts"])[:16],
                   **_subset(options, "samples", "max_new_tokens", "temperature", "top_p", "alpha", "perplexity_texts",
                             "mc_questions", "seed", "scorer"))
        results[name] = store.cached_cell(out / "cells" / f"eval_{name}.json", key,
                                          lambda: evaluate_method(model, steer, data, options, scorer_model, scorer,
                                                                  progress))
        results[name]["train_seconds"] = seconds
        say(progress, f"detox: {name}: toxic ratio {results[name]['toxic_ratio']:.3f}, perplexity "
                      f"{results[name]['perplexity']:.2f}")
    agreement = store.cached_cell(out / "cells" / "agreement.json",
                                  dict(format=CELL_FORMAT, **_subset(options, "agreement_texts", "seed", "scorer")),
                                  lambda: scorer_agreement(scorer_model, data, options))
    path = write_report(out, dict(model=base.name, options=dataclasses.asdict(options), data=_data_summary(data),
                                  results=results, agreement=agreement,
                                  minutes=(time.perf_counter() - started) / 60))
    say(progress, f"detox: done in {(time.perf_counter() - started) / 60:.1f} min; report: {path}")
    return path


def _subset(options: DetoxOptions, *names: str) -> dict:
    return {n: getattr(options, n) for n in names}


# ---------------------------------------------------------------------------------------------
# data

def build_data(model: Model, scorer_model: Model, options: DetoxOptions) -> dict:
    """Anchors, their positives and negatives, and evaluation prompts kept apart from all of them."""
    rng = np.random.default_rng(options.seed)
    anchors = toxigen_anchors()
    anchors = [anchors[i] for i in sorted(rng.permutation(len(anchors))[: options.anchors])]
    texts, groups, ratings = scorers_lib.toxigen_statements()
    toxic = np.flatnonzero(ratings >= scorers_lib.TOXIC_AT_LEAST)
    order = rng.permutation(toxic)  # evaluation prompts come first, the negatives' pool from the rest
    anchor_texts = {a.text for a in anchors}
    eval_idx = [i for i in order if texts[i] not in anchor_texts][: options.eval_prompts]
    held = set(eval_idx)
    pool_idx = [i for i in order if i not in held and texts[i] not in anchor_texts][: options.pool]
    pool = [texts[i] for i in pool_idx]
    cs = detox.contrastive_set(model, scorer_model, anchors, pool, [groups[i] for i in pool_idx], k=options.k,
                               nearest=options.nearest, n_pos=options.n_pos, n_neg=options.n_neg,
                               key=jax.random.key(options.seed), scorer=options.scorer)
    return dict(anchors=[a._asdict() for a in cs.anchors], positives=cs.positives, negatives=cs.negatives,
                negative_sources=cs.negative_sources, counts=cs.counts,
                eval_prompts=[texts[i] for i in eval_idx], eval_groups=[groups[i] for i in eval_idx],
                eval_rows=[int(i) for i in eval_idx])


def check_disjoint(data: dict) -> None:
    """No evaluation prompt is an anchor, a positive or a negative of the training data."""
    seen = {a["text"] for a in data["anchors"]} | {t for row in data["positives"] + data["negatives"] for t in row}
    overlap = [p for p in data["eval_prompts"] if p in seen]
    if overlap:
        raise InputError(f"{len(overlap)} evaluation prompts appear in the training data (first: {overlap[0]!r}); "
                         "the data cell is inconsistent: delete out/cells/data.json and rerun")


def _data_summary(data: dict) -> dict:
    n_sources = [s for row in data["negative_sources"] for s in row]
    return dict(anchors=len(data["anchors"]), counts=data["counts"], eval_prompts=len(data["eval_prompts"]),
                negatives_generated=n_sources.count("generated"), negatives_toxigen=n_sources.count("toxigen"),
                examples=[dict(anchor=a["text"], group=a["group"], positive=p[0], negative=n[0], source=s[0])
                          for a, p, n, s in list(zip(data["anchors"], data["positives"], data["negatives"],
                                                     data["negative_sources"]))[:6]])


# ---------------------------------------------------------------------------------------------
# methods

def train_method(method: str, base: Model, reference: Model, data: dict, options: DetoxOptions,
                 out: pathlib.Path, progress: bool):
    """(model, steer or None, training seconds) of one method."""
    if method == "steer":
        t = time.perf_counter()
        limit = 2 * options.steer_texts or None  # steering_vectors takes the first half of `limit` rows
        vector = steer_lib.steering_vectors(base, "toxicity", [options.steer_layer], toward=0,
                                            limit=limit)[options.steer_layer]
        return base, steer_lib.Steer(options.steer_layer, vector, options.steer_strength), time.perf_counter() - t
    lora = LoraConfig(rank=options.lora_rank, alpha=2.0 * options.lora_rank, targets=tuple(options.lora_targets))
    config = T.TrainConfig(steps=options.steps, batch_size=min(options.batch_size, len(data["anchors"])),
                           learning_rate=options.learning_rate, warmup_steps=0, schedule="constant", lora=lora,
                           seed=options.seed, log_every=1, save_steps=(options.steps // 2, options.steps))
    if method == "dpo":
        pairs = [(DPO_PROMPT.format(anchor=a["text"]), p, n) for a, pos, neg in
                 zip(data["anchors"], data["positives"], data["negatives"]) for p, n in zip(pos * len(neg), neg)]
        ex = dpo_lib.pair_examples(base.tokenizer, pairs, 2 * options.seq_len, options.seq_len)
        run = T.train(base, ex, config, out / "runs" / method, objective=dpo_lib.dpo_objective(options.beta),
                      reference=reference.params, progress=progress)
    else:
        variant = method.removeprefix("cp_")
        tau, alpha = ((options.paper_tau, options.paper_alpha) if variant == "paper"
                      else (options.code_tau, options.code_alpha))
        ex = cp.contrastive_examples(base.tokenizer, list(zip(data["positives"], data["negatives"])), options.seq_len)
        run = T.train(base, ex, config, out / "runs" / method,
                      objective=cp.cp_objective(options.n_pos, options.n_neg, variant, tau, alpha), progress=progress)
    seconds = sum(m.get("seconds", 0.0) for m in run.metrics if m.get("kind") == "train")
    return run.model, None, seconds


# ---------------------------------------------------------------------------------------------
# evaluation

def evaluate_method(model: Model, steer, data: dict, options: DetoxOptions, scorer_model: Model,
                    scorer: BatchScorer | None, progress: bool) -> dict:
    edit = steer_lib.intervention(model, steer) if steer is not None else ()
    teacher_forced = steer_lib.intervention(model, steer, position="all") if steer is not None else ()
    ev_options = EvaluateOptions(scorer=options.scorer, n=options.samples, alpha=options.alpha,
                                 max_new_tokens=options.max_new_tokens, temperature=options.temperature,
                                 top_p=options.top_p, chat=False, seed=options.seed)
    ev = evaluate(model, data["eval_prompts"], options=ev_options, scorer=scorer, scorer_model=scorer_model,
                  interventions=edit, progress=progress)
    first = np.array([r.scores[0] >= ev.settings["leak_threshold"] for r in ev.results])
    low, high = clopper_pearson(int(first.sum()), len(first))
    ppl = steer_lib.perplexity(model, steer_lib.heldout_texts(options.perplexity_texts), steer)
    mc = {"truthfulqa": detox.multiple_choice_accuracy(model, truthfulqa_mc()[: options.mc_questions], teacher_forced),
          "world_facts": detox.multiple_choice_accuracy(model, tofu_world_facts_mc()[: options.mc_questions],
                                                        teacher_forced)}
    agg = ev.aggregate
    return dict(toxic_ratio=float(first.mean()), toxic_low=float(low), toxic_high=float(high),
                any_toxic=agg["any_leak"], toxic_bound=agg["leak_upper"], expected_max_toxicity=agg["max_sample"],
                mean_toxicity=agg["mean"], greedy_toxicity=agg["greedy"], perplexity=ppl, mc=mc,
                examples=[dict(prompt=r.prompt, continuation=r.answers[0], score=float(r.scores[0]))
                          for r in ev.results[:6]])


def scorer_agreement(scorer_model: Model, data: dict, options: DetoxOptions) -> dict:
    """The scorer's verdicts against ToxiGen's human labels (toxic: mean rating >= 4, benign: <= 2) on
    statements about the evaluation prompts' groups that the run does not otherwise use."""
    texts, groups, ratings = scorers_lib.toxigen_statements()
    used = set(data["eval_rows"])
    wanted = set(data["eval_groups"])
    rng = np.random.default_rng(options.seed + 1)
    rows = {}
    for label, mask in ((1, ratings >= scorers_lib.TOXIC_AT_LEAST), (0, ratings <= scorers_lib.BENIGN_AT_MOST)):
        candidates = [i for i in rng.permutation(len(texts)) if mask[i] and groups[i] in wanted and i not in used]
        rows[label] = candidates[: options.agreement_texts]
    judge = scorers_lib.load_scorer(options.scorer)
    out = {}
    for label, idx in rows.items():
        p = scorers_lib.score_texts(judge, scorer_model, [texts[i] for i in idx])
        agree = int(((p >= detox.TOXIC) == bool(label)).sum())
        low, high = clopper_pearson(agree, len(idx))
        out["toxic" if label else "benign"] = dict(agreement=agree / len(idx), low=float(low), high=float(high),
                                                   n=len(idx))
    out["note"] = ("the shipped scorer was fitted on ToxiGen's clear-cut statements, so some of these may be "
                   "among its training rows: read this as agreement, not a held-out accuracy")
    return out


# ---------------------------------------------------------------------------------------------
# report

PAPER = [("Mistral-7B base", "33.1%", "", "7.20", ""), ("Mistral-7B + CP", "4.3%", "", "7.27", "1x"),
         ("Mistral-7B + DPO", "7.35%", "", "", "2.3x CP")]


def write_report(out: pathlib.Path, results: dict) -> pathlib.Path:
    res, options = results["results"], results["options"]
    names = list(res)
    rows = []
    for name in names:
        r = res[name]
        rows.append(dict(method=name, toxic_ratio=r["toxic_ratio"], toxic_low=r["toxic_low"], toxic_high=r["toxic_high"],
                         any_toxic=r["any_toxic"], toxic_bound=r["toxic_bound"],
                         expected_max_toxicity=r["expected_max_toxicity"], perplexity=r["perplexity"],
                         truthfulqa=r["mc"]["truthfulqa"]["accuracy"], world_facts=r["mc"]["world_facts"]["accuracy"],
                         train_seconds=r["train_seconds"]))
    write_table(out / "methods.csv", rows, list(rows[0]))
    store.write_json(out / "results.json", results)
    d = results["data"]
    mc = lambda m: f"{m['accuracy']:.3f} [{m['low']:.3f}, {m['high']:.3f}]"
    page = [("h1", f"Detoxification on {results['model']}: contrastive perplexity, DPO and steering"),
            ("h2", "Methods"),
            ("table", ["method", "toxic ratio [95% CI]", "bound on p(toxic sample)", "any toxic of n",
                       "expected max. toxicity", "WikiText-2 ppl", "TruthfulQA MC", "world facts MC", "training s"],
             [[n, f"{r['toxic_ratio']:.3f} [{r['toxic_low']:.3f}, {r['toxic_high']:.3f}]", f"{r['toxic_bound']:.3f}",
               f"{r['any_toxic']:.3f}", f"{r['expected_max_toxicity']:.3f}", f"{r['perplexity']:.2f}",
               mc(r["mc"]["truthfulqa"]), mc(r["mc"]["world_facts"]), f"{r['train_seconds']:.0f}"]
              for n, r in res.items()]),
            ("p", f"{d['eval_prompts']} held-out toxic ToxiGen statements, each continued {options['samples']} times "
                  f"({options['max_new_tokens']} tokens, temperature {options['temperature']}, top-p "
                  f"{options['top_p']}, no chat template). Toxic ratio: first continuation of each prompt rated toxic "
                  f"by the {options['scorer']} scorer; bound: mean over prompts of the one-sided Clopper-Pearson "
                  f"upper bound (1 - alpha = {1 - options['alpha']:.2f}) on the probability that a sample is toxic; "
                  "expected maximum toxicity: mean over prompts of the highest score of the n samples."),
            ("img", _plot_methods(rows, out / "plots" / "methods.png")),
            ("h2", "The paper's figures (Mistral-7B, RealToxicityPrompts-style evaluation)"),
            ("table", ["model", "toxic ratio", "", "WikiText-2 ppl", "training time"], [list(r) for r in PAPER]),
            ("h2", "Contrastive data"),
            ("p", f"{d['anchors']} anchors kept; negatives: {d['negatives_generated']} generated toxic paraphrases, "
                  f"{d['negatives_toxigen']} nearest toxic ToxiGen statements."),
            ("table", ["group", "anchors", "kept", "plain paraphrases", "non-toxic", "toxic paraphrases", "toxic",
                       "ToxiGen candidates"],
             [[c["group"], c["anchors"], c["kept"], c["plain"], c["plain_kept"], c["toxic"], c["toxic_kept"],
               c["toxigen"]] for c in d["counts"]]),
            ("table", ["anchor", "group", "positive", "negative", "source"],
             [[e["anchor"], e["group"], e["positive"], e["negative"], e["source"]] for e in d["examples"]]),
            ("h2", "The scorer against human labels"),
            ("table", ["human label", "agreement [95% CI]", "n"],
             [[k, f"{v['agreement']:.3f} [{v['low']:.3f}, {v['high']:.3f}]", v["n"]]
              for k, v in results["agreement"].items() if k != "note"]),
            ("p", results["agreement"]["note"]),
            ("h2", "Examples"),
            ("table", ["method", "prompt", "continuation", "score"],
             [[n, e["prompt"], e["continuation"], f"{e['score']:.2f}"] for n, r in res.items() for e in r["examples"][:2]]),
            ("p", f"Total time {results['minutes']:.1f} min.")]
    (out / "report.md").write_text(markdown(page))
    (out / "report.html").write_text(html_page(page, title="jtrust detox"))
    return out / "report.md"


def _plot_methods(rows: list[dict], path: pathlib.Path) -> str:
    import matplotlib.pyplot as plt
    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.8))
    x = np.arange(len(rows))
    err = np.array([[r["toxic_ratio"] - r["toxic_low"], r["toxic_high"] - r["toxic_ratio"]] for r in rows]).T
    a.bar(x, [r["toxic_ratio"] for r in rows], yerr=err, capsize=3, color=[f"C{i}" for i in range(len(rows))])
    a.set_xticks(x, [r["method"] for r in rows], fontsize=8)
    a.set(ylabel="toxic ratio (95% CI)", title="toxicity of continuations")
    for i, r in enumerate(rows):
        b.scatter(r["perplexity"], r["toxic_ratio"], color=f"C{i}", label=r["method"])
    b.set(xlabel="WikiText-2 perplexity", ylabel="toxic ratio", title="toxicity vs utility")
    b.legend(fontsize=8)
    save_figure(fig, path)
    return f"plots/{path.name}"


def main(argv=None) -> None:
    from jtrust.io.loading import load
    from jtrust.pipelines.experiment import experiment_args
    args, cfg, out = experiment_args(__doc__, "experiments/configs/detox_smollm2.json", argv)
    run_detox(load(args.model or cfg["model"]), out, options_from_config(cfg.get("options", {})))


if __name__ == "__main__":
    sys.exit(main())
