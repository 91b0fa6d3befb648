"""The one store every run directory uses: atomic files, content hashes, keyed result cells,
run identity, the cache root and safe path names.

Every file jtrust writes goes through `atomic_path`: the bytes land in a temporary sibling
whose name is unique to the process and the call (`.<name>.<pid>-<random>.tmp`), then one
`os.replace` makes them visible. A reader sees the old file or the whole new one; a crash
leaves only temporary files, which `clean_temp` removes.

A *cell* is a JSON file {"key": ..., "result": ...}: a result together with everything it was
computed from. `read_cell(path, key)` returns the result only when the stored key equals
`key`, so a rerun recomputes exactly the cells whose inputs changed.

One writer per directory: `with lock_dir(path, wait):` holds an advisory lock (`flock` on
`path/.jtrust.lock`, which names the holder's pid and host) while a run writes there; a second
writer waits up to `wait` seconds, then stops with an `InputError` naming the holder. The OS
drops the lock when its process dies, so a killed run never blocks the next one, and only the
holder cleans temporary files (`clean_temp`). `lock_target(path)` does the same for a path that
is about to be created whole (an `atomic_dir`), with the lock file `.<name>.jtrust.lock` beside it.
Directories and files are created with the ordinary modes (0o777 / 0o666 less the umask), so a
group-readable umask gives a group-readable cache.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import pathlib
import re
import secrets
import shutil
import socket
import sys
import threading
import time
from typing import Any, Callable, Iterable, Iterator, Sequence

import numpy as np

from jtrust.core.errors import InputError

TEMP_SUFFIX = ".tmp"
LOCK_NAME = ".jtrust.lock"  # the lock file of a locked directory (`lock_dir`)
LOCK_SUFFIX = ".jtrust.lock"  # ... and of a path about to be created: `.<name>.jtrust.lock` beside it
IN_USE_HINT = "wait for it to finish or choose another output directory"
_TEMP_NAME = re.compile(r"^\..+\.\d+-[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")  # see atomic_path


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


def clean_temp(directory: str | os.PathLike, name: str | None = None, recursive: bool = False) -> None:
    """Remove the temporary files and directories (`atomic_path`, `atomic_dir`) a killed writer
    left in `directory`: all of them, or with `name` only those of that target name; with
    `recursive` also in its subdirectories. Call it holding the directory's lock (`lock_dir`,
    or `lock_target` of `directory / name`): another live writer's temporaries look the same."""
    directory = pathlib.Path(directory)
    if not directory.is_dir():
        return
    pattern = _TEMP_NAME if name is None else re.compile(
        r"^\." + re.escape(name) + r"\.\d+-[0-9a-f]+" + re.escape(TEMP_SUFFIX) + "$")
    for root, dirs, files in os.walk(directory):
        for entry in files + dirs:
            if pattern.match(entry):
                p = pathlib.Path(root, entry)
                if p.is_dir() and not p.is_symlink():
                    shutil.rmtree(p, ignore_errors=True)
                else:
                    p.unlink(missing_ok=True)
        dirs[:] = [d for d in dirs if recursive and not _TEMP_NAME.match(d)]


def is_temp(path: pathlib.Path) -> bool:
    return path.name.endswith(TEMP_SUFFIX)


def is_lock(path: pathlib.Path) -> bool:
    return path.name.endswith(LOCK_SUFFIX)


def is_internal(path: pathlib.Path) -> bool:
    """A temporary or lock file: the store's bookkeeping, not a result."""
    return is_temp(path) or is_lock(path)


# ---------------------------------------------------------------------------------------------
# one writer per directory

_held: dict[str, list] = {}  # lock file (real path) -> [fd, depth] for the locks this process holds
_held_guard = threading.Lock()


@contextlib.contextmanager
def lock_dir(path: str | os.PathLike, wait: float = 0.0, *, hint: str = IN_USE_HINT
             ) -> Iterator[pathlib.Path]:
    """Hold the one-writer lock of directory `path` (created if missing) inside the block.

    Another process holding it: wait up to `wait` seconds (saying so once on stderr), then
    raise InputError("<path> is in use by process <pid> (on <host> since <time>); <hint>").
    The lock is `flock` on `path/.jtrust.lock`: released on exit, and by the OS when the process
    dies. Re-entrant within one process (nested blocks on the same directory share the lock).
    """
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    with _locked(path / LOCK_NAME, path, wait, hint):
        yield path


