"""Batched text generation with a KV cache, compiled once per shape.

`generate` left-pads the prompts into one batch and prefills them in one forward
call that writes the cache (every prompt token but the last, without logits),
repeats the cache `n_samples` times along the batch axis (so many samples of one
prompt cost one prefill), then runs one `jax.lax.while_loop` over all rows inside
the same jitted function: step t feeds one token (the last prompt token, then new
token t - 1) at cache slot P - 1 + t and chooses new token t.

Shapes are bucketed to limit recompiles: the padded prompt length P is rounded up
to a multiple of `BUCKET`; `max_new_tokens`, `n_samples`, `Sampling` and the
stop ids are static (a new value compiles a new program).

Randomness is explicit: token t of batch row r is drawn with
`fold_in(fold_in(key, t), r)`, so a row's samples do not depend on the batch
size, on sharding, or on when the loop stops.

With a mesh over several processes (`jtrust.runtime.distributed`), every process passes the
same prompts and key, and every process gets the whole `Generation`.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtrust.core.errors import InputError
from jtrust.core.options import check, option
from jtrust.runtime import distributed, sharding
from jtrust.models.model import Model
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import KVCache, forward, init_cache
from jtrust.models.interventions import Intervention
from jtrust.models.tokenizer import Tokenizer, pad

BUCKET = 16  # padded prompt lengths are multiples of this


@dataclasses.dataclass(frozen=True)
class Sampling:
    """How the next token is chosen. temperature 0 = greedy; top_k 0 and top_p 1 = off.

    confident_p < 1 turns on adaptive temperature: a row whose raw next-token distribution
    has max probability >= confident_p takes its argmax (temperature 0) at that step; the
    other rows sample with temperature / top_k / top_p as set.
    """

    temperature: float = option(0.0, "sampling temperature (0 = greedy)")
    top_k: int = option(0, "sample among the k most likely tokens (0 = off)")
    top_p: float = option(1.0, "nucleus sampling mass (1 = off)")
    confident_p: float = option(1.0, "adaptive temperature: greedy at steps whose top probability "
                                "reaches this (1 = off)")

    def __post_init__(self):
        check(self.temperature >= 0, "temperature", f"must be >= 0 (0 = greedy), not {self.temperature}")
        check(self.top_k >= 0, "top_k", f"must be >= 0 (0 = off), not {self.top_k}")
        check(0 < self.top_p <= 1, "top_p", f"must be in (0, 1] (1 = off), not {self.top_p}")
        check(0 < self.confident_p <= 1, "confident_p", f"must be in (0, 1] (1 = off), not {self.confident_p}")


class Generation(NamedTuple):
    tokens: np.ndarray  # [B, n_samples, max_new_tokens] int32, pad after the stop token
    lengths: np.ndarray  # [B, n_samples] new tokens up to and including the stop token
    texts: list[list[str]]  # [B][n_samples] decoded new tokens, stop token excluded
    prompt_ids: list[list[int]]  # [B] the prompt ids as fed to the model (unpadded)
    logprobs: np.ndarray  # [B, n_samples, max_new_tokens] log p(token) under the raw model
    #   distribution (before temperature / top-k / top-p); 0 after the stop
    logits: np.ndarray | None  # [B, n_samples, max_new_tokens, vocab] if return_logits


def generate(model: Model, prompts: Sequence[str] | Sequence[Sequence[int]], *, max_new_tokens: int,
             key: jax.Array | None = None, sampling: Sampling = Sampling(),
             interventions: Sequence[Intervention] = (), chat: bool = False, n_samples: int = 1,
             mesh: Mesh | None = None, return_logits: bool = False,
             pad_prompts_to: int = 0) -> Generation:
    """Continue every prompt `n_samples` times, up to `max_new_tokens` new tokens each.

    prompts: texts (encoded with the model's tokenizer; `chat=True` renders each
      with its chat template first) or lists of token ids, of any lengths.
    key: PRNG key; required unless sampling is greedy.
    interventions: applied in the prefill (position "last" = the last prompt
      token) and in every decode step (the new token).
    mesh: a `Mesh` with a 'data' axis: the batch of rows is sharded across it
      (parameters replicated, or split over its fsdp / model axes by `jtrust.runtime.sharding`);
      the batch is padded to a multiple of its size. It may
      span the devices of several processes (`jtrust.distributed.data_mesh()`).
    pad_prompts_to: pad prompts to at least this many tokens, so calls with different prompts
      share one compiled program.
    Generation stops for a row at the tokenizer's stop ids or eos (included in
    `tokens` and `lengths`); the row then emits pad.
    """
    if max_new_tokens < 1 or n_samples < 1:
        raise InputError(f"max_new_tokens={max_new_tokens} and n_samples={n_samples} must be >= 1")
    if sampling.temperature > 0 and key is None:
        raise InputError("sampling with temperature > 0 needs a PRNG key (jax.random.key(seed))")
    tok = model.tokenizer
    prompt_ids = encode_prompts(tok, prompts, chat)
    if max_new_tokens < 1:
        raise InputError(f"max_new_tokens (--max-new-tokens) must be at least 1, not {max_new_tokens}")
    longest = max(len(p) for p in prompt_ids) + max_new_tokens
    if longest > model.config.max_positions:  # past them a model was never trained (or cannot go)
        raise InputError(f"the longest prompt ({longest - max_new_tokens} tokens) + max_new_tokens "
                         f"({max_new_tokens}) = {longest} exceeds {model.name}'s {model.config.max_positions} "
                         "positions; lower --max-new-tokens or shorten the prompt")
    B = len(prompt_ids)
    n_devices = 1 if mesh is None else sharding.row_groups(mesh)
    n_prompts = B  # pad with copies of the first prompt so rows divide evenly over the mesh
    while (n_prompts * n_samples) % n_devices:
        n_prompts += 1
    ids = prompt_ids + [prompt_ids[0]] * (n_prompts - B)
    tokens, mask = pad(ids, tok.pad_id, _bucket(max(pad_prompts_to, *(len(p) for p in ids))), side="left")
    stop_ids = tuple(sorted(set(tok.stop_ids) | ({tok.eos_id} if tok.eos_id is not None else set())))
    cache_length = tokens.shape[1] - 1 + max_new_tokens
    if mesh is None:
        params = model.params
        tokens, mask = jnp.asarray(tokens), jnp.asarray(mask)
        cache = init_cache(model.config, n_prompts, cache_length)
    else:
        params = sharding.shard_params(model.params, mesh)
        rows = sharding.rows_spec(mesh) if n_prompts % n_devices == 0 else PartitionSpec()
        tokens, mask = distributed.put((tokens, mask), NamedSharding(mesh, rows))
        cache = _sharded_cache(model.config, n_prompts, cache_length, mesh, rows)
    out = _decode(params, tokens, mask, cache, jax.random.key(0) if key is None else key,
                  tuple(interventions),
                  config=model.config, sampling=sampling, max_new_tokens=max_new_tokens,
                  n_samples=n_samples, stop_ids=stop_ids, pad_id=tok.pad_id, mesh=mesh,
                  return_logits=return_logits)
    results = (out.tokens, out.length, out.logprobs, out.logits)
    if mesh is not None:  # every process gets every row, those of other processes' devices too
        results = distributed.to_host(results)
    per_prompt = lambda x: None if x is None else np.asarray(x).reshape(
        n_prompts, n_samples, *x.shape[1:])[:B]
    new_tokens, lengths, logprobs, logits = (per_prompt(x) for x in results)
    texts = [[tok.decode(_strip_stop(row[:n], stop_ids)) for row, n in zip(new_tokens[b], lengths[b])]
             for b in range(B)]
    return Generation(new_tokens, lengths, texts, prompt_ids, logprobs, logits)


def sequence_logprobs(model: Model, sequences: Sequence[str] | Sequence[Sequence[int]], *,
                      interventions: Sequence[Intervention] = (), batch_size: int | None = None
                      ) -> list[np.ndarray]:
    """log p(token i | tokens < i) for i >= 1 of each sequence: a list of [len - 1] float32 arrays.

    batch_size: forward the sequences in batches of exactly this many rows (the last one padded
    with copies), so questions of any number fill one compiled shape per length bucket; None:
    one batch of them all."""
    ids = encode_prompts(model.tokenizer, sequences, chat=False)
    size = batch_size or len(ids)
    out = []
    for start in range(0, len(ids), size):
        chunk = ids[start:start + size]
        rows = chunk + [chunk[0]] * (size - len(chunk))
        tokens, mask = pad(rows, model.tokenizer.pad_id, _bucket(max(len(s) for s in rows)), side="right")
        logits = model.apply(tokens, mask, interventions=tuple(interventions)).logits
        logprobs = np.asarray(_next_token_logprobs(logits, jnp.asarray(tokens)))
        out += [logprobs[b, :len(s) - 1] for b, s in enumerate(chunk)]
    return out


@jax.jit
def _next_token_logprobs(logits, tokens):
    """logits [B, T, V], tokens [B, T] -> [B, T - 1] log p(tokens[:, 1:])."""
    lp = jax.nn.log_softmax(logits[:, :-1], axis=-1)
    return jnp.take_along_axis(lp, tokens[:, 1:, None], axis=-1)[..., 0]


class _State(NamedTuple):
    """Loop carry; R = rows (prompts x samples), N = max_new_tokens, S = cache length."""

    step: jax.Array  # scalar int t: the step feeds one token and emits new token t
    feed: jax.Array  # [R] int32, the token to feed (last prompt token, then each new token)
    cache: KVCache  # k, v [L, R, S, K, h]; valid [R, S]
    done: jax.Array  # [R] bool, the row has emitted a stop token
    length: jax.Array  # [R] int32, tokens emitted up to and including the stop
    tokens: jax.Array  # [R, N] int32
    logprobs: jax.Array  # [R, N] float32
    logits: jax.Array | None  # [R, N, V] float32 (only with return_logits)


@functools.partial(jax.jit, static_argnames=("config", "sampling", "max_new_tokens", "n_samples",
                                             "stop_ids", "pad_id", "mesh", "return_logits"))
def _decode(params: Any, tokens: jax.Array, mask: jax.Array, cache: KVCache, key: jax.Array,
            interventions: tuple[Intervention, ...], *, config: ModelConfig, sampling: Sampling,
            max_new_tokens: int, n_samples: int, stop_ids: tuple[int, ...], pad_id: int,
            mesh: Mesh | None, return_logits: bool) -> _State:
    """Prefill left-padded tokens, mask [B, P] into an empty cache of B rows and P - 1 + N
    slots (made by the caller: a zero cache built inside would be constant-folded at compile
    time), then decode B * n_samples rows; step t writes slot P - 1 + t.

    The prefill writes all but the last column (a real token in every left-padded row)
    without logits, which would be [B, P, vocab]; the loop's first step feeds the last
    prompt token, so "last"-position edits reach it there and nowhere else in the prompt.
    """
    B, P = tokens.shape
    N, R = max_new_tokens, B * n_samples
    cache = cache._replace(valid=cache.valid.at[:, :P].set(mask.astype(bool)))
    head = forward(params, tokens[:, :-1], mask[:, :-1], config=config, logits=False,
                   interventions=tuple(iv for iv in interventions if iv.position == "all"), cache=cache)
    repeat = lambda x, axis=0: jnp.repeat(x, n_samples, axis=axis)
    cache = KVCache(repeat(head.cache.k, 1), repeat(head.cache.v, 1), repeat(head.cache.valid))
    last_position = repeat(mask.sum(1) - 1)  # [R] position of the last prompt token
    stop = jnp.asarray(stop_ids, jnp.int32)
    constrain = functools.partial(_constrain, mesh)

    def body(state: _State) -> _State:
        """Feed `state.feed` at slot P - 1 + t and choose new token t of every row."""
        t = state.step
        valid = jax.lax.dynamic_update_slice(state.cache.valid, jnp.ones((R, 1), bool), (0, P - 1 + t))
        out = forward(params, state.feed[:, None], jnp.ones((R, 1), bool), config=config,
                      positions=(last_position + t)[:, None], interventions=interventions,
                      cache=state.cache._replace(valid=valid), cache_index=P - 1 + t)
        logits = out.logits[:, 0]
        step_key = jax.random.fold_in(key, t)
        row_keys = jax.vmap(lambda r: jax.random.fold_in(step_key, r))(jnp.arange(R))
        token = _sample(logits, row_keys, sampling)
        logprob = (jnp.take_along_axis(logits, token[:, None], -1)[:, 0]
                   - jax.nn.logsumexp(logits, -1))  # no [R, V] log-softmax written out
        token = jnp.where(state.done, pad_id, token)
        logprob = jnp.where(state.done, 0.0, logprob)
        is_stop = (token[:, None] == stop[None, :]).any(-1)
        saved = None if state.logits is None else state.logits.at[:, t].set(logits)
        return constrain(_State(t + 1, token, out.cache, state.done | is_stop, state.length + ~state.done,
                                state.tokens.at[:, t].set(token), state.logprobs.at[:, t].set(logprob),
                                saved))

    state = constrain(_State(
        step=jnp.int32(0), feed=repeat(tokens[:, -1]), cache=cache, done=jnp.zeros((R,), bool),
        length=jnp.zeros((R,), jnp.int32), tokens=jnp.full((R, N), pad_id, jnp.int32),
        logprobs=jnp.zeros((R, N), jnp.float32),
        logits=jnp.zeros((R, N, config.vocab_size), jnp.float32) if return_logits else None))
    # stop early once every row is done; later tokens would be pad anyway
    return jax.lax.while_loop(lambda s: (s.step < N) & ~s.done.all(), body, state)


@functools.partial(jax.jit, static_argnums=(0, 1, 2, 3, 4))
def _sharded_cache(config: ModelConfig, batch: int, length: int, mesh: Mesh,
                   rows: PartitionSpec) -> KVCache:
    """An empty cache made on the mesh's devices, rows split by `rows`: k, v [L, batch, length,
    K, h], valid [batch, length] (made in place: no host copy, no full copy on one device)."""
    cache = init_cache(config, batch, length)
    kv = NamedSharding(mesh, PartitionSpec(None, *rows))  # k, v: [L, B, ...]
    c = jax.lax.with_sharding_constraint
    return KVCache(c(cache.k, kv), c(cache.v, kv), c(cache.valid, NamedSharding(mesh, rows)))


def _sample(logits: jax.Array, keys: jax.Array, sampling: Sampling) -> jax.Array:
    """One token per row from logits [R, V] (float32) with per-row keys [R] -> [R] int32."""
    greedy = jnp.argmax(logits, -1).astype(jnp.int32)
    if sampling.temperature == 0:
        return greedy
    raw = logits
    logits = logits / sampling.temperature
    if sampling.top_k:
        # min over all k values, not [:, -1]: XLA turns a top_k used only at its last entry into a full sort
        kth = jax.lax.top_k(logits, min(sampling.top_k, logits.shape[-1]))[0].min(-1, keepdims=True)
        logits = jnp.where(logits < kth, -jnp.inf, logits)
    probs = _softmax(logits)
    if sampling.top_p < 1:
        sampled = _nucleus_sample(probs, keys, sampling.top_p)
    else:
        sampled = _inverse_cdf(probs, _uniform(keys, 0))
    if sampling.confident_p == 1:
        return sampled
    confident = _softmax(raw).max(-1) >= sampling.confident_p  # [R]
    return jnp.where(confident, greedy, sampled)


def _softmax(logits: jax.Array) -> jax.Array:
    """softmax over the last axis as exp(logits - logsumexp): XLA:CPU fuses `jax.nn.softmax`'s
    max-subtract-exp into the unembedding's product, which then ran 2.5x slower (107 vs 45 ms
    at 128 rows)."""
    return jnp.exp(logits - jax.nn.logsumexp(logits, -1, keepdims=True))


def _uniform(keys: jax.Array, draw: int | jax.Array) -> jax.Array:
    """[R] uniform numbers in (0, 1], the `draw`-th of each row's key [R]."""
    return 1.0 - jax.vmap(lambda k: jax.random.uniform(jax.random.fold_in(k, draw)))(keys)


