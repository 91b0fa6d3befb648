"""One decoder-only transformer for every supported family, written in Flax Linen.

The model is used functionally: `forward(params, tokens, mask, config=...)` is a
pure function of the parameter pytree, so one compiled program serves every
checkpoint of the same shape (a whole pre-training series). Blocks are stacked
with `nn.scan`: every block parameter has a leading [n_layers] axis, which makes
"run only the first k layers" a slice of the pytree and keeps compile time flat
in depth.

Parameter pytree (shapes for d = d_model, H = n_heads, K = n_kv_heads, h = head_dim):
  embed/embedding [vocab, d]; pos_embed/embedding [max_pos, d] (gpt2)
  blocks/ln1/{scale,bias}, blocks/ln2/...                     [L, d]
  blocks/attn/{q,k,v}/kernel [L, d, H*h | K*h | K*h] (+ bias), attn/o/kernel [L, H*h, d]
  blocks/mlp/{gate,up}/kernel [L, d, f], mlp/down/kernel [L, f, d] (gelu: no gate)
  final_norm/{scale,bias} [d]; lm_head/kernel [d, vocab] (untied only)

Activation sites (what `Capture` returns and `Intervention`s edit) are listed with their
widths in `jtrust.models.sites`. Output taps (`forward(..., taps=...)`) are zeros added to
linear layers' outputs, so that `jax.grad` with respect to them gives each layer's output
gradient (see `zero_taps`).
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp

from jtrust.core.errors import InputError
from jtrust.models import sites as sites_lib
from jtrust.models.config import ModelConfig
from jtrust.models.interventions import SITES, Intervention, edit

POOLINGS = ("last", "mean", "all")
_MASK_VALUE = -1e30  # finite, so fully masked (padding) rows give zeros, not NaN


@dataclasses.dataclass(frozen=True)
class Capture:
    """Which activations to return: `sites` (names in `sites.SITES`) from every executed
    layer, pooled by `pool` over tokens (last real token, mean over real tokens, or all)."""

    sites: tuple[str, ...] = ("resid_post",)
    pool: str = "last"

    def __post_init__(self):
        bad = set(self.sites) - set(SITES)
        if bad:
            raise InputError(f"unknown sites {sorted(bad)}; choose from {SITES}")
        if self.pool not in POOLINGS:
            raise InputError(f"unknown pooling {self.pool!r}; choose from {POOLINGS}")


class KVCache(NamedTuple):
    """Keys and values of every layer: k, v [L, B, S, K, h]; `valid` [B, S] marks real tokens."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array


class Output(NamedTuple):
    logits: jax.Array | None  # [B, T, vocab] float32
    captures: dict[str, jax.Array]  # site -> [L, B, w] (last/mean) or [L, B, T, w] (all), w = its width
    cache: KVCache | None


class Context(NamedTuple):
    """Per-call data every block reads (broadcast through the scan)."""

    positions: jax.Array  # [B, T] int, token positions for rotary embeddings
    key_mask: jax.Array  # [B, S] bool, real tokens among the cache slots (cached calls only)
    token_mask: jax.Array  # [B, T] bool, real (non-pad) tokens of this call
    last_position: jax.Array  # [B, T] bool, the last real token of each row
    cache_index: jax.Array  # scalar int, where this call's keys are written in the cache
    interventions: tuple[Intervention, ...]


class Norm(nn.Module):
    kind: str
    eps: float

    @nn.compact
    def __call__(self, x):
        d = x.shape[-1]
        x32 = x.astype(jnp.float32)
        scale = self.param("scale", nn.initializers.ones, (d,), jnp.float32)
        if self.kind == "rms":
            y = x32 * jax.lax.rsqrt(jnp.mean(x32 * x32, -1, keepdims=True) + self.eps) * scale
        else:
            bias = self.param("bias", nn.initializers.zeros, (d,), jnp.float32)
            mean = jnp.mean(x32, -1, keepdims=True)
            var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
            y = (x32 - mean) * jax.lax.rsqrt(var + self.eps) * scale + bias
        return y.astype(x.dtype)


def rotate(x: jax.Array, positions: jax.Array, rotary_dim: int, theta: float) -> jax.Array:
    """Rotary embedding (Hugging Face "rotate_half" layout) on the first `rotary_dim` dims.

    x: [B, T, heads, h]; positions: [B, T].
    """
    half = rotary_dim // 2
    inv_freq = 1.0 / theta ** (jnp.arange(0, rotary_dim, 2, dtype=jnp.float32) / rotary_dim)
    angles = positions[..., None].astype(jnp.float32) * inv_freq  # [B, T, half]
    cos = jnp.cos(angles)[:, :, None, :].astype(x.dtype)
    sin = jnp.sin(angles)[:, :, None, :].astype(x.dtype)
    x1, x2, rest = x[..., :half], x[..., half:rotary_dim], x[..., rotary_dim:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin, rest], axis=-1)


