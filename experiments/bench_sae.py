"""Sparse-autoencoder training benchmark: jtrust vs sae-lens and a plain PyTorch loop, in one run.

    python experiments/bench_sae.py [--tokens 16384] [--batch 4096] [--layer 8] [--steps 5]
                                    [--repeats 2] [--architectures relu,topk] [--widths 1,2]

Every side trains the same SAE shapes on the same cached activations: SmolLM2-135M-Instruct's
`mlp_out` at --layer (d = 576) over bundled trust-set texts, token rows extracted once with
`jtrust.extract(..., pool="all")` into --cache (a rerun reads them back; --random uses Gaussian
rows instead), --batch token rows per step drawn by the same seeded permutation
(`jtrust.training.loop.batch_indices`), widths --widths x d, Adam lr 1e-3:
  jtrust    `jtrust.analysis.sae.train_saes` (the generic loop `fit`: host batch gather, one
            compiled step, post-update renormalization, metrics), steps/s from its own log
  torch     a plain PyTorch loop of the same SAE from the same initial weights: relu = the LFP
            paper's tied ReLU + L1 (rows renormalized after each step), topk = TopK with AuxK
            (skipped while no latent is dead, as in jtrust and sae-lens)
  sae-lens  `sae_lens.SAETrainer.fit` (if sae_lens imports) on its own nearest architecture:
            relu = StandardTrainingSAE (untied ReLU + L1; sae-lens has no tied SAE), topk =
            TopKTrainingSAE (AuxK); its own initialization; it always clips gradients at norm 1
Each side is timed for --steps steps after a warm-up (jtrust: a first window of --steps steps,
which compiles once and later reads the program from a compilation cache), in --repeats rounds
alternating the sides; the best round counts (the median is printed beside it). FLOPs per step,
the same for every side: 10 B d F (forward encoder and decoder, 2 B d F each; backward: the
decoder's input and weight gradients and the encoder's weight gradient; the input needs none).
Prints the CPU; ms/step (best and median round), steps/s and GFLOP/s of each side; fractions of
two peaks: the same-run float32 2048 x 2048 JAX matmul (measured between the rounds, the best
counts: the rate jtrust's XLA reaches on one dense product) and `benchlib.matmul_peak` (the
other benchmarks' peak, the best of JAX and torch over sizes; here torch's MKL matmul is faster
than XLA's); and jtrust's speed-up over the others. The machine may be shared: the load average
is printed with each figure.
"""

from __future__ import annotations

import argparse
import atexit
import os
import pathlib
import shutil
import sys
import tempfile
import time

import numpy as np

HERE = pathlib.Path(__file__).resolve().parent
D_SMOLLM2 = 576


def cpu_model() -> str:
    from bench_attribution import cpu_model as model
    return model()


def load_activations(args) -> np.ndarray:
    """[tokens, d] float32: SmolLM2's mlp_out at args.layer (cached in args.cache), or Gaussian rows."""
    if args.random:
        return np.random.default_rng(0).normal(size=(args.tokens, D_SMOLLM2)).astype(np.float32)
    import jtrust
    from jtrust.data import TRUST_DATASETS, load_texts
    model = jtrust.load("smollm2")
    texts, count = [], 0
    for name in TRUST_DATASETS:  # bundled sets, in a fixed order, until there are enough tokens
        for text in load_texts(name).texts:
            texts.append(text)
            count += min(len(model.tokenizer.encode(text)), args.max_length)
            if count >= args.tokens:
                break
        if count >= args.tokens:
            break
    acts = jtrust.extract(model, texts, sites=("mlp_out",), layers=[args.layer], pool="all",
                          max_length=args.max_length, out_dir=pathlib.Path(args.cache) / f"layer{args.layer}",
                          progress=False)
    x = np.asarray(acts.get("mlp_out", args.layer)[: args.tokens], np.float32)
    if len(x) < args.tokens:
        raise SystemExit(f"only {len(x)} tokens in the bundled texts; lower --tokens")
    return x


