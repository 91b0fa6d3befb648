"""The one store every run directory uses: atomic files, content hashes, keyed result cells,
run identity, the cache root and safe path names.

Every file jtrust writes goes through `atomic_path`: the bytes land in a temporary sibling
whose name is unique to the process and the call (`.<name>.<pid>-<random>.tmp`), then one
`os.replace` makes them visible. A reader sees the old file or the whole new one; a crash
leaves only temporary files, which `clean_temp` removes.

A *cell* is a JSON file {"key": ..., "result": ...}: a result together with everything it was
computed from. `read_cell(path, key)` returns the result only when the stored key equals
`key`, so a rerun recomputes exactly the cells whose inputs changed.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import pathlib
import secrets
import shutil
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

TEMP_SUFFIX = ".tmp"


# ---------------------------------------------------------------------------------------------
# atomic files

@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling of `path` to write; on success it replaces `path`, on an
    exception it is removed. The parent directory is created if missing."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@contextlib.contextmanager
def atomic_dir(path: str | os.PathLike) -> Iterator[pathlib.Path]:
    """Yield a temporary sibling directory to fill; on success it is renamed to `path` (which
    must not exist: FileExistsError), on an exception it is removed with its contents."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{secrets.token_hex(4)}{TEMP_SUFFIX}")
    tmp.mkdir()
    try:
        yield tmp
        if path.exists():
            raise FileExistsError(f"{path} appeared while writing; keeping the existing one")
        os.replace(tmp, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def write_text(path: str | os.PathLike, text: str) -> None:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def write_bytes(path: str | os.PathLike, data: bytes) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(data)


def write_json(path: str | os.PathLike, data: Any, indent: int | None = 1) -> None:
    write_text(path, json.dumps(data, indent=indent))


def save_npy(path: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, array)


def save_npz(path: str | os.PathLike, **arrays: np.ndarray) -> None:
    with atomic_path(path) as tmp, open(tmp, "wb") as f:  # a file object: numpy adds no suffix
        np.savez(f, **arrays)


def clean_temp(directory: str | os.PathLike) -> None:
    """Remove the temporary files a killed writer left in `directory` (not recursive)."""
    directory = pathlib.Path(directory)
    if directory.is_dir():
        for p in directory.iterdir():
            if p.name.startswith(".") and p.name.endswith(TEMP_SUFFIX) and p.is_file():
                p.unlink(missing_ok=True)


def is_temp(path: pathlib.Path) -> bool:
    return path.name.endswith(TEMP_SUFFIX)


# ---------------------------------------------------------------------------------------------
# hashes

def text_hash(items: Sequence[str] | str) -> str:
    """sha256 (hex, 64 chars) of strings joined by NUL, in order."""
    joined = items if isinstance(items, str) else "\0".join(items)
    return hashlib.sha256(joined.encode("utf-8")).hexdigest()


def file_hash(path: str | os.PathLike) -> str:
    """sha256 (hex, 64 chars) of one file's bytes, read in blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            h.update(block)
    return h.hexdigest()


def content_hash(path: str | os.PathLike) -> str:
    """sha256 over the files that define a checkpoint or directory (relative names and bytes;
    hidden files skipped), hex, first 16 chars."""
    path = pathlib.Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
    for f in files:
        h.update(f.relative_to(path.parent if path.is_file() else path).as_posix().encode())
        with open(f, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 22), b""):
                h.update(block)
    return h.hexdigest()[:16]


def arrays_hash(arrays: Iterable[np.ndarray]) -> str:
    """sha256 (hex, first 16 chars) of arrays' bytes in order (shape and dtype not included)."""
    h = hashlib.sha256()
    for a in arrays:
        h.update(np.ascontiguousarray(a).tobytes())
    return h.hexdigest()[:16]


def verified_sha256(path: str | os.PathLike) -> str:
    """The sha256 of a bundled file, checked against the SHA256SUMS file beside it."""
    path = pathlib.Path(path)
    sums = path.parent / "SHA256SUMS"
    expected = dict(reversed(line.split()) for line in sums.read_text().splitlines() if line.strip())
    digest = file_hash(path)
    if expected.get(path.name) != digest:
        raise ValueError(f"{path}: checksum mismatch (the bundled file is damaged); reinstall jtrust")
    return digest


# ---------------------------------------------------------------------------------------------
# keyed cells and run identity

def _normal(data: Any) -> Any:
    """`data` as it reads back from JSON (tuples become lists), for comparisons with stored keys."""
    return json.loads(json.dumps(data))


def read_cell(path: str | os.PathLike, key: dict) -> Any | None:
    """The result stored at `path` if its key equals `key`; None if absent, damaged or stale."""
    try:
        cell = json.loads(pathlib.Path(path).read_text())
        return cell["result"] if cell["key"] == _normal(key) else None
    except (OSError, json.JSONDecodeError, KeyError, TypeError):
        return None  # absent or damaged: recomputed


def write_cell(path: str | os.PathLike, key: dict, result: Any) -> None:
    write_json(path, dict(key=key, result=result))


def identity_diff(stored: dict, wanted: dict, keys: Sequence[str]) -> list[str]:
    """The `keys` on which a stored run description differs from the wanted one, each as
    "key: <stored> there, <wanted> now" (empty: the same run)."""
    stored, wanted = _normal(stored), _normal(wanted)
    return [f"{k}: {stored.get(k)!r} there, {wanted.get(k)!r} now" for k in keys
            if stored.get(k) != wanted.get(k)]


def check_same_run(directory: str | os.PathLike, stored: dict, wanted: dict, keys: Sequence[str],
                   what: str = "run") -> None:
    """Raise if `directory` holds another run than the one described by `wanted`."""
    diffs = identity_diff(stored, wanted, keys)
    if diffs:
        raise ValueError(f"{directory} holds a different {what} ({'; '.join(diffs)}); resume it "
                         "with the same settings, or choose another output directory")


# ---------------------------------------------------------------------------------------------
# places and names

def cache_root() -> pathlib.Path:
    """Where conversions and prepared datasets are cached: $JTRUST_CACHE or ~/.cache/jtrust."""
    root = pathlib.Path(os.environ.get("JTRUST_CACHE") or pathlib.Path.home() / ".cache" / "jtrust")
    return root.expanduser().absolute()  # orbax refuses relative paths; a relative setting is the cwd's


def safe_name(name: str) -> str:
    """A name (a checkpoint spec, a path) as one path component."""
    return name.strip("/").replace("/", "_").replace(os.sep, "_") or "model"

