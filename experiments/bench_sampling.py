"""Sampling benchmark: n = 128 samples of 64 tokens per prompt, jtrust vs transformers, in one run.

    python experiments/bench_sampling.py [--prompts 2] [--n 128] [--new-tokens 64] [--repeats 2]

Both sides sample SmolLM2-135M-Instruct (the embedded GGUF; transformers loads the same file)
with T = 1, top-p 0.9, every sample exactly --new-tokens long (stop tokens off), one prompt
at a time (chat-rendered TruthfulQA questions):
  jtrust        `jtrust.generate(model, [prompt], n_samples=n)`: one prefill, the cache
                repeated n times, one compiled decode loop
  transformers  `model.generate(..., do_sample=True, num_return_sequences=n)`
Prints the machine and its matmul peaks (`benchlib`), samples/s for each side, their ratio (best of
--repeats per prompt, summed) and the decode steps' FLOP rate as a fraction of the peak.
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import jax
import torch

import jtrust

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import benchlib  # noqa: E402
from benchlib import best_time  # noqa: E402


def sampling(model, hf, prompts: int, n: int, new_tokens: int, repeats: int) -> dict:
    """Seconds for n samples x new_tokens of each of `prompts` chat prompts (T = 1, top-p 0.9):
    jtrust (one prefill, n rows decoded together) and transformers `generate`; and the FLOPs."""
    from bench_engine import SAMPLING, chat_prompts, decode_flops, hf_sample
    tok = model.tokenizer
    no_stop, texts = chat_prompts(model, prompts)
    pad = max(len(tok.encode(p)) for p in texts)  # one compiled program for every prompt
    out = dict(jtrust=0.0, transformers=0.0, samples=prompts * n, new_tokens=prompts * n * new_tokens, flops=0.0)
    for i, prompt in enumerate(texts):
        key = iter(jax.random.split(jax.random.key(i), 100))

        def jt():
            result = jtrust.generate(no_stop, [prompt], max_new_tokens=new_tokens, key=next(key),
                                     sampling=SAMPLING, n_samples=n, pad_prompts_to=pad)
            assert result.lengths.min() == new_tokens

        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)
        out["jtrust"] += best_time(jt, repeats)
        out["transformers"] += best_time(lambda: hf_sample(hf, ids, torch.ones_like(ids), new_tokens, tok.pad_id, n),
                                         repeats)
        out["flops"] += decode_flops(model.config, n, ids.shape[1], new_tokens)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    peaks = benchlib.start()
    from bench_engine import load_peers
    model, hf = load_peers()
    r = sampling(model, hf, args.prompts, args.n, args.new_tokens, args.repeats)
    peaks.sample()
    peak = peaks.best()
    print("\n".join(peaks.table()))
    print(f"{args.prompts} prompts x n = {args.n} samples x {args.new_tokens} tokens, T = 1, top-p 0.9 "
          f"(float32 peak {peak:.1f} GFLOP/s):")
    for name in ("jtrust", "transformers"):
        t = r[name]
        print(f"  {name:13s} {r['samples'] / t:7.2f} samples/s  {r['new_tokens'] / t:7.0f} tokens/s  ({t:.1f} s)  "
              f"{r['flops'] / t / 1e9:6.1f} GFLOP/s  {r['flops'] / t / 1e9 / peak:5.1%} of peak")
    print(f"  ratio jtrust / transformers: {r['transformers'] / r['jtrust']:.2f}x (target 3x)")


if __name__ == "__main__":
    main()
