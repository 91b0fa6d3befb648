"""Feedback fine-tuning with a known reward: RLOO on the VADER sentiment reward (docs/feedback.md).

    python experiments/rloo_sentiment.py --config experiments/configs/rloo_sentiment_smollm2.json

Prompts are the first 2-10 words of the clean SST-2 sentences bundled in jtrust/data, those of
at most prompts.max_tokens tokens (a held-out set is split off first); the embedded model
continues each as plain text. The reward of a
continuation is the sum of its words' VADER lexicon valences / 5, clipped to [-10, 10]
(`jtrust.analysis.feedback.sentiment_reward`). Training is `jtrust.training.rl.rloo` with LoRA and
a KL penalty to the base model. Before and after, every held-out prompt is continued
eval.samples times with the same key; the script prints the per-iteration reward and KL and the
held-out reward before vs after with a paired t interval over prompts, and writes
<out>/summary.json, <out>/samples.json and <out>/training.png. The run directory <out>/run is a
checkpoint series (`jtrust.load("<out>/run")`) and resumes after a kill; the evaluations are
kept in <out>/eval_<name>.npz and reused.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import time

import jax
import numpy as np

import jtrust
from jtrust.analysis.feedback import review_prompts, sentiment_reward, sst2_sentences
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.training import TrainConfig
from jtrust.training.rl import PolicyEval, RLConfig, evaluate_policy, reward_change, rloo


def split_prompts(prompts: list[str], heldout: int, seed: int) -> tuple[list[str], list[str]]:
    """(train, held-out) prompts: a seeded shuffle, the first `heldout` held out."""
    if not 0 < heldout < len(prompts):
        raise InputError(f"heldout={heldout} must be between 1 and {len(prompts) - 1} prompts")
    order = np.random.default_rng(seed).permutation(len(prompts))
    return [prompts[i] for i in order[heldout:]], [prompts[i] for i in order[:heldout]]


def cached_eval(path: pathlib.Path, compute) -> PolicyEval:
    if path.exists():
        with np.load(path) as f:
            return PolicyEval(f["rewards"], f["kl"], json.loads(str(f["texts"])))
    ev = compute()
    store.save_npz(path, rewards=ev.rewards, kl=ev.kl, texts=np.array(json.dumps(ev.texts)))
    return ev


def plot(metrics: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    logs = [m for m in metrics if m["kind"] == "train"]
    steps = [m["step"] for m in logs]
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.2))
    axes[0].plot(steps, [m["reward"] for m in logs], label="reward r")
    axes[0].plot(steps, [m["penalized_reward"] for m in logs], label="r - beta KL")
    axes[0].set_xlabel("iteration"), axes[0].set_ylabel("mean over the batch"), axes[0].legend()
    axes[1].plot(steps, [m["kl"] for m in logs], color="C3")
    axes[1].set_xlabel("iteration"), axes[1].set_ylabel("KL(pi || base), nats per sequence")
    fig.tight_layout()
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120)
    plt.close(fig)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/configs/rloo_sentiment_smollm2.json")
    parser.add_argument("--out", help="overrides the config's out")
    parser.add_argument("--steps", type=int, help="overrides train.steps (save steps beyond it are dropped)")
    args = parser.parse_args(argv)
    cfg = json.loads(pathlib.Path(args.config).read_text())
    out = pathlib.Path(args.out or cfg["out"])
    train = dict(cfg["train"])
    if args.steps:
        train["steps"] = args.steps
        train["save_steps"] = [s for s in train.get("save_steps", []) if s <= args.steps]
    config = TrainConfig.from_dict(train)
    rl = RLConfig(**cfg["rl"])
    p, e = cfg["prompts"], cfg["eval"]
    began = time.perf_counter()

    model = jtrust.load(cfg["model"])
    prompts = review_prompts(sst2_sentences(), p["min_words"], p["max_words"], seed=p["seed"])
    # rows are as long as the longest prompt + max_new_tokens: a few long prompts would pad every row
    prompts = [q for q in prompts if len(model.tokenizer.encode(q)) <= p["max_tokens"]]
    train_prompts, heldout = split_prompts(prompts, p["heldout"], p["seed"])
    eval_rl = RLConfig(**{**cfg["rl"], "k": e["samples"]})
    # rows as long as training's (the longest prompt of either set): the same compiled programs
    seq_len = max(len(model.tokenizer.encode(q)) for q in prompts) + rl.max_new_tokens - 1
    evaluate = lambda m: evaluate_policy(m, heldout, sentiment_reward, eval_rl, reference=model.params,
                                         key=jax.random.key(e["seed"]), prompts_per_batch=e["prompts_per_batch"],
                                         chunk=config.batch_size // config.accumulation, seq_len=seq_len)
    out.mkdir(parents=True, exist_ok=True)
    before = cached_eval(out / "eval_step0.npz", lambda: evaluate(model))
    print(f"{len(train_prompts)} training prompts, {len(heldout)} held out; base reward "
          f"{before.rewards.mean():.3f} ({time.perf_counter() - began:.0f} s)")

    run = rloo(model, train_prompts, sentiment_reward, config, rl, out / "run",
               reward_name="jtrust.analysis.feedback.sentiment_reward")
    after = cached_eval(out / f"eval_step{config.steps}.npz", lambda: evaluate(run.model))
    change = reward_change(before, after)

    logs = [m for m in run.metrics if m["kind"] == "train"]
    print("\niteration  reward   KL      r - beta KL  new tokens  seconds")
    for m in logs:
        print(f"{m['step']:9d}  {m['reward']:6.3f}  {m['kl']:6.3f}  {m['penalized_reward']:11.3f}  "
              f"{m['new_tokens']:10.1f}  {m['seconds']:7.1f}")
    summary = {"model": cfg["model"], "train_prompts": len(train_prompts), "heldout_prompts": len(heldout),
               "rl": rl.to_dict(), "train": config.to_dict(), "heldout": change,
               "training_seconds": sum(m["seconds"] for m in logs),
               "first_iterations_reward": float(np.mean([m["reward"] for m in logs[:3]])),
               "last_iterations_reward": float(np.mean([m["reward"] for m in logs[-3:]])),
               "last_iterations_kl": float(np.mean([m["kl"] for m in logs[-3:]])),
               "seconds": time.perf_counter() - began}
    store.write_json(out / "summary.json", summary, indent=1)
    samples = [{"prompt": q, "before": b[0], "before_reward": float(rb[0]), "after": a[0], "after_reward": float(ra[0])}
               for q, b, a, rb, ra in zip(heldout, before.texts, after.texts, before.rewards, after.rewards)]
    store.write_json(out / "samples.json", samples, indent=1)
    plot(run.metrics, out / "training.png")
    c = change
    print(f"\nheld-out reward ({c['prompts']} prompts x {c['samples_per_prompt']} samples): "
          f"{c['reward_before']:.3f} [{c['reward_before_low']:.3f}, {c['reward_before_high']:.3f}] -> "
          f"{c['reward_after']:.3f} [{c['reward_after_low']:.3f}, {c['reward_after_high']:.3f}]; difference "
          f"{c['difference']:+.3f} [{c['difference_low']:+.3f}, {c['difference_high']:+.3f}] "
          f"(95%, paired t over prompts; p = {c['p_value']:.2g}); KL to the base {c['kl_after']:.3f} nats/sequence")
    print(f"wrote {out / 'summary.json'}, {out / 'samples.json'}, {out / 'training.png'}; "
          f"series: jtrust.load({str(out / 'run')!r}); {summary['seconds'] / 60:.1f} min")


if __name__ == "__main__":
    main()
