"""`jtrust sweep`: three worker processes on a shared directory, one killed after its first cell and
rerun, merge equal to a single-worker run in this process; bad configs and worker flags."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest

from jtrust.core.errors import InputError
from jtrust.pipelines import sweep
from helpers import make_tiny_hf_dir

RUN_CLI = "import sys; from jtrust.cli import main; main(sys.argv[1:])"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny") / "llama"
    make_tiny_hf_dir(path, "llama")
    return str(path)


def config_for(tiny: str, out) -> dict:
    return dict(out=str(out), analysis="trace",
                base=dict(model=tiny, limit=60, mi_samples=0, batch_size=16),
                grid=dict(dims=[["fairness"], ["toxicity"]], c=[0.1, 1.0, 10.0]))


def worker(config_path, i: int, n: int, env) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", RUN_CLI, "sweep", "--config", str(config_path),
                             "--worker", str(i), "--workers", str(n)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def comparable(results_path) -> list[dict]:
    """The merged cells without their wall times."""
    cells = json.loads(results_path.read_text())["cells"]
    return [{k: v for k, v in c.items() if k != "seconds"} for c in cells]


def test_three_workers_one_killed_and_rerun_equal_one_worker(tiny, tmp_path):
    env = {**os.environ, "JTRUST_CACHE": str(tmp_path / "cache"), "JAX_PLATFORMS": "cpu"}
    config = config_for(tiny, tmp_path / "shared")
    config_path = tmp_path / "sweep.json"
    config_path.write_text(json.dumps(config))
    cells = sweep.expand(config)
    assert len(cells) == 6 and len({c.id for c in cells}) == 6
    share = {i: [c for c in cells if c.worker(3) == i] for i in range(3)}
    victim = max(share, key=lambda i: len(share[i]))
    assert len(share[victim]) >= 2  # so that killing after its first cell leaves work undone

    procs = {i: worker(config_path, i, 3, env) for i in range(3)}
    deadline = time.monotonic() + 300
    while not any(sweep.is_done(config["out"], c) for c in share[victim]):
        assert procs[victim].poll() is None, procs[victim].stderr.read()
        assert time.monotonic() < deadline
        time.sleep(0.02)
    procs[victim].send_signal(signal.SIGKILL)
    procs[victim].wait()
    for i in set(procs) - {victim}:
        _, err = procs[i].communicate(timeout=300)
        assert procs[i].returncode == 0, err
    done = {c.id for c in cells if sweep.is_done(config["out"], c)}
    unfinished = [c.id for c in share[victim] if c.id not in done]
    assert unfinished, "the killed worker finished everything before the kill; the test saw no crash"
    with pytest.raises(InputError, match=f"{len(unfinished)} of 6 sweep cells are not done"):
        sweep.merge(config)

    stamps = {c.id: (tmp_path / "shared" / "cells" / c.id / "result.json").stat().st_mtime_ns
              for c in cells if c.id in done}
    rerun = worker(config_path, victim, 3, env)
    out, err = rerun.communicate(timeout=300)
    assert rerun.returncode == 0, err
    assert f"{len(unfinished)} cells run" in out  # only the unfinished ones
    assert stamps == {i: (tmp_path / "shared" / "cells" / i / "result.json").stat().st_mtime_ns for i in stamps}
    merged = subprocess.run([sys.executable, "-c", RUN_CLI, "sweep", "--config", str(config_path), "--merge"],
                            env=env, capture_output=True, text=True, timeout=120)
    assert merged.returncode == 0, merged.stderr

    single = {**config, "out": str(tmp_path / "single")}
    assert len(sweep.run_worker(single, 0, 1, progress=False)) == 6
    sweep.merge(single)
    assert comparable(tmp_path / "shared" / "results.json") == comparable(tmp_path / "single" / "results.json")
    report = (tmp_path / "shared" / "report.md").read_text()
    assert all(f"cells/{c.id}/run/" in report for c in cells)


@pytest.mark.parametrize("change, message", [
    (dict(analysis="probe"), "sweep analysis 'probe': choose one of"),
    (dict(grid=dict(c=[])), "sweep grid 'c': expected a non-empty list"),
    (dict(grid=dict(cee=[1.0])), "unknown options \\['cee'\\]"),
    (dict(grid=dict(split=["random"])), "split"),
    (dict(analysis="lfp", grid=dict(c=[1.0])), "\"dims\" applies to trace only"),
    (dict(base=dict(limit=60)), "needs a \"model\""),
])
def test_bad_configs_are_named(tiny, tmp_path, change, message):
    config = config_for(tiny, tmp_path)
    config = {**config, **change, "grid": {**config["grid"], **change.get("grid", {})}}
    with pytest.raises(InputError, match=message):
        sweep.expand(config)


@pytest.mark.parametrize("worker_index, workers, message", [
    (3, 3, "--worker 3: give an index in \\[0, 3\\)"), (-1, 2, "--worker -1"), (0, 0, "--workers 0")])
def test_bad_worker_flags_are_named(tiny, tmp_path, worker_index, workers, message):
    with pytest.raises(InputError, match=message):
        sweep.run_worker(config_for(tiny, tmp_path), worker_index, workers)


def test_cli_bad_config_is_one_line(tmp_path):
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    result = subprocess.run([sys.executable, "-c", RUN_CLI, "sweep", "--config", str(bad)],
                            capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert "not valid JSON" in result.stderr
