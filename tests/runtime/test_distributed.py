"""Two processes on localhost, 4 CPU devices each, one 8-device mesh: `extract` and `generate`
must give every process the results of a single-process run without a mesh, and only process 0
may write an extraction directory."""

from __future__ import annotations

import os
import pathlib
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np

import jtrust
from helpers import CORPUS, make_tiny_hf_dir, random_tokens

TEXTS = CORPUS[:4] + ["Trust.", "Zebras xylophone quantum leap!", "Verify, then trust again.",
                      "The lazy dog sleeps.", "France", "Concepts are directions."]  # 10: two batches
PROMPTS = [random_tokens((n,), seed=n).tolist() for n in (3, 5, 8, 2, 9, 4, 6, 7)]
NEW_TOKENS = 6

CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import jtrust
    import jtrust.runtime.distributed

    port, process_id, checkpoint, out = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
    jtrust.distributed.initialize(f"localhost:{port}", 2, process_id)
    import jax
    assert (jax.process_count(), len(jax.devices()), len(jax.local_devices())) == (2, 8, 4)
    model = jtrust.load(checkpoint)  # a jtrust (orbax) directory, restored by every process
    mesh = jtrust.distributed.data_mesh()
    texts, prompts = TEXTS, PROMPTS
    acts = jtrust.extract(model, texts, pool="last", batch_size=8, mesh=mesh, progress=False)
    stored = jtrust.extract(model, texts, pool="last", batch_size=8, mesh=mesh, progress=False,
                            out_dir=out + "/acts")
    assert (stored is None) == (process_id != 0)  # only process 0 writes and returns
    again = jtrust.extract(model, texts, pool="last", batch_size=8, mesh=mesh, progress=False,
                           out_dir=out + "/acts")  # complete: every process learns there is nothing to do
    assert (again is None) == (process_id != 0)
    params = jtrust.distributed.replicate(model.params, mesh)
    assert all(a is b for a, b in zip(jax.tree.leaves(params),
                                      jax.tree.leaves(jtrust.distributed.replicate(params, mesh))))
    gen = jtrust.generate(model.with_params(params), prompts, max_new_tokens=NEW_TOKENS, mesh=mesh)
    # 3 prompts x 2 samples: prompt rows replicated, sampled rows sharded; the same key everywhere
    sampled = jtrust.generate(model, prompts[:3], max_new_tokens=NEW_TOKENS, mesh=mesh, n_samples=2,
                              sampling=jtrust.Sampling(1.0, top_p=0.9), key=jax.random.key(0))
    layers = range(model.config.n_layers)
    np.savez(f"{out}/result{process_id}.npz", tokens=gen.tokens, lengths=gen.lengths,
             sampled=sampled.tokens,
             activations=np.stack([acts.get("resid_post", layer) for layer in layers]))
""").replace("TEXTS", repr(TEXTS)).replace("PROMPTS", repr(PROMPTS)).replace(
    "NEW_TOKENS", str(NEW_TOKENS))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(tmp_path):
    checkpoint = tmp_path / "llama"
    make_tiny_hf_dir(checkpoint, "llama")
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JTRUST_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    converted = jtrust.convert(checkpoint, tmp_path / "converted")
    children = [subprocess.Popen([sys.executable, "-c", CHILD, str(port), str(i), str(converted),
                                  str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]

    model = jtrust.load(checkpoint)  # the reference: this process, one device, no mesh
    acts = jtrust.extract(model, TEXTS, pool="last", batch_size=8, progress=False)
    reference = np.stack([acts.get("resid_post", layer) for layer in range(model.config.n_layers)])
    gen = jtrust.generate(model, PROMPTS, max_new_tokens=NEW_TOKENS)
    sampled = jtrust.generate(model, PROMPTS[:3], max_new_tokens=NEW_TOKENS, n_samples=2,
                              sampling=jtrust.Sampling(1.0, top_p=0.9), key=jax.random.key(0))

    errors, deadline = [], time.monotonic() + 120
    for i, child in enumerate(children):
        try:
            _, stderr = child.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            child.kill()
            _, stderr = child.communicate()
        if child.returncode != 0:
            errors.append(f"process {i} exited with {child.returncode}:\n{stderr[-3000:]}")
    assert not errors, "\n".join(errors)

    stored = jtrust.load_activations(tmp_path / "acts")
    for layer in range(model.config.n_layers):
        np.testing.assert_allclose(stored.get("resid_post", layer), reference[layer], atol=1e-5)
    for i in range(2):  # every process holds the full results
        result = np.load(tmp_path / f"result{i}.npz")
        np.testing.assert_allclose(result["activations"], reference, atol=1e-5)
        np.testing.assert_array_equal(result["tokens"], gen.tokens)
        np.testing.assert_array_equal(result["lengths"], gen.lengths)
        np.testing.assert_array_equal(result["sampled"], sampled.tokens)


SHARDED_CHILD = textwrap.dedent("""
    import sys
    import numpy as np
    import jtrust
    import jtrust.runtime.distributed

    port, process_id, hf_dir, converted, out = sys.argv[1], int(sys.argv[2]), *sys.argv[3:6]
    jtrust.distributed.initialize(f"localhost:{port}", 2, process_id)
    import jax
    from jtrust.runtime import distributed, sharding

    def read_bytes():  # bytes this process has read from files so far (page cache included)
        return int(open("/proc/self/io").read().split("rchar: ")[1].split()[0])

    mesh = sharding.make_mesh(data=1, fsdp=2, model=4)  # fsdp 0 = process 0's devices, 1 = process 1's
    result = {}
    sharding.load_sharded(converted, mesh)  # once first: orbax's first restore imports modules (read too)
    for name, path in (("hf", hf_dir), ("orbax", converted)):
        start = read_bytes()
        model = sharding.load_sharded(path, mesh)
        result[name + "_bytes"] = read_bytes() - start
        q = model.params["blocks"]["attn"]["q"]["kernel"]
        assert q.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", "model"), q.sharding
        assert not q.is_fully_addressable  # half of it lives on the other process
        gathered = distributed.to_host(model.params)
        for key, value in jax.tree_util.tree_leaves_with_path(gathered):
            result[name + jax.tree_util.keystr(key)] = value
        tokens = jax.numpy.asarray(np.arange(12, dtype=np.int32).reshape(2, 6) % 200 + 3)
        result[name + "_activations"] = np.stack([jtrust.extract(model, ["a b c", "Trust, but verify."],
            pool="mean", mesh=mesh, progress=False).get("resid_post", l) for l in range(model.config.n_layers)])
    from jtrust import training as T  # training on the same mesh: state split across the processes
    examples = T.packed_examples(np.arange(40 * 17) % 200 + 3, seq_len=16)
    run = T.train(model, examples, T.TrainConfig(steps=3, batch_size=8, learning_rate=3e-3, log_every=1),
                  out + "/train", progress=False, mesh=mesh)
    result["train_loss"] = [m["loss"] for m in run.metrics if m["kind"] == "train"]
    for key, value in jax.tree_util.tree_leaves_with_path(distributed.to_host(run.model.params)):
        result["train" + jax.tree_util.keystr(key)] = value
    start = read_bytes()
    jtrust.load(hf_dir, cache=False)  # the whole checkpoint, for comparison
    result["whole_bytes"] = read_bytes() - start
    np.savez(f"{out}/sharded{process_id}.npz", **result)
