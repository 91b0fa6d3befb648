"""Sharded parameters (jtrust.runtime.sharding): the rule table's layout on real parameter trees;
extraction and generation (greedy, and sampled with the same keys) on (2 data x 4 fsdp) and
(2 data x 2 fsdp x 2 model) meshes of 8 fake CPU devices equal to one device (the 8-data mesh is
tests/runtime/test_extract.py's and test_generate.py's); meshes that do not fit, named."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import jax
import pytest
from jax.sharding import PartitionSpec as P

import jtrust
from jtrust.core.errors import InputError
from jtrust.runtime import sharding

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

SCRIPT = textwrap.dedent("""
    import json, sys
    import jax, numpy as np
    import jtrust
    from jtrust.core.errors import InputError
    from jtrust.runtime import sharding
    from jtrust.runtime.extract import extract
    from jtrust.runtime.generate import Sampling, generate

    model = jtrust.load(sys.argv[1])
    texts = ["The quick brown fox.", "Trust, but verify.", "a b c d e f g", "Hello there, world!",
             "One more line of text here.", "x", "Numbers 1 2 3 4 5 6.", "The end."] * 2
    one = extract(model, texts, sites=("resid_post", "mlp_out"), pool="mean", batch_size=8, progress=False)
    prompts = ["Trust, but", "The quick brown", "a b", "Hello"]
    greedy = generate(model, prompts, max_new_tokens=6, sampling=Sampling())
    sampled = generate(model, prompts[:2], max_new_tokens=6, sampling=Sampling(1.0, top_p=0.9), n_samples=2,
                       key=jax.random.key(0))
    result = {"devices": len(jax.devices())}
    for name, sizes in [("2data4fsdp", dict(data=2, fsdp=4)),
                        ("2data2fsdp2model", dict(data=2, fsdp=2, model=2))]:
        mesh = sharding.make_mesh(**sizes)
        placed = sharding.shard_params(model.params, mesh)
        q = placed["blocks"]["attn"]["q"]["kernel"]
        result[name + "_q_shard"] = list(q.addressable_shards[0].data.shape)
        got = extract(model, texts, sites=("resid_post", "mlp_out"), pool="mean", batch_size=8, mesh=mesh,
                      progress=False)
        result[name + "_greedy"] = bool(np.array_equal(
            generate(model, prompts, max_new_tokens=6, sampling=Sampling(), mesh=mesh).tokens, greedy.tokens))
        result[name + "_sampled"] = bool(np.array_equal(
            generate(model, prompts[:2], max_new_tokens=6, sampling=Sampling(1.0, top_p=0.9), n_samples=2,
                     key=jax.random.key(0), mesh=mesh).tokens, sampled.tokens))
        result[name] = max(float(np.abs(got.get(s, l) - one.get(s, l)).max())
                           for s in ("resid_post", "mlp_out") for l in range(model.config.n_layers))
    for name, call in [("indivisible", lambda: sharding.shard_params(model.params, sharding.make_mesh(data=2, fsdp=3))),
                       ("too_large", lambda: sharding.make_mesh(data=4, fsdp=4))]:
        try:
            call()
            result[name] = None
        except InputError as e:
            result[name] = str(e)
    print(json.dumps(result))
""")


def test_extraction_and_generation_on_sharded_meshes_equal_one_device(tiny_checkpoints):
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run([sys.executable, "-c", SCRIPT, str(tiny_checkpoints["llama"][0])],
                          env=env, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["devices"] == 8
    # q kernel [3 layers, 64 embed, 64 heads]: embed over fsdp, heads over model
    assert r["2data4fsdp_q_shard"] == [3, 16, 64]
    assert r["2data2fsdp2model_q_shard"] == [3, 32, 32]
    for name in ("2data4fsdp", "2data2fsdp2model"):
        assert r[name] < 1e-5, (name, r[name])
        assert r[name + "_greedy"] and r[name + "_sampled"], name
    # the tiny llama's hidden size 64 is not divisible by 3: the first such parameter is named
    assert r["indivisible"].startswith("parameter blocks/attn/k/kernel (3, 64, 32): its embed dimension (64) "
                                       "is not divisible by mesh axis 'fsdp' of size 3")
    assert "needs 16 devices; there are 8" in r["too_large"]


def test_rule_table_on_the_embedded_model():
    """Every SmolLM2 parameter gets a spec; dimensions that the mesh divides are split, the rest
    refused with the parameter and axis named (abstract shapes: no device needed)."""
    model = jtrust.load("smollm2")
    shapes = jax.eval_shape(lambda p: p, model.params)
    mesh = jax.sharding.AbstractMesh((1, 2, 2), sharding.MESH_AXES)
    specs = sharding.param_specs(shapes, mesh)
    assert specs["embed"]["embedding"] == P("model", "fsdp")  # [49152 vocab, 576 embed]
    assert specs["blocks"]["attn"]["o"]["kernel"] == P(None, "model", "fsdp")  # [30, 576 heads, 576 embed]
    assert specs["blocks"]["mlp"]["down"]["kernel"] == P(None, "model", "fsdp")  # [30, 1536 mlp, 576]
    assert specs["blocks"]["ln1"]["scale"] == P(None, None)
    total = sum(x.size * 4 for x in jax.tree.leaves(shapes))
    norms = sum(x.size * 4 for k, x in jax.tree_util.tree_leaves_with_path(shapes) if "scale" in jax.tree_util.keystr(k))
    assert sharding.per_device_bytes(shapes, mesh) == (total - norms) // 4 + norms
    with pytest.raises(InputError, match=r"parameter blocks/attn/k/kernel \(30, 576, 192\): its heads dimension "
                                         r"\(192\) is not divisible by mesh axis 'model' of size 5"):
        sharding.param_specs(shapes, jax.sharding.AbstractMesh((1, 1, 5), sharding.MESH_AXES))
    with pytest.raises(InputError, match="mesh axes"):
        sharding.param_specs(shapes, jax.sharding.AbstractMesh((2,), ("tensor",)))
