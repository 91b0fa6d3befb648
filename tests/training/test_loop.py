"""The generic loop on a parameter pytree that is not a language model (least squares): it reaches
numpy's lstsq solution, and a run killed with SIGKILL resumes to exactly the straight run."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrust import training

# the problem: also run by the killed child, which imports this module
rng = np.random.default_rng(0)
X = rng.normal(size=(256, 4)).astype(np.float32)
W_TRUE = np.array([[1.0, -2.0], [0.5, 0.0], [3.0, 1.0], [-1.0, 0.25]], np.float32)
Y = (X @ W_TRUE + 0.3 + 0.01 * rng.normal(size=(256, 2))).astype(np.float32)
# full batches (every row once per step, accumulated over two micro-batches), cosine decay:
# Adam then settles on the exact least-squares minimum
CONFIG = training.TrainConfig(steps=300, batch_size=256, accumulation=2, learning_rate=0.1,
                              min_lr_ratio=0.001, grad_clip=0.0, save_steps=tuple(range(0, 301, 20)),
                              log_every=20)


def loss_fn(trainable, frozen, batch):
    pred = batch["x"] @ trainable["w"] + trainable["b"]
    err = jnp.sum((pred - batch["y"]) ** 2)
    return err, jnp.float32(batch["y"].size), {"max_abs_error": jnp.max(jnp.abs(pred - batch["y"]))}


def batches(step, delay=0.0):
    time.sleep(delay)  # the killed child is slowed so the parent can catch it mid-run
    rows = training.batch_indices(len(X), CONFIG.batch_size, step, CONFIG.seed)
    micro = CONFIG.batch_size // CONFIG.accumulation
    return {"x": X[rows].reshape(CONFIG.accumulation, micro, 4),
            "y": Y[rows].reshape(CONFIG.accumulation, micro, 2)}


def init():
    return {"w": jnp.zeros((4, 2), jnp.float32), "b": jnp.zeros((2,), jnp.float32)}


def run(out, delay=0.0, **kwargs):
    return training.fit(loss_fn, init(), lambda s: batches(s, delay), CONFIG, out,
                        manifest={"task": "least squares"}, progress=False, **kwargs)


KILLED_CHILD = ("import sys; sys.path.insert(0, sys.argv[2]); import test_loop; "
                "test_loop.run(sys.argv[1], delay=0.02)")


def test_fit_reaches_lstsq_and_resumes_after_sigkill(tmp_path):
    straight = run(tmp_path / "straight")
    design = np.hstack([X, np.ones((len(X), 1), np.float32)])
    solution, *_ = np.linalg.lstsq(design.astype(np.float64), Y.astype(np.float64), rcond=None)
    np.testing.assert_allclose(np.asarray(straight.state.trainable["w"]), solution[:4], atol=1e-4)
    np.testing.assert_allclose(np.asarray(straight.state.trainable["b"]), solution[4], atol=1e-4)
    assert straight.step == 300 and [m["step"] for m in straight.metrics if m["kind"] == "train"][-1] == 300
    assert "max_abs_error" in straight.metrics[-1]

    out = tmp_path / "killed"
    child = subprocess.Popen([sys.executable, "-c", KILLED_CHILD, str(out), os.path.dirname(__file__)], stderr=subprocess.PIPE,
                             env=dict(os.environ, JAX_PLATFORMS="cpu"))
    deadline = time.time() + 120
    while not (out / "checkpoints" / "60").exists():
        assert child.poll() is None, child.stderr.read().decode()[-2000:]
        assert time.time() < deadline, "the child never reached step 60"
        time.sleep(0.05)
    child.send_signal(signal.SIGKILL)
    child.wait()
    saved = [int(p.name) for p in (out / "checkpoints").iterdir() if p.name.isdigit()]
    assert 60 <= max(saved) < 300, saved  # killed mid-run

    resumed = run(out)
    chex.assert_trees_all_close(jax.device_get(resumed.state.trainable),
                                jax.device_get(straight.state.trainable), rtol=0, atol=0)
    assert int(resumed.state.step) == 300
    # the saved states read back without the loop, by shape
    state = training.restore_state(out, 300, resumed.state)
    chex.assert_trees_all_close(jax.device_get(state.trainable), jax.device_get(resumed.state.trainable))


def test_a_run_directory_refuses_another_task(tmp_path):
    run(tmp_path / "run", stop_after=3)
    with pytest.raises(ValueError, match="another task"):
        training.fit(loss_fn, init(), batches, CONFIG, tmp_path / "run", manifest={"task": "other"},
                     progress=False)
