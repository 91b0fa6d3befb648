"""The trust sets as tfds builders (array_record, no TensorFlow) and as plain iterators."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest

import jtrust.data as data
from jtrust.data import builders

# rows, label-1 count, label-0 count, as published with the datasets (jtrust/data/LICENSES/NOTICE.md)
COUNTS = {"reliability": (2263, 1118, 1145), "toxicity": (6514, 3633, 2881),
          "privacy": (2346, 1173, 1173), "fairness": (1952, 976, 976), "robustness": (3642, 1821, 1821)}


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """dimension -> builder prepared once under a throwaway data_dir, plus that data_dir."""
    data_dir = tmp_path_factory.mktemp("tfds")
    return data_dir, {d: builders.trust_builder(d, data_dir) for d in COUNTS}


def _rows(source) -> list[dict]:
    return source.__getitems__(range(len(source)))  # one batched read instead of n lookups


@pytest.mark.parametrize("dimension", sorted(COUNTS))
def test_data_source_matches_load_texts(prepared, dimension):
    data_dir, built = prepared
    assert built[dimension].info.file_format.value == "array_record"
    rows = _rows(built[dimension].as_data_source(split="train"))
    n, ones, zeros = COUNTS[dimension]
    labels = np.array([r["label"] for r in rows])
    assert len(rows) == n and int(labels.sum()) == ones and int((labels == 0).sum()) == zeros
    expected = data.load_texts(dimension)
    assert [r["text"].decode("utf-8") for r in rows] == expected.texts
    assert np.array_equal(labels, expected.labels)
    assert [r["index"] for r in rows] == list(range(n))


@pytest.mark.parametrize("dimension", sorted(COUNTS))
def test_label_names_and_description(prepared, dimension):
    info = prepared[1][dimension].info
    _, one, zero = data.TRUST_DATASETS[dimension]
    assert info.features["label"].names == [zero, one]
    assert f"label 1 = {one}, label 0 = {zero}" in info.description
    assert (dimension == "fairness") == ("stereoset (related vs unrelated)" in info.description)


def test_second_call_reuses_prepared_files(prepared):
    data_dir, built = prepared
    folder = pathlib.Path(built["fairness"].data_dir)
    before = {p: p.stat().st_mtime_ns for p in folder.iterdir()}
    source = builders.trust_data_source("fairness", data_dir=data_dir)
    assert len(source) == COUNTS["fairness"][0]
    assert {p: p.stat().st_mtime_ns for p in folder.iterdir()} == before
    assert sorted(p.name for p in folder.parent.iterdir()) == ["1.0.0"]  # no incomplete.* copies


def test_default_data_dir_follows_jtrust_cache():
    assert builders.default_data_dir() == pathlib.Path(os.environ["JTRUST_CACHE"]) / "tfds"


def test_unknown_dimension_lists_valid_ones(tmp_path):
    with pytest.raises(ValueError, match=r"valid: \['fairness', 'privacy', 'reliability'"):
        builders.trust_builder("honesty", tmp_path)


def test_preparing_and_reading_never_imports_tensorflow(tmp_path):
    # tfds keeps a lazy `tensorflow` handle; the numpy path must never resolve it
    script = ("import json, sys\n"
              "from jtrust.data.builders import trust_data_source\n"
              f"source = trust_data_source('fairness', data_dir={str(tmp_path)!r})\n"
              "row = source[0]\n"
              "tf = sorted(m for m in sys.modules if m == 'tensorflow' or m.startswith('tensorflow.'))\n"
              "print(json.dumps({'n': len(source), 'label': row['label'], 'tf': tf}))\n")
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True)
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert result == {"n": COUNTS["fairness"][0], "label": int(data.load_texts("fairness").labels[0]),
                      "tf": []}


@pytest.mark.parametrize("dimension", sorted(COUNTS))
def test_iter_examples_equals_load_texts(dimension):
    expected = data.load_texts(dimension)
    rows = list(data.iter_examples(dimension))
    assert [r["text"] for r in rows] == expected.texts
    assert [r["label"] for r in rows] == expected.labels.tolist()
    assert [r["index"] for r in rows] == list(range(len(expected.texts)))


def test_iter_examples_user_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": " a ", "label": 0}\n{"text": "b", "label": 1}\n')
    assert list(data.iter_examples(str(path))) == [{"text": "a", "label": 0, "index": 0},
                                                   {"text": "b", "label": 1, "index": 1}]
    (tmp_path / "bare.txt").write_text("no labels here\n")
    with pytest.raises(ValueError, match="no 'label' column"):
        data.iter_examples(str(tmp_path / "bare.txt"))