def batch_rows(n: int, batch: int, step: int) -> np.ndarray:
    from jtrust.training.loop import batch_indices
    return np.sort(batch_indices(n, batch, step, 0))


# ---------------------------------------------------------------------------------------------
# the sides: each returns seconds per step over args.steps timed steps

def time_jtrust(x: np.ndarray, config, args, work: pathlib.Path) -> float:
    from jtrust.analysis import sae
    train = sae.sae_train_config(2 * args.steps, batch_size=args.batch, learning_rate=1e-3, log_every=args.steps)
    out = pathlib.Path(tempfile.mkdtemp(dir=work))
    run = sae.train_saes([x], config, train, out, progress=False)
    windows = [m for m in run.metrics if m["kind"] == "train"]
    return args.batch / windows[-1]["tokens_per_s"]  # the second window: compiled (or read from the cache), steady


def torch_sae(config, params: dict):
    """(parameters, step(x) -> loss) of jtrust's SAE in plain PyTorch, from jtrust's initial weights."""
    import torch
    t = lambda a: torch.tensor(np.array(a), requires_grad=True)
    if config.architecture == "relu":
        w, b_e, b_d = t(np.asarray(params["W_enc"]).T), t(params["b_enc"]), t(params["b_dec"])  # w [F, d]
        opt = torch.optim.Adam([w, b_e, b_d], lr=1e-3)

        def step(x):
            f = torch.relu(x @ w.T + b_e)
            loss = ((f @ w + b_d - x) ** 2).mean() + config.l1_coef * f.sum(-1).mean()  # f >= 0: |f|_1 = sum
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            with torch.no_grad():  # the paper's unit-norm dictionary rows
                w.div_(w.norm(dim=1, keepdim=True).clamp_min(1e-12))
            return loss
        return step

    w_enc, b_e, w_dec, b_d = (t(params[k]) for k in ("W_enc", "b_enc", "W_dec", "b_dec"))
    opt = torch.optim.Adam([w_enc, b_e, w_dec, b_d], lr=1e-3)
    since_fired = torch.zeros(config.width)

    def step(x):
        pre = (x - b_d) @ w_enc + b_e
        top = pre.topk(config.k, dim=-1)
        f = torch.zeros_like(pre).scatter(-1, top.indices, torch.relu(top.values))
        x_hat = f @ w_dec + b_d
        loss = ((x - x_hat) ** 2).sum(-1).mean()
        dead = since_fired >= config.dead_tokens
        if dead.any():  # AuxK, as jtrust's: the error from the k_aux largest dead pre-activations
            k_aux = min(config.aux_k, int(dead.sum()))
            aux_top = torch.where(dead, pre, -torch.inf).topk(k_aux, dim=-1)
            aux = torch.zeros_like(pre).scatter(-1, aux_top.indices, aux_top.values)
            scale = min(float(dead.sum()) / config.aux_k, 1.0)
            loss = loss + config.aux_coef * scale * (((x - x_hat).detach() - aux @ w_dec) ** 2).sum(-1).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        with torch.no_grad():
            w_dec.div_(w_dec.norm(dim=1, keepdim=True).clamp_min(1e-12))
            fired = (f > 0).any(dim=0)
            since_fired.add_(x.shape[0]).masked_fill_(fired, 0.0)
        return loss
    return step


def time_torch(x: np.ndarray, config, params: dict, args) -> float:
    import torch
    step = torch_sae(config, params)
    step(torch.from_numpy(x[batch_rows(len(x), args.batch, 0)]))  # warm-up: first allocations
    start = time.perf_counter()
    for s in range(1, args.steps + 1):
        loss = step(torch.from_numpy(x[batch_rows(len(x), args.batch, s)]))
    loss.item()
    return (time.perf_counter() - start) / args.steps