SiteHook = Callable[[str, jax.Array], jax.Array]  # site(name, value) -> the (possibly edited) value
Taps = dict[str, jax.Array]  # linear layer name -> what to add to its output


# input(x) -> x, applied to every block product's input while set (`constrain_inputs`)
_INPUT_CONSTRAINT: contextvars.ContextVar[Callable | None] = contextvars.ContextVar("jtrust_inputs", default=None)


@contextlib.contextmanager
def constrain_inputs(constrain: Callable[[jax.Array], jax.Array] | None):
    """While tracing inside this context, the input [B, ..., d_in] of every dense layer passes
    through constrain(x) before its product: a sharding constraint that keeps rows split
    (`jtrust.runtime.sharding.keep_rows_split`)."""
    token = _INPUT_CONSTRAINT.set(constrain)
    try:
        yield
    finally:
        _INPUT_CONSTRAINT.reset(token)


_FIRST_ORDER: contextvars.ContextVar[bool] = contextvars.ContextVar("jtrust_first_order", default=False)


@contextlib.contextmanager
def first_order_products():
    """While tracing inside this context, dense layers differentiate with `_product` below: the
    backward products written out, which XLA:CPU compiles to its fast paths (a training step's
    MLP backward ran 20-37% faster). Reverse mode only: a custom VJP has no forward-mode
    derivative, so Hessian-vector products (attribution) must not trace inside it."""
    token = _FIRST_ORDER.set(True)
    try:
        yield
    finally:
        _FIRST_ORDER.reset(token)


@jax.custom_vjp
def _product(x: jax.Array, w: jax.Array) -> jax.Array:
    """x [..., d_in] @ w [d_in, d_out], with its backward written as two plain products."""
    return jax.lax.dot_general(x, w, (((x.ndim - 1,), (0,)), ((), ())))


def _product_fwd(x, w):
    return _product(x, w), (x, w)


def _product_bwd(residuals, g):
    x, w = residuals
    dx = jax.lax.dot_general(g, w, (((g.ndim - 1,), (1,)), ((), ())))  # g w^T
    dw = jax.lax.dot_general(x.reshape(-1, x.shape[-1]), g.reshape(-1, g.shape[-1]),
                             (((0,), (0,)), ((), ())))  # x^T g over every row
    return dx, dw


_product.defvjp(_product_fwd, _product_bwd)


def _dense_dot(lhs, rhs, dimension_numbers, precision=None, preferred_element_type=None):
    if dimension_numbers != (((lhs.ndim - 1,), (0,)), ((), ())) or preferred_element_type is not None:
        return jax.lax.dot_general(lhs, rhs, dimension_numbers, precision=precision,
                                   preferred_element_type=preferred_element_type)
    return _product(lhs, rhs)


def linear(x: jax.Array, n: int, bias: bool, name: str, taps: Taps | None) -> jax.Array:
    """Dense layer `name` (a child of the calling module) on x [..., d_in] -> [..., n].

    taps[name] [..., n], if given, is added to the output: its gradient is the output's.
    """
    constrain = _INPUT_CONSTRAINT.get()
    x = x if constrain is None else constrain(x)
    y = nn.Dense(n, use_bias=bias, dtype=x.dtype, name=name,
                 dot_general=_dense_dot if _FIRST_ORDER.get() else None)(x)
    return y if taps is None or name not in taps else y + taps[name].astype(y.dtype)