def _nucleus_sample(probs: jax.Array, keys: jax.Array, top_p: float, rounds: int = 8) -> jax.Array:
    """[R] draws from probs [R, V] restricted to each row's top-p nucleus, renormalised.

    By rejection: draw from the whole distribution and keep the draw if it is in the nucleus
    (one pass over the vocabulary, `_in_nucleus`), else draw again with the row's next number.
    A draw is accepted with probability mass(nucleus) >= top_p, so 128 rows at top-p 0.9 need
    about three rounds; finding the cutoff instead takes dozens of passes (or a sort of the
    vocabulary), which cost more than the model's step on CPU. Rows still rejected after
    `rounds` rounds draw from the nucleus found by bisection (`_nucleus_cutoff`)."""
    R = probs.shape[0]

    def round_(state):
        i, token, accepted = state
        draw = _inverse_cdf(probs, _uniform(keys, i))
        return i + 1, jnp.where(accepted, token, draw), accepted | _in_nucleus(probs, draw, top_p)

    _, token, accepted = jax.lax.while_loop(lambda s: (s[0] < rounds) & ~s[2].all(), round_,
                                            (jnp.int32(0), jnp.zeros((R,), jnp.int32), jnp.zeros((R,), bool)))

    def exact(token):  # every row's own next number, for the rows still rejected only
        nucleus = jnp.where(probs >= _nucleus_cutoff(probs, top_p), probs, 0)
        return jnp.where(accepted, token, _inverse_cdf(nucleus, _uniform(keys, rounds)))

    return jax.lax.cond(accepted.all(), lambda token: token, exact, token)


