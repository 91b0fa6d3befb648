"""What every benchmark prints about the machine: CPU model and flags, the matmul peak of JAX and
torch and the memory read bandwidth, measured in the same run (several times, so a busy moment
shows as a spread), and roofline tables (phase, GFLOP, MB read, time, GFLOP/s, fraction of the
peak, and the phase's roofline: the time its products at the peak or its reads at the bandwidth
would take, whichever is longer).

A ratio against torch is a fact about one machine (its BLAS, its load); a fraction of the
machine's own peak, measured in the same run, is the figure that carries over.
"""

from __future__ import annotations

import os
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import torch

# (M, K, N): square, and the embedded model's products (d 576, d_ff 1536) at 2048 / 128 / 16 rows
SHAPES = ((2048, 2048, 2048), (2048, 576, 1536), (128, 576, 1536), (16, 576, 1536))
READ_MB = 512  # MiB; the bandwidth sample: one float32 array this large summed, far past every cache
FLAGS = ("avx2", "fma", "avx512f", "avx512_vnni", "avx512_bf16", "amx_tile", "amx_bf16")


def best_time(fn, repeats: int) -> float:
    """Seconds of the fastest of `repeats` calls of fn, after one warm-up call (compiles)."""
    fn()
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def machine() -> dict:
    """CPU model, cores, SIMD / matrix flags, library versions, threads and load."""
    model, flags = platform.processor() or "unknown", set()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name") and model in ("unknown", "x86_64", ""):
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags"):
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return dict(cpu=model, cores=os.cpu_count(), flags=[f for f in FLAGS if f in flags],
                jax=jax.__version__, backend=jax.default_backend(), torch=torch.__version__,
                torch_threads=torch.get_num_threads(), load=round(os.getloadavg()[0], 2))


def machine_line(m: dict) -> str:
    return (f"machine: {m['cpu']}, {m['cores']} cores, flags {' '.join(m['flags']) or 'none of ' + str(FLAGS)}; "
            f"jax {m['jax']} on {m['backend']}, torch {m['torch']} with {m['torch_threads']} threads; "
            f"load average {m['load']}")


def start() -> "Peaks":
    """A benchmark's opening: torch on every core, the machine line printed, the first peak sample."""
    torch.set_num_threads(os.cpu_count())
    print(machine_line(machine()), flush=True)
    peaks = Peaks()
    peaks.sample()
    return peaks


class Peaks:
    """Matmul GFLOP/s of JAX and torch, float32 on `SHAPES` and bfloat16 square, and JAX's memory
    read GB/s, sampled several times through a run; `best()` is the float32 reference peak (the
    highest sample), `bandwidth()` the highest read sample."""

    def __init__(self, repeats: int = 3):
        self.repeats = repeats
        self.samples: dict[tuple[str, str, tuple], list[float]] = {}
        rng = np.random.default_rng(0)
        self._arrays = {}
        for m, k, n in SHAPES:
            a, b = rng.standard_normal((m, k), np.float32), rng.standard_normal((k, n), np.float32)
            self._arrays[(m, k, n)] = (a, b)
        self._jax_mm = jax.jit(lambda x, y: x @ y)
        self._big = jnp.ones((READ_MB * 2**20 // 4,), jnp.float32)
        self._read = jax.jit(jnp.sum)
        self.reads: list[float] = []  # GB/s

    def sample(self) -> None:
        torch.set_num_threads(os.cpu_count())
        for shape, (a, b) in self._arrays.items():
            dtypes = ("float32", "bfloat16") if shape == SHAPES[0] else ("float32",)
            for dtype in dtypes:
                ja, jb = jnp.asarray(a, dtype), jnp.asarray(b, dtype)
                t = best_time(lambda: self._jax_mm(ja, jb).block_until_ready(), self.repeats)
                self._add("jax", dtype, shape, t)
                ta = torch.from_numpy(a).to(getattr(torch, dtype))
                tb = torch.from_numpy(b).to(getattr(torch, dtype))
                with torch.inference_mode():
                    t = best_time(lambda: ta @ tb, self.repeats)
                self._add("torch", dtype, shape, t)
        t = best_time(lambda: self._read(self._big).block_until_ready(), self.repeats)
        self.reads.append(READ_MB * 2**20 / t / 1e9)

    def _add(self, lib: str, dtype: str, shape: tuple, seconds: float) -> None:
        m, k, n = shape
        self.samples.setdefault((lib, dtype, shape), []).append(2 * m * k * n / seconds / 1e9)

    def best(self) -> float:
        """The float32 peak: the highest float32 sample of either library, GFLOP/s."""
        return max(max(v) for (lib, dtype, _), v in self.samples.items() if dtype == "float32")

    def bandwidth(self) -> float:
        """The memory read bandwidth: the highest sample, GB/s."""
        return max(self.reads)

    def table(self) -> list[str]:
        """Markdown rows: library, dtype, shape, best / median / lowest GFLOP/s over the samples."""
        rows = ["| matmul | dtype | M x K x N | best GFLOP/s | median | lowest | samples |", "|---|---|---|---|---|---|---|"]
        for (lib, dtype, (m, k, n)), v in sorted(self.samples.items(), key=lambda kv: (kv[0][1], kv[0][2], kv[0][0])):
            rows.append(f"| {lib} | {dtype} | {m} x {k} x {n} | {max(v):.1f} | {np.median(v):.1f} | {min(v):.1f} | {len(v)} |")
        r = self.reads
        rows.append(f"| jax read, GB/s | float32 | {READ_MB} MiB summed | {max(r):.1f} | {np.median(r):.1f} | {min(r):.1f} "
                    f"| {len(r)} |")
        return rows


def roofline(rows: list[tuple], peak: float, bandwidth: float | None = None) -> list[str]:
    """Markdown table of (phase, FLOPs or None, seconds[, bytes read or None]) against `peak`
    GFLOP/s and `bandwidth` GB/s. A phase's roofline is the longer of its products at the peak and
    its reads at the bandwidth; "of roofline" is that time over the measured one."""
    out = ["| phase | GFLOP | MB read | ms | GFLOP/s | of peak | roofline ms | of roofline |",
           "|---|---|---|---|---|---|---|---|"]
    for phase, flops, seconds, *read in rows:
        read = read[0] if read else None
        floor = max((flops or 0) / peak / 1e9, (read or 0) / bandwidth / 1e9 if bandwidth and read else 0)
        cells = [f"{flops / 1e9:.3f}" if flops else "-", f"{read / 1e6:.0f}" if read else "-", f"{seconds * 1e3:.2f}",
                 f"{flops / seconds / 1e9:.1f}" if flops else "-", f"{flops / seconds / 1e9 / peak:.1%}" if flops else "-",
                 f"{floor * 1e3:.2f}" if floor else "-", f"{floor / seconds:.0%}" if floor else "-"]
        out.append(f"| {phase} | " + " | ".join(cells) + " |")
    return out


def matmul_peak(repeats: int = 3) -> tuple[float, str]:
    """(GFLOP/s, which library and shape) of one `Peaks` sample's best float32 product."""
    peaks = Peaks(repeats)
    peaks.sample()
    (lib, _, shape), rates = max(((k, v) for k, v in peaks.samples.items() if k[1] == "float32"),
                                 key=lambda kv: max(kv[1]))
    return max(rates), f"{lib} {'x'.join(map(str, shape))}"
