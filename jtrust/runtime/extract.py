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

On disk (`out_dir`, format "jtrust-activations/2"), written chunk by chunk so that an
interrupted run resumes:
  manifest.json          format, model, checkpoint and dataset hashes, sites, layers, pool, dtype,
                         batch_size, max_length, bucket ladder, `complete`, and
                         batches: the batch plan [[start, stop, padded length], ...]: texts
                           [start, stop) of the length-sorted order, fixed by the texts, the
                           tokenizer, batch_size and max_length
                         chunks: the stored chunks, each {"batches": [b0, b1), "texts": [t0, t1),
                           "rows": [r0, r1)}: consecutive batches b0..b1-1, i.e. sorted texts
                           t0..t1-1, stored rows r0..r1-1 (texts, or tokens for pool="all")
  order.npy    [n_texts] int64: sorted row p is text order[p] (chunks are in sorted order)
  n_tokens.npy [n_texts] int64: tokens of each text after truncation, original order
  {site}.{b0:05d}.npy    the chunk starting at batch b0: [n_layers, rows, d] float32 or float16,
                         the chunk's texts (last, mean) or their tokens (all), in sorted order
A chunk is stored when it reaches `chunk_mb` or when `flush_seconds` have passed since the
last one, so a killed run loses at most about flush_seconds of work (an exception or Ctrl-C
stores the finished batches before it propagates). Every file is written
through `jtrust.core.store` (a temporary name, then a rename) and the manifest lists a chunk
only once its files exist; rerunning with the same arguments checks the batch plan, computes
only the batches no stored chunk covers and gives the results of an uninterrupted run (each
batch is computed alone, so chunk boundaries do not change a value; chunk_mb and
flush_seconds may differ between the runs). While a run writes,
out_dir holds the lock `.jtrust.lock` (`jtrust.core.store.lock_dir`): a second run into it
waits up to `wait` seconds, then stops naming the first. Directories of the older format
"jtrust-activations/1" (a chunk plan fixed up front, {site}.{k:05d}.npy) are still read when
complete; an unfinished one cannot be resumed: delete it and extract again.