def _in_nucleus(probs: jax.Array, tokens: jax.Array, top_p: float) -> jax.Array:
    """[R] bool: token is kept by top-p, i.e. the mass of the tokens more probable than it is
    < top_p (the smallest set reaching top_p, the top token always in, ties kept together)."""
    p = jnp.take_along_axis(probs, tokens[:, None], -1)
    return jnp.sum(jnp.where(probs > p, probs, 0), -1) < top_p


def _nucleus_cutoff(probs: jax.Array, top_p: float) -> jax.Array:
    """[R, 1] the threshold of top-p: `probs >= it` is the set `_in_nucleus` keeps. Bisection on
    the threshold's float32 bit pattern (ordered like the values, for non-negative floats): the
    largest float whose tail mass still reaches top_p, exact after 31 steps."""
    bits = lambda x: jax.lax.bitcast_convert_type(x, jnp.int32)
    value = lambda i: jax.lax.bitcast_convert_type(i, jnp.float32)

    def step(_, bounds):  # invariant: tail mass at value(lo) reaches top_p, at value(hi) it does not
        lo, hi = bounds
        mid = lo + (hi - lo) // 2
        reaches = jnp.sum(jnp.where(probs >= value(mid), probs, 0), -1, keepdims=True) >= top_p
        return jnp.where(reaches, mid, lo), jnp.where(reaches, hi, mid)
    top = bits(probs.max(-1, keepdims=True)) + 1  # just above the largest probability: no mass
    lo, _ = jax.lax.fori_loop(0, 31, step, (jnp.zeros_like(top), top))
    return value(lo)


