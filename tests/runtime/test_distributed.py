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
