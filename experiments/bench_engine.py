"""Engine benchmark on the embedded model: jtrust vs Hugging Face transformers, in one run.

    python experiments/bench_engine.py [--repeats 3]

Prints
  * this machine's float32 matmul peak (best of JAX and torch over a few sizes),
  * extraction: all 30 layers' residual stream for 16 x 128 tokens; jtrust's jitted
    forward vs transformers with output_hidden_states=True (same GGUF file,
    dequantized to float32 by each), both the causal LM (the usual recipe, which
    also computes logits) and its base model (exactly jtrust's work); tokens/s,
    ratios, fraction of the peak,
  * generation: batch 16, 64 new tokens, sampling (T = 1, top-p 0.9); jtrust's
    compiled decode loop vs transformers `generate`, new tokens/s and ratio.
Both sides use the same number of threads (all cores). Compilation / warm-up
runs are excluded; every figure is the best of --repeats timed runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jtrust
from jtrust.data import load_texts
from jtrust.io.loading import embedded_gguf_path
from jtrust.models.decoder import Capture


def best_time(fn, repeats: int) -> float:
    fn()  # warm-up (compiles)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def matmul_peak(repeats: int) -> tuple[float, str]:
    """Best float32 GFLOP/s of a square matmul, over sizes and over JAX / torch."""
    best, who = 0.0, ""
    for n in (1024, 2048, 3072):
        a = jnp.asarray(np.random.rand(n, n), jnp.float32)
        mm = jax.jit(lambda x, y: x @ y)
        t = best_time(lambda: mm(a, a).block_until_ready(), repeats)
        if 2 * n**3 / t > best:
            best, who = 2 * n**3 / t, f"jax {n}"
        ta = torch.rand(n, n)
        t = best_time(lambda: ta @ ta, repeats)
        if 2 * n**3 / t > best:
            best, who = 2 * n**3 / t, f"torch {n}"
    return best / 1e9, who


def forward_flops_per_token(c, seq_len: int) -> float:
    """Matmul FLOPs of all blocks per token (no unembedding), attention at full length."""
    proj = c.d_model * (c.n_heads + 2 * c.n_kv_heads) * c.head_dim + c.n_heads * c.head_dim * c.d_model
    mlp = (3 if c.mlp == "swiglu" else 2) * c.d_model * c.d_ff
    attn = 2 * seq_len * c.n_heads * c.head_dim  # scores and weighted values
    return 2.0 * c.n_layers * (proj + mlp + attn)


def benchmark_tokens(tokenizer, batch: int, length: int) -> np.ndarray:
    """[batch, length] real token ids: bundled ToxiGen statements, concatenated and cut."""
    ids = []
    for text in load_texts("toxicity").texts:
        ids += tokenizer.encode(text + "\n")
        if len(ids) >= batch * length:
            break
    return np.asarray(ids[: batch * length], np.int32).reshape(batch, length)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    threads = os.cpu_count()
    torch.set_num_threads(threads)
    print(f"machine: {threads} cores; jax {jax.__version__} on {jax.devices()[0].platform}, "
          f"torch {torch.__version__} with {torch.get_num_threads()} threads")

    peak, peak_src = matmul_peak(args.repeats)
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({peak_src})")

    model = jtrust.load("smollm2")
    c = model.config
    tokens = benchmark_tokens(model.tokenizer, args.batch, args.length)
    mask = np.ones_like(tokens)
    n_tok = tokens.size
    flops = forward_flops_per_token(c, args.length) * n_tok

    import transformers
    gguf = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()

    capture = Capture(("resid_post",), "all")
    jt = lambda: jax.block_until_ready(model.apply(tokens, mask, capture=capture, logits=False).captures)
    t_jt = best_time(jt, args.repeats)
    t_ids, t_mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    with torch.inference_mode():
        # the usual recipe (and TracingLLM's): the causal LM with output_hidden_states=True
        t_hf = best_time(lambda: hf(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True),
                         args.repeats)
        # the stricter peer: the same minus the unembedding, i.e. exactly jtrust's work
        t_hf_base = best_time(lambda: hf.model(input_ids=t_ids, attention_mask=t_mask,
                                               output_hidden_states=True), args.repeats)
    print(f"\nextraction, {c.n_layers} layers, {args.batch} x {args.length} tokens "
          f"({flops / n_tok / 1e6:.0f} MFLOP/token of blocks; GFLOP/s counts these for every row):")
    rows = (("jtrust", t_jt), ("transformers CausalLM", t_hf), ("transformers base model", t_hf_base))
    for name, t in rows:
        print(f"  {name:24s} {n_tok / t:8.0f} tokens/s  {flops / t / 1e9:6.1f} GFLOP/s  "
              f"{flops / t / 1e9 / peak:5.1%} of peak")
    print(f"  ratio jtrust / transformers CausalLM: {t_hf / t_jt:.2f}x; "
          f"jtrust / transformers base model: {t_hf_base / t_jt:.2f}x")

    tok = model.tokenizer
    no_stop = dataclasses.replace(model, tokenizer=dataclasses.replace(tok, stop_ids=(), eos_id=None))
    questions = load_texts(str(jtrust.data.BUNDLED / "tracingllm" / "truthfulqa_test.csv")).texts
    prompts = [tok.chat(q) for q in questions[: args.batch]]
    sampling = jtrust.Sampling(temperature=1.0, top_p=0.9)
    keys = iter(jax.random.split(jax.random.key(0), 100))
    jt_gen = lambda: jtrust.generate(no_stop, prompts, max_new_tokens=args.new_tokens, key=next(keys),
                                     sampling=sampling)
    t_jt = best_time(jt_gen, args.repeats)
    hf_tok = [tok.encode(p) for p in prompts]
    ids, am = jtrust.models.tokenizer.pad(hf_tok, tok.pad_id, side="left")
    ids, am = torch.tensor(ids, dtype=torch.long), torch.tensor(am)

    def hf_gen():
        with torch.inference_mode():
            out = hf.generate(input_ids=ids, attention_mask=am, do_sample=True, temperature=1.0, top_p=0.9,
                              top_k=0, max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                              pad_token_id=tok.pad_id)
        assert out.shape[1] == ids.shape[1] + args.new_tokens
    t_hf = best_time(hf_gen, args.repeats)
    n_new = args.batch * args.new_tokens
    print(f"\ngeneration, batch {args.batch}, {args.new_tokens} new tokens, sampling T=1 top-p 0.9:")
    for name, t in (("jtrust", t_jt), ("transformers", t_hf)):
        print(f"  {name:13s} {n_new / t:8.0f} new tokens/s  ({t:.2f} s)")
    print(f"  ratio jtrust / transformers: {t_hf / t_jt:.2f}x")


if __name__ == "__main__":
    main()
