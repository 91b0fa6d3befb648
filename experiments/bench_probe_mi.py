"""Probing and nHSIC benchmark: jtrust against the released TracingLLM recipe, in one run.

    python experiments/bench_probe_mi.py [--activations-root DIR] [--limit N] [--repeats 3]
        [--parts probe,nhsic] [--solvers lbfgs] [--blas-threads both] [--nhsic-n 2000]

Probing (target: >= 10x faster at equal accuracy): all 30 layers of the embedded
SmolLM2-135M-Instruct on each of the five trust datasets, features resid_post, pool "last".
  jtrust  `jtrust.analysis.probe.probe_layers` per dimension on [30, n, 576] with its default solver,
          L-BFGS (`--solvers lbfgs,newton` adds solver="newton", the exact but flop-heavy
          reference: slow, see below); the timing covers the host->device transfer,
          standardization, fits and scoring. Reported: the first call (compiles: each
          dimension has its own n) and the steady state (best of --repeats).
  peer    the released TracingLLM code's recipe, a loop over layers: StandardScaler over the
          dataset, the first 80% of rows to train (the same rows as jtrust), LogisticRegression()
          with its defaults (lbfgs, C = 1, tol 1e-4, max_iter 100), test accuracy; timed once;
          ConvergenceWarnings counted. Same float32 features on both sides.
nHSIC (target: >= 5x): `jtrust.analysis.mi.nhsic` against a numpy transcription of TracingLLM's
formula (vectorized distances, K H as K minus its row means, np.linalg.solve), n = --nhsic-n,
on standardized Gaussian features, d = 576, b depending on a through 64 dimensions; numpy in
float64 (the natural transcription) and float32 (jtrust's dtype). When a whole extraction
with >= n rows exists, also on real activations (block 0 vs block 15 output).

Activations: --activations-root DIR reads DIR/<dimension> (directories written by
`jtrust.extract(..., out_dir=...)`); without it, results/bench_probe_mi/activations/<dimension>
is read, and extracted there first when missing (all five: ~10+ minutes here; resumable).
--limit N keeps the first N rows of each dataset; with no whole extraction on disk only those
rows are extracted, into <dimension>.first<N>.

BLAS threads: sklearn and numpy run on OpenBLAS, whose threads busy-wait; when other processes
hold the cores (and next to sklearn's OpenMP loss loops) that can cost 10x or more. The peers
are therefore timed with the default thread count and with 1 BLAS thread (--blas-threads), and
ratios are given against each. jtrust's L-BFGS probe and nHSIC make no OpenBLAS/LAPACK call
(XLA's own products only), so they are timed once; the Newton probe's solves call LAPACK, so it
is timed under each setting. Figures are wall-clock: on a shared machine they are noisy, so the
load average is printed with them.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import time
import warnings
from typing import NamedTuple

import numpy as np
import threadpoolctl
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression
from sklearn.preprocessing import StandardScaler

import jtrust
import benchlib  # noqa: E402
from benchlib import matmul_peak
from jtrust.analysis import mi
from jtrust.data import TRUST_DATASETS, load_texts
from jtrust.runtime.extract import dataset_hash, extract, load_activations
from jtrust.analysis.features import standardize
from jtrust.analysis.probe import probe_layers, split_indices

DEFAULT_ROOT = pathlib.Path(__file__).resolve().parents[1] / "results" / "bench_probe_mi" / "activations"
SITE = "resid_post"
BLAS_SETTINGS = {"default": None, "1": 1}  # label -> threadpoolctl limit (None: leave as is)


# ---------------------------------------------------------------- activations

def trust_features(dim: str, root: pathlib.Path | None, limit: int | None, model=None):
    """features [n_layers, n, d] float32 (resid_post, pool last, every layer) and labels [n].

    Reads `root/dim`, a whole-dataset extraction. Without `root`, uses DEFAULT_ROOT/dim and
    extracts it (resumably) when missing; with `limit` and no whole extraction there, extracts
    only the first `limit` texts, into DEFAULT_ROOT/dim.first{limit}.
    """
    data = load_texts(dim)
    texts, labels = data.texts, data.labels
    if limit is not None:
        texts, labels = texts[:limit], labels[:limit]
    whole = (root or DEFAULT_ROOT) / dim
    if _complete(whole):
        acts = load_activations(whole)
        _check_dataset(acts, data.texts, whole)
    elif root is not None:
        raise FileNotFoundError(f"{whole} holds no complete extraction of {dim}")
    else:
        out = whole if limit is None else DEFAULT_ROOT / f"{dim}.first{limit}"
        acts = extract(model or jtrust.load("smollm2"), texts, sites=(SITE,), layers=None,
                       pool="last", out_dir=out, dataset_name=dim)
        _check_dataset(acts, texts, out)
    n = len(texts)
    features = np.stack([np.asarray(acts.get(SITE, layer))[:n] for layer in acts.layers])
    return features.astype(np.float32, copy=False), np.asarray(labels)


def _complete(path: pathlib.Path) -> bool:
    try:
        load_activations(path)
    except ValueError:
        return False
    return True


def _check_dataset(acts, texts, path) -> None:
    if acts.manifest["dataset_hash"] != dataset_hash(texts):
        raise ValueError(f"{path} was extracted from other texts than the bundled dataset")
    if acts.pool != "last" or SITE not in acts.sites:
        raise ValueError(f"{path} must hold {SITE} with pool 'last'")


# ---------------------------------------------------------------- timing helpers

def timed(fn) -> tuple[float, object]:
    start = time.perf_counter()
    value = fn()
    return time.perf_counter() - start, value


def best_of(fn, repeats: int) -> tuple[float, object]:
    """Best wall time of `repeats` calls (no warm-up: call once before if it compiles)."""
    runs = [timed(fn) for _ in range(repeats)]
    return min(t for t, _ in runs), runs[-1][1]


def blas_limit(label: str):
    return threadpoolctl.threadpool_limits(BLAS_SETTINGS[label], user_api="blas")


def load_line() -> str:
    return "load average %.1f %.1f %.1f" % os.getloadavg()


# ---------------------------------------------------------------- probing

class PeerProbe(NamedTuple):
    accuracy: np.ndarray  # [n_layers]
    convergence_warnings: int


def sklearn_probe(features: np.ndarray, labels: np.ndarray, train: np.ndarray,
                  test: np.ndarray) -> PeerProbe:
    """The released TracingLLM recipe, one LogisticRegression() per layer."""
    accuracy, n_warnings = [], 0
    for x in features:
        z = StandardScaler().fit_transform(x)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ConvergenceWarning)
            clf = LogisticRegression().fit(z[train], labels[train])
        n_warnings += sum(issubclass(w.category, ConvergenceWarning) for w in caught)
        accuracy.append(clf.score(z[test], labels[test]))
    return PeerProbe(np.array(accuracy), n_warnings)


def lbfgs_flops(n: int, n_train: int, d: int, iterations: np.ndarray) -> float:
    """Flops of probe_layers(solver="lbfgs"), counting per iteration its two passes over the
    [n_train, d] rows (4 n d; the O(n + d) vector work is left out), and per layer the
    standardization (~5 n d) and the scoring (2 n_test d)."""
    per_layer = iterations * 4.0 * n_train * (d + 1)
    return float(np.sum(per_layer) + len(iterations) * (5.0 * n * d + 2.0 * (n - n_train) * d))


def newton_flops(n: int, n_train: int, d: int, n_layers: int, steps: int) -> float:
    """Flops of probe_layers(solver="newton"): per step and layer the Hessian (2 n d^2), margins
    and gradient (4 n d) and an LU solve (2/3 d^3). Its solution is exact to float32 rounding."""
    k = d + 1
    per_step = 2.0 * n_train * k * k + 4.0 * n_train * k + 2.0 / 3.0 * k**3
    return n_layers * (steps * per_step + 5.0 * n * d + 2.0 * (n - n_train) * d)


class ProbeRow(NamedTuple):
    dim: str
    n: int
    n_train: int
    n_test: int
    sklearn: dict  # blas label -> seconds
    warnings: int  # sklearn ConvergenceWarnings
    first: dict  # solver -> seconds of the first call (with compile)
    steady: dict  # solver -> {blas label -> seconds}
    flops: dict  # solver -> flops of one call
    bytes_read: float  # feature bytes the L-BFGS iterations stream (2 passes per iteration)
    accuracy: dict  # "sklearn" and each solver -> [n_layers]
    iterations: np.ndarray | None  # L-BFGS iterations per layer


def bench_probe_dimension(dim: str, args, solvers: list[str], blas: list[str]) -> ProbeRow:
    features, labels = trust_features(dim, args.activations_root, args.limit)
    n_layers, n, d = features.shape
    train, test = split_indices(n)
    peer_times, accuracy = {}, {}
    for label in blas:
        with blas_limit(label):
            peer_times[label], peer = timed(lambda: sklearn_probe(features, labels, train, test))
        if "sklearn" in accuracy and not np.array_equal(accuracy["sklearn"], peer.accuracy):
            print(f"  note: sklearn's accuracies on {dim} differ between BLAS settings")
        accuracy.setdefault("sklearn", peer.accuracy)
    first, steady, flops, bytes_read, iterations = {}, {}, {}, 0.0, None
    for solver in solvers:
        run = lambda: probe_layers(features, labels, solver=solver, tol=args.tol)
        first[solver], result = timed(run)
        steady[solver] = {}
        for label in blas if solver == "newton" else blas[:1]:  # L-BFGS calls no BLAS
            with blas_limit(label):
                steady[solver][label], result = best_of(run, args.repeats)
        accuracy[solver] = result.accuracy
        if solver == "lbfgs":
            iterations = result.iterations
            flops[solver] = lbfgs_flops(n, len(train), d, iterations)
            bytes_read = float(np.sum(iterations)) * 2 * len(train) * d * 4
        else:
            flops[solver] = newton_flops(n, len(train), d, n_layers, int(result.iterations[0]))
    return ProbeRow(dim, n, len(train), len(test), peer_times, peer.convergence_warnings, first,
                    steady, flops, bytes_read, accuracy, iterations)


def bench_probe(args, peak: float) -> None:
    solvers = args.solvers.split(",")
    blas = list(BLAS_SETTINGS) if args.blas_threads == "both" else [args.blas_threads]
    print(f"\nprobing: 30 layers x {len(TRUST_DATASETS)} dimensions, {SITE} at the last token, "
          f"d = 576; jtrust probe_layers solvers {solvers} (L-BFGS tol {args.tol}), sklearn "
          f"LogisticRegression() defaults (tol 1e-4, max_iter 100)  [{load_line()}]")
    rows = []
    for dim in TRUST_DATASETS:
        rows.append(bench_probe_dimension(dim, args, solvers, blas))
        _print_probe_row(rows[-1], solvers, blas, peak)
    _print_probe_totals(rows, solvers, blas, peak)


def _print_probe_row(row: ProbeRow, solvers, blas, peak: float) -> None:
    print(f"\n  {row.dim}: n = {row.n} ({row.n_train} train / {row.n_test} test)")
    for label in blas:
        warned = f"  ({row.warnings} ConvergenceWarnings of 30 fits)" if label == blas[0] else ""
        print(f"    {'sklearn, ' + _blas_name(label):34s} {row.sklearn[label]:8.3f} s{warned}")
    for solver in solvers:
        for label, t in row.steady[solver].items():
            name = f"jtrust {solver}" + (f", {_blas_name(label)}" if solver == "newton" else "")
            ratios = " / ".join(f"{row.sklearn[b] / t:.1f}x" for b in blas)
            streamed = f", rows streamed at {row.bytes_read / t / 1e9:.0f} GB/s" if solver == "lbfgs" else ""
            print(f"    {name:34s} {t:8.3f} s steady ({row.first[solver]:.2f} s first call): "
                  f"{ratios} faster than sklearn ({' / '.join(_blas_name(b) for b in blas)}); "
                  f"{row.flops[solver] / t / 1e9:.1f} GFLOP/s = {row.flops[solver] / t / 1e9 / peak:.1%} "
                  f"of peak{streamed}")
    if row.iterations is not None:
        it = row.iterations
        print(f"    L-BFGS iterations per layer: {it.min()}-{it.max()}, mean {it.mean():.0f}")
    print("    max |accuracy difference| over layers: " + "; ".join(
        f"{a} vs {b} {_max_diff(row, a, b)}" for a, b in _pairs(row.accuracy)))


def _pairs(accuracy: dict) -> list[tuple[str, str]]:
    names = list(accuracy)
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def _max_diff(row: ProbeRow, a: str, b: str) -> str:
    diff = float(np.max(np.abs(row.accuracy[a] - row.accuracy[b])))
    return f"{diff:.4f} ({round(diff * row.n_test)} of {row.n_test} test rows)"


def _print_probe_totals(rows: list[ProbeRow], solvers, blas, peak: float) -> None:
    print(f"\n  totals over the five dimensions  [{load_line()}]:")
    sklearn = {b: sum(r.sklearn[b] for r in rows) for b in blas}
    for label in blas:
        print(f"    {'sklearn, ' + _blas_name(label):34s} {sklearn[label]:8.2f} s")
    print(f"    sklearn ConvergenceWarnings: {sum(r.warnings for r in rows)} of {30 * len(rows)} fits")
    for solver in solvers:
        for label in rows[0].steady[solver]:
            steady = sum(r.steady[solver][label] for r in rows)
            first = sum(r.first[solver] for r in rows)
            flops = sum(r.flops[solver] for r in rows)
            name = f"jtrust {solver}" + (f", {_blas_name(label)}" if solver == "newton" else "")
            print(f"    {name:34s} {steady:8.2f} s steady, {first:.2f} s first calls (with compile): "
                  + "; ".join(f"{sklearn[b] / steady:.1f}x steady, {sklearn[b] / first:.1f}x with "
                              f"compile vs sklearn ({_blas_name(b)})" for b in blas)
                  + f"; {flops / steady / 1e9:.1f} GFLOP/s = {flops / steady / 1e9 / peak:.1%} of peak")
    for a, b in _pairs(rows[0].accuracy):
        worst = max(rows, key=lambda r: np.max(np.abs(r.accuracy[a] - r.accuracy[b])))
        print(f"    max |accuracy difference| {a} vs {b}: {_max_diff(worst, a, b)} on {worst.dim}")


def _blas_name(label: str) -> str:
    return "default BLAS threads" if label == "default" else "1 BLAS thread"


# ---------------------------------------------------------------- nHSIC

def numpy_nhsic(a: np.ndarray, b: np.ndarray, dtype, sigma: float = 50.0, eps: float = 1e-5) -> float:
    """TracingLLM's nHSIC transcribed to numpy: trace(R_a R_b), R = Kc (Kc + eps n I)^-1."""
    def operator(z):
        z = np.asarray(z, dtype).reshape(len(z), -1)
        n, d = z.shape
        sq = np.sum(z * z, axis=1)
        dist = np.maximum(sq[:, None] + sq[None, :] - 2 * z @ z.T, 0)
        k = np.exp(-dist / (2 * sigma**2 * d))
        kc = k - k.mean(axis=1, keepdims=True)  # K H
        # R (Kc + eps n I) = Kc  <=>  (Kc + eps n I)^T R^T = Kc^T
        return np.linalg.solve((kc + eps * n * np.eye(n, dtype=dtype)).T, kc.T).T
    return float(np.sum(operator(a) * operator(b).T))  # trace(A B) without forming A B


