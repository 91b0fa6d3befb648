"""Activation extraction against Hugging Face hidden states and hooks, plus bucketing,
streaming/resume and sharding."""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import pathlib
import subprocess
import sys

import numpy as np
import pytest
import tokenizers
import torch

from helpers import CORPUS, tiny_tokenizer_json
from jtrust.runtime.extract import extract, load_activations
from jtrust.models.model import Model
from jtrust.models.config import config_from_hf
from jtrust.io.convert import hf_to_params
from jtrust.models.sites import RESIDUAL_SITES as SITES  # the new sites: tests/models/test_sites.py
from jtrust.models.tokenizer import Tokenizer

extract_module = importlib.import_module("jtrust.runtime.extract")  # `jtrust.runtime.extract` is also the function

LONG = " ".join(CORPUS[:4]) + " Zebras xylophone quantum!"
# 1 to 60 tokens, deliberately not sorted by length, so results must be put back in order
TEXTS = [LONG[:n] for n in (45, 1, 100, 9, 70, 3, 20, 90, 30)] + ["Zebras xylophone quantum leap!"]


def tiny_tokenizer() -> Tokenizer:
    return Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), bos_id=1, eos_id=2, pad_id=0)


def jtrust_model(torch_model) -> Model:
    config = config_from_hf(torch_model.config.to_dict())
    tensors = {k: v.numpy() for k, v in torch_model.state_dict().items()}
    return Model(config, hf_to_params(tensors, config), tiny_tokenizer(), "tiny", "hash0")


def torch_sites(torch_model, ids: list[int]) -> dict[str, np.ndarray]:
    """site -> [L, T, d] of one unpadded text, from hidden_states and forward hooks."""
    family = torch_model.config.model_type
    blocks = torch_model.gpt_neox.layers if family == "gpt_neox" else torch_model.model.layers
    attn = "attention" if family == "gpt_neox" else "self_attn"
    first = lambda out: out[0] if isinstance(out, tuple) else out
    hooked = {"attn_out": [], "mlp_out": [], "last_block": []}
    handles = []
    for block in blocks:
        handles.append(getattr(block, attn).register_forward_hook(
            lambda m, a, out: hooked["attn_out"].append(first(out))))
        handles.append(block.mlp.register_forward_hook(lambda m, a, out: hooked["mlp_out"].append(first(out))))
    handles.append(blocks[-1].register_forward_hook(lambda m, a, out: hooked["last_block"].append(first(out))))
    with torch.no_grad():
        hidden = torch_model(torch.tensor([ids]), output_hidden_states=True).hidden_states
    for h in handles:
        h.remove()
    L = len(blocks)
    # hidden_states[l] is block l's input; the last entry has the final norm applied, hence the hook
    post = [hidden[l + 1] for l in range(L - 1)] + hooked["last_block"]
    stack = lambda xs: torch.cat(xs).numpy()  # L x [1, T, d] -> [L, T, d]
    return dict(resid_pre=stack(list(hidden[:L])), resid_post=stack(post),
                attn_out=stack(hooked["attn_out"]), mlp_out=stack(hooked["mlp_out"]))


def pooled(oracle: list[dict[str, np.ndarray]], site: str, layer: int, pool: str) -> np.ndarray:
    """What `Activations.get(site, layer)` must return, from per-text [L, T, d] oracles."""
    if pool == "last":
        return np.stack([o[site][layer, -1] for o in oracle])
    if pool == "mean":
        return np.stack([o[site][layer].mean(0) for o in oracle])
    return np.concatenate([o[site][layer] for o in oracle])


@pytest.fixture(scope="module")
def llama(tiny_checkpoints) -> Model:
    """The tiny llama; tests share its compiled programs (same config, batch 4, all SITES)."""
    return jtrust_model(tiny_checkpoints["llama"][1])


