"""Train several sparse autoencoders of one width in one compiled program.

`train_saes(activations, config, train_config, out_dir, seeds=(0,))` trains S = L x len(seeds)
SAEs (layer-major: SAE s = layer s // n_seeds, seed s % n_seeds) on L sites' token rows through
the generic loop (`jtrust.training.fit`): one step draws the same token rows of every layer,
vmaps the architecture's forward over the SAE axis and sums the SAEs' mean per-token losses. The
sum keeps their gradients apart and Adam is elementwise, so with gradient clipping off (the
default here, as the paper's plain Adam) each SAE trains exactly as it would alone (tested).
The run resumes after a kill and keeps checkpoints like any other (`out_dir`).

The activations are [L, N, d] or a list of L arrays [N, d] (memory-mapped ones are read a
batch at a time), e.g. token rows from extraction with pool="all":

    acts = jtrust.extract(model, texts, sites=("mlp_out",), layers=[3, 5], pool="all", out_dir=...)
    run = train_saes([acts.get("mlp_out", l) for l in (3, 5)], config, sae_train_config(2000), "runs/sae")
"""

from __future__ import annotations

import functools
import os
import pathlib
from typing import NamedTuple, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from jtrust.analysis.sae import architectures as arch
from jtrust.analysis.sae.architectures import SAEConfig
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.training.loop import TrainConfig, batch_indices, fit


class SAERun(NamedTuple):
    params: dict  # every leaf [S, ...]: the S SAEs stacked
    config: SAEConfig
    layers: int  # L
    seeds: tuple[int, ...]
    run_dir: pathlib.Path
    metrics: list[dict]

    def one(self, layer_index: int, seed_index: int = 0) -> dict:
        """The parameters of one SAE (unstacked)."""
        s = layer_index * len(self.seeds) + seed_index
        return jax.tree.map(lambda a: jnp.asarray(np.asarray(a)[s]), self.params)  # on the host: no compile per leaf


