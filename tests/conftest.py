"""Fixtures (the tiny checkpoints, the embedded model, an isolated cache); helpers live in helpers.py."""

from __future__ import annotations

import atexit
import os
import pathlib
import shutil
import tempfile

import jax

import pytest

from helpers import FAMILIES, make_tiny_hf_dir


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory):
    """family -> (directory, torch model) for every tiny family, built once per session."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for family in FAMILIES:
        out[family] = (root / family, make_tiny_hf_dir(root / family, family))
    return out


@pytest.fixture(scope="session")
def smollm2_gguf() -> pathlib.Path:
    from jtrust.io.loading import embedded_gguf_path
    return embedded_gguf_path()


os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

# Many tests compile the same programs (a tiny model's train step, say, for a straight and a
# resumed run): XLA's persistent cache, in a directory of this session only, compiles each once.
# The environment carries it into the tests' subprocesses too.
# pytest-xdist's workers inherit the directory from the controller, so they share it; only the
# process that made it removes it.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    os.environ["JAX_COMPILATION_CACHE_DIR"] = tempfile.mkdtemp(prefix="jtrust-test-xla-")
    atexit.register(shutil.rmtree, os.environ["JAX_COMPILATION_CACHE_DIR"], ignore_errors=True)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
jax.config.update("jax_compilation_cache_dir", os.environ["JAX_COMPILATION_CACHE_DIR"])
jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Conversions made by tests go to a throwaway cache, never the user's."""
    os.environ["JTRUST_CACHE"] = str(tmp_path_factory.mktemp("jtrust_cache"))
