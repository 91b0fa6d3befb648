"""Sliced reads of safetensors files (jtrust.io.slices) against the safetensors library's own
slicing, and `load_sharded` on one process's 4 fake devices against a whole load."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import ml_dtypes
import numpy as np
import pytest
from safetensors.numpy import save_file

from jtrust.core.errors import InputError
from jtrust.io.slices import SafetensorsSlices

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_slices_equal_the_safetensors_librarys(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {"m": rng.standard_normal((7, 10)).astype(np.float32), "v": rng.standard_normal(9).astype(np.float16),
               "b": rng.standard_normal((5, 6)).astype(ml_dtypes.bfloat16)}
    save_file(tensors, tmp_path / "model.safetensors")
    reader = SafetensorsSlices(tmp_path)
    from safetensors import safe_open
    with safe_open(tmp_path / "model.safetensors", framework="flax") as f:
        for name, index in [("m", (slice(2, 5), slice(3, 9))), ("m", (slice(0, 7), slice(0, 10))),
                            ("m", (slice(6, 7), slice(None))), ("v", (slice(4, 9),)), ("b", (slice(1, 3), slice(2, 4)))]:
            want = np.asarray(f.get_slice(name)[index], np.float32)
            np.testing.assert_array_equal(reader.read(name, index), want)
    # 3 x 6 + 7 x 10 + 1 x 10 float32, 5 float16, 2 x 2 bfloat16
    assert reader.bytes_read == 4 * (18 + 70 + 10) + 2 * 5 + 2 * 4


def test_corrupt_files_are_named(tmp_path):
    (tmp_path / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    with pytest.raises(InputError, match="unreadable safetensors header"):
        SafetensorsSlices(tmp_path)
    save_file({"m": np.ones((4, 4), np.float32)}, tmp_path / "model.safetensors")
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[:-8])
    with pytest.raises(InputError, match="tensor 'm' lies outside the file"):
        SafetensorsSlices(tmp_path)
    header = b'{"m": {"dtype": "F32", "shape": [2]}}'
    (tmp_path / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header + bytes(8))
    with pytest.raises(InputError, match="tensor 'm' has no valid shape and data_offsets"):
        SafetensorsSlices(tmp_path)
    (tmp_path / "model.safetensors.index.json").write_text('{"weight_map": {"m": "../model.safetensors"}}')
    with pytest.raises(InputError, match="expected the file name of a shard in the same directory"):
        SafetensorsSlices(tmp_path)
    (tmp_path / "model.safetensors.index.json").unlink()
    save_file({"m": np.array([[1.0, np.nan]], np.float32)}, tmp_path / "model.safetensors")
    with pytest.raises(InputError, match="non-finite"):
        SafetensorsSlices(tmp_path).read("m", (slice(None), slice(None)))


CHILD = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import jtrust
    from jtrust.core.errors import InputError
    from jtrust.runtime import sharding
    mesh = sharding.make_mesh(data=1, fsdp=2, model=2)
    out = {}
    for name, path in json.loads(sys.argv[1]).items():
        whole = jtrust.load(path, cache=False)
        model = sharding.load_sharded(path, mesh)
        out[name] = max(float(np.abs(np.asarray(a) - np.asarray(b)).max())
                        for a, b in zip(jax.tree.leaves(whole.params), jax.tree.leaves(model.params)))
        out[name + "_split"] = len(model.params["blocks"]["mlp"]["up"]["kernel"].addressable_shards[0].data.ravel()) * 4 \\
            == whole.params["blocks"]["mlp"]["up"]["kernel"].size
        out[name + "_hash"] = model.checkpoint_hash == whole.checkpoint_hash
    try:
        sharding.load_sharded(json.loads(sys.argv[1])["llama"], sharding.make_mesh(data=1, model=3))
    except InputError as e:
        out["bad"] = str(e)
    print(json.dumps(out))
""")


def test_load_sharded_equals_a_whole_load(tmp_path):
    from helpers import make_tiny_hf_dir
    paths = {}
    for family in ("llama", "gpt_neox"):  # sliced safetensors; read whole, then split
        make_tiny_hf_dir(tmp_path / family, family)
        paths[family] = str(tmp_path / family)
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JTRUST_CACHE=str(tmp_path / "cache"))
    proc = subprocess.run([sys.executable, "-c", CHILD, json.dumps(paths)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    for family in paths:
        assert r[family] == 0.0 and r[family + "_split"], (family, r)
    assert not r["llama_hash"] and r["gpt_neox_hash"]  # the sliced load hashes headers, not bytes
    assert "not divisible by mesh axis 'model' of size 3" in r["bad"]
