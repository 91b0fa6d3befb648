"""LoRA adapters as a transformation of the parameter pytree: W' = W + (alpha / r) A B.

The decoder never learns about adapters: `merge(params, adapters, config)` returns an ordinary
parameter pytree, so extraction, generation and every analysis run unchanged on an adapted
model, and a fine-tuning run's checkpoints load like any other. Adapters live beside the
stacked block kernels, one per projection and layer:
  adapters[name] = {"a": [L, d_in, r], "b": [L, r, d_out]}   (b starts at zero: W' = W at step 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp

from jtrust.core.errors import InputError

# projection name -> its path under params["blocks"]
PROJECTIONS = {"q": ("attn", "q"), "k": ("attn", "k"), "v": ("attn", "v"), "o": ("attn", "o"),
               "gate": ("mlp", "gate"), "up": ("mlp", "up"), "down": ("mlp", "down")}


@dataclasses.dataclass(frozen=True)
class LoraConfig:
    rank: int = 8
    alpha: float = 16.0
    targets: tuple[str, ...] = ("q", "v")

    def __post_init__(self):
        bad = set(self.targets) - set(PROJECTIONS)
        if bad or not self.targets:
            raise InputError(f"LoRA targets {sorted(bad) or '()'}: choose from {sorted(PROJECTIONS)}")
        if self.rank < 1:
            raise InputError(f"LoRA rank must be >= 1, not {self.rank}")

    @property
    def scale(self) -> float:
        return self.alpha / self.rank


def _kernel(params: Any, name: str) -> jax.Array:
    group, proj = PROJECTIONS[name]
    try:
        return params["blocks"][group][proj]["kernel"]
    except KeyError:
        raise InputError(f"this model has no '{name}' projection to adapt (blocks/{group}/{proj})") from None


def init_adapters(params: Any, config: LoraConfig, rng: jax.Array) -> dict[str, dict[str, jax.Array]]:
    """Adapters for every target projection: a ~ U(+-1/sqrt(d_in)) (PEFT's default), b = 0."""
    adapters = {}
    for name, key in zip(config.targets, jax.random.split(rng, len(config.targets))):
        L, d_in, d_out = _kernel(params, name).shape
        bound = 1.0 / d_in ** 0.5
        adapters[name] = {"a": jax.random.uniform(key, (L, d_in, config.rank), jnp.float32, -bound, bound),
                          "b": jnp.zeros((L, config.rank, d_out), jnp.float32)}
    return adapters


def merge(params: Any, adapters: dict[str, dict[str, jax.Array]], config: LoraConfig) -> Any:
    """params with W + scale * a @ b in place of every adapted kernel (a new pytree; pure)."""
    blocks = jax.tree.map(lambda x: x, params["blocks"])  # a copy of the containers, not the arrays
    for name, ab in adapters.items():
        group, proj = PROJECTIONS[name]
        w = blocks[group][proj]["kernel"]
        delta = jnp.einsum("ldr,lro->ldo", ab["a"], ab["b"]) * config.scale
        blocks[group][proj] = dict(blocks[group][proj], kernel=w + delta.astype(w.dtype))
    return dict(params, blocks=blocks)


def to_dict(config: LoraConfig) -> dict:
    return dict(dataclasses.asdict(config), targets=list(config.targets))


def from_dict(d: dict | None) -> LoraConfig | None:
    return None if d is None else LoraConfig(rank=d["rank"], alpha=d["alpha"], targets=tuple(d["targets"]))
