"""Activation extraction: run a model over texts and keep chosen sites and layers.

`extract` tokenizes each text as is (no template), sorts the texts by length and
runs them in batches padded to a rung of a fixed ladder of lengths (32, 64, 96,
128, then powers of two), so a whole dataset compiles a handful of programs.
Computation stops at the deepest requested layer. Results come back in the
original text order.

Pooling, per text, site and layer (`Activations.get(site, layer)`):
  last  the activation at the text's last token      -> [n_texts, d]
  mean  the mean over the text's tokens               -> [n_texts, d]
  all   every token, e.g. to train sparse autoencoders -> [n_tokens_total, d], CSR style:
        text i owns rows offsets[i]:offsets[i + 1] (`Activations.offsets`, [n_texts + 1])

On disk (`out_dir`), written chunk by chunk so that an interrupted run resumes:
  manifest.json          model, checkpoint and dataset hashes, sites, layers, pool,
                         dtype, bucket ladder, chunk list (row ranges, `done`), `complete`
  order.npy    [n_texts] int64: sorted row p is text order[p] (chunks are in sorted order)
  n_tokens.npy [n_texts] int64: tokens of each text after truncation, original order
  {site}.{k:05d}.npy     chunk k: [n_layers, rows, d] float32 or float16; rows are the
                         chunk's texts (last, mean) or their tokens (all), in sorted order
Every file is written through `jtrust.core.store` (a temporary name, then a rename), so a
killed run leaves only finished chunks; rerunning with the same arguments computes the missing ones.

Several processes (`jtrust.runtime.distributed`, a mesh over every process's devices): each process
passes the same texts and computes every batch; only process 0 writes `out_dir` (give a
directory on a filesystem all hosts share, or only process 0's copy exists) and returns its
Activations, the others return None. Without out_dir every process returns all results.

Costs: host memory holds one chunk of output (`chunk_mb`, all sites together, at
least one batch) plus, without `out_dir`, every result; a batch's device memory
grows with batch_size * padded length (and * n_layers for pool="all").
"""

from __future__ import annotations

import json
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jtrust.core import store
from jtrust.runtime import distributed
from jtrust.models.model import Model, forward_jit
from jtrust.models.decoder import Capture
from jtrust.models.sites import width as site_width
from jtrust.models.tokenizer import pad

FORMAT = "jtrust-activations/1"
STORE_DTYPES = ("float32", "float16")
# what must match for a rerun into the same directory to resume instead of mixing runs
_IDENTITY = ("checkpoint_hash", "dataset_hash", "sites", "layers", "pool", "dtype", "batch_size",
             "max_length", "chunk_mb")


class Activations(NamedTuple):
    """Extracted activations, held in memory or memory-mapped from `path`.

    chunks: site -> chunk arrays [n_layers, rows, d] in length-sorted order; use `get`.
    """

    manifest: dict[str, Any]  # the contents of manifest.json (see the module docstring)
    order: np.ndarray  # [n_texts] int64, original index of each sorted row
    n_tokens: np.ndarray  # [n_texts] int64, tokens per text (after truncation), original order
    chunks: dict[str, list[np.ndarray]]
    path: pathlib.Path | None  # the extraction directory, None when held in memory

    @property
    def sites(self) -> list[str]:
        return self.manifest["sites"]

    @property
    def layers(self) -> list[int]:
        return self.manifest["layers"]

    @property
    def pool(self) -> str:
        return self.manifest["pool"]

    @property
    def offsets(self) -> np.ndarray:
        """[n_texts + 1] int64: for pool="all", text i owns rows offsets[i]:offsets[i + 1] of `get`."""
        return np.concatenate([[0], np.cumsum(self.n_tokens)])

    def get(self, site: str, layer: int) -> np.ndarray:
        """Activations of `site` at `layer` in original text order.

        Returns [n_texts, d] (pool last / mean) or [n_tokens_total, d] (pool all, see `offsets`).
        """
        if site not in self.sites:
            raise ValueError(f"site {site!r} was not extracted; these were: {self.sites}")
        if layer not in self.layers:
            raise ValueError(f"layer {layer} was not extracted; these were: {self.layers}")
        j = self.layers.index(layer)
        rows = np.concatenate([chunk[j] for chunk in self.chunks[site]])
        if self.pool != "all":
            out = np.empty_like(rows)
            out[self.order] = rows
            return out
        # the token rows of text i start at sorted_offsets[p] where p is its sorted position
        sorted_offsets = np.concatenate([[0], np.cumsum(self.n_tokens[self.order])])
        position = np.argsort(self.order)
        shift = sorted_offsets[position] - self.offsets[:-1]
        return rows[np.repeat(shift, self.n_tokens) + np.arange(len(rows))]


