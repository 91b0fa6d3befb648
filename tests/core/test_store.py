"""jtrust.core.store: atomic files, hashes against hashlib, keyed cells, run identity."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from jtrust.core import store


def test_atomic_writes_leave_the_old_file_or_the_new_one(tmp_path):
    path = tmp_path / "a" / "result.json"
    store.write_json(path, {"x": 1})
    assert json.loads(path.read_text()) == {"x": 1}
    with pytest.raises(RuntimeError, match="crash"):
        with store.atomic_path(path) as tmp:
            tmp.write_text("half")
            raise RuntimeError("crash")
    assert json.loads(path.read_text()) == {"x": 1}
    assert sorted(p.name for p in path.parent.iterdir()) == ["result.json"]  # no temp file left
    store.save_npz(tmp_path / "v.npz", a=np.arange(3))
    store.save_npy(tmp_path / "v.npy", np.arange(4))
    assert np.load(tmp_path / "v.npz")["a"].tolist() == [0, 1, 2]
    assert np.load(tmp_path / "v.npy").tolist() == [0, 1, 2, 3]


def test_temp_names_are_unique_and_cleaned(tmp_path):
    target = tmp_path / "x.txt"
    with store.atomic_path(target) as a, store.atomic_path(target) as b:
        assert a != b and a.parent == b.parent == tmp_path
        a.write_text("a")
        b.write_text("b")
    assert target.read_text() == "a"  # the last writer to finish wins; neither is torn
    (tmp_path / ".y.txt.123-abcd.tmp").write_text("left by a killed writer")
    store.clean_temp(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["x.txt"]


def test_clean_temp_removes_left_files_and_directories_of_one_name_or_all(tmp_path):
    for name in (".ckpt.77-00ff.tmp", ".other.78-0a.tmp"):  # atomic_dir temps left by killed writers
        (tmp_path / name).mkdir()
        (tmp_path / name / "params").write_text("half")
    (tmp_path / ".ckpt.lock.79-0b.tmp").write_text("another target's temp")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / ".cell.json.80-0c.tmp").write_text("half")
    (tmp_path / "keep.tmp").write_text("not a temp name")  # no leading dot, no pid-hex
    store.clean_temp(tmp_path, name="ckpt")
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        ".ckpt.lock.79-0b.tmp", ".other.78-0a.tmp", "keep.tmp", "sub"]
    store.clean_temp(tmp_path)  # not recursive
    assert sorted(p.name for p in tmp_path.iterdir()) == ["keep.tmp", "sub"]
    assert [p.name for p in (tmp_path / "sub").iterdir()] == [".cell.json.80-0c.tmp"]
    store.clean_temp(tmp_path, recursive=True)
    assert list((tmp_path / "sub").iterdir()) == []


def test_atomic_dir_refuses_to_replace(tmp_path):
    with store.atomic_dir(tmp_path / "d") as tmp:
        (tmp / "f").write_text("1")
    assert (tmp_path / "d" / "f").read_text() == "1"
    with pytest.raises(FileExistsError):
        with store.atomic_dir(tmp_path / "d") as tmp:
            (tmp / "f").write_text("2")
    assert (tmp_path / "d" / "f").read_text() == "1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]


def test_hashes_match_hashlib(tmp_path):
    assert store.text_hash(["a", "b"]) == hashlib.sha256(b"a\x00b").hexdigest()
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "f1").write_bytes(b"one")
    (tmp_path / "d" / ".hidden").write_bytes(b"skipped")
    expected = hashlib.sha256(b"f1" + b"one").hexdigest()[:16]
    assert store.content_hash(tmp_path / "d") == expected
    assert store.file_hash(tmp_path / "d" / "f1") == hashlib.sha256(b"one").hexdigest()
    a, b = np.arange(3, dtype=np.int32), np.ones(2, np.float32)
    assert store.arrays_hash([a, b]) == hashlib.sha256(a.tobytes() + b.tobytes()).hexdigest()[:16]


def test_verified_sha256(tmp_path):
    (tmp_path / "data.txt").write_text("rows")
    (tmp_path / "SHA256SUMS").write_text(f"{hashlib.sha256(b'rows').hexdigest()}  data.txt\n")
    assert store.verified_sha256(tmp_path / "data.txt") == hashlib.sha256(b"rows").hexdigest()
    (tmp_path / "data.txt").write_text("edited")
    with pytest.raises(ValueError, match="checksum mismatch"):
        store.verified_sha256(tmp_path / "data.txt")


def test_cells_are_read_only_with_their_key(tmp_path):
    path = tmp_path / "cells" / "c.json"
    key = {"layers": (1, 2), "seed": 0}  # tuples compare as the lists JSON stores
    assert store.read_cell(path, key) is None
    store.write_cell(path, key, {"accuracy": 0.9})
    assert store.read_cell(path, key) == {"accuracy": 0.9}
    assert store.read_cell(path, dict(key, seed=1)) is None
    path.write_text('{"key": ')  # damaged: recomputed, not an error
    assert store.read_cell(path, key) is None


def test_run_identity(tmp_path):
    stored = {"model": "a", "steps": [1, 2]}
    assert store.identity_diff(stored, {"model": "a", "steps": (1, 2)}, ["model", "steps"]) == []
    assert store.identity_diff(stored, {"model": "b", "steps": (1, 2)}, ["model", "steps"]) == [
        "model: 'a' there, 'b' now"]
    with pytest.raises(ValueError, match="holds a different extraction.*model"):
        store.check_same_run(tmp_path, stored, {"model": "b"}, ["model"], what="extraction")
    assert store.safe_name("runs/a/step10/") == "runs_a_step10"