class Attention(nn.Module):
    cfg: ModelConfig
    attend_past: bool  # read earlier keys from the cache (false when the cache is still empty)

    @nn.compact
    def __call__(self, x, ctx: Context, cache: tuple[jax.Array, jax.Array] | None,
                 site: SiteHook = lambda name, value: value, taps: Taps | None = None):
        """x [B, T, d]; cache: this layer's (k, v) [B, S, K, h] holding slots < cache_index;
        site: hook for the attn_heads site; taps: this layer's output taps [B, T, width] by name.
        Returns the output [B, T, d] and this call's (k, v) [B, T, K, h] for the caller to store."""
        c = self.cfg
        B, T, _ = x.shape
        q = linear(x, c.n_heads * c.head_dim, c.qkv_bias, "q", taps).reshape(B, T, c.n_heads, c.head_dim)
        k = linear(x, c.n_kv_heads * c.head_dim, c.qkv_bias, "k", taps).reshape(B, T, c.n_kv_heads, c.head_dim)
        v = linear(x, c.n_kv_heads * c.head_dim, c.qkv_bias, "v", taps).reshape(B, T, c.n_kv_heads, c.head_dim)
        if c.position == "rope":
            q = rotate(q, ctx.positions, c.rotary_dim, c.rope_theta)
            k = rotate(k, ctx.positions, c.rotary_dim, c.rope_theta)
        group = c.n_heads // c.n_kv_heads
        q = q.reshape(B, T, c.n_kv_heads, group, c.head_dim) / jnp.sqrt(jnp.asarray(c.head_dim, x.dtype))
        # queries of one kv head, folded to one axis (t, g): fewer, larger products per head
        q = q.transpose(0, 2, 1, 3, 4).reshape(B, c.n_kv_heads, T * group, c.head_dim)
        by_query = lambda scores: scores.reshape(B, c.n_kv_heads, T, group, -1)  # [B, K, T, G, S]
        # this call's keys: causal among themselves, padding masked
        own = by_query(jnp.einsum("bkqh,bskh->bkqs", q, k).astype(jnp.float32))
        own_ok = (jnp.arange(T)[None, :] <= jnp.arange(T)[:, None])[None] & ctx.token_mask[:, None, :]
        scores = [jnp.where(own_ok[:, None, :, None, :], own, _MASK_VALUE)]
        values = [v]
        if cache is not None and self.attend_past:  # earlier keys: read from the cache, never copied
            ck, cv = cache
            past = by_query(jnp.einsum("bkqh,bskh->bkqs", q, ck.astype(q.dtype)).astype(jnp.float32))
            past_ok = ctx.key_mask & (jnp.arange(ck.shape[1]) < ctx.cache_index)[None, :]
            scores.insert(0, jnp.where(past_ok[:, None, None, None, :], past, _MASK_VALUE))
            values.insert(0, cv.astype(x.dtype))
        probs = jax.nn.softmax(jnp.concatenate(scores, axis=-1), axis=-1).astype(x.dtype)
        probs = probs.reshape(B, c.n_kv_heads, T * group, -1)
        splits = [s.shape[-1] for s in scores][:-1]
        parts = jnp.split(probs, splits, axis=-1) if splits else [probs]
        out = sum(jnp.einsum("bkqs,bskh->bkqh", p_, v_) for p_, v_ in zip(parts, values))
        # [B, T, K, G, h] -> [B, T, H*h]: head k*G + g reads kv head k, the Hugging Face order
        out = out.reshape(B, c.n_kv_heads, T, group, c.head_dim).transpose(0, 2, 1, 3, 4)
        heads = site("attn_heads", out.reshape(B, T, c.n_heads * c.head_dim))
        return linear(heads, c.d_model, c.out_bias, "o", taps), (k, v)


class MLP(nn.Module):
    cfg: ModelConfig

    @nn.compact
    def __call__(self, x, site: SiteHook = lambda name, value: value, taps: Taps | None = None):
        """x [B, T, d] -> [B, T, d]; site: hook for mlp_hidden [B, T, f]; taps as in Attention."""
        c = self.cfg
        dense = lambda x_, n, name: linear(x_, n, c.out_bias, name, taps)
        if c.mlp == "swiglu":
            h = jax.nn.silu(dense(x, c.d_ff, "gate")) * dense(x, c.d_ff, "up")
        else:
            h = jax.nn.gelu(dense(x, c.d_ff, "up"), approximate=c.mlp == "gelu_tanh")
        return dense(site("mlp_hidden", h), c.d_model, "down")


def pool(x: jax.Array, ctx: Context, how: str) -> jax.Array:
    """Pool x [B, T, w] over tokens: last real token, mean over real tokens ([B, w]), or all
    tokens ([B, T, w]); any width w."""
    x = x.astype(jnp.float32)
    if how == "all":
        return x
    if how == "last":
        return jnp.einsum("btd,bt->bd", x, ctx.last_position.astype(x.dtype))
    w = ctx.token_mask.astype(x.dtype)
    return jnp.einsum("btd,bt->bd", x, w) / jnp.maximum(w.sum(1, keepdims=True), 1)