def bucket_length(n_tokens: int, max_length: int | None = None) -> int:
    """Padded length of a batch whose longest text has n_tokens tokens.

    The smallest rung >= n_tokens of 32, 64, 96, 128, 256, 512, ..., capped at max_length.
    """
    rung = -(-n_tokens // 32) * 32 if n_tokens <= 128 else 1 << (n_tokens - 1).bit_length()
    return rung if max_length is None else min(rung, max_length)


def bucket_ladder(longest: int, max_length: int | None = None) -> list[int]:
    """Every padded length a dataset whose longest text has `longest` tokens may use."""
    top = bucket_length(longest, max_length)
    rungs = [32, 64, 96, 128]
    while rungs[-1] < top:
        rungs.append(rungs[-1] * 2)
    return sorted({min(r, top) for r in rungs})


def dataset_hash(texts: list[str]) -> str:
    """sha256 of the texts joined by NUL, in order (order matters: results are per row)."""
    return store.text_hash(texts)


def extract(model: Model, texts: list[str], sites=("resid_post",), layers: list[int] | None = None,
            pool: str = "last", *, batch_size: int = 16, max_length: int | None = None,
            chunk_mb: float = 64.0, out_dir: str | os.PathLike | None = None,
            dataset_name: str | None = None, mesh: Mesh | None = None, progress: bool = True,
            dtype=jnp.float32) -> Activations | None:
    """Activations of `texts` at `sites` x `layers`, pooled by `pool` (see the module docstring).

    layers: block indices (0 = the first block); None = all. Only blocks up to the deepest
      requested one run.
    batch_size: texts per forward (rounded up to a multiple of the mesh's 'data' axis); every
      batch has this many rows, the last one padded with copies that are dropped.
    max_length: keep the first max_length tokens of longer texts (counted as `n_truncated`).
    chunk_mb: output gathered before a chunk is stored; smaller = finer resume, more files.
    out_dir: stream chunks there and resume an interrupted run; None = keep all in memory.
      With several processes only process 0 writes and returns; the others return None.
    mesh: a Mesh with a 'data' axis; each batch's rows are sharded over it, params replicated.
      It may span the devices of several processes (`jtrust.distributed.data_mesh()`).
    dtype: storage dtype, float32 or float16 (the forward computes in float32).
    """
    if isinstance(texts, str):
        raise ValueError("texts must be a list of strings, not one string")
    if not texts:
        raise ValueError("no texts given: extract needs at least one")
    sites = list(dict.fromkeys(sites))
    capture = Capture(tuple(sites), pool)  # raises on unknown sites or pooling
    layers = _check_layers(layers, model.config.n_layers)
    store_dtype = np.dtype(dtype)
    if store_dtype.name not in STORE_DTYPES:
        raise ValueError(f"dtype {store_dtype.name} cannot be stored; choose from {STORE_DTYPES}")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, not {batch_size}")
    if max_length is not None and not 0 < max_length <= model.config.max_positions:
        raise ValueError(f"max_length must be in 1..{model.config.max_positions} (the model's "
                         f"positions), not {max_length}")

    params, rows_sharding, batch_size = _placement(model.params, mesh, batch_size)
    encoded, n_truncated = _tokenize(model, texts, max_length)
    n_tokens = np.array([len(ids) for ids in encoded], np.int64)
    order = np.argsort(n_tokens, kind="stable")
    row_bytes = sum(site_width(s, model.config) for s in sites) * len(layers) * store_dtype.itemsize
    manifest = dict(
        format=FORMAT, jtrust_version=_version(), model=model.name,
        checkpoint_hash=model.checkpoint_hash, dataset_hash=dataset_hash(texts),
        dataset_name=dataset_name, n_texts=len(texts), n_tokens_total=int(n_tokens.sum()),
        n_truncated=n_truncated, sites=sites, layers=layers, pool=pool,
        dtype=store_dtype.name, d_model=model.config.d_model, batch_size=batch_size,
        max_length=max_length, chunk_mb=chunk_mb,
        bucket_ladder=bucket_ladder(int(n_tokens.max()), max_length),
        chunks=_plan_chunks(n_tokens[order], batch_size, max_length, pool, row_bytes, chunk_mb),
        complete=False)

    out = None if out_dir is None else pathlib.Path(out_dir)
    writer = jax.process_index() == 0  # the other processes compute the same batches, write nothing
    if out is not None:
        manifest = _open_out_dir_on_process_0(out, manifest)
    if out is not None and writer:
        store.write_json(out / "manifest.json", manifest)
        store.save_npy(out / "order.npy", order)
        store.save_npy(out / "n_tokens.npy", n_tokens)

    in_memory = {site: [] for site in sites}
    done_texts = sum(c["texts"][1] - c["texts"][0] for c in manifest["chunks"] if c["done"])
    bar = tqdm.tqdm(total=len(texts), initial=done_texts, unit="text",
                    disable=not (progress and writer), desc=f"extract {model.name}")
    speed = _Speed(bar)
    for k, chunk in enumerate(manifest["chunks"]):
        if chunk["done"]:
            continue
        parts = {site: [] for site in sites}
        for start, stop, length in chunk["batches"]:
            batch = [encoded[i] for i in order[start:stop]]
            arrays = _batch_activations(model, params, rows_sharding, capture, layers, batch,
                                        batch_size, length)
            for site in sites:
                parts[site].append(arrays[site].astype(store_dtype))
            speed.update(len(batch), int(n_tokens[order[start:stop]].sum()))
        for site in sites:
            array = np.concatenate(parts[site], axis=1)
            if out is None:
                in_memory[site].append(array)
            elif writer:
                store.save_npy(out / _chunk_file(site, k), array)
        chunk["done"] = True
        if out is not None and writer:
            store.write_json(out / "manifest.json", manifest)
    bar.close()

    manifest["complete"] = True
    if out is None:
        return Activations(manifest, order, n_tokens, in_memory, None)
    if writer:
        store.write_json(out / "manifest.json", manifest)
    distributed.barrier("jtrust.runtime.extract: out_dir complete")  # then any process may read a shared out_dir
    return load_activations(out) if writer else None


def _batch_activations(model: Model, params, rows_sharding, capture: Capture, layers: list[int],
                       batch: list[list[int]], batch_size: int, length: int) -> dict[str, np.ndarray]:
    """One forward over `batch` (token id lists) padded to [batch_size, length].

    Returns site -> [n_layers, len(batch), d] (last, mean) or [n_layers, tokens of batch, d] (all).
    """
    rows = batch + [batch[-1]] * (batch_size - len(batch))  # fixed batch shape; copies dropped below
    tokens, mask = pad(rows, model.tokenizer.pad_id, length)
    if rows_sharding is None:
        tokens_in, mask_in = jax.device_put(tokens), jax.device_put(mask)
    else:
        tokens_in, mask_in = distributed.put((tokens, mask), rows_sharding)
    result = forward_jit(params, tokens_in, mask_in, config=model.config, capture=capture,
                         upto_layer=layers[-1], logits=False)
    # with a mesh, every process needs the whole batch (rows of other processes included)
    captures = result.captures if rows_sharding is None else distributed.to_host(result.captures)
    real = mask[:len(batch)].astype(bool)
    out = {}
    for site in capture.sites:
        x = np.asarray(captures[site])[layers, :len(batch)]  # [n_layers, n, (T,) d]
        out[site] = x[:, real] if capture.pool == "all" else x
    return out


def load_activations(out_dir: str | os.PathLike) -> Activations:
    """Read (memory-map) what `extract(..., out_dir=out_dir)` wrote; refuses an unfinished run."""
    out = pathlib.Path(out_dir)
    path = out / "manifest.json"
    if not path.exists():
        raise ValueError(f"{out} holds no extracted activations (no manifest.json)")
    manifest = json.loads(path.read_text())
    if manifest.get("format") != FORMAT:
        raise ValueError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}")
    if not manifest["complete"]:
        done = sum(c["done"] for c in manifest["chunks"])
        raise ValueError(f"{out} is incomplete ({done} of {len(manifest['chunks'])} chunks); rerun "
                         "extract with the same arguments and out_dir to resume it")
    chunks = {site: [np.load(out / _chunk_file(site, k), mmap_mode="r")
                     for k in range(len(manifest["chunks"]))] for site in manifest["sites"]}
    return Activations(manifest, np.load(out / "order.npy"), np.load(out / "n_tokens.npy"),
                       chunks, out)


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise ValueError("layers is empty; pass None for all layers")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has blocks 0..{n_layers - 1}")
    return layers


