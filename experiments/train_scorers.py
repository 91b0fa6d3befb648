"""Train the shipped scorers (toxicity, truthfulness) on the embedded model and write them.

    python experiments/train_scorers.py [--toxigen-rows 4000] [--judge-rows 3000] [--out DIR]

Writes jtrust/data/scorers/{toxicity,truthfulness}.{npz,json} (or --out): linear probes on
SmolLM2-135M-Instruct's residual stream, see `jtrust.analysis.scorers`. Both choose pool (mean, last) x
layer (6, 8, ..., 20) at C = 0.01, then C in (0.001, 0.01, 0.1, 1), on a validation split, and
report the held-out test accuracy with a 95% Clopper-Pearson interval.

Cost (2 CPU cores): one forward per text to block 20, about 10-20 texts/s (the judge's texts are
longer), plus 20 probe fits of a few seconds per scorer. The defaults take seeded subsamples, to
stay near 15 minutes in all: 4000 of the 7009 clear-cut ToxiGen statements and 3000 of the 22434
judge rows (held out by question); --toxigen-rows 0 / --judge-rows 0 use every row.
"""

from __future__ import annotations

import argparse
import hashlib
import pathlib
import shlex
import sys
import time

import numpy as np

import jtrust
from jtrust.analysis import scorers

LAYERS = list(range(6, 21, 2))
POOLS = ("mean", "last")
CS = (0.001, 0.01, 0.1, 1.0)
# the C at which pool and layer are compared: a first run comparing them at sklearn's C = 1 then
# preferred C = 0.01 (over 0.1 and 1, on validation) at both chosen sites; with 2000-2400 training
# rows and d = 576, C = 1 overfits, which blurs the comparison of sites
SELECT_C = 0.01
SEED = 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--toxigen-rows", type=int, default=4000,
                        help="clear-cut ToxiGen rows to use, of 7009 (seeded subsample; 0 = all)")
    parser.add_argument("--judge-rows", type=int, default=3000,
                        help="judge rows to use, of 22434 (seeded subsample; 0 = all)")
    parser.add_argument("--out", default=str(scorers.SCORER_DIR), help="where to write the scorers")
    args = parser.parse_args()
    command = shlex.join(["python", "experiments/train_scorers.py", *sys.argv[1:]])
    start = time.perf_counter()
    model = jtrust.load("smollm2")

    texts, labels = scorers.toxigen_annotated()
    keep = np.flatnonzero(labels != scorers.AMBIGUOUS)
    keep = subsample(keep, args.toxigen_rows)
    train_and_save("toxicity", model, [texts[i] for i in keep], labels[keep], None,
                   scorers.TOXIGEN_FILE, command, args.out,
                   binarisation=f"toxic if toxicity_human >= {scorers.TOXIC_AT_LEAST}, benign if <= "
                                f"{scorers.BENIGN_AT_MOST}, rows in between dropped")

    texts, labels, questions = scorers.truthfulness_judgements()
    keep = subsample(np.arange(len(texts)), args.judge_rows)
    train_and_save("truthfulness", model, [texts[i] for i in keep], labels[keep],
                   [questions[i] for i in keep], scorers.TRUTH_FILE, command, args.out,
                   binarisation="completion ' yes' = truthful (1), ' no' = untruthful (0); "
                                "split by question")
    print(f"total {time.perf_counter() - start:.0f} s")


def subsample(rows: np.ndarray, n: int) -> np.ndarray:
    """A seeded subset of n of `rows`, in file order (all of them for n = 0)."""
    if n == 0 or n >= len(rows):
        return rows
    return np.sort(np.random.default_rng(SEED).choice(rows, n, replace=False))


def train_and_save(name, model, texts, labels, groups, data_file: pathlib.Path, command: str,
                   out: str, binarisation: str) -> None:
    t = time.perf_counter()
    print(f"{name}: {len(texts)} texts ({int(labels.sum())} labelled {scorers.SCORERS[name][1]})",
          flush=True)
    scorer = scorers.train_scorer(
        name, model, texts, labels, groups=groups, layers=LAYERS, pools=POOLS, cs=CS, select_c=SELECT_C,
        seed=SEED,
        label_names=scorers.SCORERS[name], progress=True,
        extra_metrics=dict(command=command,
                           data_file=f"jtrust/data/{data_file.parent.name}/{data_file.name}",
                           data_sha256=hashlib.sha256(data_file.read_bytes()).hexdigest(),
                           n_rows_used=len(texts), labels=binarisation, model="smollm2",
                           layers_searched=LAYERS, pools_searched=list(POOLS), cs_searched=list(CS)))
    seconds = time.perf_counter() - t
    scorer = scorer._replace(metrics={**scorer.metrics, "train_seconds": round(seconds, 1)})
    paths = scorers.save_scorer(scorer, out)
    m = scorer.metrics
    print(f"{name}: {scorer.pool} pool, layer {scorer.layer}, C {m['c']} (validation "
          f"{m['validation_accuracy']:.3f}); held-out accuracy {m['accuracy']:.3f} "
          f"[{m['interval'][0]:.3f}, {m['interval'][1]:.3f}] on {m['n_test']} "
          f"(majority {m['majority_baseline']:.3f}); {seconds:.0f} s -> {', '.join(map(str, paths))}",
          flush=True)


if __name__ == "__main__":
    main()