def _inverse_cdf(probs: jax.Array, u: jax.Array, block: int = 512) -> jax.Array:
    """[R] draws from probs [R, V] (rows of non-negative mass), one uniform u [R] in (0, 1]
    each: the first token of positive probability whose cumulative mass reaches u x the row's
    total. Two levels (blocks of `block` tokens, then the tokens of the chosen block): a
    cumulative sum over the whole vocabulary costs more than the model's step on CPU.
    Zero-probability tokens are never drawn, even where float rounding makes a cumulative sum
    step over them."""
    R, V = probs.shape
    blocks = jnp.pad(probs, ((0, 0), (0, -V % block))).reshape(R, -1, block)
    mass = blocks.sum(-1)  # [R, n_blocks]
    upto = jnp.cumsum(mass, -1)
    target = u * upto[:, -1]  # in (0, total]
    b = _first_reaching(upto, target, mass > 0)
    before = jnp.where(b > 0, jnp.take_along_axis(upto, jnp.maximum(b - 1, 0)[:, None], -1)[:, 0], 0.0)
    inner = jnp.take_along_axis(blocks, b[:, None, None], 1)[:, 0]  # [R, block]
    i = _first_reaching(jnp.cumsum(inner, -1), target - before, inner > 0)
    return (b * block + i).astype(jnp.int32)


