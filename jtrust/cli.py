"""The `jtrust` command line: demo, info, convert, extract, generate, trace, evaluate, attribute, lfp, detox,
plan, sweep."""

from __future__ import annotations

import argparse
import json
import sys
import time

from jtrust.core.errors import InputError
from jtrust.core.options import add_flags, from_flags
from jtrust.models.sites import SITES
from jtrust.pipelines.attribute import AttributeOptions
from jtrust.pipelines.lfp import LfpOptions
from jtrust.pipelines.detox import DetoxOptions
from jtrust.pipelines.evaluate import EvaluateOptions
from jtrust.pipelines.trace import SteerOptions, TraceOptions
from jtrust.runtime.generate import Sampling

DEMO_QUESTIONS = ("What is the capital of France?", "Name a primary colour.",
                  "How many legs does a spider have?", "What is 12 plus 7?")


def _layers(text: str):
    """--layers: 'all' or comma-separated block indices."""
    if text.strip() == "all":
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not 'all' or comma-separated block indices "
                                         "such as 0,5,10") from None


def _mesh(text: str | None):
    """--mesh 'data=2,fsdp=4' -> a Mesh over this process's devices (None without the flag)."""
    if not text:
        return None
    from jtrust.runtime.sharding import make_mesh, parse_mesh_sizes
    return make_mesh(**parse_mesh_sizes(text))


MESH_HELP = ("devices to run on, e.g. data=8 or data=2,fsdp=2,model=2 (rows over data x fsdp, weights "
             "split over fsdp / model; on CPU XLA_FLAGS=--xla_force_host_platform_device_count=N gives N)")


def cmd_info(args) -> None:
    from jtrust.io.loading import load
    from jtrust.models.model import Series
    model = load(args.model)
    if isinstance(model, Series):
        print(f"series {model.name}: {len(model)} checkpoints: {', '.join(model.names)}")
        return
    print(model.config.to_json())
    print(f"name {model.name}  checkpoint_hash {model.checkpoint_hash}")


def cmd_convert(args) -> None:
    from jtrust.io.loading import convert
    t = time.perf_counter()
    dst = convert(args.src, args.dst)
    print(f"wrote {dst} in {time.perf_counter() - t:.1f} s")


def cmd_extract(args) -> None:
    mesh = _mesh(args.mesh)  # before any work: a bad --mesh fails at once
    from jtrust.data import load_texts
    from jtrust.runtime.extract import extract
    from jtrust.io.loading import load
    data = load_texts(args.data)
    texts = data.texts[: args.limit] if args.limit else data.texts
    model = load(args.model)
    t = time.perf_counter()
    acts = extract(model, texts, sites=tuple(args.sites.split(",")), layers=args.layers,
                   pool=args.pool, batch_size=args.batch_size, max_length=args.max_length, out_dir=args.out,
                   dataset_name=data.name, mesh=mesh)
    dt = time.perf_counter() - t
    print(f"extracted {len(texts)} texts from {model.name} in {dt:.1f} s -> {args.out}")
    del acts


def cmd_generate(args) -> None:
    mesh = _mesh(args.mesh)  # before any work: a bad --mesh fails at once
    import jax
    from jtrust.runtime.generate import generate
    from jtrust.io.loading import load
    prompts = list(args.prompt or [])
    if args.prompts:
        from jtrust.data import load_texts
        prompts += load_texts(args.prompts).texts
    if not prompts:
        raise InputError("give --prompt TEXT (repeatable) or --prompts FILE")
    model = load(args.model)
    sampling = from_flags(Sampling, args)
    t = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                   sampling=sampling, chat=args.chat, n_samples=args.n, mesh=mesh)
    dt = time.perf_counter() - t
    for prompt, samples in zip(prompts, out.texts):
        for s in samples:
            print(json.dumps({"prompt": prompt, "output": s}, ensure_ascii=False))
    print(f"# {int(out.lengths.sum())} new tokens in {dt:.1f} s", file=sys.stderr)