Several processes (`jtrust.runtime.distributed`, a mesh over every process's devices): each process
passes the same texts and computes every batch; only process 0 writes `out_dir` (give a
directory on a filesystem all hosts share, or only process 0's copy exists) and returns its
Activations, the others return None. Without out_dir every process returns all results.

Costs: host memory holds one chunk of output (at most `chunk_mb`, all sites together, at
least one batch) plus, without `out_dir`, every result; a batch's device memory
grows with batch_size * padded length (and * n_layers for pool="all").
"""

from __future__ import annotations

import contextlib
import json
import os
import pathlib
import time
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding

from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.runtime import distributed, sharding
from jtrust.models.model import Model, forward_jit
from jtrust.models.decoder import Capture
from jtrust.models.sites import width as site_width
from jtrust.models.tokenizer import pad

FORMAT = "jtrust-activations/2"
FORMAT_1 = "jtrust-activations/1"  # read when complete, not resumed (see the module docstring)
STORE_DTYPES = ("float32", "float16")
# what must match for a rerun into the same directory to resume instead of mixing runs (and
# the batch plan, checked separately); chunk_mb and flush_seconds may change between runs
_IDENTITY = ("checkpoint_hash", "dataset_hash", "sites", "layers", "pool", "dtype", "batch_size",
             "max_length")


class Activations(NamedTuple):
    """Extracted activations, held in memory or memory-mapped from `path`.

    chunks: site -> chunk arrays [n_layers, rows, d] in length-sorted order (together every
      row once, whatever the chunk layout); use `get`.
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
            raise InputError(f"site {site!r} was not extracted; these were: {self.sites}")
        if layer not in self.layers:
            raise InputError(f"layer {layer} was not extracted; these were: {self.layers}")
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
            chunk_mb: float = 64.0, flush_seconds: float = 15.0,
            out_dir: str | os.PathLike | None = None, dataset_name: str | None = None,
            mesh: Mesh | None = None, progress: bool = True, dtype=jnp.float32,
            wait: float = 0.0) -> Activations | None:
    """Activations of `texts` at `sites` x `layers`, pooled by `pool` (see the module docstring).

    layers: block indices (0 = the first block); None = all. Only blocks up to the deepest
      requested one run.
    batch_size: texts per forward (rounded up to a multiple of the mesh's data x fsdp axes); every
      batch has this many rows, the last one padded with copies that are dropped.
    max_length: keep the first max_length tokens of longer texts (counted as `n_truncated`).
    chunk_mb: output gathered before a chunk is stored; smaller = finer resume, more files.
    flush_seconds: also store the rows gathered so far once this much time has passed since
      the last chunk, so an interrupted run loses at most about this much work.
    out_dir: stream chunks there and resume an interrupted run; None = keep all in memory.
      With several processes only process 0 writes and returns; the others return None.
    wait: seconds to wait for another process writing out_dir to finish (then InputError).
    mesh: a Mesh with a 'data' axis; each batch's rows are sharded over it (and 'fsdp'); params are
      replicated, or split by `jtrust.runtime.sharding`'s rules over 'fsdp' / 'model' axes.
      It may span the devices of several processes (`jtrust.distributed.data_mesh()`).
    dtype: storage dtype, float32 or float16 (the forward computes in float32).
    """
    if isinstance(texts, str):
        raise InputError("texts must be a list of strings, not one string")
    if not texts:
        raise InputError("no texts given: extract needs at least one")
    sites = list(dict.fromkeys(sites))
    capture = Capture(tuple(sites), pool)  # raises on unknown sites or pooling
    layers = _check_layers(layers, model.config.n_layers)
    store_dtype = np.dtype(dtype)
    if store_dtype.name not in STORE_DTYPES:
        raise InputError(f"dtype {store_dtype.name} cannot be stored; choose from {STORE_DTYPES}")
    if batch_size < 1:
        raise InputError(f"batch_size must be >= 1, not {batch_size}")
    if max_length is not None and not 0 < max_length <= model.config.max_positions:
        raise InputError(f"max_length must be in 1..{model.config.max_positions} (the model's "
                         f"positions), not {max_length}")
    if not (chunk_mb >= 0 and flush_seconds >= 0):
        raise InputError(f"chunk_mb and flush_seconds must be >= 0, not {chunk_mb} and {flush_seconds}")

    params, rows_sharding, batch_size = _placement(model.params, mesh, batch_size)
    encoded, n_truncated = _tokenize(model, texts, max_length)
    n_tokens = np.array([len(ids) for ids in encoded], np.int64)
    order = np.argsort(n_tokens, kind="stable")
    sorted_tokens = n_tokens[order]
    batches = _plan_batches(sorted_tokens, batch_size, max_length)
    # stored rows before each batch: texts, or their tokens for pool="all"
    row_counts = [int(sorted_tokens[a:b].sum()) if pool == "all" else b - a for a, b, _ in batches]
    rows_before = np.concatenate([[0], np.cumsum(row_counts)]).astype(int).tolist()
    row_bytes = sum(site_width(s, model.config) for s in sites) * len(layers) * store_dtype.itemsize
    manifest = dict(
        format=FORMAT, jtrust_version=_version(), model=model.name,
        checkpoint_hash=model.checkpoint_hash, dataset_hash=dataset_hash(texts),
        dataset_name=dataset_name, n_texts=len(texts), n_tokens_total=int(n_tokens.sum()),
        n_truncated=n_truncated, sites=sites, layers=layers, pool=pool,
        dtype=store_dtype.name, d_model=model.config.d_model, batch_size=batch_size,
        max_length=max_length, bucket_ladder=bucket_ladder(int(n_tokens.max()), max_length),
        batches=batches, chunks=[], complete=False)

    out = None if out_dir is None else pathlib.Path(out_dir)
    writer = jax.process_index() == 0  # the other processes compute the same batches, write nothing
    keep = out is None or writer  # whether this process gathers rows at all
    result = None
    with contextlib.ExitStack() as locked:
        done = np.zeros(len(batches), bool)
        if out is not None:  # process 0 locks out_dir (until the run is complete) and reads it
            manifest, done = _open_out_dir_on_process_0(out, manifest, n_tokens, locked, wait)
        if out is not None and writer and not manifest["chunks"] and not manifest["complete"]:
            store.save_npy(out / "order.npy", order)  # before the manifest: it marks a started run
            store.save_npy(out / "n_tokens.npy", n_tokens)
            store.write_json(out / "manifest.json", manifest)

        in_memory = {site: [] for site in sites}
        pending = {site: [] for site in sites}
        first, pending_bytes, last_flush = None, 0, time.monotonic()

        def flush(stop: int) -> None:
            """Store batches first..stop-1 (gathered in `pending`) as one chunk."""
            nonlocal first, pending_bytes, last_flush
            if first is None:
                return
            chunk = dict(batches=[first, stop], texts=[batches[first][0], batches[stop - 1][1]],
                         rows=[rows_before[first], rows_before[stop]])
            if keep:
                arrays = {site: np.concatenate(pending[site], axis=1) for site in sites}
                chunks = sorted(manifest["chunks"] + [chunk], key=lambda c: c["batches"][0])
                if out is not None:  # the manifest lists a chunk once every site's file exists
                    for site in sites:
                        store.save_npy(out / _chunk_file(site, first), arrays[site])
                    store.write_json(out / "manifest.json", dict(manifest, chunks=chunks))
                else:
                    for site in sites:
                        in_memory[site].append(arrays[site])
                manifest["chunks"] = chunks
            pending.update({site: [] for site in sites})
            first, pending_bytes, last_flush = None, 0, time.monotonic()

        bar = tqdm.tqdm(total=len(texts), initial=sum(b - a for (a, b, _), d in zip(batches, done) if d),
                        unit="text", disable=not (progress and writer), desc=f"extract {model.name}")
        speed = _Speed(bar)
        end = 0  # batches before `end` are computed (and stored or pending)
        try:
            for k, (start, stop, length) in enumerate(batches):
                if done[k]:
                    flush(k)  # a chunk holds consecutive batches
                    continue
                if first is not None and pending_bytes + row_counts[k] * row_bytes > chunk_mb * 2**20:
                    flush(k)
                batch = [encoded[i] for i in order[start:stop]]
                arrays = _batch_activations(model, params, rows_sharding, capture, layers, batch,
                                            batch_size, length)
                if first is None:
                    first = k
                if keep:
                    for site in sites:
                        pending[site].append(arrays[site].astype(store_dtype))
                pending_bytes += row_counts[k] * row_bytes
                end = k + 1
                speed.update(len(batch), int(sorted_tokens[start:stop].sum()))
                if time.monotonic() - last_flush >= flush_seconds:
                    flush(end)
            flush(len(batches))
        except BaseException:  # an error or Ctrl-C: keep the batches finished so far, then stop
            if out is not None and first is not None:
                with contextlib.suppress(Exception):
                    flush(end)
            raise
        finally:
            bar.close()

        if out is None:
            manifest["complete"] = True
            return Activations(manifest, order, n_tokens, in_memory, None)
        if writer:
            if not manifest["complete"]:
                manifest["complete"] = True
                store.write_json(out / "manifest.json", manifest)
            result = load_activations(out)
    distributed.barrier("jtrust.runtime.extract: out_dir complete")  # then any process may read a shared out_dir
    return result


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
    """Read (memory-map) what `extract(..., out_dir=out_dir)` wrote; refuses an unfinished run.
    Reads the formats "jtrust-activations/2" and (complete) "jtrust-activations/1"."""
    out = pathlib.Path(out_dir)
    path = out / "manifest.json"
    if not path.exists():
        raise InputError(f"{out} holds no extracted activations (no manifest.json)")
    manifest = _read_manifest(path)
    if not manifest.get("complete"):
        if manifest.get("format") == FORMAT:
            n_done = sum(c["batches"][1] - c["batches"][0] for c in manifest["chunks"])
            raise InputError(f"{out} is incomplete ({n_done} of {len(manifest['batches'])} batches); "
                             "rerun extract with the same arguments and out_dir to resume it")
        raise InputError(f"{out} is an unfinished extraction in the older format {FORMAT_1}, which "
                         "cannot be resumed; delete it and extract again")
    if manifest["format"] == FORMAT:
        chunks = sorted(manifest["chunks"], key=lambda c: c["batches"][0])
        bounds = [b for c in chunks for b in c["batches"]]
        if bounds[:1] != [0] or bounds[-1:] != [len(manifest["batches"])] or any(
                bounds[i] != bounds[i + 1] for i in range(1, len(bounds) - 1, 2)):
            raise InputError(f"{path} is damaged (its chunks do not cover the batches once); delete "
                             f"{out} and extract again")
        files = [_chunk_file("{site}", c["batches"][0]) for c in chunks]
    else:
        files = [f"{{site}}.{k:05d}.npy" for k in range(len(manifest["chunks"]))]
    chunks = {site: [np.load(out / f.format(site=site), mmap_mode="r") for f in files]
              for site in manifest["sites"]}
    return Activations(manifest, np.load(out / "order.npy"), np.load(out / "n_tokens.npy"),
                       chunks, out)


def _read_manifest(path: pathlib.Path) -> dict:
    try:
        manifest = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise InputError(f"{path} cannot be read ({e}); delete {path.parent} and extract again") from None
    if manifest.get("format") not in (FORMAT, FORMAT_1):
        raise InputError(f"{path} has format {manifest.get('format')!r}, expected {FORMAT!r}; "
                         "delete the directory and extract again")
    return manifest


def _check_layers(layers, n_layers: int) -> list[int]:
    if layers is None:
        return list(range(n_layers))
    layers = sorted({int(layer) for layer in layers})
    if not layers:
        raise InputError("layers is empty; pass None for all layers")
    bad = [layer for layer in layers if not 0 <= layer < n_layers]
    if bad:
        raise InputError(f"layers {bad} out of range: the model has blocks 0..{n_layers - 1}")
    return layers


def _placement(params, mesh: Mesh | None, batch_size: int):
    """Parameters on device(s), the sharding of batch rows, and the batch size the mesh divides."""
    if mesh is None:
        return jax.device_put(params), None, batch_size
    if "data" not in mesh.axis_names:
        raise InputError(f"the mesh needs a 'data' axis to shard rows over; it has {mesh.axis_names}")
    n = sharding.row_groups(mesh)
    return sharding.shard_params(params, mesh), NamedSharding(mesh, sharding.rows_spec(mesh)), -(-batch_size // n) * n


def _tokenize(model: Model, texts: list[str], max_length: int | None):
    """Token ids of every text (first max_length kept) and how many texts were truncated."""
    encoded, n_truncated = [], 0
    limit = model.config.max_positions if max_length is None else max_length
    for i, text in enumerate(texts):
        if not text:
            raise InputError(f"text {i} is empty; remove it or give it content")
        ids = model.tokenizer.encode(text)
        if not ids:
            raise InputError(f"text {i} ({text[:40]!r}) encodes to no tokens")
        if max_length is None and len(ids) > limit:
            raise InputError(f"text {i} has {len(ids)} tokens, more than the model's {limit} positions; "
                             "pass max_length (--max-length on the command line) to keep the first tokens")
        n_truncated += len(ids) > limit
        encoded.append(ids[:limit])
    return encoded, n_truncated


def _plan_batches(sorted_tokens: np.ndarray, batch_size: int, max_length: int | None) -> list[list[int]]:
    """The batch plan: [start, stop, padded length] for consecutive texts of the length-sorted
    order, batch_size at a time (the last batch may be shorter)."""
    return [[start, min(start + batch_size, len(sorted_tokens)),
             bucket_length(int(sorted_tokens[min(start + batch_size, len(sorted_tokens)) - 1]), max_length)]
            for start in range(0, len(sorted_tokens), batch_size)]


def _open_out_dir(out: pathlib.Path, manifest: dict, n_tokens: np.ndarray, locked: contextlib.ExitStack,
                  wait: float) -> tuple[dict, np.ndarray]:
    """Lock `out` (held by `locked`) and start it, or resume it: `manifest` with the chunks
    already stored there, and which batches they cover."""
    locked.enter_context(store.lock_dir(out, wait))
    n_batches = len(manifest["batches"])
    path = out / "manifest.json"
    if not path.exists():
        if any(not store.is_internal(p) for p in out.iterdir()):
            raise InputError(f"{out} is not empty and holds no extraction manifest; choose "
                             "another --out directory or empty this one")
        store.clean_temp(out)  # left by a run killed before its first manifest
        return manifest, np.zeros(n_batches, bool)
    old = _read_manifest(path)
    diffs = store.identity_diff(old, manifest, _IDENTITY)
    old_batches = old["batches"] if old["format"] == FORMAT else [b for c in old["chunks"] for b in c["batches"]]
    try:
        same_tokens = np.array_equal(np.load(out / "n_tokens.npy"), n_tokens)
    except (OSError, ValueError):
        same_tokens = False
    if not diffs and (old_batches != manifest["batches"] or not same_tokens):
        diffs.append("the batch plan (was the tokenizer changed?)")
    if diffs:
        raise InputError(f"{out} holds a different extraction ({'; '.join(diffs)}); choose another "
                         "--out directory or delete this one")
    store.clean_temp(out)  # left by a run killed mid-write (only the lock holder may clean)
    if old["format"] != FORMAT:
        if not old["complete"]:
            raise InputError(f"{out} holds an unfinished extraction in the older format {FORMAT_1}, "
                             "which cannot be resumed; delete it (or choose another --out directory) "
                             "and extract again")
        return old, np.ones(n_batches, bool)  # complete: read as it is, nothing rewritten
    done = np.zeros(n_batches, bool)
    chunks = []
    for chunk in sorted(old["chunks"], key=lambda c: c["batches"][0]):
        b0, b1 = chunk["batches"]
        if not done[b0:b1].any() and all((out / _chunk_file(site, b0)).exists() for site in manifest["sites"]):
            chunks.append(chunk)
            done[b0:b1] = True
    manifest["chunks"] = chunks
    manifest["complete"] = bool(old["complete"] and done.all())
    return manifest, done


def _open_out_dir_on_process_0(out: pathlib.Path, manifest: dict, n_tokens: np.ndarray,
                               locked: contextlib.ExitStack, wait: float) -> tuple[dict, np.ndarray]:
    """`_open_out_dir` on process 0 only; every process learns which batches are done, so all
    compute the same remaining batches whether or not they see out_dir."""
    if jax.process_count() == 1:
        return _open_out_dir(out, manifest, n_tokens, locked, wait)
    n_batches = len(manifest["batches"])
    status = np.zeros(1 + n_batches, np.int32)  # [opened, done of every batch]
    done, error = np.zeros(n_batches, bool), None
    if jax.process_index() == 0:
        try:
            manifest, done = _open_out_dir(out, manifest, n_tokens, locked, wait)
            status[:] = [1] + done.astype(np.int32).tolist()
        except (ValueError, OSError) as e:  # raised below, after the others learn of it
            error = e
    status = distributed.broadcast_from_process_0(status)
    if error is not None:
        raise error
    if not status[0]:
        raise InputError(f"process 0 could not open {out}; its error says why")
    return manifest, status[1:].astype(bool)


def _chunk_file(site: str, first_batch: int) -> str:
    return f"{site}.{first_batch:05d}.npy"


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
