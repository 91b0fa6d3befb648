"""Extraction into out_dir with real processes: chunks are stored by time as well as size, so a
run killed with SIGKILL loses only its last unstored batches and the resumed run computes only
those; two extractions into one out_dir do the work once (the second stops naming the first, or
waits and finds it done). Results always equal an uninterrupted in-memory extraction.

Children import this module (tiny_model, TEXTS, slowed_extract). No assertion depends on timing:
a child that must be caught mid-run blocks at a fixed batch until it is killed or released."""

from __future__ import annotations

import importlib
import json
import os
import pathlib
import signal
import socket
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tokenizers

from helpers import CORPUS, tiny_tokenizer_json
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import init_params
from jtrust.models.model import Model
from jtrust.models.tokenizer import Tokenizer
from jtrust.runtime.extract import FORMAT, extract, load_activations

extract_module = importlib.import_module("jtrust.runtime.extract")
HERE = pathlib.Path(__file__).parent
SAFETY = 180  # seconds before a stuck child fails the test (never reached when all is well)
LONG = " ".join(CORPUS[:4])
TEXTS = [LONG[: 3 + (i * 29) % 90] for i in range(36)]  # 1 to ~25 tokens, unsorted
ARGS = dict(sites=("resid_post", "mlp_out"), layers=[0, 2], batch_size=2, progress=False)
N_BATCHES = 18


def tiny_model() -> Model:
    """A 3-block Llama with seeded random weights: the same in every process."""
    config = ModelConfig(family="llama", vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2,
                         head_dim=16, d_ff=96, norm="rms", norm_eps=1e-5, position="rope", rotary_dim=16)
    tokenizer = Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), bos_id=1, eos_id=2, pad_id=0)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(0)
    params = jax.tree.map(lambda s: rng.normal(0, 0.1, s.shape).astype(np.float32), shapes)
    return Model(config, params, tokenizer, "tiny", "hash0")


def slowed_extract(out, pool, flush_seconds, delay, wait, calls_file, block_at=None, gate=None):
    """extract(out_dir=out) whose forward passes are logged to calls_file (one line each), take
    `delay` seconds, wait for `gate` (a file) before the first one, and never return from pass
    number `block_at` (the process is then killed)."""
    real = extract_module.forward_jit

    def forward(*a, **kw):
        while gate is not None and not os.path.exists(gate):
            time.sleep(0.02)
        with open(calls_file, "a") as f:
            f.write("forward\n")
        n = len(pathlib.Path(calls_file).read_text().splitlines())
        if block_at is not None and n >= block_at:
            time.sleep(3600)
        time.sleep(delay)
        return real(*a, **kw)

    extract_module.forward_jit = forward
    extract(tiny_model(), TEXTS, pool=pool, out_dir=out, flush_seconds=flush_seconds, wait=wait, **ARGS)


CHILD = """
import sys
sys.path.insert(0, sys.argv[1])
import test_extract_resume as t
out, pool, flush, delay, wait, calls, block_at, gate = sys.argv[2:10]
t.slowed_extract(out, pool, float(flush), float(delay), float(wait), calls,
                 None if block_at == "-" else int(block_at), None if gate == "-" else gate)
"""


