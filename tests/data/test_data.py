"""Bundled trust sets (counts from the data README) and the loader's refusals."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import jtrust.data as data

# rows, label-1 count, label-0 count, as published with the datasets (jtrust/data/LICENSES/NOTICE.md)
COUNTS = {"reliability": (2263, 1118, 1145), "toxicity": (6514, 3633, 2881),
          "privacy": (2346, 1173, 1173), "fairness": (1952, 976, 976), "robustness": (3642, 1821, 1821)}


@pytest.mark.parametrize("dimension", sorted(COUNTS))
def test_bundled_counts(dimension):
    ds = data.load_texts(dimension)
    n, ones, zeros = COUNTS[dimension]
    assert len(ds.texts) == n and int(ds.labels.sum()) == ones and int((ds.labels == 0).sum()) == zeros
    assert all(t.strip() and "_x000D_" not in t for t in ds.texts)


def test_checksum_mismatch_is_refused(tmp_path, monkeypatch):
    copy = tmp_path / "data"
    shutil.copytree(data.BUNDLED / "tracingllm", copy / "tracingllm")
    with open(copy / "tracingllm" / "sst2.csv", "a") as f:
        f.write("tampered,1\n")
    monkeypatch.setattr(data, "BUNDLED", copy)
    with pytest.raises(ValueError, match="checksum mismatch"):
        data.load_texts("robustness")


@pytest.mark.parametrize("content, message, require_labels", [
    ("", "holds no rows", False),
    ("sentence,label\nhello,1\n", "no text column", False),
    # one class is refused only where labels are needed (probes); extraction takes the file
    ("text,label\nhello,1\nworld,1\n", "every label is 1", True),
    ("text,label\nhello,1\nworld,2\n", "exactly 0 or 1", False),
    ("text,label\nhello,1\n ,0\n", "empty texts, first at line 3", False),
])
def test_user_csv_refusals(tmp_path, content, message, require_labels):
    path = tmp_path / "mine.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=message):
        data.load_texts(str(path), require_labels=require_labels)


def test_user_jsonl_and_missing_file(tmp_path):
    path = tmp_path / "mine.jsonl"
    path.write_text('{"text": "a", "label": 0}\n{"text": "b", "label": 1}\n')
    ds = data.load_texts(str(path))
    assert ds.texts == ["a", "b"] and np.array_equal(ds.labels, [0, 1])
    with pytest.raises(FileNotFoundError, match="no dataset at"):
        data.load_texts(str(tmp_path / "nope.csv"))
