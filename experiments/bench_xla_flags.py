"""XLA:CPU options against the training step and the 128-row decode step, each in a fresh process.

    python experiments/bench_xla_flags.py [--repeats 3]

jtrust sets no XLA option by default; an option would be set only where this shows it helps.
Each setting runs in its own process (XLA reads XLA_FLAGS once, at start), the settings in
turn, twice over, so a busy moment shows as a spread; the user's own XLA_FLAGS come first.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys

SETTINGS = ("", "--xla_cpu_use_xnnpack=true", "--xla_cpu_use_onednn=true",
            "--xla_cpu_experimental_xnn_fusion_type=dot", "--xla_cpu_experimental_onednn_custom_call=true")

def measure(flags: str, repeats: int) -> dict:
    here = pathlib.Path(__file__).parent
    code = (
        "import json, sys\n"
        f"sys.path.insert(0, {str(here)!r})\n"
        "import bench_phases, jtrust\n"
        "c, b, s = bench_phases.pretrain_config()\n"
        f"t = bench_phases.train_phases(c, b, s, {repeats})[-1]\n"
        f"d = bench_phases.decode_phases(jtrust.load('smollm2'), 128, 128, {repeats})[-1]\n"
        "print(json.dumps({'train': [t[1], t[2]], 'decode': [d[1], d[2]]}))\n")
    env = dict(os.environ, XLA_FLAGS=" ".join(filter(None, [os.environ.get("XLA_FLAGS", ""), flags])))
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True)
    if out.returncode:
        return {"error": out.stderr.strip().splitlines()[-1][:120]}
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import benchlib
    print(benchlib.machine_line(benchlib.machine()))
    results: dict[str, list[dict]] = {s: [] for s in SETTINGS}
    for _ in range(2):
        for flags in SETTINGS:
            results[flags].append(measure(flags, args.repeats))
    print("| XLA_FLAGS | training step ms (best of 2 processes) | GFLOP/s | decode step, 128 rows, ms | GFLOP/s |")
    print("|---|---|---|---|---|")
    for flags, runs in results.items():
        ok = [r for r in runs if "error" in r] == []
        if not ok:
            print(f"| `{flags}` | {runs[0].get('error', runs[-1].get('error'))} | | | |")
            continue
        t = min(r["train"][1] for r in runs)
        d = min(r["decode"][1] for r in runs)
        print(f"| `{flags or '(none)'}` | {t * 1e3:.0f} | {runs[0]['train'][0] / t / 1e9:.1f} | {d * 1e3:.0f} | "
              f"{runs[0]['decode'][0] / d / 1e9:.1f} |")


if __name__ == "__main__":
    main()
