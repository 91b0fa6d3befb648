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


def save_params(directory: str | os.PathLike, params: Any) -> None:
    """Write a parameter pytree as an orbax checkpoint at `directory` (which must not exist)."""
    import orbax.checkpoint as ocp
    checkpointer = ocp.StandardCheckpointer()
    checkpointer.save(pathlib.Path(directory).absolute(), params)
    checkpointer.wait_until_finished()


def restore_params(params_dir: pathlib.Path, config: ModelConfig, config_path: pathlib.Path) -> Any:
    """Orbax parameters for `config`, committed to the first local device."""
    import orbax.checkpoint as ocp
    sharding = default_sharding()
    target = jax.tree.map(lambda s: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=sharding),
                          jax.eval_shape(lambda: init_params(config, jax.random.key(0))))
    try:
        return ocp.StandardCheckpointer().restore(pathlib.Path(params_dir).absolute(), target)
    except Exception as e:  # orbax raises many types; the user needs the path and the cause
        raise InputError(f"{params_dir}: cannot restore parameters for the config in "
                         f"{config_path} ({type(e).__name__}: {e})") from e
