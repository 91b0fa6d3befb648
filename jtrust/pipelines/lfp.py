"""Learned feedback patterns (issue 14): does a model tuned on a known feedback signal carry
that feedback in its activations, where sparse features can read it?

    jtrust lfp --model smollm2 --out runs/lfp                        # sentiment (RLOO + VADER)
    jtrust lfp --task preference --out runs/lfp_hh                   # preference (DPO on HH-RLHF)
    python experiments/lfp.py --config experiments/configs/lfp_smollm2.json

After "Interpreting Learned Feedback Patterns in Large Language Models" (Marks et al., arXiv
2310.08164), on the embedded model:
  1. tune: sentiment: RLOO with a KL penalty to the base model on SST-2 review prompts, reward
     = VADER lexicon valences of the continuation (`jtrust.training.rl`,
     `jtrust.analysis.feedback`); preference: DPO on HH-RLHF harmless pairs
     (`jtrust.training.preference`). Both LoRA, a checkpoint series in out/tune. The reward
     (held-out prompts, before vs after, paired t interval) or held-out preference accuracy
     (Clopper-Pearson) says whether tuning took;
  2. layers: the 5 blocks whose parameters changed most (`jtrust.analysis.lfp.layer_changes`);
  3. activations: mlp_out of those blocks on every token of the probing texts (held-out SST-2
     sentences; held-out HH prompts with each reply), base and tuned model (out/acts/);
  4. SAEs: the paper's tied ReLU + L1 SAEs (or TopK, BatchTopK, JumpReLU), widths 1x and 2x d_model, the 5 layers of one model
     and width trained in one program (`jtrust.analysis.sae`), with SAELens's metrics, CE-loss
     score with the reconstruction spliced in, and MMCS between the 1x and 2x dictionaries;
  5. probes: sentiment: ridge from the token's features (5 layers concatenated) to its word's
     lexicon valence, Kendall tau on held-out texts against an untrained probe; preference:
     logistic regression on reply-mean-pooled features, chosen vs rejected; each on raw
     activations and on the SAE features of both widths, for base and tuned model;
  6. validation (sentiment): the probe's most-weighted SAE features, their top-activating tokens
     and those tokens' valence; a permutation test of whether they are valence-bearing more often
     than random live features; feature cards;
  7. report: report.md / report.html, results.json, plots/.
Every stage is kept: the training and SAE runs resume, extraction resumes, the others are
keyed cells under out/cells/. The call holds out_dir's lock.
"""

from __future__ import annotations

import dataclasses
import os
import pathlib
import sys
import time

import jax
import numpy as np

from jtrust.analysis import feedback, lfp, sae
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.core.options import check, from_config, option
from jtrust.data import preferences as prefs
from jtrust.io.runs import RUN_MARKER
from jtrust.models.lora import PROJECTIONS, LoraConfig
from jtrust.models.model import Model, Series
from jtrust.pipelines.report import html_page, markdown, save_figure, say, write_table
from jtrust.runtime.extract import extract, load_activations
from jtrust import training as T
from jtrust.training import preference as dpo_lib
from jtrust.training import rl

CELL_FORMAT = 1
TASKS = ("sentiment", "preference")
SITE = "mlp_out"


