"""Loading straight into shards: each process reads only the slices its devices hold.

    params = read_sharded_safetensors(path, config, shardings)   # a Hugging Face directory
    params = restore_params(path / "params", config, ..., shardings)   # a jtrust (orbax) directory

A `.safetensors` file is a JSON header (name -> dtype, shape, byte offsets) followed by each
tensor's row-major bytes, so any slice of a tensor is a set of byte ranges: whole rows when the
slice keeps every column (one read), else one read per row. `SafetensorsSlices` reads those
ranges with `os.pread` and counts the bytes. For a Llama-family checkpoint every jtrust weight
is a (stacked) slice of the Hugging Face tensors, possibly transposed (`jtrust.io.convert`'s
table), so `read_sharded_safetensors` fills each device's shard of each parameter
(`jax.make_array_from_callback`) from its layers' slices, and never holds the whole model on a
host. Other families fuse q, k and v in one tensor: convert them once (`jtrust convert`) and
load the jtrust directory, which orbax restores shard by shard.
"""

from __future__ import annotations

import hashlib
import json
import os
import pathlib
import struct
from typing import Any

import jax
import ml_dtypes
import numpy as np

from jtrust.core.errors import InputError, MissingInput
from jtrust.io.convert import T, TABLES, normalise_names, tree_get, tree_set
from jtrust.io.hf import index_shards
from jtrust.io.raw import check_finite
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import init_params

DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": ml_dtypes.bfloat16, "F64": np.float64}


class SafetensorsSlices:
    """The tensors of a Hugging Face directory's safetensors files, read by slice.

    `bytes_read` counts the tensor bytes read so far (headers not included)."""

    def __init__(self, directory: str | os.PathLike):
        directory = pathlib.Path(directory)
        index = directory / "model.safetensors.index.json"
        if index.is_file():
            files = index_shards(index)[1]
        elif (directory / "model.safetensors").is_file():
            files = [directory / "model.safetensors"]
        else:
            raise MissingInput(f"{directory}: no model.safetensors or model.safetensors.index.json; sliced "
                               "loading reads safetensors only: convert the checkpoint (`jtrust convert`) "
                               "and load the jtrust directory")
        self.entries: dict[str, tuple[pathlib.Path, np.dtype, tuple[int, ...], int]] = {}
        self.bytes_read = 0
        for file in files:
            self._read_header(file)

    def _read_header(self, file: pathlib.Path) -> None:
        with open(file, "rb") as f:
            head = f.read(8)
            size = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            try:
                header = json.loads(f.read(size)) if 0 < size < 1 << 30 else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                header = None
        if not isinstance(header, dict):
            raise InputError(f"{file}: unreadable safetensors header; the file is truncated or corrupt: "
                             "download it again")
        length = file.stat().st_size
        for name, meta in header.items():
            if name == "__metadata__":
                continue
            if not isinstance(meta, dict) or meta.get("dtype") not in DTYPES:
                raise InputError(f"{file}: tensor {name!r} has dtype "
                                 f"{meta.get('dtype') if isinstance(meta, dict) else None}; jtrust reads "
                                 f"{', '.join(DTYPES)} tensors")
            try:
                start, end = (int(x) for x in meta["data_offsets"])
                shape = tuple(int(x) for x in meta["shape"])
            except (KeyError, TypeError, ValueError):
                raise InputError(f"{file}: tensor {name!r} has no valid shape and data_offsets in the "
                                 "header; the file is corrupt: download it again") from None
            dtype = np.dtype(DTYPES[meta["dtype"]])
            if end - start != int(np.prod(shape)) * dtype.itemsize or 8 + size + end > length:
                raise InputError(f"{file}: tensor {name!r} lies outside the file ({length} bytes); the file "
                                 "is truncated: download it again")
            self.entries[name] = (file, dtype, shape, 8 + size + start)

    def shape(self, name: str) -> tuple[int, ...]:
        return self.entries[name][2]

    def read(self, name: str, index: tuple[slice, ...]) -> np.ndarray:
        """tensor[index] as float32 (index: one slice per dimension, steps of 1), finite-checked."""
        file, dtype, shape, offset = self.entries[name]
        index = tuple(index) + (slice(None),) * (len(shape) - len(index))
        bounds = [s.indices(n)[:2] for s, n in zip(index, shape)]
        out_shape = tuple(b - a for a, b in bounds)
        item = dtype.itemsize
        fd = os.open(file, os.O_RDONLY)
        try:
            if len(shape) == 0:
                data = os.pread(fd, item, offset)
            elif len(shape) == 1:
                (a, b), = bounds
                data = os.pread(fd, (b - a) * item, offset + a * item)
            elif len(shape) == 2:  # rows, then columns of each row
                (r0, r1), (c0, c1) = bounds
                row = shape[1] * item
                if c0 == 0 and c1 == shape[1]:  # whole rows: one contiguous range
                    data = os.pread(fd, (r1 - r0) * row, offset + r0 * row)
                else:
                    data = b"".join(os.pread(fd, (c1 - c0) * item, offset + r * row + c0 * item)
                                    for r in range(r0, r1))
            else:
                raise InputError(f"{file}: tensor {name!r} has {len(shape)} dimensions; sliced loading reads "
                                 "vectors and matrices")
        finally:
            os.close(fd)
        self.bytes_read += len(data)
        array = np.frombuffer(data, dtype).reshape(out_shape).astype(np.float32)
        check_finite(array, name, file)
        return array