def cmd_demo(args) -> None:
    """Load the embedded model, extract every layer for a bundled set, answer a few questions."""
    import jax
    import numpy as np
    from jtrust.data import load_texts
    from jtrust.runtime.extract import extract
    from jtrust.runtime.generate import Sampling, generate
    from jtrust.io.loading import load

    t0 = time.perf_counter()
    model = load(args.model)
    t_load = time.perf_counter() - t0
    c = model.config
    print(f"model {model.name}: {c.family}, {c.n_layers} layers, d_model {c.d_model}, "
          f"vocab {c.vocab_size} (loaded in {t_load:.1f} s)")

    data = load_texts(args.data)
    texts = data.texts[: args.n]
    t0 = time.perf_counter()
    acts = extract(model, texts, sites=("resid_post",), pool="last", batch_size=16,
                   out_dir=args.out)
    t_extract = time.perf_counter() - t0
    n_tokens = sum(len(model.tokenizer.encode(t)) for t in texts)
    last = acts.get("resid_post", c.n_layers - 1)
    print(f"extract: {len(texts)} '{data.name}' statements x {c.n_layers} layers of resid_post "
          f"({n_tokens} tokens) in {t_extract:.1f} s incl. compile, {n_tokens / t_extract:.0f} tokens/s"
          f" -> {args.out}")
    labels = np.zeros(len(texts)) if data.labels is None else data.labels[: args.n]
    gap = (np.linalg.norm(last[labels == 1].mean(0) - last[labels == 0].mean(0))
           if len(set(labels.tolist())) == 2 else float("nan"))  # an unlabelled or one-class file
    print(f"  last-layer class-mean distance (label 1 vs 0): {gap:.2f}; "
          f"activation norm {np.linalg.norm(last, axis=1).mean():.1f}")

    t0 = time.perf_counter()
    out = generate(model, list(DEMO_QUESTIONS), max_new_tokens=24, key=jax.random.key(0),
                   sampling=Sampling(temperature=0.0), chat=True)
    t_gen = time.perf_counter() - t0
    for q, answers in zip(DEMO_QUESTIONS, out.texts):
        print(f"  Q: {q}\n  A: {answers[0].strip()}")
    print(f"generate: {len(DEMO_QUESTIONS)} chat answers, {int(out.lengths.sum())} tokens "
          f"in {t_gen:.1f} s incl. compile")


def cmd_trace(args) -> None:
    mesh = _mesh(args.mesh)  # before any work: a bad --mesh fails at once
    from jtrust.core.store import safe_name
    from jtrust.data import DIMENSION_TITLES
    from jtrust.io.loading import load
    from jtrust.models.model import Series
    from jtrust.pipelines.report import best_layers, read_cells
    from jtrust.pipelines.trace import trace
    models = load(args.model)
    options = from_flags(TraceOptions, args)
    steer = from_flags(SteerOptions, args, prefix="steer_") if args.steer else None
    t = time.perf_counter()
    report = trace(models, args.dims.split(","), args.out, options, steer, mesh=mesh)
    last = safe_name(models.names[-1] if isinstance(models, Series) else models.name)
    rows, _ = read_cells(args.out)
    for dim, b in best_layers(rows, last).items():
        print(f"{DIMENSION_TITLES.get(dim, dim)}: best layer {b['layer']}, accuracy {b['accuracy']:.3f} "
              f"[{b['low']:.3f}, {b['high']:.3f}] (n_test {b['n_test']})")
    print(f"trace finished in {time.perf_counter() - t:.0f} s; report: {report}")