@contextlib.contextmanager
def lock_target(path: str | os.PathLike, wait: float = 0.0, *, hint: str = IN_USE_HINT
                ) -> Iterator[pathlib.Path]:
    """`lock_dir` for a path that is to be created whole (an `atomic_dir`, a file): the lock file
    is its sibling `.<name>.jtrust.lock` (the parent directory is created if missing)."""
    path = pathlib.Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _locked(path.parent / f".{path.name}{LOCK_SUFFIX}", path, wait, hint):
        yield path


@contextlib.contextmanager
def _locked(lock_file: pathlib.Path, target: pathlib.Path, wait: float, hint: str) -> Iterator[None]:
    key = os.path.realpath(lock_file)
    with _held_guard:
        held = _held.get(key)
        if held is not None:
            held[1] += 1
    if held is not None:  # this process holds it already: a nested block
        try:
            yield
        finally:
            with _held_guard:
                held[1] -= 1
        return
    fd = _acquire(lock_file, target, wait, hint)
    with _held_guard:
        _held[key] = [fd, 1]
    try:
        yield
    finally:
        with _held_guard:
            del _held[key]
        _release(lock_file, fd)


def _acquire(lock_file: pathlib.Path, target: pathlib.Path, wait: float, hint: str) -> int:
    deadline = time.monotonic() + max(wait, 0.0)
    told, pause = False, 0.002
    while True:
        try:
            fd = os.open(lock_file, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o666)
        except PermissionError:  # another user's lock file: flock needs no write access
            fd = os.open(lock_file, os.O_RDONLY | os.O_CLOEXEC)
        try:
            while True:
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                    break
                except BlockingIOError:
                    holder = _holder(fd)
                    remaining = deadline - time.monotonic()
                    if remaining <= 0:
                        raise InputError(f"{target} is in use by {holder}; {hint}") from None
                    if not told:
                        print(f"jtrust: {target} is in use by {holder}; waiting up to {wait:g} s",
                              file=sys.stderr, flush=True)
                        told = True
                    time.sleep(min(pause, remaining))
                    pause = min(2 * pause, 0.1)
            # locked; but a holder that was releasing may have unlinked this file meanwhile
            try:
                current = os.path.samestat(os.stat(lock_file), os.fstat(fd))
            except FileNotFoundError:
                current = False
            if current:
                owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                                    "since": time.strftime("%Y-%m-%d %H:%M:%S"),
                                    "command": " ".join(sys.argv)[:200]})
                try:
                    os.ftruncate(fd, 0)
                    os.pwrite(fd, owner.encode(), 0)
                except OSError:
                    pass  # a lock file opened read-only: the lock holds, only the name is missing
                return fd
        except BaseException:
            os.close(fd)
            raise
        os.close(fd)  # lost the file to a releasing holder: lock the new one


def _release(lock_file: pathlib.Path, fd: int) -> None:
    try:
        os.unlink(lock_file)  # while still locked: a waiter on this file then sees it gone
    except OSError:
        pass
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _holder(fd: int) -> str:
    """"process <pid> (on <host> since <time>)" from a lock file's contents."""
    for _ in range(20):  # the holder writes its name just after locking: give it a moment
        try:
            owner = json.loads(os.pread(fd, 4096, 0) or b"null")
        except (OSError, ValueError):
            owner = None
        if isinstance(owner, dict) and "pid" in owner:
            return f"process {owner['pid']} (on {owner.get('host', '?')} since {owner.get('since', '?')})"
        time.sleep(0.02)
    return "another process (its lock file names no owner)"


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
        raise InputError(f"{path}: checksum mismatch (the bundled file is damaged); reinstall jtrust")
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


def cached_cell(path: str | os.PathLike, key: dict, compute: Callable[[], Any]) -> Any:
    """The cell at `path` for `key`, computed (and written atomically) when absent or stale;
    either way the result as it reads back from JSON."""
    found = read_cell(path, key)
    if found is not None:
        return found
    result = compute()
    write_cell(path, key, result)
    return json.loads(json.dumps(result))


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
        raise InputError(f"{directory} holds a different {what} ({'; '.join(diffs)}); resume it "
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

