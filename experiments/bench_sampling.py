"""Sampling benchmark: n = 128 samples of 64 tokens per prompt, jtrust vs transformers, in one run.

    python experiments/bench_sampling.py [--prompts 2] [--n 128] [--new-tokens 64] [--repeats 2]

Both sides sample SmolLM2-135M-Instruct (the embedded GGUF; transformers loads the same file)
with T = 1, top-p 0.9, every sample exactly --new-tokens long (stop tokens off), one prompt
at a time (chat-rendered TruthfulQA questions):
  jtrust        `jtrust.generate(model, [prompt], n_samples=n)`: one prefill, the cache
                repeated n times, one compiled decode loop
  transformers  `model.generate(..., do_sample=True, num_return_sequences=n)`
Prints samples/s for each side and their ratio (best of --repeats per prompt, summed).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import pathlib
import sys

import jax
import torch

import jtrust
from jtrust.data import load_texts
from jtrust.io.loading import embedded_gguf_path

sys.path.insert(0, str(pathlib.Path(__file__).parent))
from bench_engine import best_time  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--prompts", type=int, default=2)
    parser.add_argument("--n", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    torch.set_num_threads(os.cpu_count())
    print(f"machine: {os.cpu_count()} cores; jax {jax.__version__}, torch {torch.__version__} "
          f"with {torch.get_num_threads()} threads")
    model = jtrust.load("smollm2")
    tok = model.tokenizer
    no_stop = dataclasses.replace(model, tokenizer=dataclasses.replace(tok, stop_ids=(), eos_id=None))
    questions = load_texts(str(jtrust.data.BUNDLED / "tracingllm" / "truthfulqa_test.csv")).texts
    prompts = [tok.chat(q) for q in questions[: args.prompts]]
    sampling = jtrust.Sampling(temperature=1.0, top_p=0.9)

    import transformers
    gguf = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    pad = max(len(tok.encode(p)) for p in prompts)  # one compiled program for every prompt
    t_jt = t_hf = 0.0
    for i, prompt in enumerate(prompts):
        key = iter(jax.random.split(jax.random.key(i), 100))

        def jt():
            out = jtrust.generate(no_stop, [prompt], max_new_tokens=args.new_tokens, key=next(key),
                                  sampling=sampling, n_samples=args.n, pad_prompts_to=pad)
            assert out.lengths.min() == args.new_tokens

        ids = torch.tensor([tok.encode(prompt)], dtype=torch.long)

        def hft():
            with torch.inference_mode():
                out = hf.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=True,
                                  temperature=1.0, top_p=0.9, top_k=0, num_return_sequences=args.n,
                                  max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                  pad_token_id=tok.pad_id)
            assert out.shape == (args.n, ids.shape[1] + args.new_tokens)

        t_jt += best_time(jt, args.repeats)
        t_hf += best_time(hft, args.repeats)
    samples = args.prompts * args.n
    print(f"{args.prompts} prompts x n = {args.n} samples x {args.new_tokens} tokens, T = 1, top-p 0.9:")
    for name, t in (("jtrust", t_jt), ("transformers", t_hf)):
        print(f"  {name:13s} {samples / t:7.2f} samples/s  {samples * args.new_tokens / t:7.0f} tokens/s  ({t:.1f} s)")
    print(f"  ratio jtrust / transformers: {t_hf / t_jt:.2f}x (target 3x)")


if __name__ == "__main__":
    main()
