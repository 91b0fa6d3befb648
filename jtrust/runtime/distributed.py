"""Multi-process runs (several hosts, e.g. a TPU pod slice): one process per host, one mesh
over the devices of every process.

    jtrust.distributed.initialize()          # in every process, before any other JAX call
    mesh = jtrust.distributed.data_mesh()    # all devices of all processes on a 'data' axis
    acts = jtrust.extract(model, texts, mesh=mesh)   # the same call, with the same texts, everywhere

Every process runs the same program on the same host data: `put` keeps, of a host array
that every process holds, only the slices this process's devices need; `to_host` gathers a
global array back into full numpy arrays on every process. Both must be called by every
process, in the same order (they may run collectives). With one process they reduce to
`jax.device_put` and `np.asarray`.
"""

from __future__ import annotations

from typing import Any

import jax
import numpy as np
from jax.experimental import multihost_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec, Sharding


def initialize(coordinator_address: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """Join this process to the run: `jax.distributed.initialize`, called before any other JAX use.

    On TPU pods (and SLURM, Open MPI) the arguments are detected; elsewhere give all three,
    e.g. initialize("10.0.0.1:1234", 2, i) in process i of 2 (process 0 hosts the coordinator).
    """
    if jax.config.jax_cpu_collectives_implementation is None:
        # CPU devices of different processes need a collectives backend (jax 0.10 defaults to gloo)
        jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=coordinator_address,
                               num_processes=num_processes, process_id=process_id)


def data_mesh() -> Mesh:
    """A one-axis mesh ('data') over every device of every process, in `jax.devices()` order."""
    return Mesh(np.array(jax.devices()), ("data",))


def put(tree: Any, sharding: Sharding) -> Any:
    """Host arrays -> global arrays laid out by `sharding` (same shapes, [*shape] per leaf).

    Every process must pass the same values (e.g. the same batch): each one copies only the
    slices its own devices hold, without communication.
    """
    if sharding.is_fully_addressable:  # one process: a plain copy to the devices
        return jax.device_put(tree, sharding)
    return jax.tree.map(lambda x: _from_host(np.asarray(x), sharding), tree)


def replicate(tree: Any, mesh: Mesh) -> Any:
    """Parameters (any pytree of arrays) -> a full copy on every device of `mesh` (`place`)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    return place(tree, jax.tree.map(lambda _: replicated, tree))


def place(tree: Any, shardings: Any) -> Any:
    """Arrays (any pytree) -> global arrays laid out by `shardings` (a matching tree of Shardings).

    Leaves already laid out so are kept, so placing once and reusing the result
    (`model.with_params(replicate(model.params, mesh))`) saves a copy per call. With several
    processes, numpy leaves must be equal on every process and are copied without
    communication; other jax.Array leaves are taken from process 0 (one broadcast each), where
    they must be readable, because they may sit on a device of process 0 only (`jtrust.load`
    commits parameters to `jax.devices()[0]`, which belongs to process 0).
    """
    if all(s.is_fully_addressable for s in jax.tree.leaves(shardings)):
        return jax.device_put(tree, shardings)

    def leaf(x, sharding):
        if getattr(x, "sharding", None) == sharding:
            return x
        if isinstance(x, jax.Array):
            x = _from_process_0(x)
        return _from_host(np.asarray(x), sharding)

    return jax.tree.map(leaf, tree, shardings)


def to_host(tree: Any) -> Any:
    """Global arrays -> numpy arrays of the full global shape on every process.

    A collective when an array spans other processes' devices: every process must call it.
    """
    def leaf(x):
        if x.is_fully_addressable:
            return np.asarray(x)
        return multihost_utils.process_allgather(x, tiled=True)

    return jax.tree.map(leaf, tree)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier `name` (no-op with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def broadcast_from_process_0(x: np.ndarray) -> np.ndarray:
    """Process 0's value of x (same shape and dtype on every process), on every process."""
    if jax.process_count() == 1:
        return x
    return multihost_utils.broadcast_one_to_all(x)


def _from_host(host: np.ndarray, sharding: Sharding) -> jax.Array:
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def _from_process_0(x: jax.Array) -> np.ndarray:
    """x's value on process 0, as numpy on every process (others may hold no data of x)."""
    mine = jax.process_index() == 0
    local = np.asarray(x) if mine else np.zeros(x.shape, x.dtype)  # zeros: the broadcast sums
    return broadcast_from_process_0(local)