# pooling is family independent; NeoX (parallel residual, partial rotary) is checked token by token
@pytest.mark.parametrize("family, pools", [("llama", ("last", "mean", "all")), ("gpt_neox", ("all",))])
def test_matches_transformers_every_site_and_pooling(tiny_checkpoints, family, pools):
    torch_model = tiny_checkpoints[family][1]
    model = jtrust_model(torch_model)
    ids = [model.tokenizer.encode(t) for t in TEXTS]
    assert min(map(len, ids)) == 1 and max(map(len, ids)) == 60
    oracle = [torch_sites(torch_model, i) for i in ids]
    for pool in pools:
        acts = extract(model, TEXTS, sites=SITES, pool=pool, batch_size=4, progress=False)
        for site in SITES:
            for layer in range(model.config.n_layers):
                np.testing.assert_allclose(acts.get(site, layer), pooled(oracle, site, layer, pool),
                                           atol=1e-4, rtol=1e-4, err_msg=f"{pool} {site} {layer}")
    np.testing.assert_array_equal(np.diff(acts.offsets), [len(i) for i in ids])


def test_buckets_bound_compiled_shapes_and_stop_at_deepest_layer(tiny_checkpoints, llama, monkeypatch):
    texts = [LONG[: (i * 37) % 150 + 1] for i in range(40)]  # 1 to 89 tokens
    calls = []

    def recording_forward(params, tokens, mask, **kwargs):
        calls.append((tokens.shape, kwargs["upto_layer"], kwargs["logits"]))
        return real_forward(params, tokens, mask, **kwargs)

    real_forward = extract_module.forward_jit
    monkeypatch.setattr(extract_module, "forward_jit", recording_forward)
    cache_before = real_forward._cache_size()
    acts = extract(llama, texts, sites=SITES, layers=[1, 0], pool="mean", batch_size=4,
                   progress=False)
    rung = lambda n: next(r for r in (32, 64, 96, 128, 256) if r >= n)
    rungs_touched = {rung(len(llama.tokenizer.encode(t))) for t in texts}
    shapes = {shape for shape, _, _ in calls}
    assert len(calls) == 10 and rungs_touched == {32, 64, 96}
    assert len(shapes) <= len(rungs_touched)
    assert real_forward._cache_size() - cache_before <= len(rungs_touched)
    assert all(b == 4 and t in rungs_touched for b, t in shapes)
    assert {(upto, logits) for _, upto, logits in calls} == {(1, False)}
    assert acts.layers == [0, 1]
    oracle = [torch_sites(tiny_checkpoints["llama"][1], llama.tokenizer.encode(t)) for t in texts]
    for site in SITES:
        for layer in (0, 1):
            np.testing.assert_allclose(acts.get(site, layer), pooled(oracle, site, layer, "mean"),
                                       atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("pool", ["last", "all"])
def test_streams_to_disk_and_resumes_after_a_crash(llama, tmp_path, monkeypatch, pool):
    args = dict(sites=SITES, layers=[0, 2], pool=pool, batch_size=4, chunk_mb=0,
                progress=False)  # chunk_mb=0: every batch is its own chunk
    reference = extract(llama, TEXTS, **args)
    n_chunks = len(reference.manifest["chunks"])
    assert n_chunks == 3
    real_forward = extract_module.forward_jit
    calls = []

    def crashing_forward(*a, **kw):
        calls.append(1)
        if crash_after is not None and len(calls) > crash_after:
            raise RuntimeError("simulated crash")
        return real_forward(*a, **kw)

    monkeypatch.setattr(extract_module, "forward_jit", crashing_forward)
    out = tmp_path / "acts"
    crash_after = 1
    with pytest.raises(RuntimeError, match="simulated crash"):
        extract(llama, TEXTS, out_dir=out, dataset_name="demo", **args)
    manifest = json.loads((out / "manifest.json").read_text())
    assert not manifest["complete"] and [c["batches"] for c in manifest["chunks"]] == [[0, 1]]
    with pytest.raises(ValueError, match="incomplete.*rerun extract"):
        load_activations(out)
    (out / ".attn_out.00001.npy.4242-0a1b2c3d.tmp").write_bytes(b"half a chunk")  # as if killed mid-write

    calls.clear()
    crash_after = None
    acts = extract(llama, TEXTS, out_dir=out, dataset_name="demo", **args)
    assert len(calls) == n_chunks - 1
    assert list(out.glob(".*.tmp")) == []
    reloaded = load_activations(out)
    for site in args["sites"]:
        for layer in args["layers"]:
            np.testing.assert_array_equal(acts.get(site, layer), reference.get(site, layer))
            np.testing.assert_array_equal(reloaded.get(site, layer), reference.get(site, layer))
    np.testing.assert_array_equal(reloaded.offsets, reference.offsets)

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["dataset_name"] == "demo"
    assert manifest["dataset_hash"] == hashlib.sha256("\0".join(TEXTS).encode()).hexdigest()
    assert (manifest["n_texts"], manifest["d_model"], manifest["checkpoint_hash"]) == (10, 64, "hash0")
    assert sorted(np.load(out / "order.npy")) == list(range(10))
    assert np.load(out / "resid_post.00002.npy").shape[::2] == (2, 64)  # [n_layers, rows, d]

    calls.clear()
    extract(llama, TEXTS, out_dir=out, **args)  # a finished directory: nothing to compute
    assert calls == []
    with pytest.raises(ValueError, match="layers.*another --out"):
        extract(llama, TEXTS, out_dir=out, **dict(args, layers=[1]))
    with pytest.raises(ValueError, match="checkpoint_hash"):
        extract(llama.with_params(llama.params, checkpoint_hash="other"), TEXTS, out_dir=out, **args)


def test_float16_storage_and_truncation(llama):
    args = dict(sites=SITES, batch_size=4, progress=False)
    full = extract(llama, TEXTS, **args)
    half = extract(llama, TEXTS, dtype=np.float16, **args)
    assert half.get("resid_post", 1).dtype == np.float16
    np.testing.assert_array_equal(half.get("resid_post", 1), full.get("resid_post", 1).astype(np.float16))
    cut = extract(llama, TEXTS, pool="all", max_length=32, **args)
    lengths = [len(llama.tokenizer.encode(t)) for t in TEXTS]
    assert cut.manifest["n_truncated"] == sum(n > 32 for n in lengths) == 3
    assert cut.manifest["bucket_ladder"] == [32]
    np.testing.assert_array_equal(cut.n_tokens, np.minimum(lengths, 32))


def test_rejects_bad_arguments(llama, tmp_path):
    cases = [
        (dict(texts=[]), "no texts"),
        (dict(texts=["a", "b", ""]), "text 2 is empty"),
        (dict(sites=("resid_mid",)), "resid_post"),
        (dict(pool="max"), "last"),
        (dict(layers=[0, 3]), r"layers \[3\] out of range"),
        (dict(dtype=np.int8), "float16"),
    ]
    for kwargs, message in cases:
        with pytest.raises(ValueError, match=message):
            extract(llama, **{"texts": TEXTS, "progress": False, **kwargs})
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="not empty"):
        extract(llama, TEXTS, out_dir=tmp_path, progress=False)
    with pytest.raises(ValueError, match="no manifest"):
        load_activations(tmp_path)


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax starts
import jax
import numpy as np
import tokenizers
from jax.sharding import Mesh
from helpers import tiny_tokenizer_json
from jtrust.runtime.extract import extract
from jtrust.models.model import Model
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import init_params
from jtrust.models.tokenizer import Tokenizer

