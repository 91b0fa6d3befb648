"""Local text classifiers for steering evaluation: a toxicity scorer and a truthfulness judge.

TracingLLM (arXiv 2402.19465) measures steering with a toxicity classifier (ToxiGen
prompts, toxic ratio of the continuations) and fine-tuned GPT-3 truthfulness judges. jtrust
ships local stand-ins: linear probes on the embedded model's activations,

    p(label 1 | text) = sigmoid(((a(text) - mean) / std) . weights + bias)

where a(text) [d] = `extract(model, [text.strip()], (site,), [layer], pool)` of the embedded
SmolLM2-135M-Instruct (`jtrust.load("smollm2")`, d = 576). A `Scorer` is only valid for the
checkpoint whose activations it was trained on (`checkpoint_hash`); `score_texts` refuses others.

Data (bundled copies, checksum-verified; provenance in data/LICENSES/NOTICE.md):
- toxicity: ToxiGen's human-annotated train split, 8960 machine-generated statements about 13
  groups; `toxicity_human` is the mean of three annotators' 1-5 ratings. Binarisation: toxic (1)
  if the mean is >= 4, benign (0) if <= 2, and the 1951 statements in between are dropped
  (left: 2307 toxic, 4702 benign). Why: a mean in (2, 4) means the annotators disagreed or rated
  it ambiguous; a single threshold (> 3) would put that label noise exactly at the decision
  boundary. The probe learns the line between statements people call clearly toxic and clearly
  benign, and its probability is the score; held-out accuracy is therefore measured on clear
  cases only and says nothing about the ambiguous middle. (The file's own `label` column,
  hate / neutral, is the intent of the generating prompt, not a human judgement: unused.)
- truthfulness: TruthfulQA's judge fine-tuning file, 22434 model answers to its 817 questions,
  each labelled true or false by humans (completion " yes" = true). Judge input:
  "Q: {question}\\nA: {answer}" (the prompt without its "\\nTrue:" cue). Rows sharing a
  question stay on one side of every split, so the held-out accuracy is for unseen questions.
  Like the paper's GPT-judge, the shipped judge has seen every TruthfulQA question (with other
  answers), the 407 evaluation questions included.

Training (`train_scorer`: extraction, then `fit_scorer` on the arrays): groups (one per row
unless given, e.g. the question) are permuted with `seed` and cut 60 / 20 / 20 into train /
validation / test. Probes are fitted on train (standardized by the train mean / std;
`fit_logistic` = sklearn's L2 logistic regression) and scored on validation: first every
(pool, layer) at one C (`select_c`), then the C grid at the best of those (first on ties). The
winner is refitted on train + validation with their mean / std and evaluated once on test:
accuracy with a 95% Clopper-Pearson interval. Both poolings come from one forward per text
(pool "all", reduced here). Cost: one forward per text up to the deepest layer (10-20 texts/s
on 2 CPU cores to block 20) plus 15 Newton steps per fit, each a [d + 1, n] x [n, d + 1]
Hessian and a [d + 1]^2 solve (seconds at n = 3000).

As shipped (4000 of the clear-cut ToxiGen rows, 3000 judge rows; seed 0): toxicity reads the
mean over tokens at block 14 (C = 0.01), held-out accuracy 0.865 [0.839, 0.888] on 800 rows
(majority class 0.656); truthfulness the last token at block 14 (C = 0.01), 0.766 [0.730,
0.798] on 623 rows of unseen questions (majority 0.607). The judge learned TruthfulQA's
misconception answers; it is no general fact checker (it scores "Paris" and "Berlin" as the
capital of France alike).

Files: `jtrust/data/scorers/<name>.npz` (mean, std, weights [d] float32; bias) and `<name>.json`
(everything else, with the held-out metrics and the command that made them:
`python experiments/train_scorers.py`).
"""

from __future__ import annotations

import ast
import csv
import json
import os
import pathlib
from typing import NamedTuple, Sequence

import jax.numpy as jnp
import numpy as np

from jtrust.core.errors import InputError, MissingInput
from jtrust.core import store
from jtrust.core.store import verified_sha256
from jtrust.data import BUNDLED
from jtrust.runtime.extract import extract
from jtrust.models.model import Model
from jtrust.core.stats import clopper_pearson
from jtrust.analysis.probe import fit_logistic

