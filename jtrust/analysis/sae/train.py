"""Train several sparse autoencoders of one width in one compiled program.

`train_saes(activations [L, N, d], config, train_config, out_dir, seeds=(0,))` trains
S = L x len(seeds) SAEs (layer-major: SAE s = layer s // n_seeds, seed s % n_seeds) through the
generic loop (`jtrust.training.fit`): one step draws the same token rows of every layer, vmaps
the architecture's forward over the SAE axis and sums the SAEs' mean per-token losses. The sum
keeps their gradients apart and Adam is elementwise, so with gradient clipping off (the default
here, as the paper's plain Adam) each SAE trains exactly as it would alone. The run resumes
after a kill and keeps checkpoints like any other (`out_dir`).
"""

from __future__ import annotations

import dataclasses
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
        return jax.tree.map(lambda a: a[s], self.params)


def sae_train_config(steps: int, batch_size: int = 4096, learning_rate: float = 1e-3, **kw) -> TrainConfig:
    """The paper's optimizer (Adam, constant lr 1e-3, no clipping, no decay) for `steps` steps."""
    kw = dict(dict(schedule="constant", b1=0.9, b2=0.999, grad_clip=0.0, log_every=max(steps // 20, 1)), **kw)
    return TrainConfig(steps=steps, batch_size=batch_size, learning_rate=learning_rate, **kw)


def init_stack(config: SAEConfig, n_layers: int, seeds: Sequence[int]) -> dict:
    """[S, ...] parameters, SAE (layer l, seed j) initialised from key(seed_j) folded with l."""
    keys = [jax.random.fold_in(jax.random.key(seed), layer) for layer in range(n_layers) for seed in seeds]
    return jax.vmap(lambda k: arch.init(k, config))(jnp.stack(keys))


def sae_loss(config: SAEConfig, n_seeds: int):
    """The loop's loss_fn: batch [micro, L, d] -> (summed per-SAE token losses, tokens, metrics)."""

    def loss_fn(trainable, frozen, batch):
        x = jnp.repeat(jnp.swapaxes(batch, 0, 1), n_seeds, axis=0)  # [S, micro, d]
        out = jax.vmap(lambda p, xs: arch.forward(p, xs, config))(trainable, x)
        per_token = out.reconstruction_loss + out.sparsity_loss + out.aux_loss  # [S, micro]
        n = jnp.float32(batch.shape[0])
        fired = out.latents > 0
        min_kept = jnp.min(jnp.where(fired, out.latents, jnp.inf), axis=(1, 2))
        metrics = {"reconstruction": jnp.mean(out.reconstruction_loss),
                   "sparsity": jnp.mean(out.sparsity_loss), "aux": jnp.mean(out.aux_loss),
                   "l0": jnp.mean(jnp.sum(fired, axis=-1)),
                   "fired": jnp.any(fired, axis=1).astype(jnp.float32),  # [S, F]: to post_update
                   "min_kept": jnp.where(jnp.isfinite(min_kept), min_kept, 0.0)}  # [S]
        return jnp.sum(per_token), n * jnp.ones(()), metrics

    return loss_fn


def train_saes(activations: np.ndarray, config: SAEConfig, train_config: TrainConfig,
               out_dir: str | os.PathLike, *, seeds: Sequence[int] = (0,), progress: bool = True,
               stop_after: int | None = None, name: str = "") -> SAERun:
    """Train L x len(seeds) SAEs on activations [L, N, d] (token rows of L sites or layers,
    e.g. `Activations.get(site, layer)` stacked); see the module docstring.

    train_config.batch_size is tokens per step (the same rows of every layer)."""
    activations = np.asarray(activations) if not isinstance(activations, np.ndarray) else activations
    if activations.ndim != 3:
        raise InputError(f"activations must be [layers, tokens, d], got shape {activations.shape}")
    if activations.shape[2] != config.d_in:
        raise InputError(f"the activations have width {activations.shape[2]} but the SAEs' d_in is {config.d_in}")
    n_layers, n_tokens, _ = activations.shape
    if n_tokens < train_config.batch_size:
        raise InputError(f"{n_tokens} token rows are fewer than one batch of {train_config.batch_size}")
    if not np.all(np.isfinite(activations[:, : min(n_tokens, 4096)])):
        raise InputError("the activations contain NaN or infinity")
    seeds = tuple(int(s) for s in seeds)
    if not seeds:
        raise InputError("give at least one seed")
    manifest = {"kind": "sae", "name": name, "sae_config": config.to_dict(), "seeds": list(seeds),
                "activations_shape": list(activations.shape),
                "activations_sha256": store.arrays_hash([activations])}
    micro = train_config.batch_size // train_config.accumulation

    def batches(step: int) -> np.ndarray:
        rows = np.sort(batch_indices(n_tokens, train_config.batch_size, step, train_config.seed))
        x = np.asarray(activations[:, rows], np.float32).swapaxes(0, 1)  # [B, L, d]
        return x.reshape(train_config.accumulation, micro, n_layers, config.d_in)

    def post_update(params, arrays):
        fired = jnp.max(arrays["fired"], axis=0) > 0  # [S, F]: fired in any micro-batch
        min_kept = jnp.mean(arrays["min_kept"], axis=0)  # [S]
        return jax.vmap(lambda p, f, m: arch.post_update(p, f, train_config.batch_size, m, config))(
            params, fired, min_kept)

    params = init_stack(config, n_layers, seeds)
    params = jax.vmap(lambda p: arch.post_update(p, jnp.ones(config.width, bool), 0, jnp.zeros(()), config))(params)
    result = fit(sae_loss(config, len(seeds)), params, batches, train_config, out_dir, manifest=manifest,
                 items_per_step=("tokens", train_config.batch_size), progress=progress,
                 stop_after=stop_after, post_update=post_update)
    return SAERun(result.state.trainable, config, n_layers, seeds, result.run_dir, result.metrics)