def read_sharded_safetensors(directory: str | os.PathLike, config: ModelConfig, shardings: Any,
                             reader: SafetensorsSlices | None = None) -> Any:
    """The jtrust parameter tree of a Llama-family safetensors checkpoint, laid out by
    `shardings` (a tree of Shardings like the parameters'), each process reading only the
    slices of its own devices. `reader` (optional) is the SafetensorsSlices to read with."""
    if config.family != "llama":
        raise InputError(f"{directory}: sliced loading reads Llama-family safetensors; this is a "
                         f"{config.family} checkpoint: convert it once (`jtrust convert`) and load the "
                         "jtrust directory, which is restored shard by shard")
    reader = reader or SafetensorsSlices(directory)
    names = normalise_names({n: n for n in reader.entries}, "llama")  # table's name -> the file's
    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params: dict = {}
    for src, path, fn in TABLES["llama"](config):
        stacked = "{i}" in src
        full = ("blocks",) + path if stacked else path
        shape = tree_get(expected, full).shape
        first = src.format(i=0)
        hf_name = names.get(first)
        if hf_name is None:
            raise InputError(f"{directory}: tensor {first!r} is missing (does the config match the weights? "
                             f"expected a llama model with {config.n_layers} layers)")
        per_layer = shape[1:] if stacked else shape
        want = per_layer[::-1] if fn is T else per_layer
        if reader.shape(hf_name) != tuple(want):
            raise InputError(f"{directory}: tensor {first!r} has shape {reader.shape(hf_name)} but the config "
                             f"implies {tuple(want)}; the config does not match the weights")

        def shard(index, src=src, stacked=stacked, transpose=fn is T, shape=shape):
            index = tuple(s if isinstance(s, slice) else slice(s, s + 1) for s in index)
            if not stacked:
                return _read(reader, names, src, index, transpose)
            layers = range(*index[0].indices(shape[0]))
            return np.stack([_read(reader, names, src.format(i=i), index[1:], transpose) for i in layers])

        tree_set(params, full, jax.make_array_from_callback(shape, tree_get(shardings, full), shard))
    return params


def _read(reader: SafetensorsSlices, names: dict, src: str, index: tuple[slice, ...], transpose: bool):
    if src not in names:
        raise InputError(f"tensor {src!r} is missing from the checkpoint")
    name = names[src]
    if transpose:  # jtrust [in, out] is the Hugging Face [out, in] transposed
        return reader.read(name, index[::-1]).T
    return reader.read(name, index)



def checkpoint_id(directory: str | os.PathLike, reader: SafetensorsSlices) -> str:
    """A hash (hex, 16 chars) of a safetensors directory read by slice: every file's relative
    name and size, the tensors' names, dtypes, shapes and offsets, and the small files' bytes
    (config, tokenizer); the weights' bytes are not read."""
    directory = pathlib.Path(directory)
    h = hashlib.sha256()
    for f in sorted(p for p in directory.rglob("*") if p.is_file() and not p.name.startswith(".")):
        h.update(f"{f.relative_to(directory).as_posix()}:{f.stat().st_size}".encode())
        if f.suffix != ".safetensors":
            h.update(f.read_bytes())
    for name in sorted(reader.entries):
        file, dtype, shape, offset = reader.entries[name]
        h.update(f"{name}:{file.name}:{dtype}:{shape}:{offset}".encode())
    return h.hexdigest()[:16]