def spawn(out, calls, pool="last", flush=15.0, delay=0.0, wait=0.0, block_at="-", gate="-"):
    env = dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
               PYTHONPATH=os.pathsep.join([str(HERE.parent), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen([sys.executable, "-c", CHILD, str(HERE), str(out), pool, str(flush), str(delay),
                             str(wait), str(calls), str(block_at), str(gate)],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stored_chunks(out: pathlib.Path) -> list[dict]:
    try:
        return json.loads((out / "manifest.json").read_text())["chunks"]
    except (OSError, ValueError, KeyError):
        return []


def covered(chunks: list[dict]) -> int:
    return sum(c["batches"][1] - c["batches"][0] for c in chunks)


def assert_same(acts, reference):
    for site in ARGS["sites"]:
        for layer in ARGS["layers"]:
            np.testing.assert_array_equal(acts.get(site, layer), reference.get(site, layer),
                                          err_msg=f"{site} {layer}")
    np.testing.assert_array_equal(acts.offsets, reference.offsets)


@pytest.fixture(scope="module")
def model() -> Model:
    return tiny_model()


@pytest.fixture(scope="module")
def reference(model):
    """pool -> the uninterrupted in-memory extraction."""
    return {pool: extract(model, TEXTS, pool=pool, **ARGS) for pool in ("last", "all")}


@pytest.fixture
def count_forwards(monkeypatch):
    calls = []
    real = extract_module.forward_jit
    monkeypatch.setattr(extract_module, "forward_jit", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    return calls


def test_sigkill_loses_only_unstored_batches(model, reference, count_forwards, tmp_path):
    assert len(reference["last"].manifest["batches"]) == N_BATCHES
    out, calls = tmp_path / "acts", tmp_path / "calls"
    # each pass takes >= 0.3 s and a chunk is stored 0.5 s after the last: by the 8th pass at
    # least 3 chunks are stored; the 8th never returns
    child = spawn(out, calls, flush=0.5, delay=0.3, block_at=8)
    deadline = time.monotonic() + SAFETY
    while len(stored_chunks(out)) < 3:
        assert child.poll() is None, child.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the child stored no chunks"
        time.sleep(0.02)
    child.send_signal(signal.SIGKILL)
    child.wait()
    chunks = stored_chunks(out)
    done = covered(chunks)
    assert 3 <= done <= 7 and all(c["batches"][1] - c["batches"][0] <= 2 for c in chunks), chunks
    with pytest.raises(InputError, match=f"incomplete \\({done} of {N_BATCHES} batches\\)"):
        load_activations(out)

    count_forwards.clear()
    acts = extract(model, TEXTS, out_dir=out, pool="last", flush_seconds=1e9, **ARGS)  # resume: one chunk
    assert len(count_forwards) == N_BATCHES - done  # only the batches no stored chunk covered
    assert_same(acts, reference["last"])
    assert_same(load_activations(out), reference["last"])
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["complete"] and manifest["format"] == FORMAT == "jtrust-activations/2"
    assert manifest["chunks"][: len(chunks)] == chunks and len(manifest["chunks"]) == len(chunks) + 1
    assert sorted(p.name for p in out.iterdir() if p.name.startswith(".")) == []  # no temp, no lock


def test_an_interruption_keeps_finished_batches_and_the_chunk_layout_may_change(
        model, reference, tmp_path, monkeypatch):
    out = tmp_path / "acts"
    real, calls, interrupt_at = extract_module.forward_jit, [], [8]

    def forward(*a, **kw):
        calls.append(1)
        if len(calls) == interrupt_at[0]:
            raise KeyboardInterrupt  # Ctrl-C during the 8th batch
        return real(*a, **kw)

    monkeypatch.setattr(extract_module, "forward_jit", forward)
    with pytest.raises(KeyboardInterrupt):  # by size and time: one chunk for everything
        extract(model, TEXTS, pool="all", out_dir=out, chunk_mb=1e9, flush_seconds=1e9, **ARGS)
    assert [c["batches"] for c in stored_chunks(out)] == [[0, 7]]  # the finished batches, kept
    calls.clear()
    interrupt_at[0] = None
    acts = extract(model, TEXTS, pool="all", out_dir=out, flush_seconds=0, **ARGS)  # now a chunk per batch
    assert len(calls) == N_BATCHES - 7
    assert [c["batches"] for c in acts.manifest["chunks"]] == [[0, 7]] + [[b, b + 1] for b in range(7, N_BATCHES)]
    assert (out / "resid_post.00000.npy").exists() and (out / "mlp_out.00017.npy").exists()
    assert_same(acts, reference["all"])
    rows = [c["rows"] for c in acts.manifest["chunks"]]  # pool="all": token rows, consecutive
    assert rows[0][0] == 0 and rows[-1][1] == acts.manifest["n_tokens_total"]
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:]))


def test_format_1_directories_are_read_not_resumed(model, reference, tmp_path):
    """A directory as jtrust-activations/1 wrote it: a fixed chunk plan with `done` flags."""
    out = tmp_path / "v1"
    acts = extract(model, TEXTS, out_dir=out, pool="last", chunk_mb=0, **ARGS)  # a chunk per batch
    manifest = json.loads((out / "manifest.json").read_text())
    old_chunks = []
    for k, chunk in enumerate(acts.manifest["chunks"]):
        b0, b1 = chunk["batches"]
        old_chunks.append(dict(texts=chunk["texts"], rows=chunk["rows"],
                               batches=manifest["batches"][b0:b1], done=True))
        for site in ARGS["sites"]:  # the names were already {site}.{k:05d}.npy: k == b0 here
            assert (out / f"{site}.{k:05d}.npy").exists()
    v1 = {k: v for k, v in manifest.items() if k != "batches"}
    v1.update(format="jtrust-activations/1", chunks=old_chunks, chunk_mb=0)
    (out / "manifest.json").write_text(json.dumps(v1))
    assert_same(load_activations(out), reference["last"])
    again = extract(model, TEXTS, out_dir=out, pool="last", **ARGS)  # complete: read as it is
    assert_same(again, reference["last"])
    assert json.loads((out / "manifest.json").read_text())["format"] == "jtrust-activations/1"

    v1.update(complete=False, chunks=[dict(c, done=False) for c in old_chunks])
    (out / "manifest.json").write_text(json.dumps(v1))
    with pytest.raises(InputError, match="older format jtrust-activations/1, which cannot be resumed; delete it"):
        extract(model, TEXTS, out_dir=out, pool="last", **ARGS)
    with pytest.raises(InputError, match="older format.*delete it and extract again"):
        load_activations(out)


def test_two_extractions_into_one_directory_do_the_work_once(reference, tmp_path):
    out, gate = tmp_path / "acts", tmp_path / "gate"
    holder = spawn(out, tmp_path / "holder.calls", gate=gate)  # holds the lock, held at its first batch
    deadline = time.monotonic() + SAFETY
    while json.loads(_read(out / store.LOCK_NAME) or "{}").get("pid") != holder.pid:
        assert holder.poll() is None, holder.stderr.read()[-3000:]
        assert time.monotonic() < deadline, "the first extraction never locked out_dir"
        time.sleep(0.02)
    second = spawn(out, tmp_path / "second.calls")  # wait=0: stops
    waiter = spawn(out, tmp_path / "waiter.calls", wait=600)
    _, err = second.communicate(timeout=SAFETY)
    message = (f"InputError: {out} is in use by process {holder.pid} (on {socket.gethostname()} since ")
    assert second.returncode != 0 and message in err, err[-3000:]
    assert "; wait for it to finish or choose another output directory" in err
    for line in iter(waiter.stderr.readline, ""):
        if "waiting up to 600 s" in line:
            assert f"in use by process {holder.pid} " in line
            break
    else:
        raise AssertionError(f"the waiter ended (status {waiter.wait()}) without waiting")
    gate.touch()
    for child in (holder, waiter):
        _, err = child.communicate(timeout=SAFETY)
        assert child.returncode == 0, err[-3000:]
    lines = lambda name: len(_read(tmp_path / f"{name}.calls").splitlines())
    assert (lines("holder"), lines("second"), lines("waiter")) == (N_BATCHES, 0, 0)
    assert_same(load_activations(out), reference["last"])
    assert not [p for p in out.iterdir() if store.is_internal(p)]


def _read(path: pathlib.Path) -> str:
    try:
        return path.read_text()
    except OSError:
        return ""