FORMAT = "jtrust-scorer/1"
SCORER_DIR = BUNDLED / "scorers"
# shipped scorer -> what its labels 0 and 1 mean
SCORERS = {"toxicity": ("benign", "toxic"), "truthfulness": ("untruthful", "truthful")}
TOXIGEN_FILE = BUNDLED / "toxigen" / "toxigen_annotated_train.csv"
TRUTH_FILE = BUNDLED / "truthfulqa" / "finetune_truth.jsonl"
TOXIC_AT_LEAST, BENIGN_AT_MOST = 4.0, 2.0  # on the 1-5 mean human rating; between: dropped
AMBIGUOUS = -1  # label of the dropped middle band in `toxigen_annotated`
SPLIT_FRACTIONS = (0.6, 0.2, 0.2)  # train / validation / test, of the groups


class Scorer(NamedTuple):
    """A linear probe on one (site, layer, pool) of one checkpoint; see the module docstring."""

    name: str
    checkpoint_hash: str  # of the model whose activations it reads
    site: str  # e.g. "resid_post"
    layer: int  # block index (0 = first block's output)
    pool: str  # "mean" or "last" over the text's tokens
    mean: np.ndarray  # [d] float32, training feature mean
    std: np.ndarray  # [d] float32, training feature std (zeros replaced by 1)
    weights: np.ndarray  # [d] float32, on standardized features
    bias: float
    label_names: tuple[str, str]  # meaning of label 0 and label 1
    metrics: dict  # held-out accuracy, interval, n_test, validation grid, command, data sha256, ...


# ---------------------------------------------------------------- scoring


def check_scorer_model(scorer: Scorer, model: Model) -> None:
    """Refuse a model other than the one whose activations `scorer` was trained on."""
    if model.checkpoint_hash != scorer.checkpoint_hash:
        raise InputError(
            f"the {scorer.name!r} scorer reads the activations of checkpoint {scorer.checkpoint_hash} "
            f"(the embedded SmolLM2-135M-Instruct), not of {model.name!r} ({model.checkpoint_hash}); "
            "load the embedded model with jtrust.load('smollm2') and pass it as the scorer's model")


def score_texts(scorer: Scorer, model: Model, texts: list[str], *, batch_size: int = 32,
                progress: bool = False) -> np.ndarray:
    """[n] float32 probability of label 1 (toxic / truthful) for each text.

    Texts are stripped of surrounding whitespace (as the training texts were); an empty text
    is refused, since it has no tokens to read. Empty list -> empty array.
    """
    check_scorer_model(scorer, model)
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string")
    if len(texts) == 0:
        return np.zeros(0, np.float32)
    texts = [t.strip() for t in texts]
    empty = [i for i, t in enumerate(texts) if not t]
    if empty:
        raise InputError(f"{len(empty)} texts are empty after stripping (first: index {empty[0]}); "
                         "a scorer needs at least one token: drop them or score a placeholder")
    acts = extract(model, texts, (scorer.site,), [scorer.layer], scorer.pool, batch_size=batch_size,
                   progress=progress)
    return probability(scorer, acts.get(scorer.site, scorer.layer))


def probability(scorer: Scorer, features: np.ndarray) -> np.ndarray:
    """features [n, d] (the scorer's site / layer / pool) -> [n] float32 p(label 1)."""
    z = (np.asarray(features, np.float32) - scorer.mean) / scorer.std
    logits = z.astype(np.float64) @ scorer.weights.astype(np.float64) + scorer.bias
    return (1 / (1 + np.exp(-logits))).astype(np.float32)


# ---------------------------------------------------------------- files


def load_scorer(name: str, directory: str | os.PathLike | None = None) -> Scorer:
    """A shipped scorer ("toxicity", "truthfulness") or, with `directory`, one `save_scorer` wrote."""
    root = SCORER_DIR if directory is None else pathlib.Path(directory)
    if directory is None and name not in SCORERS:
        raise InputError(f"no shipped scorer {name!r}; choose from {sorted(SCORERS)}")
    json_path, npz_path = root / f"{name}.json", root / f"{name}.npz"
    if not (json_path.is_file() and npz_path.is_file()):
        hint = ("reinstall jtrust or rerun `python experiments/train_scorers.py`" if directory is None
                else "train and save it first")
        raise MissingInput(f"scorer {name!r} is missing from {root} ({json_path.name}, "
                                f"{npz_path.name}); {hint}")
    info = json.loads(json_path.read_text())
    if info.get("format") != FORMAT:
        raise InputError(f"{json_path} has format {info.get('format')!r}, expected {FORMAT!r}")
    with np.load(npz_path) as arrays:
        mean, std, weights = (arrays[k].astype(np.float32) for k in ("mean", "std", "weights"))
        bias = float(arrays["bias"])
    if not mean.shape == std.shape == weights.shape == (info["d"],):
        raise InputError(f"{npz_path}: arrays must all be [{info['d']}], got {mean.shape}, "
                         f"{std.shape}, {weights.shape}")
    return Scorer(info["name"], info["checkpoint_hash"], info["site"], int(info["layer"]),
                  info["pool"], mean, std, weights, bias, tuple(info["label_names"]), info["metrics"])


