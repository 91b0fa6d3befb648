"""EK-FAC with DDA's variants when the query measurement is the NLL of the canary city's tokens
only, instead of the whole generated answer (docs/attribution.md). Reads a finished
`experiments/attribute.py` run (its canaries, answers, checkpoints and gradient cache).

    python experiments/attribute_entity_tokens.py --out runs/attribute
"""

import argparse
import json
import pathlib
import time

import numpy as np
from sklearn.metrics import roc_auc_score

import jtrust
from jtrust import training as T
from jtrust.analysis import attribution as attr
from jtrust.pipelines import attribute as at


def entity_weights(tokenizer, prompt: str, answer: str, entity: str, seq_len: int) -> np.ndarray:
    """[seq_len] weights 1 on the positions that predict `entity`'s tokens in prompt + answer."""
    rows = lambda a: T.prompt_answer_examples(tokenizer, [(prompt, " " + a)], seq_len).weights[0]
    k = answer.index(entity.split(",")[0])
    full, before, through = rows(answer), rows(answer[:k].rstrip()), rows(answer[:k] + entity)
    start = int(np.flatnonzero(full)[0])
    out = np.zeros_like(full)
    out[start + int(before.sum()) - 1: start + int(through.sum()) - 1] = 1  # the answers' EOS excluded
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="runs/attribute")
    out = pathlib.Path(p.parse_args().out)
    split = json.loads((out / "canaries.json").read_text())
    queries = json.loads((out / "results.json").read_text())["queries"]
    base, opts = jtrust.load("smollm2"), at.AttributeOptions()  # the benchmark's settings
    prompt = lambda q: opts.prompt.format(question=q)
    train = T.prompt_answer_examples(base.tokenizer, [(prompt(r["question"]), " " + r["answer"])
                                                      for r in split["train"]], opts.seq_len)
    full = T.prompt_answer_examples(base.tokenizer, [(prompt(q["question"]), " " + q["generated"])
                                                     for q in queries], opts.seq_len)
    weights = np.stack([entity_weights(base.tokenizer, prompt(q["question"]), q["generated"], split["city"],
                                       opts.seq_len) for q in queries])
    task = attr.Task(modules=attr.Modules(names=opts.modules, layers=opts.layers))
    t = time.perf_counter()
    variants = attr.dda(at.epoch_series(out / "finetune"), base, train, full._replace(weights=weights), task=task,
                        options=attr.Options(method="ekfac", chunk=opts.chunk), cache_dir=out / "attribution",
                        mean=True)
    canary = np.array([r["canary"] for r in split["train"]])
    for name, s in variants.items():
        print(f"ekfac {name:<8} AUC {roc_auc_score(canary, s[0]):.3f}")
    print(f"{time.perf_counter() - t:.0f} s")


if __name__ == "__main__":
    main()
