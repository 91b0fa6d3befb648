"""Engine benchmark on the embedded model: jtrust vs Hugging Face transformers, in one run.

    python experiments/bench_engine.py [--repeats 3]

Prints
  * the machine (CPU model, flags) and its matmul peaks (`benchlib.Peaks`: JAX and torch,
    float32 and bfloat16, square and the model's shapes, sampled three times through the run),
  * extraction: all 30 layers' residual stream for 16 x 128 tokens; jtrust's jitted
    forward vs transformers with output_hidden_states=True (same GGUF file,
    dequantized to float32 by each), both the causal LM (the usual recipe, which
    also computes logits) and its base model (exactly jtrust's work); tokens/s,
    ratios, fraction of the peak,
  * generation: batch 16, 64 new tokens, sampling (T = 1, top-p 0.9); jtrust's
    compiled decode loop vs transformers `generate`, new tokens/s, ratio, fraction of the peak.
Both sides use the same number of threads (all cores). Compilation / warm-up
runs are excluded; every figure is the best of --repeats timed runs.
"""

from __future__ import annotations

import argparse
import dataclasses
import pathlib
import sys

import jax
import numpy as np
import torch

import jtrust
from jtrust.data import load_texts
from jtrust.io.loading import embedded_gguf_path
from jtrust.models.decoder import Capture

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import benchlib  # noqa: E402
from benchlib import best_time  # noqa: E402


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


def load_peers():
    """The embedded model in jtrust and in transformers (the same GGUF file, float32)."""
    import transformers
    model = jtrust.load("smollm2")
    gguf = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    return model, hf


def extraction(model, hf, batch: int, length: int, repeats: int) -> dict:
    """Seconds to extract every layer's residual stream of batch x length tokens: jtrust, the
    transformers causal LM with hidden states (the usual recipe), its base model; and the FLOPs."""
    c = model.config
    tokens = benchmark_tokens(model.tokenizer, batch, length)
    mask = np.ones_like(tokens)
    capture = Capture(("resid_post",), "all")
    jt = lambda: jax.block_until_ready(model.apply(tokens, mask, capture=capture, logits=False).captures)
    t_ids, t_mask = torch.tensor(tokens, dtype=torch.long), torch.tensor(mask)
    out = dict(jtrust=best_time(jt, repeats), tokens=tokens.size,
               flops=forward_flops_per_token(c, length) * tokens.size)
    with torch.inference_mode():
        out["transformers"] = best_time(lambda: hf(input_ids=t_ids, attention_mask=t_mask, output_hidden_states=True),
                                        repeats)
        out["transformers_base"] = best_time(lambda: hf.model(input_ids=t_ids, attention_mask=t_mask,
                                                              output_hidden_states=True), repeats)
    return out


SAMPLING = jtrust.Sampling(temperature=1.0, top_p=0.9)  # both sides sample with T = 1, top-p 0.9


def chat_prompts(model, n: int):
    """(the model without stop tokens, so every sample runs to full length; n chat-rendered
    TruthfulQA questions)."""
    tok = model.tokenizer
    no_stop = dataclasses.replace(model, tokenizer=dataclasses.replace(tok, stop_ids=(), eos_id=None))
    questions = load_texts(str(jtrust.data.BUNDLED / "tracingllm" / "truthfulqa_test.csv")).texts
    return no_stop, [tok.chat(q) for q in questions[:n]]


def hf_sample(hf, ids, mask, new_tokens: int, pad_id: int, n: int = 1) -> None:
    """transformers `generate` with SAMPLING: n samples of exactly new_tokens per row of ids."""
    with torch.inference_mode():
        out = hf.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=0.9,
                          top_k=0, num_return_sequences=n, max_new_tokens=new_tokens,
                          min_new_tokens=new_tokens, pad_token_id=pad_id)
    assert out.shape == (ids.shape[0] * n, ids.shape[1] + new_tokens)


def generation(model, hf, batch: int, new_tokens: int, repeats: int) -> dict:
    """Seconds to sample new_tokens for each of `batch` chat prompts (T = 1, top-p 0.9), jtrust's
    decode loop and transformers `generate`, and the FLOPs of the decode steps."""
    tok = model.tokenizer
    no_stop, prompts = chat_prompts(model, batch)
    keys = iter(jax.random.split(jax.random.key(0), 100))
    jt_gen = lambda: jtrust.generate(no_stop, prompts, max_new_tokens=new_tokens, key=next(keys), sampling=SAMPLING)
    ids, am = jtrust.models.tokenizer.pad([tok.encode(p) for p in prompts], tok.pad_id, side="left")
    ids, am = torch.tensor(ids, dtype=torch.long), torch.tensor(am)
    return dict(jtrust=best_time(jt_gen, repeats),
                transformers=best_time(lambda: hf_sample(hf, ids, am, new_tokens, tok.pad_id), repeats),
                new_tokens=batch * new_tokens,
                flops=decode_flops(model.config, batch, ids.shape[1], new_tokens))


def decode_flops(c, rows: int, prompt: int, new_tokens: int) -> float:
    """Matmul FLOPs of the decode steps: every block and the unembedding for each row and new
    token, attention over the slots filled so far (the prompt's prefill is left out)."""
    unembed = 2 * c.d_model * c.vocab_size
    return sum(forward_flops_per_token(c, prompt + t) + unembed for t in range(new_tokens)) * rows


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--length", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    args = parser.parse_args()
    peaks = benchlib.start()
    model, hf = load_peers()
    c = model.config
    e = extraction(model, hf, args.batch, args.length, args.repeats)
    peaks.sample()
    g = generation(model, hf, args.batch, args.new_tokens, args.repeats)
    peaks.sample()
    peak = peaks.best()
    print("\n".join(peaks.table()))
    print(f"float32 peak (best sample): {peak:.1f} GFLOP/s")
    print(f"\nextraction, {c.n_layers} layers, {args.batch} x {args.length} tokens "
          f"({e['flops'] / e['tokens'] / 1e6:.0f} MFLOP/token of blocks; GFLOP/s counts these for every row):")
    for name in ("jtrust", "transformers", "transformers_base"):
        t = e[name]
        print(f"  {name:24s} {e['tokens'] / t:8.0f} tokens/s  {e['flops'] / t / 1e9:6.1f} GFLOP/s  "
              f"{e['flops'] / t / 1e9 / peak:5.1%} of peak")
    print(f"  ratio jtrust / transformers CausalLM: {e['transformers'] / e['jtrust']:.2f}x; "
          f"jtrust / transformers base model: {e['transformers_base'] / e['jtrust']:.2f}x")
    print(f"\ngeneration, batch {args.batch}, {args.new_tokens} new tokens, sampling T=1 top-p 0.9:")
    for name in ("jtrust", "transformers"):
        t = g[name]
        print(f"  {name:13s} {g['new_tokens'] / t:8.0f} new tokens/s  ({t:.2f} s)  "
              f"{g['flops'] / t / 1e9:6.1f} GFLOP/s  {g['flops'] / t / 1e9 / peak:5.1%} of peak")
    print(f"  ratio jtrust / transformers: {g['transformers'] / g['jtrust']:.2f}x")


if __name__ == "__main__":
    main()
