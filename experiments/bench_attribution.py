"""Influence-function benchmark on the embedded model: jtrust vs kronfluence, EK-FAC, in one run.

    python experiments/bench_attribution.py [--train 16] [--queries 4] [--seq-len 80]
                                            [--names q,down] [--layers 4,12,20,28] [--batch 8]

Both sides score the same N training rows against the same M query rows (bundled TOFU
question-answer pairs: retain99 rows 0..N-1 train, rows N..N+M-1 query, built by
`jtrust.training.prompt_answer_examples`, so the loss and the measurement are the NLL of the
answer) over the same linear kernels of SmolLM2-135M-Instruct (the embedded GGUF; transformers
loads the same file, dequantized to float32 by each):
  jtrust       `jtrust.analysis.attribution` with Options(method="ekfac", damping=0.1), chunks of
               --batch rows
  kronfluence  kronfluence 1.x (PyTorch) FactorArguments(strategy="ekfac", empirical Fisher) and
               ScoreArguments(damping_factor=None) (0.1 x the mean eigenvalue per module, the
               same damping), --batch rows per batch for factors and scores
Each side runs in its own subprocess (peak memory = its ru_maxrss; "before" = the resident set
once the model is loaded, before any attribution) with all cores. Each first runs a warm-up on
--batch training rows (jtrust compiles there; the compile time is printed apart), then is timed:
  factors  jtrust: one forward/backward pass over the training rows (kernel gradients and the
           token covariances), eigendecompositions, the eigenvalue correction;
           kronfluence: covariance pass, eigendecomposition, Lambda pass (two passes).
  scores   jtrust: query gradients, preconditioning, dot products with the kept training
           gradients; kronfluence: query gradients, preconditioning, a third pass over the
           training rows.
Prints the CPU, the same-run float32 matmul peak (`benchlib.matmul_peak`), each phase's wall
time, the speed-up (kronfluence time / jtrust time), the Spearman correlation of the two [M, N]
score matrices, and jtrust's phases as fractions of the peak. FLOPs counted for jtrust: the usual
6 x params per token of a forward + backward plus 12 L T d for attention (as bench_train; jtrust's
backward stops at the taps and forms no weight gradient, so it does somewhat less), over every
position of every padded chunk; plus the covariance, per-row gradient, rotation, preconditioning
and dot-product einsums. The eigendecompositions are not counted.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import resource
import subprocess
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
TORCH_NAMES = {"q": "self_attn.q_proj", "k": "self_attn.k_proj", "v": "self_attn.v_proj",
               "o": "self_attn.o_proj", "gate": "mlp.gate_proj", "up": "mlp.up_proj", "down": "mlp.down_proj"}


def rss_mb() -> float:
    """Current resident set (MB) from /proc/self/status."""
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KB on Linux


# ---------------------------------------------------------------------------------------------
# rows

def build_rows(args, path: pathlib.Path) -> dict:
    """TOFU retain99 pairs that fit seq_len: N training rows then M query rows, saved to `path`."""
    import jtrust
    from jtrust.data import tofu
    from jtrust.training import prompt_answer_examples

    model = jtrust.load("smollm2")
    tok = model.tokenizer
    eos = 1 if tok.eos_id is not None else 0
    pairs = []
    for r in tofu("retain99"):
        n = len(tok.encode(r["question"])) + len(tok.backend.encode(r["answer"], add_special_tokens=False).ids) + eos
        if n <= args.seq_len + 1:
            pairs.append((r["question"], r["answer"]))
        if len(pairs) == args.train + args.queries:
            break
    train = prompt_answer_examples(tok, pairs[: args.train], args.seq_len)
    queries = prompt_answer_examples(tok, pairs[args.train:], args.seq_len)
    np.savez(path, **{f"train_{k}": v for k, v in train._asdict().items()},
             **{f"query_{k}": v for k, v in queries._asdict().items()})
    c = model.config
    import jax
    return {"params": int(sum(x.size for x in jax.tree.leaves(model.params))), "n_layers": c.n_layers,
            "attn_width": c.n_heads * c.head_dim, "d_model": c.d_model, "d_ff": c.d_ff,
            "kv_width": c.n_kv_heads * c.head_dim,
            "train_tokens": int(train.mask.sum()), "query_tokens": int(queries.mask.sum())}


def load_rows(path: str):
    from jtrust.training.lm import Examples
    with np.load(path) as f:
        train = Examples(*(f[f"train_{k}"] for k in Examples._fields))
        queries = Examples(*(f[f"query_{k}"] for k in Examples._fields))
    return train, queries


def take(rows, n: int):
    return type(rows)(*(x[:n] for x in rows))


# ---------------------------------------------------------------------------------------------
# the two sides (each in its own process)

def run_jtrust(args) -> dict:
    import jax

    import jtrust
    from jtrust.analysis import attribution as attr
    from jtrust.analysis.attribution.scores import _Scorer

    train, queries = load_rows(args.rows)
    model = jtrust.load("smollm2")
    jax.block_until_ready(model.params)
    before = rss_mb()
    task = attr.Task(modules=attr.Modules(names=tuple(args.names.split(",")),
                                          layers=tuple(int(l) for l in args.layers.split(","))))
    options = attr.Options(method="ekfac", damping=args.damping, chunk=args.batch)

    # warm-up: every jitted shape of the timed run (a full chunk, the last partial chunk, all queries)
    warm_rows = min(train.tokens.shape[0], args.batch + train.tokens.shape[0] % args.batch)
    t = time.perf_counter()
    attr.scores(model, take(train, warm_rows), queries, task=task, options=options, progress=False)
    compile_s = time.perf_counter() - t

    # the public `attr.scores` is _Scorer(...).scores(queries); timed here in its two phases
    scorer = _Scorer(model, train, task, options, None, None, False)
    t = time.perf_counter()
    loaders, cov = scorer._train_grads()
    factors = scorer._factors(loaders, cov)
    factors_s = time.perf_counter() - t
    scorer._train_grads = lambda: (loaders, cov)  # the scores phase reuses the factor phase's work
    scorer._factors = lambda *_: factors
    t = time.perf_counter()
    scores = scorer._module_scores(queries, mean=False)
    scores_s = time.perf_counter() - t
    return {"factors_s": factors_s, "scores_s": scores_s, "warmup_s": compile_s, "scores": scores.tolist(),
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


def run_kronfluence(args) -> dict:
    import torch
    import transformers
    from kronfluence.analyzer import Analyzer, prepare_model
    from kronfluence.arguments import FactorArguments, ScoreArguments
    from kronfluence.task import Task

    from jtrust.io.loading import embedded_gguf_path

    torch.set_num_threads(os.cpu_count())
    train, queries = load_rows(args.rows)
    names = [f"model.layers.{l}.{TORCH_NAMES[n]}" for n in args.names.split(",") for l in
             (int(x) for x in args.layers.split(","))]

    class Rows(torch.utils.data.Dataset):
        def __init__(self, e):
            self.e = e

        def __len__(self):
            return self.e.tokens.shape[0]

        def __getitem__(self, i):
            return {"input_ids": torch.as_tensor(self.e.tokens[i], dtype=torch.long),
                    "attention_mask": torch.as_tensor(self.e.mask[i], dtype=torch.long),
                    "targets": torch.as_tensor(self.e.targets[i], dtype=torch.long),
                    "weights": torch.as_tensor(self.e.weights[i], dtype=torch.float32)}

    def weighted_nll(batch, model):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = -torch.gather(torch.log_softmax(logits.float(), -1), -1, batch["targets"][..., None])[..., 0]
        return torch.sum(nll * batch["weights"])

    class NllTask(Task):
        def compute_train_loss(self, batch, model, sample=False):
            del sample  # the empirical Fisher with the rows' own targets, as jtrust fits it
            return weighted_nll(batch, model)

        def compute_measurement(self, batch, model):
            return weighted_nll(batch, model)

        def get_influence_tracked_modules(self):
            return names

        def get_attention_mask(self, batch):
            return batch["attention_mask"]

    gguf = embedded_gguf_path()
    hf = transformers.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name,
                                                           dtype=torch.float32).eval()
    task = NllTask()
    model = prepare_model(hf, task)
    before = rss_mb()
    out = tempfile.mkdtemp(prefix="bench_kronfluence_")
    analyzer = Analyzer(analysis_name="bench", model=model, task=task, cpu=True, disable_tqdm=True,
                        output_dir=out)
    factor_args = FactorArguments(strategy="ekfac", use_empirical_fisher=True)
    score_args = ScoreArguments(damping_factor=None)

    def run(name, tr):
        t = time.perf_counter()
        analyzer.fit_all_factors(factors_name=name, dataset=Rows(tr), per_device_batch_size=args.batch,
                                 factor_args=factor_args, overwrite_output_dir=True)
        t_f = time.perf_counter() - t
        t = time.perf_counter()
        analyzer.compute_pairwise_scores(scores_name=name, factors_name=name, query_dataset=Rows(queries),
                                         train_dataset=Rows(tr), per_device_query_batch_size=args.batch,
                                         per_device_train_batch_size=args.batch, score_args=score_args,
                                         overwrite_output_dir=True)
        t_s = time.perf_counter() - t
        return t_f, t_s, analyzer.load_pairwise_scores(name)["all_modules"].double().numpy()

    t = time.perf_counter()
    run("warmup", take(train, min(train.tokens.shape[0], args.batch)))
    warm = time.perf_counter() - t
    factors_s, scores_s, scores = run("timed", train)
    return {"factors_s": factors_s, "scores_s": scores_s, "warmup_s": warm, "scores": scores.tolist(),
            "rss_before_mb": before, "peak_rss_mb": peak_rss_mb()}


# ---------------------------------------------------------------------------------------------
# FLOPs of jtrust's phases

def jtrust_flops(args, info: dict, n: int, m: int) -> tuple[float, float]:
    T, b = args.seq_len, args.batch
    rows_train = -(-n // b) * b  # every chunk is padded to --batch rows
    rows_query = -(-m // b) * b
    per_token = 6 * info["params"] + 12 * info["n_layers"] * T * info["attn_width"]
    widths = {"q": (info["d_model"], info["attn_width"]), "k": (info["d_model"], info["kv_width"]),
              "v": (info["d_model"], info["kv_width"]), "o": (info["attn_width"], info["d_model"]),
              "gate": (info["d_model"], info["d_ff"]), "up": (info["d_model"], info["d_ff"]),
              "down": (info["d_ff"], info["d_model"])}
    n_layers = len(args.layers.split(","))
    fac = per_token * rows_train * T
    sco = per_token * rows_query * T
    for name in args.names.split(","):
        i, o = widths[name]
        fac += n_layers * (2 * rows_train * T * (i * i + o * o)   # token covariances
                           + 2 * rows_train * T * i * o           # per-row kernel gradients
                           + 2 * n * (i * i * o + i * o * o))     # EK-FAC rotation of each gradient
        sco += n_layers * (2 * rows_query * T * i * o             # query kernel gradients
                           + 4 * m * (i * i * o + i * o * o)      # rotate in and back
                           + 2 * m * n * i * o)                   # dot products
    return fac, sco


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train", type=int, default=16, help="training rows N")
    parser.add_argument("--queries", type=int, default=4, help="query rows M")
    parser.add_argument("--seq-len", type=int, default=80)
    parser.add_argument("--names", default="q,down", help="projections (q,k,v,o,gate,up,down)")
    parser.add_argument("--layers", default="4,12,20,28")
    parser.add_argument("--batch", type=int, default=8, help="rows per batch on both sides")
    parser.add_argument("--damping", type=float, default=0.1)
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the matmul peak")
    parser.add_argument("--side", choices=("jtrust", "kronfluence"), help=argparse.SUPPRESS)
    parser.add_argument("--rows", help=argparse.SUPPRESS)
    parser.add_argument("--result", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.side:  # a child: one side, its result as JSON
        result = (run_jtrust if args.side == "jtrust" else run_kronfluence)(args)
        pathlib.Path(args.result).write_text(json.dumps(result))
        return

    import scipy.stats
    sys.path.insert(0, str(HERE))
    import benchlib
    from benchlib import matmul_peak

    print(benchlib.machine_line(benchlib.machine()))
    peak, who = matmul_peak(args.repeats)
    print(f"float32 matmul peak: {peak:.1f} GFLOP/s ({who})")

    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_attribution_"))
    info = build_rows(args, work / "rows.npz")
    n, m = args.train, args.queries
    print(f"rows: {n} training x {m} query TOFU pairs, seq_len {args.seq_len} ({info['train_tokens']} + "
          f"{info['query_tokens']} real tokens); modules {args.names} in layers {args.layers}; batch {args.batch}")

    results = {}
    for side in ("jtrust", "kronfluence"):
        out = work / f"{side}.json"
        cmd = [sys.executable, __file__, "--side", side, "--rows", str(work / "rows.npz"), "--result", str(out),
               "--seq-len", str(args.seq_len), "--names", args.names, "--layers", args.layers,
               "--batch", str(args.batch), "--damping", str(args.damping)]
        subprocess.run(cmd, check=True)
        results[side] = json.loads(out.read_text())

    jt, kf = results["jtrust"], results["kronfluence"]
    fac_flops, sco_flops = jtrust_flops(args, info, n, m)
    print(f"{'':12s} {'factors':>9s} {'scores':>9s} {'total':>9s} {'warm-up':>9s} {'RSS before':>11s} {'peak RSS':>9s}")
    for side, r in results.items():
        print(f"{side:12s} {r['factors_s']:8.2f}s {r['scores_s']:8.2f}s {r['factors_s'] + r['scores_s']:8.2f}s "
              f"{r['warmup_s']:8.2f}s {r['rss_before_mb']:9.0f}MB {r['peak_rss_mb']:7.0f}MB")
    speed = lambda k: kf[k] / jt[k]
    total = (kf["factors_s"] + kf["scores_s"]) / (jt["factors_s"] + jt["scores_s"])
    print(f"speed-up jtrust / kronfluence: factors {speed('factors_s'):.2f}x, scores {speed('scores_s'):.2f}x, "
          f"factors + scores {total:.2f}x (target 2x); counting jtrust's warm-up (compilation) too: "
          f"{(kf['factors_s'] + kf['scores_s']) / (jt['factors_s'] + jt['scores_s'] + jt['warmup_s']):.2f}x")
    a, b = np.asarray(jt["scores"]), np.asarray(kf["scores"])
    rho = scipy.stats.spearmanr(a.ravel(), b.ravel()).statistic
    rel = np.abs(a - b).max() / np.abs(b).max()
    print(f"EK-FAC scores [{m}, {n}]: Spearman {rho:.4f} (target >= 0.9), max |difference| / max |score| {rel:.2e}")
    for phase, flops, t in (("factors", fac_flops, jt["factors_s"]), ("scores", sco_flops, jt["scores_s"])):
        print(f"jtrust {phase:8s} {flops / 1e9:8.1f} GFLOP in {t:.2f}s = {flops / t / 1e9:6.1f} GFLOP/s = "
              f"{flops / t / 1e9 / peak:5.1%} of peak")


if __name__ == "__main__":
    main()
