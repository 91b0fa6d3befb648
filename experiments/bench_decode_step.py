"""Where a batch-16 decode step of the embedded model goes, and the floor its matrix products set.

    python experiments/bench_decode_step.py

Prints the median time of: one cached decode step of jtrust (batch 16, 112 cache
slots, logits included); the same step's 30 MLPs alone as M = 16 matrix products,
in JAX and in torch (same threads); and the sampling rules on [16, vocab] logits.
"""

from __future__ import annotations

import os
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

import jtrust
from jtrust.runtime.generate import Sampling, _sample
from jtrust.models.decoder import forward, init_cache


def median_ms(fn, repeats: int = 30) -> float:
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return float(np.median(times) * 1000)


def main():
    torch.set_num_threads(os.cpu_count())
    model = jtrust.load("smollm2")
    c, params = model.config, model.params
    B, S, index = 16, 112, 60
    tokens, mask = jnp.ones((B, 1), jnp.int32), jnp.ones((B, 1), bool)
    cache = init_cache(c, B, S)._replace(valid=jnp.ones((B, S), bool))
    step = jax.jit(lambda p, cache: forward(p, tokens, mask, config=c, cache=cache, cache_index=index,
                                            positions=jnp.full((B, 1), index)).logits)
    t_step = median_ms(lambda: step(params, cache).block_until_ready())

    mlp = params["blocks"]["mlp"]
    x = jnp.ones((B, c.d_model))

    def mlps(mlp, x):
        def body(h, w):
            return h + (jax.nn.silu(h @ w["gate"]["kernel"]) * (h @ w["up"]["kernel"])) @ w["down"]["kernel"], None
        return jax.lax.scan(body, x, mlp)[0]
    mlps = jax.jit(mlps)
    t_jax = median_ms(lambda: mlps(mlp, x).block_until_ready())

    weights = [[torch.from_numpy(np.asarray(mlp[n]["kernel"][l]).T.copy()) for n in ("gate", "up", "down")]
               for l in range(c.n_layers)]
    tx = torch.ones(B, c.d_model)

    def torch_mlps():
        h = tx
        for g, u, d in weights:
            F = torch.nn.functional
            h = h + F.linear(F.silu(F.linear(h, g)) * F.linear(h, u), d)
        return h
    with torch.inference_mode():
        t_torch = median_ms(torch_mlps)

    flops = 2 * B * 3 * c.d_model * c.d_ff * c.n_layers
    print(f"decode step, batch {B}, {S} cache slots, with logits: {t_step:6.1f} ms")
    print(f"its 30 MLPs alone (M = {B}): jax {t_jax:6.1f} ms ({flops / t_jax / 1e6:.0f} GFLOP/s), "
          f"torch {t_torch:6.1f} ms ({flops / t_torch / 1e6:.0f} GFLOP/s)")
    logits = jax.random.normal(jax.random.key(1), (B, c.vocab_size)) * 3
    keys = jax.random.split(jax.random.key(0), B)
    for s in (Sampling(), Sampling(1.0), Sampling(1.0, top_k=50), Sampling(1.0, top_p=0.9)):
        f = jax.jit(lambda k, x, s=s: _sample(x, k, s))
        print(f"sampling {s}: {median_ms(lambda: f(keys, logits).block_until_ready()):6.1f} ms")


if __name__ == "__main__":
    main()