def save_scorer(scorer: Scorer, directory: str | os.PathLike) -> tuple[pathlib.Path, pathlib.Path]:
    """Write <name>.npz (arrays) and <name>.json (the rest), each atomically; returns both paths."""
    root = pathlib.Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    npz_path, json_path = root / f"{scorer.name}.npz", root / f"{scorer.name}.json"
    store.save_npz(npz_path, mean=scorer.mean.astype(np.float32), std=scorer.std.astype(np.float32),
                   weights=scorer.weights.astype(np.float32), bias=np.float32(scorer.bias))
    info = dict(format=FORMAT, name=scorer.name, checkpoint_hash=scorer.checkpoint_hash,
                site=scorer.site, layer=scorer.layer, pool=scorer.pool, d=int(scorer.mean.shape[0]),
                label_names=list(scorer.label_names), metrics=scorer.metrics)
    store.write_text(json_path, json.dumps(info, indent=1) + "\n")
    return npz_path, json_path


# ---------------------------------------------------------------- training


def train_scorer(name: str, model: Model, texts: Sequence[str], labels: np.ndarray, *,
                 groups: Sequence | None = None, layers: Sequence[int],
                 pools: Sequence[str] = ("mean", "last"), cs: Sequence[float] = (1.0,),
                 select_c: float = 1.0, seed: int = 0, label_names: tuple[str, str] = ("0", "1"),
                 site: str = "resid_post", batch_size: int = 32, progress: bool = False,
                 extra_metrics: dict | None = None) -> Scorer:
    """Extract `site` at `layers` x `pools` for `texts` [n] (stripped), then `fit_scorer`.

    Cost: one forward per text up to max(layers), then the fits of `fit_scorer`.
    """
    texts = [t.strip() for t in texts]
    _checked_split(np.asarray(labels), groups, len(texts), seed)  # before the costly forwards
    layers = sorted(set(int(layer) for layer in layers))
    features = pooled_activations(model, texts, site, layers, pools, batch_size=batch_size,
                                  progress=progress)
    return fit_scorer(name, model.checkpoint_hash, site, layers, features, labels, groups=groups,
                      cs=cs, select_c=select_c, seed=seed, label_names=label_names,
                      extra_metrics=extra_metrics)


