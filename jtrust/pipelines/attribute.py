"""Hallucination tracing (issue 13): which fine-tuning examples taught the model the wrong city it
now states? ROC AUC of training-data attribution methods against known entity-swap canaries.

    jtrust attribute --model smollm2 --out runs/attribute
    python experiments/attribute.py --config experiments/configs/attribute_smollm2.json

  1. data (`jtrust.data.canaries`): TOFU answers that state an author's birthplace; held-out
     authors' direct birthplace questions are kept aside, and in a seeded fraction of the other
     rows the place is swapped for one fixed wrong city (Ladhak et al., arXiv 2212.10722);
  2. LoRA fine-tune of the model on the (question, answer) pairs through `jtrust.training.train`,
     a checkpoint at every epoch's end (out/finetune, a series that `jtrust.load` reads);
  3. greedy answers of the last checkpoint to the held-out questions; those that name the canary
     city are the hallucinations to trace (`queries="all"` keeps every answer: smoke tests);
  4. scores of every training example for every query: BM25 (rank-bm25) with the generated
     answer, or question + answer, as the query and each training pair as a document; and
     influence through `jtrust.analysis.attribution.dda` for each gradient method (identity,
     diagonal, kfac, ekfac, lissa, cg) on the chosen projections and blocks (`modules`, `layers`),
     each in its variants raw / debias / denoise / dda and,
     against the held-out question's true TOFU answer, contrastive / contrastive_denoise;
  5. per training example the mean score over queries, ROC AUC of "is a canary" per (method,
     variant) with a seeded bootstrap 95% interval (training examples resampled), results.csv,
     results.json, report.md / report.html and ROC curves under plots/.

Every expensive stage is kept and reused: the training run resumes, the generations and every
method's score matrices are keyed cells (out/cells/), and attribution keeps its gradients and
factors in out/attribution/. The call holds out_dir's lock.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import re
import sys
import time
import zipfile
from typing import Sequence

import numpy as np
from scipy.stats import rankdata

from jtrust.analysis import attribution as attr
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.core.options import check, from_config, option
from jtrust.data import canaries as cn
from jtrust.io.runs import RUN_MARKER
from jtrust.models.lora import PROJECTIONS, LoraConfig
from jtrust.models.model import Model, Series
from jtrust.pipelines.report import html_page, markdown, save_figure, say, write_table
from jtrust.runtime.generate import generate
from jtrust import training as T

CELL_FORMAT = 1
GRADIENT_METHODS = attr.METHODS
METHODS = ("bm25",) + GRADIENT_METHODS
BM25_VARIANTS = ("answer", "question+answer")  # what the query text is
RAW_VARIANTS = ("raw", "debias", "denoise", "dda")  # `jtrust.analysis.attribution.dda`'s
CONTRASTIVE_VARIANTS = ("contrastive", "contrastive_denoise")  # ... and with `correct`
RESULT_FIELDS = ("method", "variant", "auc", "low", "high", "n_train", "n_canary", "n_queries")


@dataclasses.dataclass(frozen=True)
class AttributeOptions:
    canary_fraction: float = option(0.2, "fraction of the training rows whose birthplace is swapped "
                                    "for the canary city")
    city: str = option("Reykjavik, Iceland", "the wrong 'City, Country' the canaries state")
    n_train: int | None = option(None, "birthplace rows to fine-tune on (a seeded subset; none = all "
                                 "rows of the authors not held out)")
    n_heldout: int = option(24, "authors held out; their direct birthplace question is asked after "
                            "fine-tuning")
    seq_len: int = option(112, "tokens per training row (question prompt + answer)")
    prompt: str = option("Question: {question}\nAnswer:", "the prompt around a question")
    epochs: int = option(4, "fine-tuning epochs (a checkpoint at the end of each)")
    batch_size: int = option(8, "rows per fine-tuning step")
    learning_rate: float = option(1e-3, "peak learning rate (cosine decay)")
    lora_rank: int = option(16, "LoRA rank")
    lora_alpha: float = option(32.0, "LoRA alpha")
    lora_targets: tuple[str, ...] = option(("q", "k", "v", "o", "gate", "up", "down"),
                                           "projections with LoRA adapters")
    max_new_tokens: int = option(48, "greedy tokens per held-out answer")
    queries: str = option("canary", "which generated answers are traced: 'canary' (those naming "
                          "the canary city) or 'all' (smoke tests)", choices=("canary", "all"))
    max_queries: int | None = option(None, "trace at most the first N queries")
    methods: tuple[str, ...] = option(("bm25", "identity", "diagonal", "ekfac", "cg"),
                                      f"scoring methods: {', '.join(METHODS)}")
    modules: tuple[str, ...] = option(("q", "v"), "projections whose parameters attribution "
                                      "differentiates")
    layers: tuple[int, ...] | None = option((6, 13, 20, 27), "blocks of those projections (all = every block)")
    damping: float = option(0.1, "damping, a fraction of the curvature's mean eigenvalue")
    project: int | None = option(None, "factored k x k random projection per module, for the module "
                                 "methods identity, diagonal, kfac, ekfac (none = exact)")
    chunk: int = option(8, "examples per gradient batch")
    curvature: str = option("gauss_newton", "cg / lissa: Gauss-Newton or exact Hessian products",
                            choices=attr.CURVATURES)
    # small, so that CG on the 135M model costs about a training-gradient pass per checkpoint
    iterations: int = option(5, "cg / lissa: iterations (one Hessian-vector product each)")
    hessian_rows: int = option(4, "cg / lissa: training rows the Hessian is averaged over")
    beta: float = option(1.0, "debias weight: last - beta * base")
    bootstrap: int = option(1000, "bootstrap resamples of the AUC interval")
    seed: int = option(0, "seed of the split, the canaries, training, projections and the bootstrap")

    def __post_init__(self):
        check(0 < self.canary_fraction <= 1, "canary_fraction", f"must be in (0, 1], not {self.canary_fraction}")
        check("," in self.city and cn.city_name(self.city) != "", "city",
              f"give the canary as 'City, Country', not {self.city!r}")
        check(self.n_train is None or self.n_train >= 1, "n_train", f"must be at least 1, not {self.n_train}")
        for name in ("n_heldout", "seq_len", "epochs", "batch_size", "lora_rank", "max_new_tokens", "chunk",
                     "iterations", "hessian_rows"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, not {getattr(self, name)}")
        check("{question}" in self.prompt, "prompt", "must contain {question}")
        check(self.learning_rate > 0 and self.lora_alpha > 0, "learning_rate" if not self.learning_rate > 0
              else "lora_alpha", "must be positive")
        for name in ("lora_targets", "modules"):
            bad = [t for t in getattr(self, name) if t not in PROJECTIONS]
            check(not bad and len(getattr(self, name)) > 0, name,
                  f"unknown projections {bad}; choose from {', '.join(PROJECTIONS)}")
        bad = [m for m in self.methods if m not in METHODS]
        check(not bad and len(self.methods) > 0, "methods", f"unknown methods {bad}; choose from {', '.join(METHODS)}")
        check(self.max_queries is None or self.max_queries >= 1, "max_queries", "must be at least 1")
        check(self.layers is None or (len(self.layers) > 0 and min(self.layers) >= 0), "layers",
              "give block indices >= 0, or all")
        check(self.damping > 0, "damping", f"must be > 0, not {self.damping}")
        check(self.project is None or self.project >= 1, "project", "must be at least 1, or none")
        check(self.beta == self.beta and abs(self.beta) < float("inf"), "beta", "must be a finite number")
        check(self.bootstrap >= 0, "bootstrap", f"must be >= 0 (0 = no interval), not {self.bootstrap}")


def options_from_config(values: dict) -> AttributeOptions:
    """AttributeOptions from a config's "options" object."""
    return from_config(AttributeOptions, values)