class Block(nn.Module):
    cfg: ModelConfig
    capture: Capture | None
    attend_past: bool = True

    @nn.compact
    def __call__(self, x, layer, cache, taps: Taps | None, ctx: Context):
        """x [B, T, d]; layer: this block's index; cache: (k, v) [B, S, K, h] or None;
        taps: linear name -> [B, T, width] added to that layer's output, or None."""
        c = self.cfg
        seen = {}

        def site(name, value):
            if name not in sites_lib.SITES:  # trace time only: every site the block emits is registered
                raise KeyError(f"site {name!r} is not in jtrust.models.sites.SITES")
            value = edit(value, layer, name, ctx.interventions, ctx.last_position)
            if self.capture is not None and name in self.capture.sites:
                seen[name] = pool(value, ctx, self.capture.pool)
            return value

        mlp = lambda x_: site("mlp_out", MLP(c, name="mlp")(
            site("mlp_in", Norm(c.norm, c.norm_eps, name="ln2")(x_)), site, taps))
        x = site("resid_pre", x)
        a, new_kv = Attention(c, self.attend_past, name="attn")(
            site("attn_in", Norm(c.norm, c.norm_eps, name="ln1")(x)), ctx, cache, site, taps)
        a = site("attn_out", a)
        if c.parallel_residual:  # NeoX: both sublayers read the block's input
            m = mlp(x)
            x = x + a + m
        else:
            x = x + a
            x = x + mlp(x)
        x = site("resid_post", x)
        return x, (None if cache is None else new_kv, seen)


class Decoder(nn.Module):
    """Embeddings, `n_run` scanned blocks and (optionally) the final norm and unembedding."""

    cfg: ModelConfig
    n_run: int
    capture: Capture | None = None
    logits: bool = True
    attend_past: bool = True

    @nn.compact
    def __call__(self, tokens, ctx: Context, cache: KVCache | None, dtype=jnp.float32,
                 taps: Taps | None = None):
        """taps: linear name -> [n_run, B, T, width], or None (then no addition is traced)."""
        c = self.cfg
        embed = nn.Embed(c.vocab_size, c.d_model, name="embed")
        x = embed(tokens).astype(dtype)
        if c.position == "learned":
            x = x + nn.Embed(c.max_positions, c.d_model, name="pos_embed")(ctx.positions).astype(dtype)
        # layer index, cache and taps are sliced per block like the parameters; ctx is shared
        blocks = nn.scan(Block, variable_axes={"params": 0}, split_rngs={"params": True},
                         in_axes=(0, 0, 0, nn.broadcast), length=self.n_run)
        kv = None if cache is None else (cache.k, cache.v)
        x, (kv, captures) = blocks(c, self.capture, self.attend_past, name="blocks")(
            x, jnp.arange(self.n_run), kv, taps, ctx)
        new_cache = None
        if cache is not None:  # one in-place write of every layer's new keys, after the scan
            at = (0, 0, ctx.cache_index, 0, 0)
            new_cache = KVCache(jax.lax.dynamic_update_slice(cache.k, kv[0].astype(cache.k.dtype), at),
                                jax.lax.dynamic_update_slice(cache.v, kv[1].astype(cache.v.dtype), at),
                                cache.valid)
        if not self.logits:
            return None, captures, new_cache
        x = Norm(c.norm, c.norm_eps, name="final_norm")(x)
        if c.tie_embeddings:
            logits = embed.attend(x.astype(jnp.float32))
        else:
            logits = nn.Dense(c.vocab_size, use_bias=False, dtype=dtype, name="lm_head")(x)
        return logits.astype(jnp.float32), captures, new_cache


def last_position(mask: jax.Array) -> jax.Array:
    """[B, T] bool: true at the last real token of each row (works for left and right padding)."""
    T = mask.shape[1]
    last = T - 1 - jnp.argmax(mask[:, ::-1], axis=1)
    return jnp.arange(T)[None, :] == last[:, None]


def default_positions(mask: jax.Array) -> jax.Array:
    """Positions that ignore padding: the first real token of each row is position 0."""
    return jnp.maximum(jnp.cumsum(mask.astype(jnp.int32), axis=1) - 1, 0)


