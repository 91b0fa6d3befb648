"""Training benchmark: jtrust's train step vs an equivalent PyTorch loop, in one run.

    python experiments/bench_train.py [--config experiments/configs/pretrain_tiny.json] [--steps 10]

Both sides train the pre-training config's model shape (Llama-like, tied embeddings) from the
same initial weights on the same random token batches (batch x seq_len from the config):
  jtrust   `jtrust.training.make_train_step` (AdamW, global-norm clip 1.0), jitted
  pytorch  transformers `LlamaForCausalLM` (its default sdpa attention, the usual recipe), torch.optim.AdamW with the
           same hyper-parameters and clip, `torch.nn.functional.cross_entropy`
Prints the machine (CPU model and flags), tokens/s for each, the ratio, and each side's FLOP rate
as a fraction of this machine's float32 matmul peak (`benchlib.Peaks`: JAX and torch, square and
the model's shapes, sampled before and after). FLOPs per step are the usual model count,
6 N per token plus 12 L T d for attention, used for both sides: the same model, batch and
optimizer. Every figure is the best of --repeats timed runs of --steps steps after warm-up.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import benchlib  # noqa: E402

from jtrust import training as T  # noqa: E402
from jtrust.models.config import ModelConfig  # noqa: E402
from jtrust.io.convert import hf_to_params  # noqa: E402


def model_config(cfg: dict) -> ModelConfig:
    m = cfg["model"]
    heads = m["d_model"] // m["head_dim"]
    return ModelConfig(family="llama", vocab_size=cfg["tokenizer"]["vocab_size"], d_model=m["d_model"],
                       n_layers=m["n_layers"], n_heads=heads, n_kv_heads=heads, head_dim=m["head_dim"],
                       d_ff=m["d_ff"], norm="rms", norm_eps=1e-5, position="rope",
                       rotary_dim=m["head_dim"], max_positions=m["seq_len"], mlp="swiglu",
                       tie_embeddings=True)


def torch_model(c: ModelConfig):
    import transformers
    hf = transformers.LlamaConfig(vocab_size=c.vocab_size, hidden_size=c.d_model, intermediate_size=c.d_ff,
                                  num_hidden_layers=c.n_layers, num_attention_heads=c.n_heads,
                                  num_key_value_heads=c.n_kv_heads, rms_norm_eps=c.norm_eps,
                                  max_position_embeddings=c.max_positions, tie_word_embeddings=True,
                                  attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(hf).train()


def time_steps(run_step, steps: int, repeats: int) -> float:
    run_step()  # warm-up (compiles)
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(steps):
            run_step()
        best = min(best, time.perf_counter() - start)
    return best / steps


def run(c: ModelConfig, batch: int, seq: int, steps: int, repeats: int, peak: float) -> dict:
    """Seconds per step of jtrust and of the PyTorch loop, and the FLOPs per step."""
    tokens_per_step = batch * seq
    ids = np.random.default_rng(0).integers(0, c.vocab_size, (batch, seq + 1)).astype(np.int32)
    examples = T.Examples(ids[:, :-1], np.ones((batch, seq), bool), ids[:, 1:], np.ones((batch, seq), np.float32))

    tm = torch_model(c)
    params = hf_to_params({k: v.detach().numpy() for k, v in tm.state_dict().items()}, c)
    n_params = sum(p.numel() for p in tm.parameters())
    config = T.TrainConfig(steps=1000, batch_size=batch, learning_rate=1e-3, schedule="constant",
                           weight_decay=0.1)
    optimizer = T.make_optimizer(config)
    step = jax.jit(T.make_train_step(T.lm_loss(c, config), optimizer), donate_argnums=0)
    state = T.TrainState(jnp.zeros((), jnp.int32), jax.tree.map(jnp.asarray, params), optimizer.init(params))
    frozen = {"base": None, "reference": None}
    micro = T.Examples(*(jnp.asarray(a)[None] for a in examples))
    # the usual model-FLOPs count: 6 N per token for the matrices, 12 L T d for attention
    flops = (6 * n_params + 12 * c.n_layers * seq * c.d_model) * tokens_per_step

    def jtrust_step():
        nonlocal state
        state, metrics = step(state, frozen, micro)
        metrics["loss"].block_until_ready()

    decay = [p for n, p in tm.named_parameters() if "norm" not in n]
    no_decay = [p for n, p in tm.named_parameters() if "norm" in n]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=1e-3, betas=(0.9, 0.95))
    x, y = torch.tensor(examples.tokens, dtype=torch.long), torch.tensor(examples.targets, dtype=torch.long)

    def torch_step():
        logits = tm(input_ids=x).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(tm.parameters(), 1.0)
        opt.step()

    t_jtrust = time_steps(jtrust_step, steps, repeats)
    t_torch = time_steps(torch_step, steps, repeats)
    print(f"model: {n_params / 1e6:.2f}M parameters, d={c.d_model}, {c.n_layers} layers, vocab {c.vocab_size}; "
          f"batch {batch} x {seq} = {tokens_per_step} tokens/step; 6N + 12 L T d = {flops / 1e9:.1f} GFLOP/step")
    for name, t in (("jtrust", t_jtrust), ("pytorch", t_torch)):
        print(f"{name:8s} {t * 1e3:8.1f} ms/step  {tokens_per_step / t:8.0f} tokens/s  "
              f"{flops / t / 1e9:6.1f} GFLOP/s = {flops / t / 1e9 / peak:5.1%} of peak")
    print(f"ratio: jtrust {t_torch / t_jtrust:.2f}x PyTorch (target 1.2x); "
          f"jtrust at {flops / t_jtrust / 1e9 / peak:.1%} of peak (target 65%)")
    return dict(jtrust=t_jtrust, torch=t_torch, flops=flops, tokens=tokens_per_step, n_params=n_params)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="experiments/configs/pretrain_tiny.json")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    cfg = json.loads(pathlib.Path(args.config).read_text())
    peaks = benchlib.start()
    run(model_config(cfg), cfg["train"]["batch_size"], cfg["model"]["seq_len"], args.steps, args.repeats, peaks.best())
    peaks.sample()
    print("\n".join(peaks.table()))
    print(f"peak (best float32 sample): {peaks.best():.1f} GFLOP/s")


if __name__ == "__main__":
    main()
