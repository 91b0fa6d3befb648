"""Pre-train a small Llama-like model from scratch on the bundled corpus, keep a dense checkpoint
series, and trace it (probe accuracy, I(X;T), I(T;Y) per layer and dimension against step).

    python experiments/pretrain.py --config experiments/configs/pretrain_tiny.json

Steps, each resumable (re-running the command continues where a killed run stopped):
  1. a byte-level BPE tokenizer trained on the training text (`jtrust.models.tokenizer.train_bpe`);
     lowercasing, because the bundled TinyStories train head is lowercased, so every text the
     model is later probed on is mapped into what it was trained on; a 4096-token vocabulary
     instead of SmolLM2's 49152, which would put most of a few-million-parameter model in the
     embedding
     (the longest trust text is 225 of these tokens, so 256-token windows cover every probe)
  2. `jtrust.training.train` on packed windows of the train head, validation perplexity on the first
     windows of the TinyStories validation head at every saved step
  3. `jtrust trace` over the saved series (out/trace/report.html), with the two-phase analysis

Writes out/ (the run: checkpoints, metrics.jsonl), out/training.png, out/trace/.
"""

from __future__ import annotations

import hashlib
import pathlib
import sys
import time

import jax
import numpy as np

import jtrust
from jtrust import training as T
from jtrust.data import TRUST_DATASETS, corpus_paragraphs
from jtrust.io.runs import RUN_MARKER
from jtrust.models.model import Model
from jtrust.pipelines.report import save_figure
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import init_params
from jtrust.models.tokenizer import Tokenizer, train_bpe
from jtrust.pipelines.trace import TraceOptions, trace
from jtrust.pipelines.experiment import experiment_args


def main(argv=None) -> None:
    args, cfg, out = experiment_args(__doc__, "experiments/configs/pretrain_tiny.json", argv, model=False,
                                     extra=lambda p: p.add_argument("--no-trace", action="store_true",
                                                                    help="train only"))
    started = time.perf_counter()

    tokenizer = _tokenizer(out, cfg)
    train_ex = T.packed_examples(_encode(tokenizer, corpus_paragraphs(cfg["corpus"]["train"])),
                                 cfg["model"]["seq_len"])
    val_ex = T.packed_examples(_encode(tokenizer, corpus_paragraphs(cfg["corpus"]["val"])),
                               cfg["model"]["seq_len"])
    val_ex = T.take(val_ex, np.arange(min(cfg["corpus"]["val_windows"], len(val_ex.tokens))))
    model = _initial_model(cfg, tokenizer)
    n_params = sum(x.size for x in jax.tree.leaves(model.params))
    steps = cfg["train"]["steps"]
    save_steps = T.log_spaced_steps(steps, cfg["checkpoints"]["count"], cfg["checkpoints"]["dense_until"])
    config = T.TrainConfig(**cfg["train"], save_steps=save_steps)
    print(f"pretrain: {n_params / 1e6:.2f}M parameters, {train_ex.tokens.size / 1e6:.2f}M training tokens "
          f"in {len(train_ex.tokens)} windows, {steps} steps of {config.batch_size} x "
          f"{train_ex.tokens.shape[1]} tokens, {len(save_steps)} checkpoints -> {out}")
    result = T.train(model, train_ex, config, out, evals=[T.perplexity_eval(val_ex, batch_size=32)])
    trained = time.perf_counter() - started
    _plot_training(result.metrics, out / "training.png")
    final = [m for m in result.metrics if m["kind"] == "eval"][-1]
    last_train = [m for m in result.metrics if m["kind"] == "train"][-1]
    print(f"pretrain: done in {trained / 60:.1f} min; train loss {last_train['loss']:.3f}, validation "
          f"perplexity {final['val_ppl']:.2f} at step {final['step']}; curves: {out / 'training.png'}")
    if args.no_trace:
        return
    tcfg = cfg["trace"]
    dims = list(TRUST_DATASETS) if tcfg["dims"] == "all" else tcfg["dims"].split(",")
    options = TraceOptions(mi_samples=tcfg["mi_samples"], limit=tcfg.get("limit") or None)
    report = trace(jtrust.load(out), dims, out / "trace", options)
    print(f"pretrain: trace done in {(time.perf_counter() - started - trained) / 60:.1f} min; report: {report}")


def _tokenizer(out: pathlib.Path, cfg: dict) -> Tokenizer:
    """The run's tokenizer if it exists (a resumed run must not retrain it), else a new one."""
    if (out / RUN_MARKER).exists():
        return Tokenizer.from_dir(out)
    return train_bpe(corpus_paragraphs(cfg["corpus"]["train"]), cfg["tokenizer"]["vocab_size"],
                     lowercase=cfg["tokenizer"]["lowercase"])


def _encode(tokenizer: Tokenizer, paragraphs: list[str]) -> np.ndarray:
    """One token stream [n]: paragraphs joined by <|endoftext|>."""
    encoded = tokenizer.backend.encode_batch(paragraphs, add_special_tokens=False)
    return np.concatenate([np.asarray(e.ids + [tokenizer.eos_id], np.int32) for e in encoded])


def _initial_model(cfg: dict, tokenizer: Tokenizer) -> Model:
    m = cfg["model"]
    heads = m["d_model"] // m["head_dim"]
    config = ModelConfig(family="llama", vocab_size=tokenizer.backend.get_vocab_size(),
                         d_model=m["d_model"], n_layers=m["n_layers"], n_heads=heads, n_kv_heads=heads,
                         head_dim=m["head_dim"], d_ff=m["d_ff"], norm="rms", norm_eps=1e-5,
                         position="rope", rotary_dim=m["head_dim"],
                         max_positions=m.get("max_positions", m["seq_len"]),
                         mlp="swiglu", tie_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    params = init_params(config, jax.random.key(m["init_seed"]))
    digest = hashlib.sha256((config.to_json() + str(m["init_seed"])).encode()).hexdigest()[:16]
    return Model(config, params, tokenizer, name="init", checkpoint_hash=digest)


def _plot_training(metrics: list[dict], path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    train = [m for m in metrics if m["kind"] == "train"]
    evals = [m for m in metrics if m["kind"] == "eval"]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    left.plot([m["step"] for m in train], [m["loss"] for m in train], label="train")
    left.plot([m["step"] for m in evals], [m["val_loss"] for m in evals], marker=".", label="validation")
    left.set(xlabel="step", ylabel="loss (nats/token)", title="loss")
    left.legend()
    right.plot([m["step"] for m in evals], [m["val_ppl"] for m in evals], marker=".")
    right.set(xlabel="step", ylabel="perplexity", yscale="log", xscale="symlog", title="validation perplexity")
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