def nhsic_flops(n: int, d: int) -> tuple[float, float]:
    """(jtrust, numpy) flops of one nHSIC: per operator the Gram (2 n^2 d) and jtrust's SPD
    inverse (4/3 n^3) or numpy's LU solve with n right-hand sides (2/3 n^3 + 2 n^3)."""
    return 2 * (2.0 * n * n * d + 4.0 / 3.0 * n**3), 2 * (2.0 * n * n * d + 8.0 / 3.0 * n**3)


def gaussian_pair(n: int, d: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    a = standardize(rng.standard_normal((n, d)))
    b = standardize(a[:, :64] @ rng.standard_normal((64, d)) + rng.standard_normal((n, d)))
    return a, b


def real_pair(n: int, root: pathlib.Path | None):
    """(block 0, block 15) outputs, standardized, first n rows of a whole extraction with >= n rows."""
    for dim in TRUST_DATASETS:
        path = (root or DEFAULT_ROOT) / dim
        if _complete(path):
            acts = load_activations(path)
            if acts.manifest["n_texts"] >= n:
                x, t = (standardize(np.asarray(acts.get(SITE, layer))[:n]) for layer in (0, 15))
                return dim, x, t
    return None


def bench_nhsic(args, peak: float) -> None:
    n, d = args.nhsic_n, 576
    blas = list(BLAS_SETTINGS) if args.blas_threads == "both" else [args.blas_threads]
    a, b = gaussian_pair(n, d)
    print(f"\nnHSIC, n = {n}, standardized Gaussian features d = {d} (b depends on a), "
          f"sigma 50, eps 1e-5  [{load_line()}]")
    first, _ = timed(lambda: mi.nhsic(a, b))
    t_jt, v_jt = best_of(lambda: mi.nhsic(a, b), args.repeats)
    f_jt, f_np = nhsic_flops(n, d)
    peer = {}
    for dtype in (np.float64, np.float32):
        for label in blas:
            with blas_limit(label):
                peer[dtype, label] = best_of(lambda: numpy_nhsic(a, b, dtype), args.repeats)
    v64 = peer[np.float64, blas[0]][1]
    print(f"  jtrust float32       {t_jt:7.3f} s steady ({first - t_jt:5.2f} s compile: first call "
          f"{first:5.2f} s)  value {v_jt:.6f}  rel. diff to numpy float64 {abs(v_jt - v64) / abs(v64):.1e}  "
          f"{f_jt / t_jt / 1e9:6.1f} GFLOP/s = {f_jt / t_jt / 1e9 / peak:5.1%} of peak")
    for (dtype, label), (t, v) in peer.items():
        name = f"numpy {np.dtype(dtype).name}"
        print(f"  {name:13s} ({_blas_name(label):20s}) {t:7.3f} s  value {v:.6f}  "
              f"rel. diff to float64 {abs(v - v64) / abs(v64):.1e}  {f_np / t / 1e9:6.1f} GFLOP/s  "
              f"-> jtrust {t / t_jt:5.1f}x faster")
    best = min(peer, key=lambda key: peer[key][0])
    print(f"  ratio vs the fastest numpy run ({np.dtype(best[0]).name}, {_blas_name(best[1])}): "
          f"{peer[best][0] / t_jt:.1f}x; vs numpy float64 at its best: "
          f"{min(peer[np.float64, b][0] for b in blas) / t_jt:.1f}x  [{load_line()}]")
    real = real_pair(n, args.activations_root)
    if real is None:
        print(f"  (no whole extraction with >= {n} rows on disk: real activations skipped)")
        return
    dim, x, t = real
    mi.nhsic(x, t)
    t_real, v_real = best_of(lambda: mi.nhsic(x, t), args.repeats)
    with blas_limit(best[1]):
        t_np, v_np = best_of(lambda: numpy_nhsic(x, t, np.float64), args.repeats)
    print(f"  real activations ({dim}, first {n} rows, block 0 vs block 15): jtrust {t_real:.3f} s "
          f"value {v_real:.6f}; numpy float64 {t_np:.3f} s value {v_np:.6f}; rel. diff "
          f"{abs(v_real - v_np) / abs(v_np):.1e}; ratio {t_np / t_real:.1f}x")


# ---------------------------------------------------------------- main

def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--activations-root", type=pathlib.Path, default=None)
    parser.add_argument("--limit", type=int, default=None, help="first N rows of each dataset")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--parts", default="probe,nhsic")
    parser.add_argument("--solvers", default="lbfgs", help="probe_layers solvers to time: lbfgs,newton")
    parser.add_argument("--tol", type=float, default=1e-5, help="probe_layers tol (L-BFGS)")
    parser.add_argument("--blas-threads", choices=["both", *BLAS_SETTINGS], default="both",
                        help="BLAS thread settings for the peers (and the Newton probe)")
    parser.add_argument("--nhsic-n", type=int, default=2000)
    args = parser.parse_args()
    parts = args.parts.split(",")
    print(f"{benchlib.machine_line(benchlib.machine())}; {load_line()}")
    peak, peak_src = matmul_peak(args.repeats)
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({peak_src})")
    if "probe" in parts:
        bench_probe(args, peak)
    if "nhsic" in parts:
        bench_nhsic(args, peak)


if __name__ == "__main__":
    main()
