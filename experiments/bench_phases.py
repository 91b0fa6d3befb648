"""Where the time goes: per-phase roofline tables of a decode step and of a training step.

    python experiments/bench_phases.py [--rows 16 128] [--repeats 5]

Decode step of the embedded model (R rows, S cache slots), each phase on its own with the
step's shapes, all 30 layers: the q/k/v/o projections, attention over the cache, the MLP, the
unembedding [R, d] x [d, V], and top-p sampling (of real logits: step 8 of R samples of a chat
prompt); then jtrust's whole step (the cached forward
and the sampler, one compiled program). Training step of the pre-training config's model (batch
x seq_len tokens): the block parts on their own with the step's dense products (attention and
MLP sub-blocks over all layers, the head: final norm, unembedding, cross-entropy), each forward
and backward, the AdamW update, jtrust's loss forward and forward + backward (traced as the step
traces it), then the whole step (`make_train_step`). FLOPs are matrix products only (backward = 2 x forward); the rest of a
phase's time (norms, softmax, masks, layouts) shows as a lower rate. The "rest" row is the whole
minus the phases' sum.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import benchlib  # noqa: E402

import jtrust  # noqa: E402
from jtrust import training as T  # noqa: E402
from jtrust.models import decoder  # noqa: E402
from jtrust.models.decoder import forward, init_cache, init_params  # noqa: E402
from jtrust.runtime.generate import Sampling, _sample  # noqa: E402


def _time(fn, *args, repeats: int) -> float:
    return benchlib.best_time(lambda: jax.block_until_ready(fn(*args)), repeats)


def sampled_logits(model, rows: int, step: int = 8):
    """[rows, V] real next-token logits: step `step` of `rows` samples (T = 1, top-p 0.9) of a
    chat-rendered TruthfulQA question, so the sampler meets the nuclei it meets in use."""
    from bench_engine import SAMPLING, chat_prompts
    no_stop, (prompt,) = chat_prompts(model, 1)
    out = jtrust.generate(no_stop, [prompt], max_new_tokens=step + 1, key=jax.random.key(0), sampling=SAMPLING,
                          n_samples=rows, return_logits=True)
    return jnp.asarray(out.logits[0, :, step])


def decode_phases(model, rows: int, slots: int, repeats: int) -> list[tuple]:
    """(phase, FLOPs, seconds[, bytes read]) of one decode step with `rows` rows and `slots` cache
    slots; bytes are the weights and cache the phase must read (float32)."""
    c, p = model.config, model.params
    blocks = p["blocks"]
    R, S, L, d, H, K, h, F, V = rows, slots, c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size
    x = jax.random.normal(jax.random.key(0), (R, d))

    @jax.jit
    def projections(blocks, x):
        def body(hid, w):
            a = w["attn"]
            q, k, v = hid @ a["q"]["kernel"], hid @ a["k"]["kernel"], hid @ a["v"]["kernel"]
            return hid + 1e-3 * (q @ a["o"]["kernel"]) + 1e-9 * (k.sum() + v.sum()), None
        return jax.lax.scan(body, x, blocks)[0]

    @jax.jit
    def attention(q, k, v):  # q [L, R, K, G, h]; k, v [L, R, S, K, h]: the cache's layout
        def body(acc, qkv):
            q, k, v = qkv
            scores = jnp.einsum("rkgh,rskh->rkgs", q, k) / np.sqrt(h)
            return acc + jnp.einsum("rkgs,rskh->rkgh", jax.nn.softmax(scores, -1), v).sum(), None
        return jax.lax.scan(body, 0.0, (q, k, v))[0]

    @jax.jit
    def mlps(blocks, x):
        def body(hid, w):
            m = w["mlp"]
            return hid + 1e-3 * ((jax.nn.silu(hid @ m["gate"]["kernel"]) * (hid @ m["up"]["kernel"])) @ m["down"]["kernel"]), None
        return jax.lax.scan(body, x, blocks)[0]

    table = p["embed"]["embedding"] if c.tie_embeddings else p["lm_head"]["kernel"].T
    unembed = jax.jit(lambda x, e: x @ e.T)
    keys = jax.random.split(jax.random.key(1), R)
    sample = jax.jit(lambda logits, keys: _sample(logits, keys, Sampling(1.0, top_p=0.9)))
    logits = sampled_logits(model, R)

    q = jax.random.normal(jax.random.key(2), (L, R, K, H // K, h))
    ck, cv = (jax.random.normal(jax.random.key(i), (L, R, S, K, h)) for i in (3, 4))  # as many bytes as the cache
    tokens, mask = jnp.ones((R, 1), jnp.int32), jnp.ones((R, 1), bool)
    cache = init_cache(c, R, S)._replace(valid=jnp.ones((R, S), bool))
    index = S // 2

    @functools.partial(jax.jit, donate_argnums=1)  # the cache is written in place, as in the decode loop
    def whole(params, cache, keys):
        out = forward(params, tokens, mask, config=c, cache=cache, cache_index=index,
                      positions=jnp.full((R, 1), index))
        return _sample(out.logits[:, 0], keys, Sampling(1.0, top_p=0.9)), out.cache

    def step():
        nonlocal cache
        token, cache = whole(p, cache, keys)
        return token

    # weights each phase reads once per step (float32); a product does 2 FLOPs per weight per row
    proj_w, mlp_w, unembed_w = L * (d * (H + 2 * K) * h + H * h * d), L * 3 * d * F, V * d
    cache_bytes = 4 * 2 * L * R * S * K * h
    phases = [
        ("q/k/v/o projections", 2 * R * proj_w, _time(projections, blocks, x, repeats=repeats), 4 * proj_w),
        (f"attention over {S} slots", 4 * R * L * S * H * h, _time(attention, q, ck, cv, repeats=repeats), cache_bytes),
        ("MLP", 2 * R * mlp_w, _time(mlps, blocks, x, repeats=repeats), 4 * mlp_w),
        ("unembedding", 2 * R * unembed_w, _time(unembed, x, table, repeats=repeats), 4 * unembed_w),
        ("top-p sampling", None, _time(sample, logits, keys, repeats=repeats)),
    ]
    t_whole = _time(step, repeats=repeats)
    flops = sum(f or 0 for _, f, *_ in phases)
    rest = max(t_whole - sum(row[2] for row in phases), 0.0)
    return phases + [("rest (norms, rope, cache writes, loop)", None, rest),
                     ("whole decode step", flops, t_whole, sum(row[3] for row in phases if len(row) > 3))]


def train_phases(c, batch: int, seq: int, repeats: int) -> list[tuple[str, float | None, float]]:
    """(phase, FLOPs, seconds) of one training step of the config `c` on batch x seq tokens."""
    params = init_params(c, jax.random.key(0))
    rng = np.random.default_rng(0)
    ids = rng.integers(0, c.vocab_size, (batch, seq + 1)).astype(np.int32)
    ex = T.Examples(jnp.asarray(ids[:, :-1]), jnp.ones((batch, seq), bool), jnp.asarray(ids[:, 1:]),
                    jnp.ones((batch, seq), jnp.float32))
    config = T.TrainConfig(steps=1000, batch_size=batch, learning_rate=1e-3, schedule="constant", weight_decay=0.1)
    loss = T.lm_loss(c, config)
    frozen = {"base": None, "reference": None}
    loss_only = jax.jit(lambda p, b: loss(p, frozen, b)[0])

    @jax.jit
    def grads(p, b):  # traced as make_train_step traces it
        with decoder.first_order_products():
            return jax.grad(lambda p, b: loss(p, frozen, b)[0])(p, b)

    mm = decoder._product  # the step's dense products (first_order_products), so the parts time the same


    L, d, H, K, h, F, V, N = c.n_layers, c.d_model, c.n_heads, c.n_kv_heads, c.head_dim, c.d_ff, c.vocab_size, batch * seq
    blocks = params["blocks"]
    x = jax.random.normal(jax.random.key(1), (batch, seq, d))
    causal = jnp.tril(jnp.ones((seq, seq), bool))

    def rms(x, scale):
        return x * jax.lax.rsqrt((x * x).mean(-1, keepdims=True) + 1e-5) * scale

    def attention_part(blocks, x):
        def body(hid, w):
            a = w["attn"]
            n = rms(hid, w["ln1"]["scale"])
            q = mm(n, a["q"]["kernel"]).reshape(batch, seq, K, H // K, h)
            k = mm(n, a["k"]["kernel"]).reshape(batch, seq, K, h)
            v = mm(n, a["v"]["kernel"]).reshape(batch, seq, K, h)
            s = jnp.einsum("btkgh,bskh->bkgts", q, k) / np.sqrt(h)
            s = jnp.where(causal, s, -1e9)
            o = jnp.einsum("bkgts,bskh->btkgh", jax.nn.softmax(s, -1), v).reshape(batch, seq, H * h)
            return hid + mm(o, a["o"]["kernel"]), None
        return jax.lax.scan(body, x, blocks)[0].sum()

    def mlp_part(blocks, x):
        def body(hid, w):
            m = w["mlp"]
            n = rms(hid, w["ln2"]["scale"])
            return hid + mm(jax.nn.silu(mm(n, m["gate"]["kernel"])) * mm(n, m["up"]["kernel"]), m["down"]["kernel"]), None
        return jax.lax.scan(body, x, blocks)[0].sum()

    table = params["embed"]["embedding"] if c.tie_embeddings else params["lm_head"]["kernel"].T

    def head_part(table, x):
        logits = mm(rms(x, 1.0), table.T)
        return -jnp.take_along_axis(jax.nn.log_softmax(logits, -1), ex.targets[..., None], -1).sum()

    optimizer = T.make_optimizer(config)
    opt_state = optimizer.init(params)
    g = grads(params, ex)

    @jax.jit
    def update(g, opt_state, params):
        updates, opt_state = optimizer.update(g, opt_state, params)
        return jax.tree.map(jnp.add, params, updates), opt_state

    step = jax.jit(T.make_train_step(loss, optimizer), donate_argnums=0)
    state = T.TrainState(jnp.zeros((), jnp.int32), params, opt_state)
    micro = T.Examples(*(a[None] for a in ex))

    def whole():
        nonlocal state
        state, metrics = step(state, frozen, micro)
        return metrics["loss"]

    attn_f = 2 * N * L * (d * (H + 2 * K) * h + H * h * d) + 4 * N * L * seq * H * h  # causal, but every score is computed
    mlp_f = 2 * N * L * 3 * d * F
    head_f = 2 * N * d * V
    phases = []
    for name, fn, args, f in (("attention sub-blocks", attention_part, (blocks, x), attn_f),
                              ("MLP sub-blocks", mlp_part, (blocks, x), mlp_f),
                              ("head: norm, unembedding, cross-entropy", head_part, (table, x), head_f)):
        t_fwd = _time(jax.jit(fn), *args, repeats=repeats)
        t_both = _time(jax.jit(jax.grad(fn, argnums=(0, 1))), *args, repeats=repeats)
        phases += [(f"{name}: forward", f, t_fwd), (f"{name}: backward", 2 * f, max(t_both - t_fwd, 1e-9))]
    t_update = _time(update, g, opt_state, params, repeats=repeats)
    t_loss = _time(loss_only, params, ex, repeats=repeats)
    t_grads = _time(grads, params, ex, repeats=repeats)
    t_whole = benchlib.best_time(lambda: jax.block_until_ready(whole()), repeats)
    total = attn_f + mlp_f + head_f
    return phases + [("AdamW update (clip, moments, decay)", None, t_update),
                     ("jtrust loss: forward", total, t_loss),
                     ("jtrust loss: forward + backward", 3 * total, t_grads),
                     ("rest of the step (update, accumulation)", None, max(t_whole - t_grads, 0.0)),
                     ("whole training step", 3 * total, t_whole)]


def pretrain_config(path: str = "experiments/configs/pretrain_tiny.json"):
    """The pre-training config's model and batch (bench_train's subject)."""
    from bench_train import model_config
    cfg = json.loads(pathlib.Path(path).read_text())
    return model_config(cfg), cfg["train"]["batch_size"], cfg["model"]["seq_len"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=[16, 128])
    parser.add_argument("--slots", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    peaks = benchlib.start()
    model = jtrust.load("smollm2")
    tables = {f"decode step, {r} rows, {args.slots} cache slots": decode_phases(model, r, args.slots, args.repeats)
              for r in args.rows}
    c, batch, seq = pretrain_config()
    tables[f"training step, {batch} x {seq} tokens, d {c.d_model}, {c.n_layers} layers, vocab {c.vocab_size}"] = \
        train_phases(c, batch, seq, args.repeats)
    peaks.sample()
    print("\n".join(peaks.table()))
    for title, rows in tables.items():
        print(f"\n{title} (peak {peaks.best():.1f} GFLOP/s, read bandwidth {peaks.bandwidth():.1f} GB/s)")
        print("\n".join(benchlib.roofline(rows, peaks.best(), peaks.bandwidth())))


if __name__ == "__main__":
    main()