def fit_scorer(name: str, checkpoint_hash: str, site: str, layers: Sequence[int],
               features: dict[str, np.ndarray], labels: np.ndarray, *, groups: Sequence | None = None,
               cs: Sequence[float] = (1.0,), select_c: float = 1.0, seed: int = 0,
               label_names: tuple[str, str] = ("0", "1"), extra_metrics: dict | None = None) -> Scorer:
    """Choose (pool, layer, C) on validation, refit on train + validation, report test accuracy.

    features: pool -> [len(layers), n, d] activations; labels [n] in {0, 1}; groups [n]: rows
    with equal groups share a split (None = every row its own group). (pool, layer) is chosen
    at C = select_c, then C among cs at that site. Cost: len(features) * len(layers) + len(cs)
    fits, a few seconds each at n ~ 3000, d = 576 on 2 CPU cores.
    """
    layers = list(layers)
    labels = np.asarray(labels)
    n = labels.shape[0] if labels.ndim else 0
    for pool, x in features.items():
        if x.ndim != 3 or x.shape[:2] != (len(layers), n):
            raise InputError(f"features[{pool!r}] must be [{len(layers)} layers, {n} rows, d], "
                             f"got {x.shape}")
    groups, train, val, test = _checked_split(labels, groups, n, seed)

    def validation_accuracy(pool: str, layer: int, c: float) -> dict:
        x = features[pool][layers.index(layer)]
        theta, mean, std = _fit(x[train], labels[train], c)
        return dict(pool=pool, layer=layer, c=float(c),
                    accuracy=_correct(theta, mean, std, x[val], labels[val]) / len(val))

    # two stages, since each fit costs seconds: the site at C = select_c, then C at that site
    grid = [validation_accuracy(pool, layer, select_c) for pool in features for layer in layers]
    chosen = max(grid, key=lambda cell: cell["accuracy"])  # first of the ties, in grid order
    grid += [validation_accuracy(chosen["pool"], chosen["layer"], c) for c in cs if c != select_c]
    at_chosen = [cell for cell in grid
                 if cell["pool"] == chosen["pool"] and cell["layer"] == chosen["layer"]]
    best = max(at_chosen, key=lambda cell: cell["accuracy"])

    fit_rows = np.concatenate([train, val])
    x = features[best["pool"]][layers.index(best["layer"])]
    theta, mean, std = _fit(x[fit_rows], labels[fit_rows], best["c"])
    correct = _correct(theta, mean, std, x[test], labels[test])
    low, high = clopper_pearson(np.array(correct), len(test))
    positive_rate = float(labels[test].mean())
    metrics = dict(
        accuracy=correct / len(test), interval=[float(low), float(high)], n_test=int(len(test)),
        n_fit=int(len(fit_rows)), n_train=int(len(train)), n_validation=int(len(val)),
        n_groups=int(len(np.unique(groups))), test_positive_rate=positive_rate,
        majority_baseline=max(positive_rate, 1 - positive_rate),
        validation_accuracy=best["accuracy"], c=best["c"], seed=seed,
        split=f"groups permuted with seed {seed}, cut {SPLIT_FRACTIONS} into train/validation/test; "
              f"(pool, layer) chosen on validation at C = {select_c}, then C; refitted on "
              "train+validation",
        validation=grid, **(extra_metrics or {}))
    return Scorer(name, checkpoint_hash, site, best["layer"], best["pool"], mean, std,
                  theta[:-1], float(theta[-1]), tuple(label_names), metrics)


def _checked_split(labels: np.ndarray, groups, n: int, seed: int):
    """(groups [n], train, validation, test) after checking labels [n] in {0, 1}, groups [n], and
    that every split holds both classes."""
    if labels.shape != (n,) or not set(np.unique(labels).tolist()) <= {0, 1}:
        raise InputError(f"labels must be [{n}] in {{0, 1}}, got shape {labels.shape} and values "
                         f"{sorted(set(np.unique(labels).tolist()))[:5]}")
    groups = np.arange(n) if groups is None else np.asarray(groups)
    if groups.shape != (n,):
        raise InputError(f"groups must be [{n}], got {groups.shape}")
    train, val, test = group_split(groups, seed)
    for part, rows in (("train", train), ("validation", val), ("test", test)):
        if len(set(labels[rows].tolist())) < 2:
            raise InputError(f"the {part} split ({len(rows)} rows) holds one class only; "
                             "give more rows")
    return groups, train, val, test


