"""DPO on the HH-RLHF harmless pairs: the embedded model with LoRA, held-out preference accuracy
before and after, as a checkpoint series (method and figures: docs/preference.md).

    python experiments/dpo_hh.py --config experiments/configs/dpo_hh_smollm2.json

Data: the bundled harmless-base test split (`jtrust.data.preferences.read_pairs`), 2303 usable
pairs, split by prompt (10% held out, seeded); the first `heldout_pairs` held-out pairs are
scored at every saved step. Dialogues stay in HH-RLHF's plain "\\n\\nHuman: ... \\n\\nAssistant:"
format (the chat template takes one user turn; these are multi-turn). Rows are `seq_len` tokens
per reply: each reply keeps its first `max_response` tokens, and a longer dialogue loses its
earliest turns (it starts at the earliest human turn from which it fits). Training: DPO
(sigmoid loss, `beta`) with LoRA adapters, the base model as the frozen reference; checkpoints
hold merged weights, so `jtrust.load(out)` reads the run as a series. Re-running the command
resumes an unfinished run; out/summary.json holds the figures.
"""

from __future__ import annotations

import json
import sys
import time

import jtrust
from jtrust import training as T
from jtrust.data.preferences import read_pairs, split_pairs
from jtrust.models.lora import LoraConfig
from jtrust.pipelines.experiment import experiment_args
from jtrust.training import preference as P


def truncated(tokenizer, pairs, seq_len: int, max_response: int) -> int:
    """How many pairs `pair_examples` shortens (a prompt that loses turns or a reply cut short)."""
    eos = 1 if tokenizer.eos_id is not None else 0
    count = 0
    for prompt, chosen, rejected in pairs:
        replies = [len(tokenizer.backend.encode(r, add_special_tokens=False).ids) + eos for r in (chosen, rejected)]
        count += max(replies) > max_response or len(tokenizer.encode(prompt)) + max(replies) > seq_len + 1
    return count


def identical(examples: T.Examples) -> int:
    """Pair rows whose two sequences are the same after truncation (their margin is always 0)."""
    T_ = examples.tokens.shape[1] // 2
    same = [(a[:, :T_] == a[:, T_:]).all(axis=1) for a in (examples.tokens, examples.targets, examples.weights)]
    return int((same[0] & same[1] & same[2]).sum())


def main(argv=None) -> dict:
    args, cfg, out = experiment_args(__doc__, "experiments/configs/dpo_hh_smollm2.json", argv)
    started = time.perf_counter()
    model = jtrust.load(args.model or cfg["model"])
    data, ev = cfg["data"], cfg["eval"]
    pairs = read_pairs()
    split = split_pairs(pairs.pairs, heldout=data["heldout"], seed=data["split_seed"])
    heldout = split.heldout[: data["heldout_pairs"]]
    build = lambda ps: P.pair_examples(model.tokenizer, ps, data["seq_len"], data["max_response"])
    train_ex, held_ex = build(split.train), build(heldout)
    tc = dict(cfg["train"])
    tc["lora"] = LoraConfig(**{**tc["lora"], "targets": tuple(tc["lora"]["targets"])}) if tc.get("lora") else None
    config = T.TrainConfig(**tc, save_steps=tuple(cfg["save_steps"]))
    reference = model.params  # the frozen base: LoRA trains adapters on top of it
    print(f"dpo: {model.name}, {len(train_ex.tokens)} training pairs "
          f"({truncated(model.tokenizer, split.train, data['seq_len'], data['max_response'])} shortened), "
          f"{len(held_ex.tokens)} held-out ({truncated(model.tokenizer, heldout, data['seq_len'], data['max_response'])} "
          f"shortened; {identical(held_ex)} identical after truncation), {config.steps} steps of {config.batch_size} pairs, beta {cfg['beta']}, LoRA {config.lora} -> {out}")
    result = T.train(model, train_ex, config, out, objective=P.dpo_objective(cfg["beta"]), reference=reference,
                     evals=[P.preference_eval(held_ex, reference, cfg["beta"], ev["batch_size"], "heldout",
                                              ev["confidence"])])
    minutes = (time.perf_counter() - started) / 60
    evals = [m for m in result.metrics if m["kind"] == "eval"]
    logs = [m for m in result.metrics if m["kind"] == "train"]
    figure = lambda m, key: [m[f"heldout_{key}"], m[f"heldout_{key}_low"], m[f"heldout_{key}_high"]]
    summary = {
        "model": model.name, "run": str(out), "minutes_this_call": round(minutes, 2),
        "pairs": {"usable": len(pairs.pairs), "dropped": pairs.dropped, "train": len(split.train),
                  "heldout_scored": len(held_ex.tokens), "heldout_identical_after_truncation": identical(held_ex)},
        "base_logp_accuracy": figure(evals[0], "reference_logp_accuracy"),
        "series": [{"step": m["step"], "accuracy": figure(m, "accuracy"), "logp_accuracy": figure(m, "logp_accuracy"),
                    "margin": m["heldout_margin"], "reward_chosen": m["heldout_reward_chosen"],
                    "reward_rejected": m["heldout_reward_rejected"]} for m in evals],
        "train_loss_first_last": [logs[0]["loss"], logs[-1]["loss"]],
        "train_reward_accuracy_last10": sum(m["reward_accuracy"] for m in logs[-10:]) / len(logs[-10:]),
        "config": cfg,
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=1))
    print(f"dpo: {minutes:.1f} min; base log p(chosen) > log p(rejected) on held-out pairs: "
          f"{_fmt(summary['base_logp_accuracy'])}")
    print("step  implicit-reward accuracy   margin    log-p accuracy")
    for s in summary["series"]:
        print(f"{s['step']:>4}  {_fmt(s['accuracy']):>24}  {s['margin']:+.3f}  {_fmt(s['logp_accuracy']):>24}")
    print(f"dpo: summary {out / 'summary.json'}; series: jtrust.load({str(out)!r})")
    return summary


def _fmt(figure) -> str:
    value, low, high = figure
    return f"{value:.3f} [{low:.3f}, {high:.3f}]"


if __name__ == "__main__":
    main()
    sys.exit(0)