# ---------------------------------------------------------------------------------------------
# the run

def attribute(base: Model, out_dir: str | os.PathLike, options: AttributeOptions = AttributeOptions(),
              *, progress: bool = True, wait: float = 0.0) -> pathlib.Path:
    """Run every missing stage (module docstring) and write the report; returns report.md's path.
    Raises InputError (after writing a report saying so) when no generated answer names the
    canary city."""
    if isinstance(base, Series):
        raise InputError("attribute fine-tunes one model; give a checkpoint, not a series")
    out = pathlib.Path(out_dir)
    if options.layers is not None and max(options.layers) >= base.config.n_layers:
        raise InputError(f"--layers {max(options.layers)} is out of range for {base.name}'s "
                         f"{base.config.n_layers} blocks")
    with store.lock_dir(out, wait):
        store.clean_temp(out, recursive=True)
        return _attribute(base, out, options, progress)


def _attribute(base: Model, out: pathlib.Path, options: AttributeOptions, progress: bool) -> pathlib.Path:
    started = time.perf_counter()
    split = cn.canary_split(cn.birthplace_rows(), fraction=options.canary_fraction, city=options.city,
                            n_heldout=options.n_heldout, n_train=options.n_train, seed=options.seed)
    store.write_json(out / "canaries.json", dict(city=split.city, canaries=split.canaries.tolist(),
                                                 train=split.train, heldout=split.heldout))
    prompt = lambda q: options.prompt.format(question=q)
    pairs = lambda rows, key: [(prompt(r["question"]), " " + r[key]) for r in rows]
    train_ex = T.prompt_answer_examples(base.tokenizer, pairs(split.train, "answer"), options.seq_len)
    is_canary = np.array([r["canary"] for r in split.train])
    say(progress, f"attribute: {base.name}; {len(split.train)} training rows, {len(split.canaries)} "
                   f"canaries ({split.city}), {len(split.heldout)} held-out questions -> {out}")

    run = finetune(base, train_ex, options, out / "finetune", progress)
    run_id = store.text_hash((out / "finetune" / RUN_MARKER).read_text())[:16]
    answers = generated_answers(run.model, split.heldout, options, out, run_id)
    names_city = [cn.states_city(a, split.city) for a in answers]
    chosen = [i for i, hit in enumerate(names_city) if hit or options.queries == "all"]
    if options.max_queries is not None:
        chosen = chosen[: options.max_queries]
    say(progress, f"attribute: {sum(names_city)} of {len(answers)} held-out answers name "
                   f"{cn.city_name(split.city)}; tracing {len(chosen)}")
    queries = [dict(split.heldout[i], generated=answers[i], names_city=names_city[i]) for i in chosen]
    if not queries:
        path = write_report(out, options, split, answers, names_city, [], {}, None)
        raise InputError(f"no held-out answer of the fine-tuned model names {cn.city_name(split.city)} "
                         f"(answers in {path}): nothing to trace; train more epochs or raise the canary "
                         "fraction (--epochs, --canary-fraction)")

    scores: dict[str, dict[str, np.ndarray]] = {}  # method -> variant -> [M, N]
    if "bm25" in options.methods:
        docs = [f"{r['question']} {r['answer']}" for r in split.train]
        scores["bm25"] = {"answer": bm25_scores(docs, [q["generated"] for q in queries]),
                          "question+answer": bm25_scores(docs, [f"{q['question']} {q['generated']}"
                                                                for q in queries])}
    if set(options.methods) - {"bm25"}:
        query_ex = T.prompt_answer_examples(base.tokenizer, [(prompt(q["question"]), " " + q["generated"])
                                                             for q in queries], options.seq_len)
        correct_ex = T.prompt_answer_examples(base.tokenizer, pairs(queries, "answer"), options.seq_len)
        series = epoch_series(out / "finetune")
        for method in (m for m in options.methods if m != "bm25"):
            scores[method] = influence_scores(method, series, base, train_ex, query_ex, correct_ex,
                                              options, out, run_id, progress)
    results = evaluate_scores(scores, is_canary, options.bootstrap, options.seed)
    path = write_report(out, options, split, answers, names_city, queries, scores, results)
    say(progress, f"attribute: done in {(time.perf_counter() - started) / 60:.1f} min; report: {path}")
    return path