""")


def test_two_processes_load_only_their_slices_and_train_on_them(tmp_path):
    """Each of two processes reads about half of the checkpoint (a safetensors directory by
    byte ranges, a jtrust directory by orbax chunks); together they hold the whole model, extract
    as one process does, and train it (state split across them) to one process's losses."""
    from jtrust.io import params as params_io
    checkpoint = tmp_path / "llama"
    make_tiny_hf_dir(checkpoint, "llama")
    chunk, params_io.CHUNK_BYTES = params_io.CHUNK_BYTES, 2048  # tiny weights: tiny chunks
    try:
        converted = jtrust.convert(checkpoint, tmp_path / "converted")
    finally:
        params_io.CHUNK_BYTES = chunk
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4", JAX_PLATFORMS="cpu",
               JTRUST_CACHE=str(tmp_path / "cache"),
               PYTHONPATH=os.pathsep.join([str(here.parent), str(here.parents[1]), os.environ.get("PYTHONPATH", "")]))
    port = free_port()
    children = [subprocess.Popen([sys.executable, "-c", SHARDED_CHILD, str(port), str(i), str(checkpoint),
                                  str(converted), str(tmp_path)], env=env, stdout=subprocess.PIPE,
                                 stderr=subprocess.PIPE, text=True) for i in range(2)]
    model = jtrust.load(checkpoint, cache=False)
    reference = jtrust.extract(model, ["a b c", "Trust, but verify."], pool="mean", progress=False)
    from jtrust import training as T
    examples = T.packed_examples(np.arange(40 * 17) % 200 + 3, seq_len=16)
    trained = T.train(model, examples, T.TrainConfig(steps=3, batch_size=8, learning_rate=3e-3, log_every=1),
                      tmp_path / "train_one", progress=False)
    for child in children:
        _, err = child.communicate(timeout=600)
        assert child.returncode == 0, err[-3000:]
    weights = (checkpoint / "model.safetensors").stat().st_size
    for i in range(2):
        r = np.load(tmp_path / f"sharded{i}.npz")
        assert r["whole_bytes"] >= weights  # the whole load reads every tensor
        for name in ("hf", "orbax"):
            # half of every split weight (norms and the 4 KB tokenizer read whole; orbax adds its index)
            assert r[f"{name}_bytes"] < 0.62 * r["whole_bytes"], (name, i, r[f"{name}_bytes"], r["whole_bytes"])
            for key, value in jax.tree_util.tree_leaves_with_path(model.params):
                np.testing.assert_array_equal(r[name + jax.tree_util.keystr(key)], np.asarray(value))
            want = np.stack([reference.get("resid_post", l) for l in range(model.config.n_layers)])
            np.testing.assert_allclose(r[name + "_activations"], want, atol=2e-5, rtol=1e-5)
        np.testing.assert_allclose(r["train_loss"], [m["loss"] for m in trained.metrics if m["kind"] == "train"],
                                   rtol=1e-5)
        for key, value in jax.tree_util.tree_leaves_with_path(trained.model.params):
            np.testing.assert_allclose(r["train" + jax.tree_util.keystr(key)], np.asarray(value), atol=3e-3)
