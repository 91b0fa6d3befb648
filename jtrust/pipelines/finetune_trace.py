"""Fine-tune the embedded model on truthful answers (LoRA) and trace its checkpoint series: the
pre-training tools (jtrust.training, jtrust trace) on a real 135M model.

    python experiments/finetune_trace.py --config experiments/configs/finetune_smollm2.json

Data: the true (question, answer) pairs of the bundled TruthfulQA judge data
(`jtrust.analysis.scorers.truthfulness_judgements`, label "yes"), the question as a chat turn and the
answer as the reply; the loss covers the answer only. Questions are split 90/10 by a seeded
shuffle; validation perplexity is over answers to held-out questions. Training uses LoRA
adapters on every projection (the saved checkpoints hold the merged weights, so the run loads
as an ordinary series). The trace probes the configured dimensions and layers at every saved
step (out/trace/report.html). Re-running resumes both stages.
"""

from __future__ import annotations

import sys
import time

import numpy as np

import jtrust
from jtrust import training as T
from jtrust.models.lora import LoraConfig
from jtrust.analysis.scorers import truthfulness_judgements
from jtrust.pipelines.trace import TraceOptions, trace
from jtrust.pipelines.experiment import experiment_args


def truthful_pairs(seed: int) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    """(train, held-out) lists of (question, true answer), split by question."""
    texts, labels, questions = truthfulness_judgements()
    pairs = [(q, t[t.index("\nA: ") + 4:]) for t, y, q in zip(texts, labels, questions) if y == 1]
    unique = sorted(set(q for q, _ in pairs))
    held = set(np.random.default_rng(seed).permutation(unique)[: len(unique) // 10])
    return [p for p in pairs if p[0] not in held], [p for p in pairs if p[0] in held]


def main(argv=None) -> None:
    args, cfg, out = experiment_args(__doc__, "experiments/configs/finetune_smollm2.json", argv)
    started = time.perf_counter()
    model = jtrust.load(args.model or cfg["model"])
    data = cfg["data"]
    prompt = (lambda q: model.tokenizer.chat(q)) if data["chat"] else (lambda q: f"Q: {q}\nA:")
    train_pairs, held_pairs = truthful_pairs(data["seed"])
    fits = lambda pairs: [(prompt(q), " " + a if not data["chat"] else a) for q, a in pairs
                          if len(model.tokenizer.encode(prompt(q) + a)) < data["seq_len"]]
    train_ex = T.prompt_answer_examples(model.tokenizer, fits(train_pairs), data["seq_len"])
    val_ex = T.prompt_answer_examples(model.tokenizer, fits(held_pairs)[: data["val_pairs"]], data["seq_len"])
    tc = dict(cfg["train"])
    tc["lora"] = LoraConfig(**{**tc["lora"], "targets": tuple(tc["lora"]["targets"])}) if tc.get("lora") else None
    config = T.TrainConfig(**tc, save_steps=tuple(cfg["save_steps"]))
    print(f"finetune: {model.name}, {len(train_ex.tokens)} training pairs, {len(val_ex.tokens)} held-out, "
          f"{config.steps} steps of {config.batch_size}, LoRA {config.lora} -> {out}")
    result = T.train(model, train_ex, config, out, evals=[T.perplexity_eval(val_ex, batch_size=16)])
    evals = [m for m in result.metrics if m["kind"] == "eval"]
    print(f"finetune: trained in {(time.perf_counter() - started) / 60:.1f} min; held-out answer "
          f"perplexity {evals[0]['val_ppl']:.2f} (step {evals[0]['step']}) -> {evals[-1]['val_ppl']:.2f} "
          f"(step {evals[-1]['step']})")
    t = cfg["trace"]
    options = TraceOptions(layers=tuple(int(x) for x in t["layers"].split(",")), limit=t["limit"] or None,
                           mi_samples=t["mi_samples"])
    report = trace(jtrust.load(out), t["dims"].split(","), out / "trace", options)
    print(f"finetune: done in {(time.perf_counter() - started) / 60:.1f} min; report: {report}")


if __name__ == "__main__":
    sys.exit(main())