def time_sae_lens(x: np.ndarray, config, args) -> float:
    import sae_lens
    import torch
    from sae_lens.config import SAETrainerConfig
    if config.architecture == "relu":
        cfg = sae_lens.StandardTrainingSAEConfig(d_in=config.d_in, d_sae=config.width, l1_coefficient=config.l1_coef,
                                                 apply_b_dec_to_input=False, dtype="float32", device="cpu")
        sae = sae_lens.StandardTrainingSAE(cfg)
    else:
        cfg = sae_lens.TopKTrainingSAEConfig(d_in=config.d_in, d_sae=config.width, k=config.k,
                                             aux_loss_coefficient=config.aux_coef, dtype="float32", device="cpu")
        sae = sae_lens.TopKTrainingSAE(cfg)

    def provider(first: int):
        s = first
        while True:
            yield torch.from_numpy(x[batch_rows(len(x), args.batch, s)])
            s += 1

    def trainer(steps: int, first: int):
        tc = SAETrainerConfig(total_training_samples=steps * args.batch, train_batch_size_samples=args.batch,
                              lr=1e-3, lr_end=1e-3, device="cpu", dead_feature_window=1000)
        return sae_lens.SAETrainer(tc, sae, provider(first))  # logging to wandb is off by default

    trainer(1, 0).fit()  # warm-up
    run = trainer(args.steps, 1)
    start = time.perf_counter()
    run.fit()
    return (time.perf_counter() - start) / args.steps


# ---------------------------------------------------------------------------------------------

