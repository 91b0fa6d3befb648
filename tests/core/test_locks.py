"""One writer per directory (`jtrust.core.store.lock_dir`), with real processes: a second writer
stops naming the first, or waits and then finds the work done; a killed holder blocks no one;
the same for training runs (`fit`) and for two processes converting one checkpoint into the
cache, whose directories honour the umask. No assertion depends on timing: children that must
overlap are held at a gate (a file the test creates) until the test has seen what it checks."""

from __future__ import annotations

import json
import os
import pathlib
import signal
import socket
import stat
import subprocess
import sys
import textwrap
import time

import jax.numpy as jnp
import numpy as np
import pytest

from jtrust import training
from jtrust.core import store
from jtrust.core.errors import InputError

HERE = pathlib.Path(__file__).parent
TESTS, REPO = HERE.parent, HERE.parents[1]
HINT = "; wait for it to finish or choose another output directory"
SAFETY = 180  # seconds before a stuck child fails the test (never reached when all is well)


def child_env(**extra) -> dict:
    return dict(os.environ, JAX_PLATFORMS="cpu", TOKENIZERS_PARALLELISM="false",
                PYTHONPATH=os.pathsep.join([str(HERE), str(TESTS), str(REPO), os.environ.get("PYTHONPATH", "")]),
                **extra)