def _first_reaching(cumulative: jax.Array, target: jax.Array, positive: jax.Array) -> jax.Array:
    """[R] the first index whose cumulative [R, n] reaches target [R] among those marked
    positive [R, n]; the last positive one if rounding leaves none reaching it."""
    reach = (cumulative >= target[:, None]) & positive
    last = jnp.max(jnp.arange(positive.shape[1]) * positive, -1)
    return jnp.where(reach.any(-1), jnp.argmax(reach, -1), last)


def _constrain(mesh: Mesh | None, state: _State) -> _State:
    """Shard every per-row array of the loop state over the mesh's data (and fsdp) axes."""
    if mesh is None:
        return state
    spec = sharding.rows_spec(mesh)
    rows = NamedSharding(mesh, spec)
    kv = NamedSharding(mesh, PartitionSpec(None, *spec))  # k, v: [L, R, ...]
    c = jax.lax.with_sharding_constraint
    cache = KVCache(c(state.cache.k, kv), c(state.cache.v, kv), c(state.cache.valid, rows))
    return _State(state.step, c(state.feed, rows), cache, c(state.done, rows), c(state.length, rows),
                  c(state.tokens, rows), c(state.logprobs, rows),
                  None if state.logits is None else c(state.logits, rows))


def encode_prompts(tok: Tokenizer, prompts, chat: bool) -> list[list[int]]:
    """Texts or id lists -> non-empty id lists. Chat prompts are rendered, then encoded without
    an extra BOS (the template writes its own, as Hugging Face's apply_chat_template does)."""
    if len(prompts) == 0:
        raise InputError("no prompts given")
    if all(isinstance(p, str) for p in prompts):
        if chat:
            plain = dataclasses.replace(tok, add_bos=False)
            ids = [plain.encode(tok.chat(p)) for p in prompts]
        else:
            ids = [tok.encode(p) for p in prompts]
    elif chat:
        raise InputError("chat=True needs text prompts, not token ids")
    elif any(isinstance(p, str) for p in prompts):
        raise InputError("prompts must be all texts or all token id lists")
    else:
        ids = [[int(i) for i in p] for p in prompts]
    empty = [i for i, p in enumerate(ids) if not p]
    if empty:
        raise InputError(f"prompts {empty} encode to no tokens; generation needs at least one")
    return ids


def _bucket(n: int) -> int:
    return BUCKET * math.ceil(n / BUCKET)


def _strip_stop(ids: np.ndarray, stop_ids: tuple[int, ...]) -> np.ndarray:
    return ids[:-1] if len(ids) and int(ids[-1]) in stop_ids else ids