def cmd_evaluate(args) -> None:
    from jtrust.data import read_prompts
    from jtrust.pipelines.evaluate import evaluate, write
    from jtrust.io.loading import load
    options = from_flags(EvaluateOptions, args)
    prompts, references = read_prompts(args.prompts)
    if args.limit:
        prompts, references = prompts[: args.limit], None if references is None else references[: args.limit]
    model = load(args.model)
    scorer_model = None
    if options.scorer == "toxicity":  # the probe reads the embedded model: the target, or loaded
        from jtrust.analysis.scorers import load_scorer
        same = model.checkpoint_hash == load_scorer("toxicity").checkpoint_hash
        scorer_model = model if same else load(args.scorer_model)
    t = time.perf_counter()
    ev = evaluate(model, prompts, references, options, scorer_model=scorer_model)
    path = write(ev, args.out)
    a, n = ev.aggregate, options.n
    print(f"{a['prompts']} prompts x {n} samples ({options.scorer}, alpha {options.alpha}), "
          f"{time.perf_counter() - t:.0f} s")
    print(f"  greedy score {a['greedy']:.3f}; sample mean {a['mean']:.3f}, upper bound {a['mean_upper']:.3f}; "
          f"std bound {a['std_upper']:.3f}; ED score {a['ed_score']:.3f}")
    print(f"  mean best-of-{n} sample {a['max_sample']:.3f}; prompts with a leaking sample "
          f"{a['any_leak']:.3f}; leak probability {a['leak_rate']:.4f} (bound {a['leak_upper']:.4f})")
    print(f"results: {path}; plot: {path.parent / 'scores.png'}")