def jax_matmul_rate(repeats: int = 3) -> float:
    """GFLOP/s of a float32 2048 x 2048 JAX matmul (best of repeats): the peak jtrust's XLA reaches."""
    import jax
    import jax.numpy as jnp
    from benchlib import best_time
    a = jnp.asarray(np.random.default_rng(0).random((2048, 2048)), jnp.float32)
    mm = jax.jit(lambda u: u @ u)
    return 2 * 2048 ** 3 / best_time(lambda: mm(a).block_until_ready(), repeats) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=16384, help="cached activation rows")
    parser.add_argument("--batch", type=int, default=4096, help="token rows per step")
    parser.add_argument("--layer", type=int, default=8, help="SmolLM2 block whose mlp_out is cached")
    parser.add_argument("--max-length", type=int, default=128, help="tokens kept per text")
    parser.add_argument("--steps", type=int, default=3, help="timed steps per side and repeat")
    parser.add_argument("--repeats", type=int, default=4, help="rounds alternating the sides; the best counts")
    parser.add_argument("--architectures", default="relu,topk", help="relu (the LFP paper's) and/or topk")
    parser.add_argument("--widths", default="1,2", help="dictionary widths as multiples of d")
    parser.add_argument("--k", type=int, default=32, help="topk: latents per token")
    parser.add_argument("--cache", default="runs/bench_sae", help="where the activations are cached")
    parser.add_argument("--random", action="store_true", help="Gaussian rows instead of SmolLM2's activations")
    parser.add_argument("--no-sae-lens", action="store_true", help="leave sae-lens out")
    args = parser.parse_args()

    sys.path.insert(0, str(HERE))
    os.environ.setdefault("TQDM_DISABLE", "1")  # sae-lens's progress bar
    import jax
    import torch
    work = pathlib.Path(tempfile.mkdtemp(prefix="bench_sae_"))  # the jtrust runs' directories, removed at exit
    atexit.register(shutil.rmtree, work, ignore_errors=True)
    # each repeat is a fresh `train_saes` call: its step program compiles once, then comes from this cache
    jax.config.update("jax_compilation_cache_dir", str(work / "xla_cache"))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
    import benchlib
    from benchlib import matmul_peak
    from jtrust.analysis import sae

    have_sae_lens = False
    if not args.no_sae_lens:
        try:
            import sae_lens  # noqa: F401  (installed without its dependencies by setup.sh's test oracles)
            have_sae_lens = True
        except Exception as e:  # any import failure means: no sae-lens side
            print(f"sae-lens does not import ({type(e).__name__}: {e}); timing jtrust and plain torch only")

    print(f"cpu: {cpu_model()}, {os.cpu_count()} cores; load average {os.getloadavg()[0]:.1f}; jax {jax.__version__}, "
          f"torch {torch.__version__} ({torch.get_num_threads()} threads)"
          + (f", sae-lens {sys.modules['sae_lens'].__version__}" if have_sae_lens else ""))
    x = load_activations(args)
    d = x.shape[1]
    source = "Gaussian" if args.random else f"SmolLM2 mlp_out, layer {args.layer}"
    print(f"activations: {len(x)} token rows x d = {d} ({source}); "
          f"batch {args.batch} tokens/step, {args.steps} timed steps, best of {args.repeats} rounds")
    peaks = [jax_matmul_rate()]
    results = []
    for architecture in args.architectures.split(","):
        for mult in (int(w) for w in args.widths.split(",")):
            config = sae.SAEConfig(d_in=d, width=mult * d, architecture=architecture, k=args.k)
            params = {k: np.asarray(v[0]) for k, v in sae.init_stack(config, 1, (0,)).items()}
            times = {"jtrust": [], "torch": [], **({"sae-lens": []} if have_sae_lens else {})}
            for _ in range(args.repeats):  # alternating, so that a busy moment hits every side
                times["jtrust"].append(time_jtrust(x, config, args, work))
                times["torch"].append(time_torch(x, config, params, args))
                if have_sae_lens:
                    times["sae-lens"].append(time_sae_lens(x, config, args))
                peaks.append(jax_matmul_rate())
            results.append((architecture, mult, config, times, os.getloadavg()[0]))

    peak = max(peaks)  # the same-run peak: the best 2048 x 2048 float32 JAX matmul between the rounds
    machine, who = matmul_peak(3)  # the other benchmarks' peak: best of JAX and torch over sizes
    print(benchlib.machine_line(benchlib.machine()))
    print(f"peak: JAX float32 2048 x 2048 matmul {peak:.1f} GFLOP/s (best of {len(peaks)} measurements between "
          f"the rounds; median {np.median(peaks):.1f}); best of JAX and torch (benchlib.matmul_peak) "
          f"{machine:.1f} GFLOP/s ({who})")
    print(f"{'SAE':16s} {'side':9s} {'ms/step':>9s} {'median':>8s} {'steps/s':>8s} {'GFLOP/s':>8s} {'of peak':>8s}"
          f" {'of best':>8s}  jtrust speed-up")
    for architecture, mult, config, times, load in results:
        flops = 10 * args.batch * d * config.width
        best = {k: min(v) for k, v in times.items()}
        for side, t in best.items():
            ratio = "" if side == "jtrust" else f"  {t / best['jtrust']:.2f}x"
            print(f"{architecture + f' {mult}x (F={config.width})':16s} {side:9s} {t * 1e3:9.1f} "
                  f"{np.median(times[side]) * 1e3:8.1f} {1 / t:8.2f} {flops / t / 1e9:8.1f} "
                  f"{flops / t / 1e9 / peak:8.1%} {flops / t / 1e9 / machine:8.1%}{ratio}")
        print(f"{'':16s} (load average {load:.1f} after these runs)")
    for architecture, mult, config, times, _ in results:
        if mult != 2:
            continue
        best = {k: min(v) for k, v in times.items()}
        flops = 10 * args.batch * d * config.width
        verdict = (f"jtrust {best['torch'] / best['jtrust']:.2f}x the torch loop (target 1.5x)"
                   + (f", {best['sae-lens'] / best['jtrust']:.2f}x sae-lens" if "sae-lens" in best else "")
                   + f"; {flops / best['jtrust'] / 1e9 / peak:.1%} of the JAX matmul peak (target 60%), "
                   f"{flops / best['jtrust'] / 1e9 / machine:.1%} of the best of JAX and torch")
        print(f"{architecture} at width 2x: {verdict}")


if __name__ == "__main__":
    main()
