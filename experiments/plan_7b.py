"""Memory plans for 7B-class models: every task's per-device bytes on 8-device meshes (estimate
and XLA's compiled figure), and the smallest mesh each task needs on 16 and 32 GiB devices
(found by the estimate, confirmed by compiling). Abstract parameters only: nothing is allocated.

    python experiments/plan_7b.py            # prints the markdown tables of docs/distributed.md

Runs itself again with 64 fake CPU devices when this process has fewer (XLA compiles a program
for a mesh only when its devices exist).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

DEVICES = 64
MODELS = ("llama-2-7b", "mistral-7b")
FIXED = ({"data": 1, "fsdp": 8, "model": 1}, {"data": 1, "fsdp": 4, "model": 2})


def main() -> None:
    import jax
    from jtrust.pipelines import plan
    from jtrust.runtime import sharding

    shapes = {"extract": plan.Shape(batch=8, seq_len=512),
              "generate": plan.Shape(batch=1, seq_len=64, samples=128, new_tokens=64),
              "train": plan.Shape(batch=8, seq_len=512),
              "attribute": plan.Shape(batch=8, seq_len=512)}
    t0 = time.perf_counter()
    print("Shapes: extract, train and attribute 8 rows x 512 tokens; generate 1 prompt of 64 tokens x 128 "
          "samples x 64 new tokens; float32 weights (training: float32 weights, gradients, Adam moments).\n")
    print("| model | task | mesh | estimate GiB | XLA GiB | estimate / XLA |")
    print("|---|---|---|---|---|---|")
    for spec in MODELS:
        config = plan.model_config(spec)
        for task, shape in shapes.items():
            for sizes in FIXED:
                e = plan.estimate(config, task, sizes, shape)["total"]
                x = plan.compiled(config, task, sharding.make_mesh(**sizes), shape)["total"]
                print(f"| {spec} | {task} | {plan.mesh_text(sizes)} | {plan.gib(e)} | {plan.gib(x)} | {e / x:.2f} |",
                      flush=True)
    print("\n| model | task | 16 GiB devices | 32 GiB devices |")
    print("|---|---|---|---|")
    for spec in MODELS:
        config = plan.model_config(spec)
        for task, shape in shapes.items():
            verify = lambda sizes: plan.compiled(config, task, sharding.make_mesh(**sizes), shape)["total"]
            cells = []
            for size in (16, 32):
                found = plan.smallest_mesh(config, task, size * plan.GIB, shape, max_devices=DEVICES, verify=verify)
                cells.append("no mesh up to 64 devices" if found is None else
                             f"{plan.mesh_text(found[0])} ({plan.devices_text(found[0])}): {plan.gib(found[1])} GiB")
            print(f"| {spec} | {task} | {cells[0]} | {cells[1]} |", flush=True)
    print(f"\n({len(jax.devices())} fake CPU devices; {time.perf_counter() - t0:.0f} s; XLA figures: "
          "argument + output - aliased + temp bytes of the compiled program, per device)")


if __name__ == "__main__":
    if not os.environ.get("JTRUST_PLAN_CHILD"):
        from jtrust.pipelines.plan import fake_cpu_devices_env
        env = dict(fake_cpu_devices_env(DEVICES), JTRUST_PLAN_CHILD="1")
        raise SystemExit(subprocess.run([sys.executable, __file__, *sys.argv[1:]], env=env).returncode)
    main()
