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
sharded inputs and gives the one-device results: extraction, generation, attribution scoring and
the training loop (parameters, gradients and optimizer state) place trees with `tree_shardings`.

Rows of a batch are split over 'data' and 'fsdp' together (`rows_spec`): fully sharded data
parallelism, each device computing its own rows with gathered weights. Any pytree may be placed:
leaves whose names are not decoder weights (LoRA adapters, a sparse autoencoder, a probe) are
replicated.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtrust.core.errors import InputError
from jtrust.models import decoder
from jtrust.runtime import distributed

MESH_AXES = ("data", "fsdp", "model")
RULES: dict[str, str | None] = dict(embed="fsdp", vocab="model", heads="model", mlp="model",
                                    layers=None, norm=None)

_KERNELS = dict(q=("embed", "heads"), k=("embed", "heads"), v=("embed", "heads"), o=("heads", "embed"),
                gate=("embed", "mlp"), up=("embed", "mlp"), down=("mlp", "embed"))


def logical_axes(path: tuple[str, ...], ndim: int) -> tuple[str | None, ...]:
    """The logical axis of each dimension of the parameter at `path` (names from the root)."""
    stacked = "blocks" in path  # blocks' parameters carry a leading [n_layers] axis (also nested, e.g. base/blocks)
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


def parse_mesh_sizes(text: str) -> dict[str, int]:
    """'data=2,fsdp=4' (a --mesh flag) -> {"data": 2, "fsdp": 4, "model": 1}; axes left out are 1."""
    sizes = dict(data=1, fsdp=1, model=1)
    for part in filter(None, (p.strip() for p in text.split(","))):
        axis, _, value = part.partition("=")
        if axis.strip() not in sizes or not value.strip().isdigit() or int(value) < 1:
            raise InputError(f"mesh {text!r}: write axis=size pairs over data, fsdp, model, e.g. "
                             "data=2,fsdp=4 (sizes positive integers)")
        sizes[axis.strip()] = int(value)
    return sizes


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


def tree_shardings(tree: Any, mesh: Mesh, rules: dict[str, str | None] = RULES) -> Any:
    """A NamedSharding per leaf of `tree` (same structure): decoder weights by the rules, others replicated."""
    return jax.tree.map(lambda s: NamedSharding(mesh, s), param_specs(tree, mesh, rules), is_leaf=_is_spec)


def shard_params(params: Any, mesh: Mesh, rules: dict[str, str | None] = RULES) -> Any:
    """`params` laid out on `mesh` by the rules (each device holds only its slices); with several
    processes as `jtrust.runtime.distributed.place`."""
    return distributed.place(params, tree_shardings(params, mesh, rules))


def keep_rows_split(mesh: Mesh | None):
    """A context for tracing a program on `mesh`: inside the scanned blocks every product's
    input keeps its rows split over data x fsdp, so XLA gathers each layer's weights (fully
    sharded data parallelism) instead of gathering the batch, and the backward pass
    reduce-scatters each layer's gradient to the weight's slices (without it, a 7B training step
    held every row's activations and a whole stacked gradient on each device). A no-op
    without fsdp / model axes."""
    if mesh is None or all(mesh.shape.get(a, 1) == 1 for a in ("fsdp", "model")):
        return decoder.constrain_inputs(None)
    rows = rows_spec(mesh)

    def constrain(x: jax.Array) -> jax.Array:
        return jax.lax.with_sharding_constraint(x, NamedSharding(mesh, PartitionSpec(*rows, *[None] * (x.ndim - 1))))

    return decoder.constrain_inputs(constrain)


def rows_spec(mesh: Mesh) -> PartitionSpec:
    """How a batch's leading (row) axis is split: over 'data' and, when present, 'fsdp'."""
    return PartitionSpec(tuple(a for a in ("data", "fsdp") if a in mesh.axis_names))


def row_groups(mesh: Mesh) -> int:
    """Into how many parts `rows_spec` splits the rows (a batch must be a multiple of it)."""
    return mesh.shape["data"] * mesh.shape.get("fsdp", 1)


def per_device_bytes(params: Any, mesh: Mesh, rules: dict[str, str | None] = RULES) -> int:
    """Bytes of `params` (arrays or `jax.ShapeDtypeStruct`s) one device holds under the rules."""
    total = 0
    for leaf, spec in zip(jax.tree.leaves(params), jax.tree.leaves(param_specs(params, mesh, rules), is_leaf=_is_spec)):
        split = int(np.prod([mesh.shape[a] for a in spec if a is not None] or [1]))
        total += int(np.prod(leaf.shape)) * np.dtype(leaf.dtype).itemsize // split
    return total


def _is_spec(x) -> bool:
    return isinstance(x, PartitionSpec)


def load_sharded(spec, mesh: Mesh, rules: dict[str, str | None] = RULES):
    """A checkpoint loaded straight into its shards on `mesh` (a `jtrust.Model`), each process
    reading only what its devices hold:

      a jtrust directory (`jtrust convert`)   orbax restores each device's slices from the stored
                                              chunks that overlap them (any family)
      a Hugging Face safetensors directory    the slices' byte ranges of each tensor (Llama family:
                                              Llama, Mistral, Qwen2, SmolLM2; `jtrust.io.slices`)
      anything else (GGUF, .bin)              read whole on every host, then split (`shard_params`)

    Every process of a multi-host run calls it with the same spec and mesh. The checkpoint hash
    of a sliced safetensors load covers the files' names, sizes and headers (reading every byte
    to hash it would defeat the purpose), so it differs from a whole load's.
    """
    from jtrust.io import hf, loading, slices
    from jtrust.models.model import Model

    check_mesh(mesh)

    def shardings(config):
        shapes = jax.eval_shape(lambda: decoder.init_params(config, jax.random.key(0)))
        return tree_shardings(shapes, mesh, rules)

    path, kind = loading.checkpoint_kind(spec)
    if kind == "jtrust":
        return loading.read_jtrust_dir(path, shardings)
    config = hf.read_hf_config(path) if kind == "hf" else None
    if config is not None and config.family == "llama" and any(
            (path / f).is_file() for f in ("model.safetensors", "model.safetensors.index.json")):
        reader = slices.SafetensorsSlices(path)
        params = slices.read_sharded_safetensors(path, config, shardings(config), reader)
        return Model(config, params, hf.read_hf_tokenizer(path), name=str(spec),
                     checkpoint_hash=slices.checkpoint_id(path, reader))
    if kind == "series":
        raise InputError(f"{path} is a series; load its checkpoints one at a time with load_sharded")
    model = loading.load(spec)
    return model.with_params(shard_params(model.params, mesh, rules))
