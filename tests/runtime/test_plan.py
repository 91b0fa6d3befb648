"""The memory planner (jtrust.pipelines.plan): its exact parts against closed forms and XLA's
compiled memory analysis, its estimate of the whole against XLA's on SmolLM2 and on 7B-shaped
models compiled ahead of time for 8 fake devices, and its errors."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

from jtrust.core.errors import InputError
from jtrust.pipelines import plan

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
LLAMA_2_7B_PARAMETERS = 6_738_415_616  # the published count of Llama-2-7B
MISTRAL_7B_PARAMETERS = 7_241_732_096  # and of Mistral-7B-v0.1

COMPILE = textwrap.dedent("""
    import json, sys
    from jtrust.pipelines import plan
    from jtrust.runtime import sharding
    out = []
    for spec, task, sizes, shape in json.loads(sys.argv[1]):
        config = plan.model_config(spec)
        shape = plan.Shape(**shape)
        out.append(dict(estimate=plan.estimate(config, task, sizes, shape),
                        xla=plan.compiled(config, task, sharding.make_mesh(**sizes), shape)))
    print(json.dumps(out))
""")


def compile_in_child(cases: list, devices: int) -> list[dict]:
    env = plan.fake_cpu_devices_env(devices)
    proc = subprocess.run([sys.executable, "-c", COMPILE, json.dumps(cases)], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_parameter_counts_and_splits_match_the_published_models():
    for spec, count in (("llama-2-7b", LLAMA_2_7B_PARAMETERS), ("mistral-7b", MISTRAL_7B_PARAMETERS)):
        config = plan.model_config(spec)
        one = plan.estimate(config, "train", dict(data=1, fsdp=1, model=1), plan.Shape(batch=1))
        assert one["parameters"] == 4 * count, spec
        assert one["optimizer"] == 2 * one["parameters"] and one["gradients"] == 3 * one["parameters"]
        # every weight is split 8 ways except the norms ([L, d] + [d]: 4 bytes x (2L + 1) d)
        norms = 4 * (2 * config.n_layers + 1) * config.d_model
        eight = plan.estimate(config, "extract", dict(data=1, fsdp=8, model=1), plan.Shape(dtype="bfloat16"))
        assert eight["parameters"] == (4 * count - norms) // 8 // 2 + norms // 2, spec


def test_kv_cache_is_the_closed_form():
    config = plan.model_config("mistral-7b")  # 8 kv heads of 128: the cache is 4x smaller than Llama's
    shape = plan.Shape(batch=1, seq_len=64, samples=128, new_tokens=64)
    parts = plan.estimate(config, "generate", dict(data=2, fsdp=4, model=1), shape)
    rows = 1 + 128 // 8  # the prompt's cache (a row on every device) and the samples'
    assert parts["kv_cache"] == 2 * 32 * rows * (64 - 1 + 64) * 8 * 128 * 4


@pytest.mark.parametrize("sizes", [dict(data=2, fsdp=2, model=1),
                                   pytest.param(dict(data=1, fsdp=2, model=2), marks=pytest.mark.slow)])
def test_estimates_agree_with_xla_on_smollm2_meshes(sizes):
    """Arguments are exactly the parameters (and Adam's moments) plus the inputs; the estimated
    total is within a third of XLA's for every task on a data x fsdp and an fsdp x model mesh
    (a data-only mesh replicates: its parts are one device's)."""
    shape = dict(batch=4, seq_len=64, samples=4, new_tokens=8)
    cases = [("smollm2", task, sizes, shape) for task in plan.TASKS]
    for (_, task, _, _), r in zip(cases, compile_in_child(cases, 4)):
        e, x = r["estimate"], r["xla"]
        unused = 4 * 576 if task == "extract" else 0  # the final norm, pruned from a forward without logits
        inputs = x["argument"] - (e["parameters"] - unused) - e["optimizer"]
        if task == "generate":  # the prompts' cache is an argument, the samples' an output
            inputs = x["argument"] + x["output"] - e["parameters"] - e["kv_cache"]
        assert 0 <= inputs <= 64 * 4 * 13 + 4096, (task, sizes, inputs)  # ids, masks, targets, weights, tokens
        assert 0.75 <= e["total"] / x["total"] <= 1.34, (task, sizes, e["total"] / x["total"])


def test_7b_programs_compile_ahead_of_time_on_8_devices_and_match_the_estimate():
    """Llama-2-7B training and Mistral-7B sampling compiled for 8 fake devices from abstract
    parameters: nothing allocated; the estimate within a third of XLA's figure."""
    cases = [("llama-2-7b", "train", dict(data=1, fsdp=8, model=1), dict(batch=8, seq_len=512)),
             ("mistral-7b", "generate", dict(data=1, fsdp=4, model=2),
              dict(batch=1, seq_len=64, samples=128, new_tokens=64))]
    for (spec, task, sizes, _), r in zip(cases, compile_in_child(cases, 8)):
        e, x = r["estimate"], r["xla"]
        assert 0.75 <= e["total"] / x["total"] <= 1.34, (spec, task, e["total"] / x["total"])
        if task == "train":  # the donated state: parameters and moments in, the same out
            assert 0 <= x["output"] - x["alias"] < 4096  # all but a few scalars (metrics, counters)
            assert x["argument"] - (e["parameters"] + e["optimizer"]) < 2 ** 20


def test_smallest_mesh_and_the_command_line():
    config = plan.model_config("llama-2-7b")
    sizes, total = plan.smallest_mesh(config, "train", 32 * plan.GIB)
    assert total <= 32 * plan.GIB and sizes["data"] * sizes["fsdp"] * sizes["model"] == 8
    assert plan.smallest_mesh(config, "train", 1 * plan.GIB, max_devices=4) is None
    out = subprocess.run([sys.executable, "-m", "jtrust.cli", "plan", "--model", "llama-2-7b", "--task", "extract",
                          "--mesh", "fsdp=8", "--dtype", "bfloat16"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "parameters       1.57 GiB per device" in out.stdout  # 6.74e9 x 2 bytes / 8
    assert "on 16 GiB devices: mesh data=1 (1 device)" in out.stdout


def test_bad_input_is_named():
    config = plan.model_config("llama-2-7b")
    with pytest.raises(InputError, match="task 'finetune': choose one of extract, generate, train, attribute"):
        plan.estimate(config, "finetune", dict(data=1, fsdp=1, model=1))
    with pytest.raises(InputError, match=r"parameter blocks/attn/k/kernel \(32, 4096, 4096\): its embed dimension "
                                         r"\(4096\) is not divisible by mesh axis 'fsdp' of size 3"):
        plan.estimate(config, "extract", dict(data=1, fsdp=3, model=1))
    with pytest.raises(InputError, match="batch 8 does not split over data x fsdp = 16"):
        plan.estimate(config, "train", dict(data=1, fsdp=16, model=1))
    with pytest.raises(InputError, match="shape name"):
        plan.model_config("no/such/model")