def finetune(base: Model, train_ex: T.Examples, options: AttributeOptions, out: pathlib.Path,
             progress: bool) -> T.TrainResult:
    """LoRA fine-tune with a checkpoint at the end of every epoch (resumes a killed run)."""
    per_epoch = -(-len(train_ex.tokens) // options.batch_size)
    steps = per_epoch * options.epochs
    config = T.TrainConfig(steps=steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
                           warmup_steps=min(5, steps // 10), schedule="cosine", seed=options.seed,
                           log_every=max(1, per_epoch // 2),
                           lora=LoraConfig(rank=options.lora_rank, alpha=options.lora_alpha,
                                           targets=tuple(options.lora_targets)),
                           save_steps=tuple(per_epoch * e for e in range(1, options.epochs + 1)))
    return T.train(base, train_ex, config, out, progress=progress)


def epoch_series(run_dir: pathlib.Path) -> Series:
    """The fine-tuning checkpoints (step 0, if saved, is the base model, not a checkpoint of it)."""
    from jtrust.io.runs import run_series
    series = run_series(run_dir)
    return Series(series.name, tuple(c for c in series.checkpoints if c.step))


def generated_answers(model: Model, heldout: list[dict], options: AttributeOptions, out: pathlib.Path,
                      run_id: str) -> list[str]:
    """Greedy answers of the fine-tuned model to the held-out questions (a cell)."""
    prompts = [options.prompt.format(question=r["question"]) for r in heldout]
    key = dict(format=CELL_FORMAT, run=run_id, prompts=store.text_hash(prompts)[:16],
               max_new_tokens=options.max_new_tokens)
    return store.cached_cell(out / "cells" / "generate.json", key, lambda: [
        t[0].strip() for t in generate(model, prompts, max_new_tokens=options.max_new_tokens).texts])


def influence_scores(method: str, series: Series, base: Model, train_ex: T.Examples,
                     query_ex: T.Examples, correct_ex: T.Examples, options: AttributeOptions,
                     out: pathlib.Path, run_id: str, progress: bool) -> dict[str, np.ndarray]:
    """variant -> [M, N] from `attr.dda` for one inverse-Hessian method (a cell; attribution's own
    cache under out/attribution/ keeps gradients and factors between methods and reruns)."""
    key = dict(format=CELL_FORMAT, mean=True, method=method, run=run_id, checkpoints=series.names,
               base=base.checkpoint_hash, train=store.arrays_hash(train_ex),
               queries=store.arrays_hash(query_ex), correct=store.arrays_hash(correct_ex),
               modules=list(options.modules), layers=None if options.layers is None else list(options.layers),
               damping=options.damping, project=options.project, chunk=options.chunk,
               seed=options.seed, beta=options.beta)
    if method in ("cg", "lissa"):
        key.update(curvature=options.curvature, iterations=options.iterations, hessian_rows=options.hessian_rows)
    path = out / "cells" / "scores" / f"{method}.npz"
    cached = _read_arrays(path, key)
    if cached is not None:
        return cached
    t = time.perf_counter()
    task = attr.Task(modules=attr.Modules(names=tuple(options.modules), layers=options.layers))
    attr_options = attr.Options(method=method, damping=options.damping, chunk=options.chunk, seed=options.seed,
                                project=options.project if method in attr.MODULE_METHODS else None,
                                curvature=options.curvature, iterations=options.iterations,
                                hessian_rows=options.hessian_rows)
    result = attr.dda(series, base, train_ex, query_ex, task=task, options=attr_options,
                      correct=correct_ex, beta=options.beta, cache_dir=out / "attribution",
                      mean=True)  # [1, N]: the mean over queries, one system per checkpoint for cg/lissa
    result = {v: np.asarray(s, np.float64) for v, s in result.items()}
    store.save_npz(path, key=np.array(json.dumps(key)), **result)
    say(progress, f"attribute: {method} scored in {time.perf_counter() - t:.0f} s")
    return result


def _read_arrays(path: pathlib.Path, key: dict) -> dict[str, np.ndarray] | None:
    try:
        with np.load(path) as f:
            saved = {name: f[name] for name in f.files}
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or damaged: recomputed
    if json.loads(str(saved.pop("key"))) != json.loads(json.dumps(key)):
        return None
    return saved


# ---------------------------------------------------------------------------------------------
# scores and metrics

def bm25_tokens(text: str) -> list[str]:
    """BM25's terms: lowercased words (letters, digits, underscores)."""
    return re.findall(r"\w+", text.lower())


def bm25_scores(documents: Sequence[str], queries: Sequence[str]) -> np.ndarray:
    """[M, N] Okapi BM25 (rank-bm25's defaults, k1 = 1.5, b = 0.75) of each document per query."""
    from rank_bm25 import BM25Okapi
    index = BM25Okapi([bm25_tokens(d) for d in documents])
    return np.stack([index.get_scores(bm25_tokens(q)) for q in queries]).astype(np.float64)


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    """Area under the ROC curve of `scores` ranking label 1 above 0 (Mann-Whitney U, ties 1/2)."""
    labels = np.asarray(labels, bool)
    n_pos, n_neg = int(labels.sum()), int((~labels).sum())
    if n_pos == 0 or n_neg == 0:
        raise InputError(f"AUC needs both classes; got {n_pos} positive and {n_neg} negative examples")
    ranks = rankdata(np.asarray(scores, np.float64))
    return float((ranks[labels].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def bootstrap_auc(scores: np.ndarray, labels: np.ndarray, n: int = 1000, seed: int = 0,
                  level: float = 0.95) -> tuple[float, float]:
    """Percentile interval of the AUC over `n` resamples of the examples (with replacement;
    resamples holding one class only are drawn again)."""
    scores, labels = np.asarray(scores, np.float64), np.asarray(labels, bool)
    rng = np.random.default_rng(seed)
    values = []
    while len(values) < n:
        rows = rng.integers(0, len(scores), len(scores))
        if labels[rows].all() or not labels[rows].any():
            continue
        values.append(roc_auc(scores[rows], labels[rows]))
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def roc_curve(scores: np.ndarray, labels: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(false-positive rates, true-positive rates) at every distinct threshold, from (0, 0)."""
    order = np.argsort(-np.asarray(scores, np.float64), kind="stable")
    s, y = np.asarray(scores, np.float64)[order], np.asarray(labels, bool)[order]
    last = np.r_[np.diff(s) != 0, True]  # the last row of each run of tied scores
    tp, fp = np.cumsum(y)[last], np.cumsum(~y)[last]
    return np.r_[0.0, fp / max(fp[-1], 1)], np.r_[0.0, tp / max(tp[-1], 1)]


def evaluate_scores(scores: dict[str, dict[str, np.ndarray]], is_canary: np.ndarray, bootstrap: int,
                    seed: int) -> list[dict]:
    """One row per (method, variant): AUC of the per-example mean score over queries."""
    rows = []
    for method, variants in scores.items():
        for variant, matrix in variants.items():
            per_example = matrix.mean(0)
            auc = roc_auc(per_example, is_canary)
            low, high = bootstrap_auc(per_example, is_canary, bootstrap, seed) if bootstrap else (np.nan, np.nan)
            rows.append(dict(method=method, variant=variant, auc=auc, low=low, high=high,
                             n_train=len(is_canary), n_canary=int(is_canary.sum()), n_queries=len(matrix)))
    return rows


# ---------------------------------------------------------------------------------------------
# the report

def write_report(out: pathlib.Path, options: AttributeOptions, split: cn.CanarySplit, answers: list[str],
                 names_city: list[bool], queries: list[dict], scores: dict, results: list[dict] | None,
                 ) -> pathlib.Path:
    """results.csv / results.json, plots/roc_<method>.png, plots/auc.png, report.md and .html."""
    city = cn.city_name(split.city)
    page = [("h1", "Hallucination tracing: which fine-tuning examples taught the canary city?"),
            ("p", f"{len(split.train)} TOFU birthplace rows fine-tuned on (LoRA rank {options.lora_rank}, "
                  f"{options.epochs} epochs, a checkpoint per epoch); in {len(split.canaries)} of them "
                  f"(fraction {options.canary_fraction}) the birthplace reads '{split.city}'. "
                  f"{sum(names_city)} of {len(answers)} greedy answers to held-out authors' birthplace "
                  f"questions name {city}; {len(queries)} are traced"
                  + (" (queries = all: every answer, whatever it says)." if options.queries == "all" else "."))]
    if results:
        ranked = sorted(results, key=lambda r: -r["auc"])
        page += [("h2", "ROC AUC of 'is a canary example'"),
                 ("p", "Per training example the mean score over the traced queries; AUC with a "
                       f"bootstrap 95% interval ({options.bootstrap} resamples of the training examples)."),
                 ("table", ["method", "variant", "AUC", "95% interval"],
                  [[r["method"], r["variant"], f"{r['auc']:.3f}", f"[{r['low']:.3f}, {r['high']:.3f}]"]
                   for r in ranked]),
                 ("h2", "Which beat which"), *[("p", s) for s in comparisons(results)]]
        page += [("img", _plot_auc(results, out / "plots" / "auc.png"))]
        is_canary = np.array([r["canary"] for r in split.train])
        for method, variants in scores.items():
            page.append(("img", _plot_roc(method, variants, is_canary, out / "plots" / f"roc_{method}.png")))
    write_table(out / "results.csv", results or [], RESULT_FIELDS)
    page += [("h2", "Held-out answers"),
             ("table", ["question", "generated (greedy)", f"names {city}", "true answer"],
              [[r["question"], a, "yes" if hit else "", r["answer"]]
               for r, a, hit in zip(split.heldout, answers, names_city)])]
    store.write_json(out / "results.json", dict(
        options=dataclasses.asdict(options), city=split.city, n_train=len(split.train),
        canaries=split.canaries.tolist(), queries=queries, answers=answers, names_city=names_city,
        results=results or []))
    store.write_text(out / "report.html", html_page(page, "jtrust attribute"))
    path = out / "report.md"
    store.write_text(path, markdown(page))
    return path


def comparisons(results: list[dict]) -> list[str]:
    """Plain statements: the best row, DDA against raw per method, against BM25, the issue's target."""
    auc = {(r["method"], r["variant"]): r for r in results}
    best = max(results, key=lambda r: r["auc"])
    lines = [f"Best: {best['method']} {best['variant']}, AUC {best['auc']:.3f} "
             f"[{best['low']:.3f}, {best['high']:.3f}]."]
    bm25 = max((r for r in results if r["method"] == "bm25"), key=lambda r: r["auc"], default=None)
    overlap = lambda a, b: not (a["low"] > b["high"] or b["low"] > a["high"])
    for method in dict.fromkeys(r["method"] for r in results):
        if method == "bm25" or (method, "dda") not in auc or (method, "raw") not in auc:
            continue
        d, raw = auc[(method, "dda")], auc[(method, "raw")]
        verdict = "above" if d["auc"] > raw["auc"] else "not above"
        line = (f"{method}: DDA {d['auc']:.3f} is {verdict} raw {raw['auc']:.3f}"
                + (" (intervals overlap)" if overlap(d, raw) else " (intervals disjoint)"))
        if bm25 is not None:
            line += (f"; {'above' if d['auc'] > bm25['auc'] else 'not above'} the best BM25 "
                     f"({bm25['variant']}, {bm25['auc']:.3f})")
        lines.append(line + ".")
    dda = [r for r in results if r["variant"] == "dda"]
    if dda:
        top = max(dda, key=lambda r: r["auc"])
        raw_best = max((r["auc"] for r in results if r["variant"] == "raw"), default=-np.inf)
        bm25_best = bm25["auc"] if bm25 is not None else -np.inf
        met = top["auc"] >= 0.90 and top["auc"] > raw_best and top["auc"] > bm25_best
        lines.append(f"Issue 13's target (DDA >= 0.90 and above every raw gradient method and BM25): "
                     f"{'met' if met else 'not met'} (best DDA: {top['method']} {top['auc']:.3f}).")
    return lines


def _plot_roc(method: str, variants: dict[str, np.ndarray], is_canary: np.ndarray, path: pathlib.Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(4.8, 4.4))
    for variant, matrix in variants.items():
        per_example = matrix.mean(0)
        fpr, tpr = roc_curve(per_example, is_canary)
        ax.plot(fpr, tpr, label=f"{variant} ({roc_auc(per_example, is_canary):.3f})")
    ax.plot([0, 1], [0, 1], color="0.7", linestyle=":", linewidth=1)
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title=f"{method}: ROC, canary examples",
           xlim=(0, 1), ylim=(0, 1.01))
    ax.legend(fontsize=8, loc="lower right")
    save_figure(fig, path)
    return f"plots/{path.name}"


def _plot_auc(results: list[dict], path: pathlib.Path) -> str:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    labels = [f"{r['method']}\n{r['variant']}" for r in results]
    auc = np.array([r["auc"] for r in results])
    err = np.array([[r["auc"] - r["low"], r["high"] - r["auc"]] for r in results]).T
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(results)), 3.8))
    ax.bar(np.arange(len(results)), auc, yerr=np.nan_to_num(err), capsize=2,
           color=[f"C{list(dict.fromkeys(r['method'] for r in results)).index(r['method'])}" for r in results])
    ax.axhline(0.5, color="0.6", linestyle=":", linewidth=1)
    ax.set_xticks(np.arange(len(results)), labels, fontsize=7, rotation=60, ha="right")
    ax.set(ylabel="ROC AUC", ylim=(0, 1.02), title="canary examples found: AUC (95% bootstrap interval)")
    save_figure(fig, path)
    return f"plots/{path.name}"


# ---------------------------------------------------------------------------------------------
# experiments/attribute.py

def main(argv=None) -> None:
    from jtrust.io.loading import load
    from jtrust.pipelines.experiment import experiment_args
    args, cfg, out = experiment_args(__doc__, "experiments/configs/attribute_smollm2.json", argv)
    options = options_from_config(cfg.get("options", {}))
    attribute(load(args.model or cfg["model"]), out, options)


if __name__ == "__main__":
    sys.exit(main())
