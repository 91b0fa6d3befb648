"""Fixtures (the tiny checkpoints, the embedded model, an isolated cache); helpers live in helpers.py."""

from __future__ import annotations

import os
import pathlib

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


@pytest.fixture(autouse=True, scope="session")
def _isolated_cache(tmp_path_factory):
    """Conversions made by tests go to a throwaway cache, never the user's."""
    os.environ["JTRUST_CACHE"] = str(tmp_path_factory.mktemp("jtrust_cache"))
