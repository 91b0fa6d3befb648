"""Sharded parameters: logical axes per weight, mapped to mesh axes by a small rule table.

Every parameter of the decoder gets logical axes from its name and rank (`logical_axes`):

    embed/embedding          [vocab, embed]
    lm_head/kernel           [embed, vocab]
    blocks/attn/{q,k,v}      kernel [layers, embed, heads]   bias [layers, heads]
    blocks/attn/o            kernel [layers, heads, embed]   bias [layers, embed]
    blocks/mlp/{gate,up}     kernel [layers, embed, mlp]     bias [layers, mlp]
    blocks/mlp/down          kernel [layers, mlp, embed]     bias [layers, embed]
    norms, pos_embed         replicated

`RULES` maps them to the mesh axes ("data", "fsdp", "model"), in the style of MaxText's logical
axis rules: the model dimension (embed) over fsdp (ZeRO-3-like: each device holds a slice of every
weight, gathered when used), heads / mlp / vocab over model (Megatron-style tensor parallelism),
layers never split. A mesh axis that is absent or of size 1 leaves its dimensions whole; one that
does not divide a dimension is an InputError naming the parameter and the axis. XLA's partitioner
inserts the gathers and reductions, so a jitted function of the parameters runs unchanged on
sharded inputs and gives the one-device results: extraction, generation and attribution scoring
place parameters with `place_params` (the training loop still replicates its state).
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtrust.core.errors import InputError
from jtrust.runtime import distributed

MESH_AXES = ("data", "fsdp", "model")
RULES: dict[str, str | None] = dict(embed="fsdp", vocab="model", heads="model", mlp="model",
                                    layers=None, norm=None)

_KERNELS = dict(q=("embed", "heads"), k=("embed", "heads"), v=("embed", "heads"), o=("heads", "embed"),
                gate=("embed", "mlp"), up=("embed", "mlp"), down=("mlp", "embed"))


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """The logical axis of each dimension of the parameter at `path` (names from the root)."""
    stacked = path[0] == "blocks"  # blocks' parameters carry a leading [n_layers] axis
    lead = ("layers",) if stacked else ()
    name, leaf = path[-2] if len(path) > 1 else "", path[-1]
    if name == "embed":
        axes = ("vocab", "embed")
    elif name == "lm_head":
        axes = ("embed", "vocab")
    elif name in _KERNELS and leaf == "kernel":
        axes = _KERNELS[name]
    elif name in _KERNELS and leaf == "bias":
        axes = _KERNELS[name][1:]
    else:  # norms' scale and bias, learned positions: small, replicated
        axes = ("norm",) * (ndim - len(lead))
    axes = lead + axes
    if len(axes) != ndim:
        raise InputError(f"parameter {'/'.join(path)} has {ndim} dimensions; its layout expects {len(axes)} "
                         f"({', '.join(map(str, axes))}): a checkpoint of another layout")
    return axes


def check_mesh(mesh: Mesh) -> None:
    """InputError unless `mesh`'s axes are among MESH_AXES (and it has a 'data' axis)."""
    unknown = [a for a in mesh.axis_names if a not in MESH_AXES]
    if unknown or "data" not in mesh.axis_names:
        raise InputError(f"mesh axes {tuple(mesh.axis_names)}: use 'data' and optionally 'fsdp', 'model' "
                         f"(e.g. make_mesh(data=2, fsdp=4)); {'unknown ' + str(unknown) if unknown else 'no data axis'}")


def make_mesh(data: int = 1, fsdp: int = 1, model: int = 1, devices=None) -> Mesh:
    """A (data, fsdp, model) mesh over `devices` (default all, in `jax.devices()` order)."""
    devices = list(jax.devices() if devices is None else devices)
    sizes = dict(data=data, fsdp=fsdp, model=model)
    if any(not isinstance(n, int) or n < 1 for n in sizes.values()):
        raise InputError(f"mesh sizes must be positive integers, not {sizes}")
    need = data * fsdp * model
    if need > len(devices):
        raise InputError(f"a mesh of data={data} x fsdp={fsdp} x model={model} needs {need} devices; "
                         f"there are {len(devices)} (on CPU, XLA_FLAGS=--xla_force_host_platform_device_count=N "
                         "before JAX starts gives N)")
    return Mesh(np.array(devices[:need]).reshape(data, fsdp, model), MESH_AXES)  # the first `need` devices


def param_specs(params: Any, mesh: Mesh, rules: dict[str, str | None] = RULES) -> Any:
    """A PartitionSpec per parameter (same tree as `params`), checked against the shapes."""
    check_mesh(mesh)

    def spec(path, leaf):
        names = tuple(getattr(k, "key", getattr(k, "name", str(k))) for k in path)
        axes = logical_axes(names, len(leaf.shape))
        out = []
        for dim, axis in zip(leaf.shape, axes):
            mesh_axis = rules.get(axis)
            size = mesh.shape.get(mesh_axis, 1) if mesh_axis else 1
            if size == 1:
                out.append(None)
                continue
            if dim % size:
                raise InputError(f"parameter {'/'.join(names)} {tuple(leaf.shape)}: its {axis} dimension "
                                 f"({dim}) is not divisible by mesh axis '{mesh_axis}' of size {size}; choose a "
                                 f"'{mesh_axis}' size that divides {dim}, or 1")
            out.append(mesh_axis)
        return PartitionSpec(*out)

    return jax.tree_util.tree_map_with_path(spec, params)


def shard_params(params: Any, mesh: Mesh, rules: dict[str, str | None] = RULES) -> Any:
    """`params` laid out on `mesh` by the rules (each device holds only its slices).

    With several processes every process must hold the same parameter values; each copies only
    its own devices' slices (`jtrust.runtime.distributed.put`).
    """
    shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(params, mesh, rules), is_leaf=_is_spec)
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(params, shardings)
    return jax.tree.map(lambda x, s: distributed.put(np.asarray(x), s), params, shardings)


def place_params(params: Any, mesh: Mesh) -> Any:
    """Parameters for a computation on `mesh`: split by the rules when it has an fsdp or model
    axis larger than 1, else a full copy per device (`distributed.replicate`)."""
    return shard_params(params, mesh) if is_sharded_mesh(mesh) else distributed.replicate(params, mesh)


def is_sharded_mesh(mesh: Mesh) -> bool:
    """True when `mesh` splits parameters (an fsdp or model axis larger than 1)."""
    return any(mesh.shape.get(a, 1) > 1 for a in ("fsdp", "model"))


def per_device_bytes(params: Any, mesh: Mesh, rules: dict[str, str | None] = RULES) -> int:
    """Bytes of `params` (arrays or `jax.ShapeDtypeStruct`s) one device holds under the rules."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(param_specs(params, mesh, rules), is_leaf=_is_spec)):
        split = int(np.prod([mesh.shape[a] for a in spec if a is not None] or [1]))
        total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize // split
    return total


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)