def forward(params: Any, tokens: jax.Array, attention_mask: jax.Array, *, config: ModelConfig,
            positions: jax.Array | None = None,
            interventions: tuple[Intervention, ...] = (), capture: Capture | None = None,
            upto_layer: int | None = None, logits: bool = True, cache: KVCache | None = None,
            cache_index: jax.Array | int = 0, dtype=jnp.float32,
            taps: dict[str, jax.Array] | None = None) -> Output:
    """Run the model. Pure in `params`; `config`, `capture`, `upto_layer`, `logits` are static.

    tokens, attention_mask: [B, T] (mask 1 = real token; left or right padding).
    upto_layer: run blocks 0..upto_layer only (stops the computation early; no logits).
    cache: a `KVCache` from `init_cache`; queries attend to its slots < cache_index
      that `cache.valid` marks, then to this call's tokens (by attention_mask), whose
      keys are written at slots cache_index..cache_index+T-1 of the returned cache.
      Default positions then count the valid slots, so left padding is ignored.
    dtype: compute dtype of activations and matmuls (float32 or bfloat16).
    taps: linear layer name (q, k, v, o, gate, up, down; `sites.linears(config)`) ->
      [n_layers, B, T, sites.linear_width(name, config)], added to that layer's output in
      every block. Pure in taps, so at zero taps (`zero_taps`) `jax.grad` of a loss with
      respect to them is dL/d(output) of each linear layer per layer, row and token (the
      per-layer gradients K-FAC and influence functions need); the inputs are the sites
      `sites.LINEAR_INPUTS[name]`. With upto_layer only the first upto_layer + 1 layers are used.
      None (default) adds nothing and compiles exactly as without taps.
    """
    mask = attention_mask.astype(bool)
    T = tokens.shape[1]
    if positions is None and cache is None:
        positions = default_positions(mask)
    elif positions is None:  # count the real tokens already in the cache, slot by slot
        slots = jnp.asarray(cache_index, jnp.int32) + jnp.arange(T)
        positions = default_positions(cache.valid)[:, slots]
    n_run = config.n_layers if upto_layer is None else upto_layer + 1
    if not 0 < n_run <= config.n_layers:
        raise InputError(f"upto_layer={upto_layer} out of range for {config.n_layers} layers")
    if cache is not None and n_run < config.n_layers:
        raise InputError("upto_layer cannot be combined with a cache (the cache holds every layer)")
    run_params = params
    if n_run < config.n_layers:
        run_params = dict(params, blocks=jax.tree.map(lambda p: p[:n_run], params["blocks"]))
        logits = False
    attend_past = not (isinstance(cache_index, int) and cache_index == 0)  # a first fill has no past
    cache_index = jnp.asarray(cache_index, jnp.int32)
    ctx = Context(positions=positions,
                  key_mask=mask if cache is None else cache.valid.astype(bool),
                  token_mask=mask, last_position=last_position(mask), cache_index=cache_index,
                  interventions=tuple(interventions))
    taps = _check_taps(taps, config, n_run, tokens.shape)
    model = Decoder(config, n_run, capture, logits, attend_past)
    out_logits, captures, new_cache = model.apply({"params": run_params}, tokens, ctx, cache, dtype, taps)
    return Output(out_logits, captures, new_cache)


def zero_taps(config: ModelConfig, batch: int, length: int, names: tuple[str, ...] | None = None,
              dtype=jnp.float32) -> dict[str, jax.Array]:
    """Zero output taps for `forward(..., taps=...)`: name -> [n_layers, batch, length, width].

    names: linear layers to tap (default every one `config`'s blocks have, `sites.linears`).
    """
    names = sites_lib.linears(config) if names is None else tuple(names)
    return {n: jnp.zeros((config.n_layers, batch, length, sites_lib.linear_width(n, config)), dtype)
            for n in names}


def _check_taps(taps, config: ModelConfig, n_run: int, shape: tuple[int, int]):
    """Validated taps cut to the n_run executed layers; None for no taps (or an empty dict)."""
    if not taps:
        return None
    B, T = shape
    out = {}
    for name, tap in taps.items():
        want = (config.n_layers, B, T, sites_lib.linear_width(name, config))  # raises on unknown names
        if tuple(tap.shape) != want:
            raise InputError(f"tap {name!r} has shape {tuple(tap.shape)}; expected {want} "
                             "([n_layers, batch, length, output width])")
        out[name] = tap[:n_run]
    return out


def init_params(config: ModelConfig, rng: jax.Array) -> Any:
    """Random parameters in the layout above (Linen's default initialisers)."""
    tokens = jnp.zeros((1, 4), jnp.int32)
    mask = jnp.ones((1, 4), bool)
    ctx = Context(default_positions(mask), mask, mask, last_position(mask),
                  jnp.int32(0), ())
    return Decoder(config, config.n_layers).init(rng, tokens, ctx, None)["params"]


def init_cache(config: ModelConfig, batch: int, length: int, dtype=jnp.float32) -> KVCache:
    shape = (config.n_layers, batch, length, config.n_kv_heads, config.head_dim)
    return KVCache(jnp.zeros(shape, dtype), jnp.zeros(shape, dtype), jnp.zeros((batch, length), bool))
