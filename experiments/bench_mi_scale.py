"""nHSIC at scale: one information-plane cell (X, Y and one layer) for n samples.

    /usr/bin/time -v python experiments/bench_mi_scale.py --n 10000

Prints the machine, its matmul peak and the time; `time -v` reports the peak memory (each n x n float32 operator is 4 n^2 bytes).
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import time

import numpy as np

from jtrust.analysis import mi

sys.path.insert(0, str(pathlib.Path(__file__).parent))
import benchlib  # noqa: E402


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--n", type=int, default=10000)
    parser.add_argument("--d", type=int, default=576)
    args = parser.parse_args()
    print(benchlib.machine_line(benchlib.machine()))
    peak, who = benchlib.matmul_peak()
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({who}); the n x n kernels are memory-bound, timed here")
    rng = np.random.RandomState(0)
    x = rng.randn(args.n, args.d).astype(np.float32)
    t = x[:, :64] @ rng.randn(64, args.d).astype(np.float32) + rng.randn(args.n, args.d).astype(np.float32)
    y = (x[:, 0] > 0).astype(np.float32)
    start = time.perf_counter()
    plane = mi.information_plane(x, t[None], y)
    print(f"n={args.n} d={args.d}: I(X;T) {plane.i_xt[0]:.3f}  I(T;Y) {plane.i_ty[0]:.3f}  "
          f"in {time.perf_counter() - start:.1f} s")


if __name__ == "__main__":
    main()