def _placement(params, mesh: Mesh | None, batch_size: int):
    """Parameters on device(s), the sharding of batch rows, and the batch size the mesh divides."""
    if mesh is None:
        return jax.device_put(params), None, batch_size
    if "data" not in mesh.axis_names:
        raise ValueError(f"the mesh needs a 'data' axis to shard rows over; it has {mesh.axis_names}")
    n = mesh.shape["data"]
    return (distributed.replicate(params, mesh), NamedSharding(mesh, PartitionSpec("data")),
            -(-batch_size // n) * n)


def _tokenize(model: Model, texts: list[str], max_length: int | None):
    """Token ids of every text (first max_length kept) and how many texts were truncated."""
    encoded, n_truncated = [], 0
    limit = model.config.max_positions if max_length is None else max_length
    for i, text in enumerate(texts):
        if not text:
            raise ValueError(f"text {i} is empty; remove it or give it content")
        ids = model.tokenizer.encode(text)
        if not ids:
            raise ValueError(f"text {i} ({text[:40]!r}) encodes to no tokens")
        if max_length is None and len(ids) > limit:
            raise ValueError(f"text {i} has {len(ids)} tokens, more than the model's "
                             f"{limit} positions; pass max_length to truncate")
        n_truncated += len(ids) > limit
        encoded.append(ids[:limit])
    return encoded, n_truncated


def _plan_chunks(sorted_tokens: np.ndarray, batch_size: int, max_length: int | None, pool: str,
                 row_bytes: int, chunk_mb: float) -> list[dict]:
    """Cut the length-sorted texts into batches and group consecutive batches into chunks.

    Each chunk: texts [start, stop) in sorted order, rows [start, stop) in the stored arrays
    (texts, or tokens for pool="all"), batches [[start, stop, padded length], ...], done.
    """
    chunks, current, size, row = [], None, 0, 0
    for start in range(0, len(sorted_tokens), batch_size):
        stop = min(start + batch_size, len(sorted_tokens))
        n_rows = int(sorted_tokens[start:stop].sum()) if pool == "all" else stop - start
        batch = [start, stop, bucket_length(int(sorted_tokens[stop - 1]), max_length)]
        if current is None or size + n_rows * row_bytes > chunk_mb * 2**20:
            current = dict(texts=[start, stop], rows=[row, row], batches=[], done=False)
            chunks.append(current)
            size = 0
        current["texts"][1] = stop
        current["rows"][1] += n_rows
        current["batches"].append(batch)
        size += n_rows * row_bytes
        row += n_rows
    return chunks


def _open_out_dir(out: pathlib.Path, manifest: dict) -> dict:
    """Start `out`, or resume it: `manifest` with the chunks already stored there marked done."""
    out.mkdir(parents=True, exist_ok=True)
    path = out / "manifest.json"
    if not path.exists():
        if any(not store.is_temp(p) for p in out.iterdir()):
            raise ValueError(f"{out} is not empty and holds no extraction manifest; choose "
                             "another --out directory or empty this one")
        return manifest
    old = json.loads(path.read_text())
    diffs = store.identity_diff(old, manifest, _IDENTITY)
    layout = lambda m: [(c["texts"], c["rows"], c["batches"]) for c in m["chunks"]]
    if not diffs and layout(old) != layout(manifest):
        diffs.append("the chunk layout (was the tokenizer changed?)")
    if diffs:
        raise ValueError(f"{out} holds a different extraction ({'; '.join(diffs)}); choose another "
                         "--out directory or delete this one")
    store.clean_temp(out)  # left by a run killed mid-write
    for k, (chunk, old_chunk) in enumerate(zip(manifest["chunks"], old["chunks"])):
        chunk["done"] = old_chunk["done"] and all(
            (out / _chunk_file(site, k)).exists() for site in manifest["sites"])
    return manifest


def _open_out_dir_on_process_0(out: pathlib.Path, manifest: dict) -> dict:
    """`_open_out_dir` on process 0 only; every process gets its chunk `done` flags, so all
    compute the same remaining batches whether or not they see out_dir."""
    if jax.process_count() == 1:
        return _open_out_dir(out, manifest)
    status = np.zeros(1 + len(manifest["chunks"]), np.int32)  # [opened, done of every chunk]
    error = None
    if jax.process_index() == 0:
        try:
            manifest = _open_out_dir(out, manifest)
            status[:] = [1] + [c["done"] for c in manifest["chunks"]]
        except (ValueError, OSError) as e:  # raised below, after the others learn of it
            error = e
    status = distributed.broadcast_from_process_0(status)
    if error is not None:
        raise error
    if not status[0]:
        raise ValueError(f"process 0 could not open {out}; its error says why")
    for chunk, done in zip(manifest["chunks"], status[1:]):
        chunk["done"] = bool(done)
    return manifest


def _chunk_file(site: str, k: int) -> str:
    return f"{site}.{k:05d}.npy"


def _version() -> str:
    import jtrust  # here, not at the top: jtrust/__init__ imports this module
    return jtrust.__version__


class _Speed:
    """Advances a progress bar by texts and shows real (unpadded) tokens per second."""

    def __init__(self, bar: tqdm.tqdm):
        self.bar, self.tokens, self.start = bar, 0, time.perf_counter()

    def update(self, n_texts: int, n_tokens: int) -> None:
        self.tokens += n_tokens
        self.bar.update(n_texts)
        self.bar.set_postfix_str(f"{self.tokens / (time.perf_counter() - self.start):.0f} tok/s",
                                 refresh=False)
