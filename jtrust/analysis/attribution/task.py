"""What is attributed: the parameter subset, the training loss and the query measurement.

A `Task` states the model-specific parts once:
  loss(logits [B, T, V], batch: Examples) -> [B]      the training loss of each row
  measure(logits [B, T, V], batch: Examples) -> [B]   the measurement of each query row
Both default to the row's weighted next-token NLL (for rows built by
`jtrust.training.prompt_answer_examples`: the NLL of the answer), so a score
g_query^T H^-1 g_train > 0 means the training row made the query's answer more likely.

The parameters are `Modules`: linear kernels chosen by projection name (q, k, v, o, gate, up,
down) and layer, taken from the model's full (LoRA-merged) parameters, so every checkpoint of a
fine-tuning series and its base model are scored on the same coordinates; or every parameter of
the model (`modules=None`, for the matrix-free methods). Two ways to get per-example gradients:
  module_io     one forward/backward of a batch with output taps: per module and row the inputs
                a [T, d_in] and output gradients g [T, d_out]; the row's kernel gradient is
                a^T g (what K-FAC, EK-FAC and the ghost inner products need)
  flat_grads    `vmap(grad)` of the row loss over the subset, raveled to [B, D] (any subset)
They agree (tests/analysis/attribution); the first is the fast path.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
from jax.flatten_util import ravel_pytree

from jtrust.core.errors import InputError
from jtrust.models import sites
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import Capture, forward, zero_taps
from jtrust.models.lora import PROJECTIONS
from jtrust.training.lm import Examples

RowFn = Callable[[jax.Array, Examples], jax.Array]  # (logits [B, T, V], batch) -> [B]


def row_nll(logits: jax.Array, batch: Examples) -> jax.Array:
    """Weighted next-token NLL summed over each row: [B] (float32)."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, batch.targets[..., None].astype(jnp.int32), axis=-1)[..., 0]
    return jnp.sum(nll * batch.weights.astype(jnp.float32), axis=-1)


@dataclasses.dataclass(frozen=True)
class Modules:
    """Linear kernels `names` in `layers` (None: every layer). A module is one (name, layer)."""

    names: tuple[str, ...] = ("down",)
    layers: tuple[int, ...] | None = None

    def check(self, config: ModelConfig) -> tuple[int, ...]:
        """The layers, checked against `config`; raises InputError naming what to change."""
        if not self.names:
            raise InputError("no modules named: give projection names, e.g. ('q', 'v')")
        for name in self.names:
            sites.linear_width(name, config)  # raises for a projection this family lacks
        layers = tuple(range(config.n_layers)) if self.layers is None else tuple(self.layers)
        bad = [l for l in layers if not 0 <= l < config.n_layers]
        if bad or not layers or len(set(layers)) != len(layers):
            raise InputError(f"module layers {list(layers)} must be distinct layers of the model's "
                             f"{config.n_layers} (0..{config.n_layers - 1})")
        return layers

    def key(self) -> str:
        layers = "all" if self.layers is None else "-".join(map(str, self.layers))
        return f"{'+'.join(self.names)}@{layers}"


@dataclasses.dataclass(frozen=True)
class Task:
    modules: Modules | None = Modules()
    loss: RowFn = row_nll
    measure: RowFn = row_nll


# ---------------------------------------------------------------------------------------------
# the parameter subset as a pytree

def split(params: Any, task: Task, config: ModelConfig) -> Any:
    """The subset's parameters: {name: [n_layers_chosen, d_in, d_out]}, or all of `params`."""
    if task.modules is None:
        return params
    layers = jnp.asarray(task.modules.check(config))
    out = {}
    for name in task.modules.names:
        group, proj = PROJECTIONS[name]
        out[name] = params["blocks"][group][proj]["kernel"][layers]
    return out


def merge(subset: Any, params: Any, task: Task, config: ModelConfig) -> Any:
    """`params` with the subset's parameters put back (pure; the inverse of `split`)."""
    if task.modules is None:
        return subset
    layers = jnp.asarray(task.modules.check(config))
    blocks = jax.tree.map(lambda x: x, params["blocks"])  # copy the containers, not the arrays
    for name, kernel in subset.items():
        group, proj = PROJECTIONS[name]
        full = jnp.asarray(blocks[group][proj]["kernel"])
        blocks[group][proj] = dict(blocks[group][proj], kernel=full.at[layers].set(kernel.astype(full.dtype)))
    return dict(params, blocks=blocks)


# ---------------------------------------------------------------------------------------------
# per-example gradients

def module_io(params: Any, batch: Examples, *, config: ModelConfig, task: Task, fn: str = "loss",
              ) -> dict[str, tuple[jax.Array, jax.Array]]:
    """Per module inputs and output gradients of each row's `fn` ("loss" or "measure").

    batch: Examples [B, T]. Returns name -> (a [B, l, T, d_in], g [B, l, T, d_out]) for the
    l = len(layers) chosen layers; row b's gradient of kernel (name, layer j) is a[b, j]^T g[b, j].
    """
    if task.modules is None:
        raise InputError("module inputs and gradients need modules (kernels by name and layer)")
    layers = jnp.asarray(task.modules.check(config))
    row_fn = getattr(task, fn)
    B, T = batch.tokens.shape
    batch = Examples(*(jnp.asarray(x) for x in batch))
    taps = zero_taps(config, B, T, task.modules.names)
    capture = Capture(tuple(sorted({sites.LINEAR_INPUTS[n] for n in task.modules.names})), "all")

    def total(taps):
        out = forward(params, batch.tokens, batch.mask, config=config, capture=capture, taps=taps)
        return jnp.sum(row_fn(out.logits, batch)), out.captures  # rows are independent: per-row grads

    grads, captures = jax.grad(total, has_aux=True)(taps)
    io = {}
    for name in task.modules.names:
        # padding inputs are zeroed: they carry no gradient and do not count in covariances
        a = captures[sites.LINEAR_INPUTS[name]][layers] * batch.mask[None, :, :, None]  # [l, B, T, d_in]
        g = grads[name][layers]  # [l, B, T, d_out]
        io[name] = (jnp.swapaxes(a, 0, 1), jnp.swapaxes(g, 0, 1))
    return io


def flat_grads(params: Any, batch: Examples, *, config: ModelConfig, task: Task, fn: str = "loss",
               ) -> jax.Array:
    """Per-row gradients of `fn` over the subset, `vmap(grad)` and raveled: [B, D] float32."""
    row_fn = getattr(task, fn)
    subset = split(params, task, config)

    def one(sub, row: Examples):
        row = Examples(*(x[None] for x in row))
        logits = forward(merge(sub, params, task, config), row.tokens, row.mask, config=config).logits
        return row_fn(logits, row)[0]

    grads = jax.vmap(jax.grad(one), in_axes=(None, 0))(subset, batch)
    return jax.vmap(lambda g: ravel_pytree(g)[0])(grads).astype(jnp.float32)


def ravel_subset(params: Any, task: Task, config: ModelConfig) -> tuple[jax.Array, Callable]:
    """(the subset raveled [D], unravel: [D] -> params with the subset replaced)."""
    flat, unravel = ravel_pytree(split(params, task, config))
    return flat, lambda v: merge(unravel(v), params, task, config)


def module_grads(io: dict[str, tuple[jax.Array, jax.Array]]) -> dict[str, jax.Array]:
    """Per-row kernel gradients from `module_io`: name -> [B, l, d_in, d_out] (sum over tokens)."""
    return {n: jnp.einsum("bjti,bjto->bjio", a, g, precision=jax.lax.Precision.HIGHEST)
            for n, (a, g) in io.items()}