assert len(jax.devices()) == 8
config = ModelConfig(family="llama", vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                     head_dim=16, d_ff=96, norm="rms", norm_eps=1e-5, position="rope", rotary_dim=16)
tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), bos_id=1, eos_id=2, pad_id=0)
shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))  # Linen's init is slow here
rng = np.random.default_rng(0)
params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
model = Model(config, params, tokenizer, "tiny", "hash0")
mesh = Mesh(np.array(jax.devices()), ("data",))
sites, texts = ("resid_post", "attn_out"), TEXTS
sharded = extract(model, texts, sites=sites, pool="all", batch_size=6, mesh=mesh, progress=False)
assert sharded.manifest["batch_size"] == 8  # rounded up to the device count
single = extract(model, texts, sites=sites, pool="all", batch_size=8, progress=False)
for site in sites:
    for layer in range(3):
        np.testing.assert_allclose(sharded.get(site, layer), single.get(site, layer), atol=1e-5)
print("ok")
"""


def test_mesh_of_eight_devices_matches_single_device():
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(here.parent), str(here.parents[1])]))  # tests/, repo
    texts = [t for t in TEXTS if len(t) < 50]  # 7 texts of one bucket: one batch with a dummy row
    script = MESH_SCRIPT.replace("TEXTS", repr(texts))
    result = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