@dataclasses.dataclass(frozen=True)
class LfpOptions:
    task: str = option("sentiment", "the feedback: 'sentiment' (RLOO, VADER reward) or 'preference' "
                       "(DPO on HH-RLHF)", choices=TASKS)
    steps: int = option(12, "tuning steps (RLOO iterations or DPO steps)")
    batch_size: int = option(32, "sequences per step (RLOO: prompts per step x k)")
    learning_rate: float = option(2e-3, "learning rate of the LoRA adapters (constant)")
    lora_rank: int = option(16, "LoRA rank")
    lora_targets: tuple[str, ...] = option(("q", "k", "v", "o", "gate", "up", "down"), "projections with adapters")
    k: int = option(4, "RLOO: samples per prompt")
    kl_coef: float = option(0.05, "RLOO: KL penalty weight")
    n_prompts: int = option(512, "sentiment: training prompts (first 2-10 words of SST-2 sentences)")
    n_heldout: int = option(32, "held-out prompts (sentiment) or pairs (preference) for the before/after figure")
    eval_samples: int = option(4, "sentiment: samples per held-out prompt")
    beta: float = option(0.1, "DPO beta")
    seq_len: int = option(160, "preference: tokens per prompt + reply")
    max_reply: int = option(48, "preference: reply tokens kept")
    top_layers: int = option(5, "layers chosen by parameter change")
    probe_texts: int = option(600, "texts whose token activations train the SAEs and the probes")
    widths: tuple[int, ...] = option((1, 2), "SAE widths, multiples of d_model")
    sae_steps: int = option(600, "SAE optimizer steps")
    sae_batch: int = option(512, "tokens per SAE step")
    sae_architecture: str = option("relu", "SAE architecture: relu (the paper's tied ReLU + L1), topk, batchtopk "
                                   "or jumprelu (jtrust.analysis.sae)")
    sae_k: int = option(32, "topk / batchtopk SAEs: latents kept per token")
    l1_coef: float = option(1e-3, "SAE L1 coefficient (the paper's; relu only)")
    sae_learning_rate: float = option(1e-3, "SAE Adam learning rate (the paper's)")
    ce_texts: int = option(32, "texts for the CE-loss score with the SAE spliced in")
    ridge_alpha: float = option(1.0, "ridge penalty of the sentiment probe")
    top_features: int = option(20, "validation: the probe's most-weighted features tested")
    contexts: int = option(10, "validation: top-activating tokens per feature")
    permutations: int = option(10_000, "validation: permutation-test draws")
    seed: int = option(0, "seed of the splits, tuning, SAEs and tests")

    def __post_init__(self):
        for name in ("steps", "batch_size", "lora_rank", "k", "n_prompts", "n_heldout", "eval_samples", "seq_len",
                     "max_reply", "top_layers", "probe_texts", "sae_steps", "sae_batch", "ce_texts",
                     "top_features", "contexts", "permutations", "sae_k"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, not {getattr(self, name)}")
        check(self.k >= 2, "k", "RLOO needs at least 2 samples per prompt")
        check(self.batch_size % self.k == 0 or self.task != "sentiment", "batch_size",
              f"must be a multiple of k={self.k}")
        bad = [t for t in self.lora_targets if t not in PROJECTIONS]
        check(not bad and len(self.lora_targets) > 0, "lora_targets", f"unknown projections {bad}")
        check(len(self.widths) > 0 and min(self.widths) >= 1, "widths", "give positive multiples of d_model")
        check(self.sae_architecture in sae.ARCHITECTURES, "sae_architecture",
              f"unknown architecture {self.sae_architecture!r}; choose from {sae.ARCHITECTURES}")
        check(self.learning_rate > 0 and self.sae_learning_rate > 0 and self.beta > 0 and self.kl_coef >= 0,
              "learning_rate", "learning rates and beta must be > 0, kl_coef >= 0")


def options_from_config(values: dict) -> LfpOptions:
    """LfpOptions from a config's "options" object."""
    return from_config(LfpOptions, values)


# ---------------------------------------------------------------------------------------------
# the run

def run_lfp(base: Model, out_dir: str | os.PathLike, options: LfpOptions = LfpOptions(), *,
            progress: bool = True, wait: float = 0.0) -> pathlib.Path:
    """Every missing stage (module docstring), then the report; returns report.md's path."""
    if isinstance(base, Series):
        raise InputError("lfp tunes one model; give a checkpoint, not a series")
    if options.top_layers > base.config.n_layers:
        raise InputError(f"top_layers={options.top_layers} exceeds {base.name}'s {base.config.n_layers} blocks")
    out = pathlib.Path(out_dir)
    with store.lock_dir(out, wait):
        store.clean_temp(out, recursive=True)
        return _run(base, out, options, progress)


def _run(base: Model, out: pathlib.Path, options: LfpOptions, progress: bool) -> pathlib.Path:
    started = time.perf_counter()
    data = task_data(options)
    if options.task == "preference":
        data["probe_texts"], data["reply_starts"] = preference_texts(base.tokenizer, data["probe_pairs"], options)
    say(progress, f"lfp ({options.task}): {base.name} -> {out}")
    tuned, feedback_result = tune(base, data, options, out, progress)
    run_id = store.text_hash((out / "tune" / RUN_MARKER).read_text())[:16]
    key = dict(format=CELL_FORMAT, run=run_id, options=dataclasses.asdict(options))

    changes = lfp.layer_changes(base.params, tuned.params)
    layers = sorted(lfp.top_layers(changes, options.top_layers))
    say(progress, f"lfp: layers changed most: {layers}")
    models = {"base": base, "tuned": tuned}
    acts = {name: token_activations(m, data["probe_texts"], layers, out / "acts" / name, progress)
            for name, m in models.items()}
    saes = {(name, w): train_layer_saes(acts[name], layers, w, options, out, name, progress)
            for name in models for w in options.widths}
    sae_rows = store.cached_cell(out / "cells" / "sae_metrics.json", key,
                      lambda: sae_metrics(models, acts, saes, layers, data, options, progress))
    mmcs_rows = store.cached_cell(out / "cells" / "mmcs.json", key, lambda: dictionary_similarity(saes, layers, options))
    if options.task == "sentiment":
        probes, validation = store.cached_cell(out / "cells" / "probes.json", key,
                                    lambda: sentiment_probes(models, acts, saes, layers, data, options))
    else:
        probes, validation = store.cached_cell(out / "cells" / "probes.json", key,
                                    lambda: preference_probes(acts, saes, layers, data, options)), None
    results = dict(task=options.task, model=base.name, options=dataclasses.asdict(options), feedback=feedback_result,
                   layer_changes=changes.tolist(), layers=layers, sae=sae_rows, mmcs=mmcs_rows, probes=probes,
                   validation=validation, minutes=(time.perf_counter() - started) / 60)
    path = write_report(out, results)
    say(progress, f"lfp: done in {(time.perf_counter() - started) / 60:.1f} min; report: {path}")
    return path


def task_data(options: LfpOptions) -> dict:
    """The task's texts: training prompts or pairs, held-out ones, probing texts (disjoint)."""
    rng = np.random.default_rng(options.seed)
    if options.task == "sentiment":
        sentences = feedback.sst2_sentences()
        order = rng.permutation(len(sentences))
        probe = [sentences[i] for i in order[: options.probe_texts]]
        rest = [sentences[i] for i in order[options.probe_texts:]]
        prompts = feedback.review_prompts(rest, seed=options.seed)
        if len(prompts) < options.n_prompts + options.n_heldout:
            raise InputError(f"{len(prompts)} review prompts are fewer than n_prompts + n_heldout = "
                             f"{options.n_prompts + options.n_heldout}; lower them or probe_texts")
        return dict(prompts=prompts[: options.n_prompts], heldout=prompts[-options.n_heldout:], probe_texts=probe)
    pairs = prefs.read_pairs().pairs
    split = prefs.split_pairs(pairs, heldout=0.3, seed=options.seed)
    held = split.heldout
    probe_pairs = held[: options.probe_texts // 2]
    eval_pairs = held[options.probe_texts // 2:][: options.n_heldout]
    if len(eval_pairs) < options.n_heldout:
        raise InputError(f"the held-out HH pairs ({len(held)}) cannot give {options.probe_texts // 2} probing "
                         f"and {options.n_heldout} evaluation pairs; lower probe_texts or n_heldout")
    return dict(train_pairs=split.train, heldout_pairs=eval_pairs, probe_pairs=probe_pairs)


def preference_texts(tokenizer, pairs: list, options: LfpOptions) -> tuple[list[str], np.ndarray]:
    """(texts: each pair's prompt, shortened from its earliest turns, + chosen, then + rejected;
    [2 n] token index where each reply starts)."""
    texts, starts = [], []
    for pair in pairs:
        prompt = tokenizer.decode(dpo_lib.fit_prompt(tokenizer, pair.prompt, options.seq_len - options.max_reply),
                                  skip_special_tokens=False)
        for reply in (pair.chosen, pair.rejected):
            reply = tokenizer.decode(tokenizer.backend.encode(reply, add_special_tokens=False).ids[: options.max_reply])
            text = prompt + reply
            n_reply = len(tokenizer.backend.encode(reply, add_special_tokens=False).ids)
            texts.append(text)
            starts.append(max(len(tokenizer.encode(text)) - n_reply, 1))
    return texts, np.asarray(starts)


def tune(base: Model, data: dict, options: LfpOptions, out: pathlib.Path, progress: bool) -> tuple[Model, dict]:
    """The feedback fine-tune (a resumable run in out/tune) and its before/after figures (a cell)."""
    lora = LoraConfig(rank=options.lora_rank, alpha=2.0 * options.lora_rank, targets=tuple(options.lora_targets))
    config = T.TrainConfig(steps=options.steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
                           warmup_steps=0, schedule="constant", lora=lora,
                           seed=options.seed, log_every=1,
                           save_steps=tuple(sorted({options.steps // 4, options.steps // 2, options.steps})))
    if options.task == "sentiment":
        rl_config = rl.RLConfig(k=options.k, kl_coef=options.kl_coef)
        run = rl.rloo(base, data["prompts"], feedback.sentiment_reward, config, rl_config, out / "tune",
                      progress=progress)
    else:
        ex = dpo_lib.pair_examples(base.tokenizer, data["train_pairs"], options.seq_len, options.max_reply)
        run = T.train(base, ex, config, out / "tune", objective=dpo_lib.dpo_objective(options.beta),
                      reference=base.params, progress=progress)
    run_id = store.text_hash((out / "tune" / RUN_MARKER).read_text())[:16]
    key = dict(format=CELL_FORMAT, run=run_id, heldout=options.n_heldout, samples=options.eval_samples,
               seed=options.seed)
    result = store.cached_cell(out / "cells" / "feedback.json", key, lambda: feedback_change(base, run.model, data, options))
    result["train_log"] = [m for m in run.metrics if m.get("kind") == "train"]
    return run.model, result


def feedback_change(base: Model, tuned: Model, data: dict, options: LfpOptions) -> dict:
    if options.task == "sentiment":
        rl_config = rl.RLConfig(k=options.eval_samples, kl_coef=options.kl_coef)
        key = jax.random.key(options.seed + 1)
        before = rl.evaluate_policy(base, data["heldout"], feedback.sentiment_reward, rl_config,
                                    reference=base.params, key=key)
        after = rl.evaluate_policy(tuned, data["heldout"], feedback.sentiment_reward, rl_config,
                                   reference=base.params, key=key)
        return dict(rl.reward_change(before, after), examples=[
            dict(prompt=p, before=b[0], after=a[0]) for p, b, a in zip(data["heldout"][:8], before.texts, after.texts)])
    held = dpo_lib.pair_examples(base.tokenizer, data["heldout_pairs"], options.seq_len, options.max_reply)
    evaluate = dpo_lib.preference_eval(held, base.params, beta=options.beta)
    return {"before": evaluate(base), "after": evaluate(tuned)}


def token_activations(model: Model, texts: list[str], layers: list[int], out: pathlib.Path, progress: bool):
    """mlp_out of `layers` on every token of `texts` (resumable extraction into `out`)."""
    extract(model, texts, (SITE,), layers, pool="all", out_dir=out, progress=progress, max_length=256)
    return load_activations(out)


def stacked(acts, layers: list[int]) -> np.ndarray:
    """[L, N_tokens, d] float32 of the extraction's layers."""
    return np.stack([acts.get(SITE, layer) for layer in layers]).astype(np.float32)


def train_layer_saes(acts, layers: list[int], width: int, options: LfpOptions, out: pathlib.Path, name: str,
                     progress: bool) -> sae.SAERun:
    x = stacked(acts, layers)
    config = sae.SAEConfig(d_in=x.shape[2], width=width * x.shape[2], architecture=options.sae_architecture,
                           l1_coef=options.l1_coef, k=options.sae_k)
    train = sae.sae_train_config(options.sae_steps, batch_size=min(options.sae_batch, x.shape[1]),
                                 learning_rate=options.sae_learning_rate, seed=options.seed)
    say(progress, f"lfp: SAEs {name} {width}x on {x.shape[1]} tokens x {len(layers)} layers")
    run_dir = out / "sae" / f"{name}_{width}x_{options.sae_architecture}"
    return sae.train_saes(x, config, train, run_dir, seeds=(options.seed,),
                          progress=progress, name=f"{name} {width}x")


def sae_metrics(models: dict, acts: dict, saes: dict, layers: list[int], data: dict, options: LfpOptions,
                progress: bool) -> list[dict]:
    rows = []
    for (name, width), run in saes.items():
        x = stacked(acts[name], layers)
        model = models[name]
        ex = _text_examples(model, data["probe_texts"][: options.ce_texts])
        for j, layer in enumerate(layers):
            params = run.one(j)
            m = sae.reconstruction_metrics(params, run.config, x[j])
            m.update(sae.spliced_losses(model, ex, params, run.config, layer, SITE))
            rows.append(dict(model=name, width=width, layer=layer, **m))
            say(progress, f"lfp: SAE {name} {width}x layer {layer}: explained variance "
                           f"{m['explained_variance']:.3f}, L0 {m['l0']:.1f}, CE score {m['ce_loss_score']:.3f}")
    return rows


def _sae_title(options: dict) -> str:
    arch = options.get("sae_architecture", "relu")
    if arch == "relu":
        return f"Tied ReLU + L1 (the paper's; l1 {options['l1_coef']:g})"
    return f"{arch} (k {options['sae_k']})" if arch in ("topk", "batchtopk") else arch


def _text_examples(model: Model, texts: list[str]) -> T.Examples:
    """Next-token rows of whole texts (weight on every prediction), right-padded."""
    ids = [model.tokenizer.encode(t)[:257] for t in texts]
    return T.token_examples([i[:1] for i in ids], [i[1:] for i in ids], max(len(i) for i in ids) - 1,
                            model.tokenizer.pad_id)


def dictionary_similarity(saes: dict, layers: list[int], options: LfpOptions) -> list[dict]:
    """MMCS between the smallest and every larger width, per model and layer."""
    rows = []
    small = min(options.widths)
    for (name, width), run in saes.items():
        if width == small:
            continue
        ref = saes[(name, small)]
        for j, layer in enumerate(layers):
            a = np.asarray(sae.decoder(ref.one(j), ref.config))
            b = np.asarray(sae.decoder(run.one(j), run.config))
            rows.append(dict(model=name, small=small, big=width, layer=layer, mmcs=sae.mmcs(a, b),
                             mmcs_plain=sae.mmcs(a, b, hungarian=False)))
    return rows


def sae_features(run: sae.SAERun, x: np.ndarray, rows: np.ndarray | None = None, batch: int = 4096) -> np.ndarray:
    """[N, L * F] latents of the L layers' SAEs on token rows of x [L, N, d], concatenated."""
    encode = jax.jit(lambda p, xs: sae.encode(p, xs, run.config)[0])
    x = x if rows is None else x[:, rows]
    parts = []
    for j in range(x.shape[0]):
        params = run.one(j)
        parts.append(np.concatenate([np.asarray(encode(params, x[j, s:s + batch])) for s in range(0, x.shape[1], batch)]))
    return np.concatenate(parts, axis=1)


def token_valence_rows(tokenizer, texts: list[str]) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """(valence of every token row [N] (its VADER word's), text index of every row [N], ids per text),
    rows in extraction order (texts concatenated)."""
    valence, text_of, ids = [], [], []
    for i, text in enumerate(texts):
        tv = feedback.token_valences(tokenizer, text)
        if tv.ids != tokenizer.encode(text)[: len(tv.ids)]:
            raise InputError("the tokenizer adds tokens (e.g. BOS) the valence rows do not know of")
        valence.append(tv.valence), text_of.append(np.full(len(tv.ids), i)), ids.append(tv.ids)
    return np.concatenate(valence), np.concatenate(text_of), ids


def sentiment_probes(models: dict, acts: dict, saes: dict, layers: list[int], data: dict,
                     options: LfpOptions) -> tuple[list[dict], dict]:
    """Ridge probes to the valence of lexicon-word tokens; validation of the tuned model's widest
    SAE probe (module docstring)."""
    tokenizer = models["base"].tokenizer
    valence, text_of, ids = token_valence_rows(tokenizer, data["probe_texts"])
    rows = np.flatnonzero(valence != 0)
    rows_out, validation = [], None
    for name in models:
        x = stacked(acts[name], layers)
        if x.shape[1] != len(valence):
            raise InputError(f"{x.shape[1]} activation rows but {len(valence)} token rows: extraction truncated texts")
        feats = {"raw activations": x[:, rows].transpose(1, 0, 2).reshape(len(rows), -1)}
        for width in options.widths:
            feats[f"SAE {width}x"] = sae_features(saes[(name, width)], x, rows)
        for what, f in feats.items():
            probe = lfp.reward_probe(f, valence[rows], alpha=options.ridge_alpha, seed=options.seed,
                                     groups=text_of[rows])
            rows_out.append(dict(model=name, features=what, n_features=f.shape[1], n_tokens=len(rows),
                                 tau=probe.tau, p_value=probe.p_value, baseline_tau=probe.baseline_tau,
                                 baseline_p=probe.baseline_p))
            if name == "tuned" and what == f"SAE {max(options.widths)}x":
                validation = validate_features(saes[(name, max(options.widths))], x, f, probe, valence, ids,
                                               tokenizer, options)
    return rows_out, validation


def validate_features(run: sae.SAERun, x: np.ndarray, probe_features: np.ndarray, probe: lfp.RewardProbe,
                      valence: np.ndarray, ids: list[list[int]], tokenizer, options: LfpOptions) -> dict:
    """Top features by |weight| x feature std; their top-activating tokens over every token row;
    related = most of those tokens carry a valence; permutation test against live features."""
    importance = np.abs(probe.coef) * probe_features.std(axis=0)
    top = np.argsort(-importance)[: options.top_features]
    latents = sae_features(run, x)  # [N, L * F] on every token
    live = np.flatnonzero((latents > 0).any(axis=0))
    mean_valence, fraction = lfp.feature_valence(latents, valence, np.arange(latents.shape[1]), options.contexts)
    related = fraction >= 0.5
    observed, null_mean, p = lfp.related_test(related, top, live, n_permutations=options.permutations,
                                              seed=options.seed)
    offsets = np.concatenate([[0], np.cumsum([len(i) for i in ids])])
    width = run.config.width
    cards = []
    for f in top[:8]:
        contexts = []
        for row in lfp.top_activating(latents, [f], options.contexts)[0][:5]:
            t = int(np.searchsorted(offsets, row, side="right") - 1)
            pos = int(row - offsets[t])
            left = tokenizer.decode(ids[t][max(pos - 8, 0):pos])
            token = tokenizer.decode(ids[t][pos:pos + 1])
            right = tokenizer.decode(ids[t][pos + 1:pos + 4])
            contexts.append(dict(text=f"{left}[[{token}]]{right}", activation=float(latents[row, f]),
                                 valence=float(valence[row])))
        cards.append(dict(feature=int(f), layer_index=int(f // width), latent=int(f % width),
                          weight=float(probe.coef[f]), importance=float(importance[f]),
                          mean_valence=float(mean_valence[f]), related=bool(related[f]), contexts=contexts))
    return dict(top_features=top.tolist(), related_fraction=observed, null_fraction=null_mean, p_value=p,
                live_features=int(len(live)), related_live=int(related[live].sum()), cards=cards)


def preference_probes(acts: dict, saes: dict, layers: list[int], data: dict, options: LfpOptions) -> list[dict]:
    """Logistic probes, chosen vs rejected, on the replies' mean-pooled features."""
    out = []
    for name in ("base", "tuned"):
        a = acts[name]
        x = stacked(a, layers)
        offsets, reply_start = a.offsets, data["reply_starts"]
        feats = {"raw activations": x.transpose(1, 0, 2).reshape(x.shape[1], -1)}
        for width in options.widths:
            feats[f"SAE {width}x"] = sae_features(saes[(name, width)], x)
        for what, f in feats.items():
            pooled = np.stack([f[offsets[i] + reply_start[i]: offsets[i + 1]].mean(axis=0)
                               for i in range(len(offsets) - 1)])
            probe = lfp.preference_probe(pooled[0::2], pooled[1::2], seed=options.seed)
            out.append(dict(model=name, features=what, n_features=f.shape[1], n_pairs=len(pooled) // 2,
                            accuracy=probe.accuracy, low=probe.low, high=probe.high, n_test=probe.n_test))
    return out


# ---------------------------------------------------------------------------------------------
# cells and report

def write_report(out: pathlib.Path, results: dict) -> pathlib.Path:
    """results.json, sae.csv, probes.csv, plots/*.png, report.md and report.html."""
    fb, options = results["feedback"], results["options"]
    page = [("h1", f"Learned feedback patterns: {results['task']} feedback on {results['model']}")]
    if results["task"] == "sentiment":
        page += [("h2", "1. Feedback tuning (RLOO, VADER lexicon reward)"),
                 ("p", f"{options['steps']} RLOO iterations of {options['batch_size']} samples ({options['k']} per "
                       f"prompt), KL coefficient {options['kl_coef']}, LoRA rank {options['lora_rank']}. Held-out "
                       f"reward over {fb['prompts']} prompts x {fb['samples_per_prompt']} samples: before "
                       f"{fb['reward_before']:.3f} [{fb['reward_before_low']:.3f}, {fb['reward_before_high']:.3f}], "
                       f"after {fb['reward_after']:.3f} [{fb['reward_after_low']:.3f}, {fb['reward_after_high']:.3f}]; "
                       f"difference {fb['difference']:+.3f} (95% paired t interval [{fb['difference_low']:+.3f}, "
                       f"{fb['difference_high']:+.3f}], p = {fb['p_value']:.2g}); KL to the base model "
                       f"{fb['kl_after']:.3f} nats per continuation."),
                 ("img", _plot_training(fb["train_log"], out / "plots" / "tuning.png")),
                 ("table", ["prompt", "base continuation", "tuned continuation"],
                  [[e["prompt"], e["before"], e["after"]] for e in fb["examples"]])]
    else:
        b, a = fb["before"], fb["after"]
        cell = lambda m, k: f"{m[f'pref_{k}']:.3f} [{m[f'pref_{k}_low']:.3f}, {m[f'pref_{k}_high']:.3f}]"
        page += [("h2", "1. Feedback tuning (DPO on HH-RLHF harmless pairs)"),
                 ("p", f"{options['steps']} DPO steps (beta {options['beta']}) of {options['batch_size']} pairs, "
                       f"LoRA rank {options['lora_rank']}; {b['pref_n']} held-out pairs, 95% Clopper-Pearson "
                       "intervals. Implicit-reward accuracy: margin beta (log-ratio chosen - log-ratio rejected) > 0 "
                       "(0 for the base model, whose margins are all 0); likelihood accuracy: log p(chosen) > "
                       "log p(rejected)."),
                 ("table", ["", "implicit-reward accuracy", "likelihood accuracy", "mean margin"],
                  [[name, cell(m, "accuracy"), cell(m, "logp_accuracy"), f"{m['pref_margin']:.4f}"]
                   for name, m in (("base", b), ("tuned", a))]),
                 ("img", _plot_training(fb["train_log"], out / "plots" / "tuning.png"))]
    page += [("h2", "2. Layers that changed most"),
             ("p", f"Sum over each block's tensors of |theta_base - theta_tuned|_2 (LoRA merged); chosen: "
                   f"{results['layers']}."),
             ("img", _plot_changes(results["layer_changes"], results["layers"], out / "plots" / "layers.png")),
             ("h2", "3. Sparse autoencoders on mlp_out"),
             ("p", f"{_sae_title(results['options'])} SAEs, one per layer, model and width. CE score: (CE "
                   "zero-ablated - CE spliced) / (CE zero-ablated - CE clean) with the reconstruction spliced "
                   "into the model."),
             ("table", ["model", "width", "layer", "explained var.", "MSE", "L0", "dead", "dense", "shrinkage",
                        "CE score", "KL"],
              [[r["model"], f"{r['width']}x", r["layer"], f"{r['explained_variance']:.3f}", f"{r['mse']:.4g}",
                f"{r['l0']:.1f}", f"{r['dead_fraction']:.3f}", f"{r['dense_fraction']:.3f}", f"{r['shrinkage']:.3f}",
                f"{r['ce_loss_score']:.3f}", f"{r['kl_div_with_sae']:.4f}"] for r in results["sae"]])]
    if results["mmcs"]:
        page += [("p", "Mean max cosine similarity between the dictionaries of two widths (Hungarian matching, "
                       "as the authors; plain: each atom's best match)."),
                 ("table", ["model", "widths", "layer", "MMCS", "MMCS (plain)"],
                  [[r["model"], f"{r['small']}x vs {r['big']}x", r["layer"], f"{r['mmcs']:.3f}",
                    f"{r['mmcs_plain']:.3f}"] for r in results["mmcs"]])]
    if results["task"] == "sentiment":
        page += [("h2", "4. Probes: token features -> lexicon valence"),
                 ("p", f"Ridge regression from a token's features (the {len(results['layers'])} layers concatenated) to its VADER word "
                       "valence, on tokens of lexicon words; Kendall tau on held-out texts, against an untrained "
                       "probe with random weights (the authors report about -0.04 for theirs)."),
                 ("table", ["model", "features", "dims", "tokens", "Kendall tau", "p", "untrained tau"],
                  [[r["model"], r["features"], r["n_features"], r["n_tokens"], f"{r['tau']:.3f}",
                    f"{r['p_value']:.2g}", f"{r['baseline_tau']:.3f}"] for r in results["probes"]]),
                 ("img", _plot_probes(results["probes"], "tau", out / "plots" / "probes.png"))]
        v = results["validation"]
        page += [("h2", "5. Are the probe's features feedback-related?"),
                 ("p", f"The tuned model's widest-SAE probe: of its {len(v['top_features'])} most-weighted features "
                       f"(|weight| x std), {v['related_fraction']:.0%} have mostly valence-bearing top-activating "
                       f"tokens, against {v['null_fraction']:.0%} of random live features ({v['related_live']} of "
                       f"{v['live_features']} live features are); permutation test p = {v['p_value']:.3g}."),
                 ("table", ["feature (layer index, latent)", "probe weight", "related", "mean valence of top tokens",
                            "top-activating contexts ([[token]], activation, valence)"],
                  [[f"{c['feature']} ({c['layer_index']}, {c['latent']})", f"{c['weight']:+.3f}",
                    "yes" if c["related"] else "no", f"{c['mean_valence']:+.2f}",
                    " | ".join(f"{x['text']} ({x['activation']:.2f}, {x['valence']:+.1f})" for x in c["contexts"])]
                   for c in v["cards"]])]
    else:
        page += [("h2", "4. Probes: reply features -> chosen or rejected"),
                 ("p", "Logistic regression on the features mean-pooled over the reply's tokens; a pair's two "
                       "replies are on the same side of the split; 95% Clopper-Pearson intervals."),
                 ("table", ["model", "features", "dims", "pairs", "accuracy", "95% interval"],
                  [[r["model"], r["features"], r["n_features"], r["n_pairs"], f"{r['accuracy']:.3f}",
                    f"[{r['low']:.3f}, {r['high']:.3f}]"] for r in results["probes"]]),
                 ("img", _plot_probes(results["probes"], "accuracy", out / "plots" / "probes.png"))]
    page.append(("p", f"Run time {results['minutes']:.1f} min (stages already done are read back)."))
    write_table(out / "sae.csv", results["sae"], list(results["sae"][0]))
    write_table(out / "probes.csv", results["probes"], list(results["probes"][0]))
    store.write_json(out / "results.json", results)
    store.write_text(out / "report.html", html_page(page, "jtrust lfp"))
    path = out / "report.md"
    store.write_text(path, markdown(page))
    return path


def _pyplot():
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt


def _plot_training(log: list[dict], path: pathlib.Path) -> str:
    plt = _pyplot()
    keys = [k for k in ("reward", "kl", "reward_margin", "reward_accuracy", "loss") if log and k in log[0]][:2]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.2 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        ax.plot([m["step"] for m in log], [m[k] for m in log], marker=".")
        ax.set(xlabel="step", ylabel=k, title=f"tuning: {k}")
    save_figure(fig, path)
    return f"plots/{path.name}"


def _plot_changes(changes: list[float], chosen: list[int], path: pathlib.Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.0))
    ax.bar(np.arange(len(changes)), changes, color=["C3" if i in chosen else "C0" for i in range(len(changes))])
    ax.set(xlabel="block", ylabel="sum of |delta theta|_2", title="parameter change by block (red: chosen)")
    save_figure(fig, path)
    return f"plots/{path.name}"


def _plot_probes(rows: list[dict], field: str, path: pathlib.Path) -> str:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 3.4))
    labels = [f"{r['model']}\n{r['features']}" for r in rows]
    ax.bar(np.arange(len(rows)), [r[field] for r in rows], color=["C0" if r["model"] == "base" else "C1" for r in rows])
    if field == "tau":
        ax.scatter(np.arange(len(rows)), [r["baseline_tau"] for r in rows], color="k", marker="_", s=200,
                   label="untrained probe", zorder=3)
        ax.legend(fontsize=8)
    else:
        ax.errorbar(np.arange(len(rows)), [r["accuracy"] for r in rows],
                    yerr=np.array([[r["accuracy"] - r["low"], r["high"] - r["accuracy"]] for r in rows]).T,
                    fmt="none", color="k", capsize=3)
        ax.axhline(0.5, color="0.6", linestyle=":")
    ax.set_xticks(np.arange(len(rows)), labels, fontsize=7)
    ax.set(ylabel="Kendall tau" if field == "tau" else "held-out accuracy", title="probes")
    save_figure(fig, path)
    return f"plots/{path.name}"


def main(argv=None) -> None:
    from jtrust.io.loading import load
    from jtrust.pipelines.experiment import experiment_args
    args, cfg, out = experiment_args(__doc__, "experiments/configs/lfp_smollm2.json", argv)
    run_lfp(load(args.model or cfg["model"]), out, options_from_config(cfg.get("options", {})))


if __name__ == "__main__":
    sys.exit(main())