def sae_train_config(steps: int, batch_size: int = 4096, learning_rate: float = 1e-3, **kw) -> TrainConfig:
    """The paper's optimizer (Adam, constant lr 1e-3, no clipping, no decay) for `steps` steps."""
    kw = dict(dict(schedule="constant", b1=0.9, b2=0.999, grad_clip=0.0, log_every=max(steps // 20, 1)), **kw)
    return TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, **kw)


def init_stack(config: SAEConfig, n_layers: int, seeds: Sequence[int]) -> dict:
    """[S, ...] parameters, SAE (layer l, seed j) initialised from key(seed_j) folded with l."""
    pairs = np.array([(seed, layer) for layer in range(n_layers) for seed in seeds], np.uint32).reshape(-1, 2)
    return _init_stack(config, pairs)


@functools.partial(jax.jit, static_argnums=(0,))
def _init_stack(config: SAEConfig, pairs: jax.Array) -> dict:
    keys = jax.vmap(lambda p: jax.random.fold_in(jax.random.key(p[0]), p[1]))(pairs)
    return _fresh(jax.vmap(lambda k: arch.init(k, config))(keys), config)


@functools.partial(jax.jit, static_argnums=(1,))
def _fresh(params: dict, config: SAEConfig) -> dict:
    """Stacked parameters ready to train: unit-norm dictionary rows (as the authors' first
    forward), every latent counted as just fired."""
    return jax.vmap(lambda p: arch.post_update(p, jnp.ones(config.width, bool), 0, jnp.zeros(()), config))(params)


def sae_loss(config: SAEConfig, n_seeds: int):
    """The loop's loss_fn: batch [micro, L, d] -> (summed per-SAE token losses, tokens, metrics)."""
    counts_fires = config.architecture in ("topk", "batchtopk")  # AuxK: tokens since each latent fired

    def loss_fn(trainable, frozen, batch):
        x = jnp.repeat(jnp.swapaxes(batch, 0, 1), n_seeds, axis=0)  # [S, micro, d]
        any_dead = (jnp.any(trainable["tokens_since_fired"] >= config.dead_tokens)
                    if counts_fires else None)  # one flag for the stack: AuxK's matmuls skipped while none is dead
        out = jax.vmap(lambda p, xs: arch.forward(p, xs, config, any_dead=any_dead))(trainable, x)
        per_token = out.reconstruction_loss + out.sparsity_loss + out.aux_loss  # [S, micro]
        n = jnp.float32(batch.shape[0])
        fired = out.latents > 0
        metrics = {"reconstruction": jnp.mean(out.reconstruction_loss),
                   "sparsity": jnp.mean(out.sparsity_loss), "aux": jnp.mean(out.aux_loss),
                   "l0": jnp.mean(jnp.sum(fired, axis=-1))}
        if counts_fires:  # [S, F]: to post_update (the others need no pass over the latents)
            metrics["fired"] = jnp.any(fired, axis=1).astype(jnp.float32)
        if config.architecture == "batchtopk":
            min_kept = jnp.min(jnp.where(fired, out.latents, jnp.inf), axis=(1, 2))
            metrics["min_kept"] = jnp.where(jnp.isfinite(min_kept), min_kept, 0.0)  # [S]
        return jnp.sum(per_token), n * jnp.ones(()), metrics

    return loss_fn


def train_saes(activations: np.ndarray | Sequence[np.ndarray], config: SAEConfig, train_config: TrainConfig,
               out_dir: str | os.PathLike, *, seeds: Sequence[int] = (0,), init_params: dict | None = None,
               progress: bool = True, stop_after: int | None = None, name: str = "") -> SAERun:
    """Train L x len(seeds) SAEs on activations [L, N, d] or a list of L arrays [N, d] (token
    rows of L sites or layers, the same tokens in each); see the module docstring.

    train_config.batch_size is tokens per step (the same rows of every layer).
    init_params: stacked [S, ...] starting parameters (default `init_stack`), e.g. to train
      SAEs from a given dictionary; dictionary rows are renormalized and fire counts reset."""
    layers = _layers(activations, config)
    n_layers, n_tokens = len(layers), len(layers[0])
    if n_tokens < train_config.batch_size:
        raise InputError(f"{n_tokens} token rows are fewer than one batch of {train_config.batch_size}")
    seeds = tuple(int(s) for s in seeds)
    if not seeds or not all(0 <= s < 2 ** 32 for s in seeds):
        raise InputError(f"seeds must be one or more integers in 0..2**32 - 1, got {seeds}")
    params = init_stack(config, n_layers, seeds) if init_params is None else _check_init(init_params, config,
                                                                                          n_layers * len(seeds))
    # hashed 65536 rows at a time: the same digest as whole arrays, without copying a memory map whole
    blocks = (a[i:i + 65536] for a in layers for i in range(0, n_tokens, 65536))
    manifest = {"kind": "sae", "name": name, "sae_config": config.to_dict(), "seeds": list(seeds),
                "activations_shape": [n_layers, n_tokens, config.d_in],
                "activations_sha256": store.arrays_hash(blocks),
                "init_sha256": None if init_params is None else store.arrays_hash(
                    np.asarray(a) for a in jax.tree.leaves(params))}
    micro = train_config.batch_size // train_config.accumulation

    def batches(step: int) -> np.ndarray:
        # sorted rows: contiguous reads from memory-mapped arrays; the order within a step is irrelevant
        rows = np.sort(batch_indices(n_tokens, train_config.batch_size, step, train_config.seed))
        x = np.stack([np.asarray(a[rows], np.float32) for a in layers], axis=1)  # [B, L, d]
        return x.reshape(train_config.accumulation, micro, n_layers, config.d_in)

    def post_update(params, arrays):
        fired = jnp.max(arrays["fired"], axis=0) > 0 if "fired" in arrays else None  # [S, F]: in any micro-batch
        min_kept = jnp.mean(arrays["min_kept"], axis=0) if "min_kept" in arrays else None  # [S]
        return jax.vmap(lambda p, f, m: arch.post_update(p, f, train_config.batch_size, m, config))(
            params, fired, min_kept)

    result = fit(sae_loss(config, len(seeds)), params, batches, train_config, out_dir, manifest=manifest,
                 items_per_step=("tokens", train_config.batch_size), progress=progress,
                 stop_after=stop_after, post_update=post_update)
    return SAERun(result.state.trainable, config, n_layers, seeds, result.run_dir, result.metrics)


def _layers(activations, config: SAEConfig) -> list[np.ndarray]:
    """The L arrays [N, d] of [L, N, d] or of a list, checked (shape, width, finite)."""
    if isinstance(activations, np.ndarray) or hasattr(activations, "shape"):
        activations = np.asarray(activations) if not isinstance(activations, np.ndarray) else activations
        if activations.ndim != 3:
            raise InputError(f"activations must be [layers, tokens, d] or a list of [tokens, d], "
                             f"got shape {activations.shape}")
        layers = list(activations)
    else:
        layers = [a if isinstance(a, np.ndarray) else np.asarray(a) for a in activations]
    if not layers:
        raise InputError("no activations given: pass [layers, tokens, d] or a list of [tokens, d]")
    for i, a in enumerate(layers):
        if a.ndim != 2 or a.shape[0] != layers[0].shape[0]:
            raise InputError(f"activations {i} have shape {a.shape}; every layer needs [tokens, d] with the "
                             f"same tokens ({layers[0].shape[0]} rows in the first)")
        if a.shape[1] != config.d_in:
            raise InputError(f"the activations have width {a.shape[1]} but the SAEs' d_in is {config.d_in}")
        if not np.all(np.isfinite(a[: min(len(a), 4096)])):  # a cheap look: the head of each layer
            raise InputError(f"activations {i} contain NaN or infinity")
    return layers


def _check_init(params: dict, config: SAEConfig, n_saes: int) -> dict:
    """init_params against the architecture's layout, stacked over n_saes SAEs."""
    want = jax.eval_shape(lambda: init_stack(config, 1, (0,)))
    got = {k: np.shape(v) for k, v in params.items()}
    expected = {k: (n_saes,) + v.shape[1:] for k, v in want.items()}
    if got != expected:
        raise InputError(f"init_params should have the shapes {expected} (S = {n_saes} SAEs), got {got}")
    return _fresh(jax.tree.map(lambda a: jnp.asarray(a, jnp.float32), params), config)
