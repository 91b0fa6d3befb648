"""Edits of activations at named sites, honoured by the decoder's pure `apply`.

An `Intervention` is a pytree: its arrays (one vector and one scale per layer)
are traced, its site / kind / position / function are static. A sweep over
strengths or layers therefore changes only arrays: `jax.vmap` or a Python loop
reuses one compiled program.

Sites are the entries of `jtrust.models.sites.SITES` (resid_pre, attn_in, attn_heads,
attn_out, mlp_in, mlp_hidden, mlp_out, resid_post); a site's vectors have that site's
width (`sites.width(site, config)`), e.g. d_ff for mlp_hidden.
"""

from __future__ import annotations

from typing import Any, Callable

import flax.struct
import jax
import jax.numpy as jnp

from jtrust.core.errors import InputError
from jtrust.models import sites as _sites

SITES = tuple(_sites.SITES)  # every site name, in block order (the registry is sites.SITES)
KINDS = ("add", "replace", "project_out", "splice")
POSITIONS = ("all", "last")


@flax.struct.dataclass
class Intervention:
    """One edit rule applied at `site` of every layer whose scale is non-zero.

    vectors: [n_layers, width]    what to add / write / project out per layer;
                                  width = sites.width(site, config), e.g. d_model.
    scales:  [n_layers]           strength per layer (0 = untouched layer).
    fn_params: pytree for `fn` (splice only), e.g. an autoencoder's weights.

    kind   add          x + s * v
           replace      (1 - s) * x + s * v
           project_out  x - s * (x . u) u,  u = v / |v|
           splice       x + s * (fn(fn_params, x) - x)
    position  "last" edits only the last non-pad token of each row (in
    generation: the last prompt token, then every new token); "all" edits
    every position.
    """

    vectors: jax.Array
    scales: jax.Array
    fn_params: Any = None
    site: str = flax.struct.field(pytree_node=False, default="resid_post")
    kind: str = flax.struct.field(pytree_node=False, default="add")
    position: str = flax.struct.field(pytree_node=False, default="last")
    fn: Callable | None = flax.struct.field(pytree_node=False, default=None)

    def __post_init__(self):
        _sites.check_site(self.site)
        if self.kind not in KINDS:
            raise InputError(f"unknown intervention kind {self.kind!r}; choose from {KINDS}")
        if self.position not in POSITIONS:
            raise InputError(f"unknown position {self.position!r}; choose from {POSITIONS}")
        if (self.kind == "splice") != (self.fn is not None):
            raise InputError("kind='splice' needs fn (and only splice takes fn)")


def at_layer(n_layers: int, layer: int, vector: jax.Array | None = None, strength: float = 1.0,
             **static) -> Intervention:
    """An intervention active at one layer, e.g. a steering vector alpha * v at block l."""
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} out of range for a {n_layers}-layer model")
    d = None if vector is None else jnp.asarray(vector, jnp.float32)
    if d is None:
        raise InputError("at_layer needs a vector (for splice pass any [width] array, e.g. zeros)")
    vectors = jnp.zeros((n_layers, d.shape[-1]), jnp.float32).at[layer].set(d)
    scales = jnp.zeros((n_layers,), jnp.float32).at[layer].set(strength)
    return Intervention(vectors=vectors, scales=scales, **static)


def edit(x: jax.Array, layer: jax.Array, site: str, interventions: tuple[Intervention, ...],
         last_position: jax.Array) -> jax.Array:
    """Apply every intervention registered at `site` to x [B, T, width] in block `layer`.

    last_position: [B, T] bool, true at the token a "last"-position edit touches.
    """
    for iv in interventions:
        if iv.site != site:
            continue
        if iv.vectors.shape[-1] != x.shape[-1]:  # caught here: broadcasting would hide it or fail opaquely
            raise InputError(f"intervention at {site!r} has vectors of width {iv.vectors.shape[-1]} "
                             f"but the site's activations have width {x.shape[-1]}")
        v = iv.vectors[layer].astype(x.dtype)
        s = iv.scales[layer].astype(x.dtype)
        if iv.kind == "add":
            delta = s * v
        elif iv.kind == "replace":
            delta = s * (v - x)
        elif iv.kind == "project_out":
            u = v / jnp.maximum(jnp.linalg.norm(v), 1e-12)
            delta = -s * (x @ u)[..., None] * u
        else:  # splice: skip the function entirely on layers it is not meant for
            delta = jax.lax.cond(s != 0, lambda: s * (iv.fn(iv.fn_params, x).astype(x.dtype) - x),
                                 lambda: jnp.zeros_like(x))
        if iv.position == "last":
            delta = jnp.where(last_position[..., None], delta, 0)
        x = x + delta
    return x