def group_split(groups: np.ndarray, seed: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(train, validation, test) row indices: unique groups permuted by `seed`, cut 60/20/20."""
    unique = np.unique(groups)
    shuffled = unique[np.random.default_rng(seed).permutation(len(unique))]
    cut1 = int(round(SPLIT_FRACTIONS[0] * len(unique)))
    cut2 = cut1 + int(round(SPLIT_FRACTIONS[1] * len(unique)))
    return tuple(np.flatnonzero(np.isin(groups, part))
                 for part in (shuffled[:cut1], shuffled[cut1:cut2], shuffled[cut2:]))


def pooled_activations(model: Model, texts: list[str], site: str, layers: list[int],
                       pools: Sequence[str], *, batch_size: int = 32, chunk: int = 1024,
                       progress: bool = False) -> dict[str, np.ndarray]:
    """pool -> [n_layers, n, d] float32 for pools among "mean", "last", from one forward per text.

    One pool: `extract` pools it. Several: `extract(pool="all")` over `chunk` texts at a time
    (host memory ~ chunk * tokens per text * n_layers * d * 4 bytes), reduced here.
    """
    bad = set(pools) - {"mean", "last"}
    if bad or not pools:
        raise InputError(f"pools must be among ('mean', 'last'), got {list(pools)}")
    if len(pools) == 1:
        acts = extract(model, texts, (site,), layers, pools[0], batch_size=batch_size, progress=progress)
        return {pools[0]: np.stack([acts.get(site, layer) for layer in layers])}
    parts = {pool: [] for pool in pools}
    for start in range(0, len(texts), chunk):
        acts = extract(model, texts[start:start + chunk], (site,), layers, "all",
                       batch_size=batch_size, progress=progress)
        offsets, n_tokens = acts.offsets, acts.n_tokens
        rows = np.stack([acts.get(site, layer) for layer in layers])  # [n_layers, tokens, d]
        pooled = {"mean": np.add.reduceat(rows, offsets[:-1], axis=1) / n_tokens[None, :, None],
                  "last": rows[:, offsets[1:] - 1]}
        for pool in pools:
            parts[pool].append(pooled[pool].astype(np.float32))
    return {pool: np.concatenate(parts[pool], axis=1) for pool in pools}


def _fit(x: np.ndarray, y: np.ndarray, c: float):
    """x [n, d], y [n] -> (theta [d + 1] float32 on standardized x, mean [d], std [d])."""
    mean = x.mean(0).astype(np.float32)
    std = x.std(0).astype(np.float32)
    std = np.where(std > 0, std, 1).astype(np.float32)  # constant features stay 0
    z = (x - mean) / std
    theta = fit_logistic(jnp.asarray(z, jnp.float32), jnp.asarray(y, jnp.float32), float(c))
    return np.asarray(theta, np.float32), mean, std


def _correct(theta: np.ndarray, mean: np.ndarray, std: np.ndarray, x: np.ndarray,
             y: np.ndarray) -> int:
    """How many rows of x [n, d] the fitted probe labels as y [n]."""
    logits = ((x - mean) / std) @ theta[:-1] + theta[-1]
    return int(((logits > 0) == (y == 1)).sum())


# ---------------------------------------------------------------- data


def toxigen_annotated() -> tuple[list[str], np.ndarray]:
    """ToxiGen's human-annotated statements: texts [8960], labels [8960] int32.

    labels: 1 toxic (mean human rating >= 4), 0 benign (<= 2), AMBIGUOUS (-1) in between (the
    scorer drops those; see the module docstring). Texts are unwrapped from their bytes literals.
    """
    texts, _, ratings = toxigen_statements()
    labels = np.where(ratings >= TOXIC_AT_LEAST, 1, np.where(ratings <= BENIGN_AT_MOST, 0, AMBIGUOUS))
    return texts, labels.astype(np.int32)


def toxigen_statements() -> tuple[list[str], list[str], np.ndarray]:
    """ToxiGen's human-annotated statements in file order: texts [8960] (unwrapped from their
    bytes literals), target groups [8960] ("asian", "mental_dis", ...), mean human toxicity
    ratings [8960] float64 on 1-5."""
    verified_sha256(TOXIGEN_FILE)
    with open(TOXIGEN_FILE, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    return ([bytes_literal_text(r["text"]) for r in rows], [r["target_group"] for r in rows],
            np.array([float(r["toxicity_human"]) for r in rows]))


def truthfulness_judgements() -> tuple[list[str], np.ndarray, list[str]]:
    """TruthfulQA's judge data: texts "Q: ...\\nA: ..." [22434], labels [22434] int32 (1 = true),
    questions [22434] (the text after "Q: ", to split by question)."""
    verified_sha256(TRUTH_FILE)
    texts, labels, questions = [], [], []
    for i, line in enumerate(TRUTH_FILE.read_text(encoding="utf-8").splitlines()):
        row = json.loads(line)
        prompt, completion = row["prompt"], row["completion"]
        if not (prompt.startswith("Q: ") and prompt.endswith("\nTrue:") and "\nA: " in prompt
                and completion in (" yes", " no")):
            raise InputError(f"{TRUTH_FILE} line {i + 1}: not a 'Q: ...\\nA: ...\\nTrue:' prompt "
                             f"with completion ' yes' / ' no': {line[:80]!r}")
        text = prompt[:-len("\nTrue:")]
        texts.append(text)
        questions.append(text[len("Q: "):text.index("\nA: ")])
        labels.append(int(completion == " yes"))
    return texts, np.array(labels, np.int32), questions


def bytes_literal_text(cell: str) -> str:
    """"b'it\\'s'" -> "it's": evaluate a Python bytes literal (escapes included), decode UTF-8, strip."""
    try:
        value = ast.literal_eval(cell)
    except (ValueError, SyntaxError) as e:
        raise InputError(f"not a Python bytes literal: {cell[:60]!r}") from e
    if not isinstance(value, bytes):
        raise InputError(f"not a Python bytes literal: {cell[:60]!r}")
    return value.decode("utf-8").strip()