def spawn(script: str, *args, **env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", textwrap.dedent(script), *map(str, args)],
                            env=child_env(**env), stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(child: subprocess.Popen) -> tuple[str, str]:
    """stdout, stderr of a child that must exit with status 0 (its stdin closed first)."""
    out, err = child.communicate(timeout=SAFETY)
    assert child.returncode == 0, err[-3000:]
    return out, err


def refused(child: subprocess.Popen) -> str:
    """stderr of a child that must fail (with an InputError)."""
    out, err = child.communicate(timeout=SAFETY)
    assert child.returncode != 0, out
    return err


def await_line(stream, needle: str, child: subprocess.Popen) -> str:
    """Read `stream` line by line until a line contains `needle`."""
    seen = []
    while True:
        line = stream.readline()
        if not line:
            child.wait(timeout=SAFETY)
            raise AssertionError(f"the child ended (status {child.returncode}) before printing "
                                 f"{needle!r}:\n{''.join(seen)[-3000:]}")
        seen.append(line)
        if needle in line:
            return line


def await_holder(lock_file: pathlib.Path, child: subprocess.Popen) -> None:
    """Until `child` holds the lock whose file is `lock_file` (the file names its pid)."""
    deadline = time.monotonic() + SAFETY
    while True:
        try:
            if json.loads(lock_file.read_text() or "{}").get("pid") == child.pid:
                return
        except (OSError, ValueError):
            pass
        assert child.poll() is None, child.stderr.read()[-3000:]
        assert time.monotonic() < deadline, f"{child.pid} never took {lock_file}"
        time.sleep(0.02)


def in_use(path, pid: int) -> str:
    return f"{path} is in use by process {pid} (on {socket.gethostname()} since "


HOLDER = """
    import sys
    from jtrust.core import store
    with store.lock_dir(sys.argv[1]):
        print("locked", flush=True)
        sys.stdin.read()  # until the test closes stdin
"""

WAITER = """
    import sys
    from jtrust.core import store
    with store.lock_dir(sys.argv[1], wait=float(sys.argv[2])):
        print("got it", flush=True)
"""


def test_a_second_writer_stops_or_waits_and_a_killed_holder_blocks_no_one(tmp_path):
    d = tmp_path / "run"
    holder = spawn(HOLDER, d)
    assert holder.stdout.readline() == "locked\n"
    with pytest.raises(InputError) as e:
        with store.lock_dir(d):
            pass
    assert str(e.value).startswith(in_use(d, holder.pid)) and str(e.value).endswith(HINT)

    waiter = spawn(WAITER, d, 600)
    line = await_line(waiter.stderr, "waiting up to 600 s", waiter)
    assert line.startswith(f"jtrust: {in_use(d, holder.pid)}")
    finish(holder)  # closes its stdin: the holder leaves its block, the waiter goes on
    assert finish(waiter)[0] == "got it\n"
    assert sorted(p.name for p in d.iterdir()) == []  # the lock file goes with the lock

    killed = spawn(HOLDER, d)
    assert killed.stdout.readline() == "locked\n"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert (d / store.LOCK_NAME).exists()  # left behind, naming a dead process ...
    with store.lock_dir(d):  # ... but the OS released the lock: no wait, no error
        assert json.loads((d / store.LOCK_NAME).read_text())["pid"] == os.getpid()


COUNTER = """
    import pathlib, sys
    from jtrust.core import store
    d, n = sys.argv[1], int(sys.argv[2])
    print("ready", flush=True)
    sys.stdin.readline()  # all start together
    for _ in range(n):
        with store.lock_dir(d, wait=600):
            path = pathlib.Path(d, "count")
            count = int(path.read_text()) if path.exists() else 0
            path.write_text(str(count + 1))  # a plain read-modify-write: only the lock protects it
"""


def test_holders_exclude_each_other_while_lock_files_come_and_go(tmp_path):
    d = tmp_path / "shared"
    children = [spawn(COUNTER, d, 400) for _ in range(3)]
    for child in children:
        assert child.stdout.readline() == "ready\n"
    for child in children:
        child.stdin.write("go\n")
        child.stdin.flush()
    for child in children:
        finish(child)
    assert (d / "count").read_text() == "1200"
    assert sorted(p.name for p in d.iterdir()) == ["count"]


def test_lock_files_are_bookkeeping(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "a.txt").write_text("a")
    before = store.content_hash(d)
    with store.lock_dir(d) as locked:
        assert locked == d
        with store.lock_dir(d):  # re-entrant within a process
            pass
        assert (d / ".jtrust.lock").exists()  # still held by the outer block
        owner = json.loads((d / ".jtrust.lock").read_text())
        assert (owner["pid"], owner["host"]) == (os.getpid(), socket.gethostname())
        assert store.content_hash(d) == before
        assert [p.name for p in d.iterdir() if not store.is_internal(p)] == ["a.txt"]
    assert sorted(p.name for p in d.iterdir()) == ["a.txt"]
    with store.lock_target(tmp_path / "new" / "ckpt") as target:
        assert (tmp_path / "new" / ".ckpt.jtrust.lock").exists() and not target.exists()
        assert store.is_lock(tmp_path / "new" / ".ckpt.jtrust.lock")
    assert list((tmp_path / "new").iterdir()) == []


def test_directories_honour_the_umask(tmp_path):
    old = os.umask(0o027)
    try:
        with store.lock_dir(tmp_path / "a" / "b"):
            store.write_text(tmp_path / "a" / "b" / "f.txt", "x")
    finally:
        os.umask(old)
    assert stat.S_IMODE((tmp_path / "a").stat().st_mode) == 0o750
    assert stat.S_IMODE((tmp_path / "a" / "b").stat().st_mode) == 0o750


# ---------------------------------------------------------------------------------------------
# training runs: a tiny least-squares problem (also run by the children, which import this module)

rng = np.random.default_rng(0)
X = rng.normal(size=(64, 3)).astype(np.float32)
Y = (X @ np.array([[1.0], [-2.0], [0.5]], np.float32) + 0.1).astype(np.float32)
CONFIG = training.TrainConfig(steps=12, batch_size=16, learning_rate=0.05, save_steps=(0, 6, 12),
                              log_every=4)


def loss_fn(trainable, frozen, batch):
    err = jnp.sum((batch["x"] @ trainable["w"] + trainable["b"] - batch["y"]) ** 2)
    return err, jnp.float32(batch["y"].size), {}


def fit(out, gate=None, wait=0.0):
    def batches(step):
        while gate is not None and not os.path.exists(gate):  # held here until the test opens the gate
            time.sleep(0.02)
        rows = training.batch_indices(len(X), CONFIG.batch_size, step, CONFIG.seed)
        return {"x": X[rows][None], "y": Y[rows][None]}
    init = {"w": jnp.zeros((3, 1), jnp.float32), "b": jnp.zeros((1,), jnp.float32)}
    return training.fit(loss_fn, init, batches, CONFIG, out, manifest={"task": "lstsq"},
                        progress=False, wait=wait)


FIT_CHILD = """
    import sys
    import numpy as np
    import test_locks
    out, gate, wait, result = sys.argv[1:5]
    r = test_locks.fit(out, gate if gate != "-" else None, float(wait))
    np.savez(result, step=r.step, **{k: np.asarray(v) for k, v in r.state.trainable.items()})
"""


def test_two_trainings_into_one_run_directory(tmp_path):
    run, gate = tmp_path / "run", tmp_path / "gate"
    holder = spawn(FIT_CHILD, run, gate, 0, tmp_path / "holder.npz")
    await_holder(run / store.LOCK_NAME, holder)
    second = spawn(FIT_CHILD, run, "-", 0, tmp_path / "second.npz")
    waiter = spawn(FIT_CHILD, run, "-", 600, tmp_path / "waiter.npz")
    err = refused(second)
    assert f"InputError: {in_use(run, holder.pid)}" in err and HINT in err, err[-2000:]
    await_line(waiter.stderr, "waiting up to 600 s", waiter)
    gate.touch()
    finish(holder)
    finish(waiter)  # it found the run finished: resumed nothing, read the last checkpoint

    straight = fit(tmp_path / "straight")
    for name in ("holder", "waiter"):
        result = np.load(tmp_path / f"{name}.npz")
        assert int(result["step"]) == CONFIG.steps
        for k, v in straight.state.trainable.items():
            np.testing.assert_array_equal(result[k], np.asarray(v), err_msg=f"{name} {k}")
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["0", "12", "6"]
    assert not (tmp_path / "second.npz").exists()
    assert not [p for p in run.iterdir() if store.is_internal(p)]


# ---------------------------------------------------------------------------------------------
# two processes loading one uncached checkpoint: one converts, the other waits and reads its copy

LOAD_CHILD = """
    import os, sys, json, time
    os.umask(0o022)
    import jax
    from jtrust.core import store
    from jtrust.io import loading
    checkpoint, gate = sys.argv[1:3]
    converted, real_convert, real_save = [], loading._convert_source, loading.save
    def convert_source(*a, **kw):
        converted.append(1)
        return real_convert(*a, **kw)
    def save(*a, **kw):
        while gate != "-" and not os.path.exists(gate):  # held, lock taken, until the test opens the gate
            time.sleep(0.02)
        return real_save(*a, **kw)
    loading._convert_source, loading.save = convert_source, save
    model = loading.load(checkpoint)
    print(json.dumps({"params": store.arrays_hash(jax.tree.leaves(model.params)),
                      "converted": len(converted)}))
"""


def test_two_loads_of_one_checkpoint_convert_once_into_a_group_readable_cache(tmp_path):
    from helpers import make_tiny_hf_dir
    checkpoint, cache, gate = tmp_path / "llama", tmp_path / "cache", tmp_path / "gate"
    make_tiny_hf_dir(checkpoint, "llama")
    entry = cache / "converted" / store.content_hash(checkpoint)
    holder = spawn(LOAD_CHILD, checkpoint, gate, JTRUST_CACHE=str(cache))
    await_holder(entry.parent / f".{entry.name}.jtrust.lock", holder)
    waiter = spawn(LOAD_CHILD, checkpoint, "-", JTRUST_CACHE=str(cache))
    line = await_line(waiter.stderr, "waiting up to 3600 s", waiter)
    assert line.startswith(f"jtrust: {in_use(entry, holder.pid)}")
    gate.touch()
    first, second = (json.loads(finish(c)[0].splitlines()[-1]) for c in (holder, waiter))
    assert (first["converted"], second["converted"]) == (1, 0)  # the second read the cache
    assert first["params"] == second["params"]
    assert sorted(p.name for p in entry.parent.iterdir()) == [entry.name]  # no lock, no temp left

    dirs = [entry.parent, *(p for p in entry.rglob("*") if p.is_dir()), entry]  # orbax's included
    files = [p for p in entry.rglob("*") if p.is_file()]
    assert len(dirs) > 3 and files
    for p in dirs:  # umask 0o022: group and others may read and enter
        assert stat.S_IMODE(p.stat().st_mode) == 0o755, p
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o044 == 0o044, p
