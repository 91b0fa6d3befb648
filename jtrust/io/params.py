"""Model parameters on disk (orbax) and where loaded parameters live."""

from __future__ import annotations

import os
import pathlib
from typing import Any

import jax

from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import init_params


def default_sharding() -> jax.sharding.Sharding:
    # local: with several processes, jax.devices()[0] belongs to process 0 only
    return jax.sharding.SingleDeviceSharding(jax.local_devices()[0])


# stored chunks of at most this size, so a process restoring a shard reads about its share
CHUNK_BYTES = 4 << 20


def save_params(directory: str | os.PathLike, params: Any) -> None:
    """Write a parameter pytree as an orbax checkpoint at `directory` (which must not exist),
    each array stored in chunks of at most CHUNK_BYTES (split along its largest dimensions)."""
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    save_args = jax.tree.map(lambda _: ocp.SaveArgs(chunk_byte_size=CHUNK_BYTES), params)
    checkpointer.save(pathlib.Path(directory).absolute(), params, save_args=save_args)
    checkpointer.wait_until_finished()


def restore_params(params_dir: pathlib.Path, config: ModelConfig, config_path: pathlib.Path,
                   shardings: Any = None) -> Any:
    """Orbax parameters for `config`, committed to the first local device, or laid out by
    `shardings` (a tree of Shardings like the parameters'): then each process reads only the
    stored chunks that overlap its own devices' slices."""
    import orbax.checkpoint as ocp
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    if shardings is None:
        shardings = jax.tree.map(lambda _: default_sharding(), shapes)
    target = jax.tree.map(lambda s, sharding: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          shapes, shardings)
    try:
        return ocp.StandardCheckpointer().restore(pathlib.Path(params_dir).absolute(), target)
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise InputError(f"{params_dir}: cannot restore parameters for the config in "
                         f"{config_path} ({type(e).__name__}: {e})") from e
