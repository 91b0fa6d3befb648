"""A loaded checkpoint (`Model`) and an ordered checkpoint series (`Series`)."""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Iterator

import jax

from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import forward
from jtrust.models.tokenizer import Tokenizer

# One compiled program per (config, static options, shapes): every checkpoint of a
# family and every intervention strength reuse it.
forward_jit = jax.jit(forward, static_argnames=("config", "capture", "upto_layer", "logits", "dtype"))


@dataclasses.dataclass(frozen=True)
class Model:
    """Parameters plus what is needed to use them. `params` is a pytree of arrays."""

    config: ModelConfig
    params: Any
    tokenizer: Tokenizer
    name: str  # what the user asked for, e.g. "smollm2" or a path
    checkpoint_hash: str  # content hash of the source files (keys caches and manifests)

    def apply(self, tokens, attention_mask, **kwargs):
        """`jtrust.models.decoder.forward` on this model's parameters (jitted)."""
        return forward_jit(self.params, tokens, attention_mask, config=self.config, **kwargs)

    def with_params(self, params, name: str | None = None, checkpoint_hash: str | None = None):
        return dataclasses.replace(self, params=params, name=name or self.name,
                                   checkpoint_hash=checkpoint_hash or self.checkpoint_hash)


@dataclasses.dataclass(frozen=True)
class Checkpoint:
    """One member of a series; its parameters are read only when `load` is called."""

    name: str  # e.g. "step1000"
    step: int | None
    load: Callable[[], Model]


@dataclasses.dataclass(frozen=True)
class Series:
    """Checkpoints of one architecture in training order; all share one compiled forward."""

    name: str
    checkpoints: tuple[Checkpoint, ...]

    def __len__(self) -> int:
        return len(self.checkpoints)

    def __iter__(self) -> Iterator[Model]:
        config = None
        for ckpt in self.checkpoints:
            model = ckpt.load()
            if config is not None and model.config != config:
                raise InputError(f"{self.name}: checkpoint {ckpt.name} has config {model.config} "
                                 f"but earlier ones have {config}; a series must share one architecture")
            config = model.config
            yield model

    @property
    def names(self) -> list[str]:
        return [c.name for c in self.checkpoints]