def cmd_attribute(args) -> None:
    import json as json_
    from jtrust.io.loading import load
    from jtrust.pipelines.attribute import attribute
    options = from_flags(AttributeOptions, args)
    t = time.perf_counter()
    report = attribute(load(args.model), args.out, options)
    results = json_.loads((report.parent / "results.json").read_text())["results"]
    for r in sorted(results, key=lambda r: -r["auc"]):
        print(f"{r['method']:>9} {r['variant']:<20} AUC {r['auc']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
    print(f"attribute finished in {time.perf_counter() - t:.0f} s; report: {report}")


def cmd_lfp(args) -> None:
    import json as json_
    from jtrust.io.loading import load
    from jtrust.pipelines.lfp import run_lfp
    options = from_flags(LfpOptions, args)
    t = time.perf_counter()
    report = run_lfp(load(args.model), args.out, options)
    results = json_.loads((report.parent / "results.json").read_text())
    print(f"layers changed most: {results['layers']}")
    for r in results["probes"]:
        figure = (f"Kendall tau {r['tau']:+.3f} (untrained {r['baseline_tau']:+.3f})" if "tau" in r
                  else f"accuracy {r['accuracy']:.3f} [{r['low']:.3f}, {r['high']:.3f}]")
        print(f"{r['model']:>6} {r['features']:<16} {figure}")
    print(f"lfp finished in {time.perf_counter() - t:.0f} s; report: {report}")


def cmd_detox(args) -> None:
    import json as json_
    from jtrust.io.loading import load
    from jtrust.pipelines.detox import run_detox
    options = from_flags(DetoxOptions, args)
    t = time.perf_counter()
    model = load(args.model)
    scorer_model = model if args.scorer_model == args.model else load(args.scorer_model)
    report = run_detox(model, args.out, options, scorer_model=scorer_model)
    results = json_.loads((report.parent / "results.json").read_text())["results"]
    for name, r in results.items():
        print(f"{name:>9} toxic ratio {r['toxic_ratio']:.3f} [{r['toxic_low']:.3f}, {r['toxic_high']:.3f}], "
              f"perplexity {r['perplexity']:.2f}, training {r['train_seconds']:.0f} s")
    print(f"detox finished in {time.perf_counter() - t:.0f} s; report: {report}")


def cmd_plan(args) -> None:
    import os
    import subprocess
    from jtrust.pipelines import plan
    from jtrust.runtime.sharding import parse_mesh_sizes
    sizes = parse_mesh_sizes(args.mesh)
    shape = plan.Shape(args.batch, args.seq_len, args.samples, args.new_tokens, args.dtype)
    try:
        device_gib = tuple(float(x) for x in args.device_gib.split(","))
    except ValueError:
        raise InputError(f"--device-gib {args.device_gib!r}: give comma-separated sizes in GiB, e.g. 16,32") from None
    if args.compile and not os.environ.get("JTRUST_PLAN_CHILD"):
        import jax
        need = max(64, sizes["data"] * sizes["fsdp"] * sizes["model"])
        if jax.default_backend() == "cpu" and len(jax.devices()) < need:
            # XLA compiles for a mesh of `need` devices; fake CPU devices stand in for them
            env = dict(plan.fake_cpu_devices_env(need), JTRUST_PLAN_CHILD="1")
            code = subprocess.run([sys.executable, "-m", "jtrust.cli", *sys.argv[1:]], env=env).returncode
            raise SystemExit(code)
    print("\n".join(plan.report(args.model, args.task, sizes, shape, args.compile, device_gib)))


def cmd_sweep(args) -> None:
    from jtrust.pipelines import sweep
    config = sweep.read_config(args.config)
    if args.out is not None:
        config["out"] = args.out
    if not args.merge:
        t = time.perf_counter()
        ran = sweep.run_worker(config, args.worker, args.workers)
        print(f"sweep worker {args.worker}/{args.workers}: {len(ran)} cells run in {time.perf_counter() - t:.0f} s")
    if args.merge or args.workers == 1:  # with several workers, merge once after all have finished
        print(f"sweep report: {sweep.merge(config)}")


def build_parser() -> argparse.ArgumentParser:
    debug_help = "show the traceback of a bad-input error"
    p = argparse.ArgumentParser(prog="jtrust", description=__doc__)
    p.add_argument("--debug", action="store_true", help=debug_help)
    common = argparse.ArgumentParser(add_help=False)  # --debug after the command name too
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=debug_help)
    sub = p.add_subparsers(dest="command", required=True)

    def command(name: str, help: str) -> argparse.ArgumentParser:
        return sub.add_parser(name, help=help, parents=[common])

    s = command("demo", help="a one-minute look: extract a bundled set, answer four questions")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--data", default="toxicity")
    s.add_argument("--n", type=int, default=256, help="statements to extract")
    s.add_argument("--out", default="runs/demo/activations")
    s.set_defaults(fn=cmd_demo)

    s = command("info", help="print a checkpoint's config, or a series' members")
    s.add_argument("--model", default="smollm2")
    s.set_defaults(fn=cmd_info)

    s = command("convert", help="write a checkpoint as a jtrust (orbax) directory")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_convert)

    s = command("extract", help="activations of a dataset, streamed to disk (resumable)")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--data", required=True, help="a bundled dimension name or a .csv/.jsonl/.txt file")
    s.add_argument("--out", required=True)
    s.add_argument("--sites", default="resid_post", help=f"comma-separated: {','.join(SITES)}")
    s.add_argument("--layers", type=_layers, default=None, help="'all' or comma-separated block indices")
    s.add_argument("--pool", default="last", choices=("last", "mean", "all"))
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--limit", type=int, default=0, help="only the first N texts")
    s.add_argument("--max-length", type=int, default=None, help="keep the first N tokens of longer texts")
    s.add_argument("--mesh", default=None, help=MESH_HELP)
    s.set_defaults(fn=cmd_extract)

    s = command("generate", help="sample continuations (prints JSON lines)")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prompt", action="append")
    s.add_argument("--prompts", help="a .txt/.csv/.jsonl file of prompts")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the checkpoint's chat template")
    s.add_argument("--max-new-tokens", type=int, default=64)
    add_flags(s, Sampling)
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mesh", default=None, help=MESH_HELP)
    s.set_defaults(fn=cmd_generate)

    s = command("trace", help="probe, MI and steering over layers and checkpoints, with a report")
    s.add_argument("--model", default="smollm2", help="a checkpoint or a series (directory or list)")
    s.add_argument("--dims", default="all", help="'all', or comma-separated bundled dimensions "
                   "(reliability,toxicity,privacy,fairness,robustness) and/or labelled .csv/.jsonl files")
    s.add_argument("--out", default="runs/trace")
    add_flags(s, TraceOptions)
    s.add_argument("--steer", action="store_true", help="also sweep steering vectors (--steer-* flags)")
    add_flags(s, SteerOptions, prefix="steer-")
    s.add_argument("--mesh", default=None, help=MESH_HELP)
    s.set_defaults(fn=cmd_trace)

    s = command("evaluate", help="n sampled answers per prompt, scored, with high-probability bounds")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prompts", required=True, help=".json/.jsonl/.csv/.txt with 'prompt' or 'question' "
                   "(and 'answer' or 'reference' for rougeL / exact)")
    s.add_argument("--out", default="runs/evaluate")
    s.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    s.add_argument("--scorer-model", default="smollm2", help="the model the toxicity probe reads "
                   "(the embedded model it was trained on; reused when it is --model)")
    add_flags(s, EvaluateOptions)
    s.set_defaults(fn=cmd_evaluate)

    s = command("attribute", help="hallucination tracing: canaries, LoRA fine-tune, attribution AUC, report")
    s.add_argument("--model", default="smollm2", help="the model to fine-tune (one checkpoint)")
    s.add_argument("--out", default="runs/attribute")
    add_flags(s, AttributeOptions)
    s.set_defaults(fn=cmd_attribute)

    s = command("lfp", help="learned feedback patterns: feedback tuning, SAEs on the changed layers, probes, report")
    s.add_argument("--model", default="smollm2", help="the model to tune (one checkpoint)")
    s.add_argument("--out", default="runs/lfp")
    add_flags(s, LfpOptions)
    s.set_defaults(fn=cmd_lfp)

    s = command("detox", help="detoxification: contrastive perplexity (two variants), DPO and steering, one evaluation")
    s.add_argument("--model", default="smollm2", help="the model to detoxify (one checkpoint)")
    s.add_argument("--out", default="runs/detox")
    s.add_argument("--scorer-model", default="smollm2", help="the model the toxicity probe reads "
                   "(the embedded model it was trained on; reused when it is --model)")
    add_flags(s, DetoxOptions)
    s.set_defaults(fn=cmd_detox)

    s = command("plan", help="per-device memory of a task on a mesh, and the smallest mesh that fits")
    s.add_argument("--model", default="smollm2", help="a checkpoint, a config.json, or a shape name "
                   "(llama-2-7b, mistral-7b)")
    s.add_argument("--task", default="extract", help="extract, generate, train or attribute")
    s.add_argument("--mesh", default="data=1", help=MESH_HELP)
    s.add_argument("--batch", type=int, default=8, help="rows (generate: prompts)")
    s.add_argument("--seq-len", type=int, default=512, help="tokens per row (generate: prompt tokens)")
    s.add_argument("--samples", type=int, default=1, help="generate: samples per prompt")
    s.add_argument("--new-tokens", type=int, default=64, help="generate: new tokens per sample")
    s.add_argument("--dtype", default="float32", help="weights' dtype for extract/generate/attribute")
    s.add_argument("--device-gib", default="16,32", help="device sizes to find the smallest mesh for")
    s.add_argument("--compile", action="store_true", help="also compile the program and print XLA's "
                   "memory analysis (on CPU with fake devices)")
    s.set_defaults(fn=cmd_plan)

    s = command("sweep", help="a config's grid of analyses, split over workers that share a directory")
    s.add_argument("--config", required=True, help="a JSON sweep config (see experiments/configs/sweep_*.json)")
    s.add_argument("--out", default=None, help="overrides the config's output directory")
    s.add_argument("--worker", type=int, default=0, help="this worker's index in [0, workers)")
    s.add_argument("--workers", type=int, default=1, help="how many workers share the sweep")
    s.add_argument("--merge", action="store_true", help="only write the combined report (all cells done)")
    s.set_defaults(fn=cmd_sweep)
    return p


def main(argv=None) -> None:
    """Run a command. Bad input (InputError) is one line on stderr and exit status 2; with
    --debug its traceback too. Any other exception is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except InputError as e:
        if args.debug:
            raise
        message = " ".join(str(e).split())  # one line, however the message was wrapped
        print(f"jtrust {args.command}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
