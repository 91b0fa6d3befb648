"""The `jtrust` command line: demo, info, convert, extract, generate, trace, evaluate."""

from __future__ import annotations

import argparse
import json
import sys
import time

DEMO_QUESTIONS = ("What is the capital of France?", "Name a primary colour.",
                  "How many legs does a spider have?", "What is 12 plus 7?")


def _layers(text: str | None):
    if text in (None, "all"):
        return None
    return [int(x) for x in text.split(",")]


def cmd_info(args) -> None:
    from jtrust.loading import load
    from jtrust.model import Series
    model = load(args.model)
    if isinstance(model, Series):
        print(f"series {model.name}: {len(model)} checkpoints: {', '.join(model.names)}")
        return
    print(model.config.to_json())
    print(f"name {model.name}  checkpoint_hash {model.checkpoint_hash}")


def cmd_convert(args) -> None:
    from jtrust.loading import convert
    t = time.perf_counter()
    dst = convert(args.src, args.dst)
    print(f"wrote {dst} in {time.perf_counter() - t:.1f} s")


def cmd_extract(args) -> None:
    from jtrust.data import load_texts
    from jtrust.extract import extract
    from jtrust.loading import load
    data = load_texts(args.data)
    texts = data.texts[: args.limit] if args.limit else data.texts
    model = load(args.model)
    t = time.perf_counter()
    acts = extract(model, texts, sites=tuple(args.sites.split(",")), layers=_layers(args.layers),
                   pool=args.pool, batch_size=args.batch_size, out_dir=args.out,
                   dataset_name=data.name)
    dt = time.perf_counter() - t
    print(f"extracted {len(texts)} texts from {model.name} in {dt:.1f} s -> {args.out}")
    del acts


def cmd_generate(args) -> None:
    import jax
    from jtrust.generate import Sampling, generate
    from jtrust.loading import load
    prompts = list(args.prompt or [])
    if args.prompts:
        from jtrust.data import load_texts
        prompts += load_texts(args.prompts).texts
    if not prompts:
        raise SystemExit("jtrust generate: give --prompt TEXT (repeatable) or --prompts FILE")
    model = load(args.model)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p)
    t = time.perf_counter()
    out = generate(model, prompts, max_new_tokens=args.max_new_tokens, key=jax.random.key(args.seed),
                   sampling=sampling, chat=args.chat, n_samples=args.n)
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
    from jtrust.extract import extract
    from jtrust.generate import Sampling, generate
    from jtrust.loading import load

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
    labels = data.labels[: args.n]
    gap = np.linalg.norm(last[labels == 1].mean(0) - last[labels == 0].mean(0))
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


def _numbers(text: str, kind=int) -> tuple:
    return tuple(kind(x) for x in text.split(",") if x.strip())


def cmd_trace(args) -> None:
    from jtrust.loading import load
    from jtrust.model import Series
    from jtrust.report import best_layers
    from jtrust.trace import DIMENSION_TITLES, SteerOptions, TraceOptions, _safe, read_cells, trace
    models = load(args.model)
    options = TraceOptions(layers=_layers(args.layers) and tuple(_layers(args.layers)), split=args.split,
                           seed=args.seed, mi_samples=args.mi_samples, limit=args.limit or None,
                           batch_size=args.batch_size, keep_activations=args.keep_activations)
    steer = None
    if args.steer:
        steer = SteerOptions(metrics=tuple(args.steer_metrics.split(",")),
                             layers=_numbers(args.steer_layers), strengths=_numbers(args.steer_strengths, float),
                             variant=args.steer_variant, n_prompts=args.steer_prompts,
                             max_new_tokens=args.steer_tokens, n_heldout=args.steer_heldout,
                             source=args.steer_from, target=args.steer_target)
    t = time.perf_counter()
    report = trace(models, args.dims.split(","), args.out, options, steer)
    last = _safe(models.names[-1] if isinstance(models, Series) else models.name)
    rows, _ = read_cells(args.out)
    for dim, b in best_layers(rows, last).items():
        print(f"{DIMENSION_TITLES.get(dim, dim)}: best layer {b['layer']}, accuracy {b['accuracy']:.3f} "
              f"[{b['low']:.3f}, {b['high']:.3f}] (n_test {b['n_test']})")
    print(f"trace finished in {time.perf_counter() - t:.0f} s; report: {report}")


def cmd_evaluate(args) -> None:
    from jtrust.evaluate import evaluate, read_prompts, write
    from jtrust.generate import Sampling
    from jtrust.loading import load
    prompts, references = read_prompts(args.prompts)
    if args.limit:
        prompts, references = prompts[: args.limit], None if references is None else references[: args.limit]
    model = load(args.model)
    sampling = Sampling(temperature=args.temperature, top_k=args.top_k, top_p=args.top_p,
                        confident_p=args.confident_p)
    t = time.perf_counter()
    ev = evaluate(model, prompts, references, scorer=args.scorer, n=args.n, alpha=args.alpha,
                  sampling=sampling, max_new_tokens=args.max_new_tokens, chat=not args.no_chat,
                  seed=args.seed, prompts_per_batch=args.prompts_per_batch,
                  leak_threshold=args.leak_threshold)
    path = write(ev, args.out)
    a = ev.aggregate
    print(f"{a['prompts']} prompts x {args.n} samples ({args.scorer}, alpha {args.alpha}), "
          f"{time.perf_counter() - t:.0f} s")
    print(f"  greedy score {a['greedy']:.3f}; sample mean {a['mean']:.3f}, upper bound {a['mean_upper']:.3f}; "
          f"std bound {a['std_upper']:.3f}; ED score {a['ed_score']:.3f}")
    print(f"  mean best-of-{args.n} sample {a['max_sample']:.3f}; prompts with a leaking sample "
          f"{a['any_leak']:.3f}; leak probability {a['leak_rate']:.4f} (bound {a['leak_upper']:.4f})")
    print(f"results: {path}; plot: {path.parent / 'scores.png'}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="jtrust", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    s = sub.add_parser("demo", help="the main job on the embedded model and a bundled dataset")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--data", default="toxicity")
    s.add_argument("--n", type=int, default=256, help="statements to extract")
    s.add_argument("--out", default="runs/demo/activations")
    s.set_defaults(fn=cmd_demo)

    s = sub.add_parser("info", help="print a checkpoint's config, or a series' members")
    s.add_argument("--model", default="smollm2")
    s.set_defaults(fn=cmd_info)

    s = sub.add_parser("convert", help="write a checkpoint as a jtrust (orbax) directory")
    s.add_argument("src")
    s.add_argument("dst")
    s.set_defaults(fn=cmd_convert)

    s = sub.add_parser("extract", help="activations of a dataset, streamed to disk (resumable)")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--data", required=True, help="a bundled dimension name or a .csv/.jsonl/.txt file")
    s.add_argument("--out", required=True)
    s.add_argument("--sites", default="resid_post", help="comma-separated: resid_pre,attn_out,mlp_out,resid_post")
    s.add_argument("--layers", default="all", help="'all' or comma-separated block indices")
    s.add_argument("--pool", default="last", choices=("last", "mean", "all"))
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--limit", type=int, default=0, help="only the first N texts")
    s.set_defaults(fn=cmd_extract)

    s = sub.add_parser("generate", help="sample continuations (prints JSON lines)")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prompt", action="append")
    s.add_argument("--prompts", help="a .txt/.csv/.jsonl file of prompts")
    s.add_argument("--chat", action="store_true", help="wrap prompts in the checkpoint's chat template")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=0.0, help="0 = greedy")
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=1.0)
    s.add_argument("--n", type=int, default=1, help="samples per prompt")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_generate)

    s = sub.add_parser("trace", help="probe, MI and steering over layers and checkpoints, with a report")
    s.add_argument("--model", default="smollm2", help="a checkpoint or a series (directory or list)")
    s.add_argument("--dims", default="all", help="'all' or comma-separated: reliability,toxicity,privacy,"
                   "fairness,robustness")
    s.add_argument("--out", default="runs/trace")
    s.add_argument("--layers", default="all", help="'all' or comma-separated block indices")
    s.add_argument("--split", default="order", choices=("order", "shuffled"))
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--mi-samples", type=int, default=2000, help="training rows for nHSIC; 0 = all")
    s.add_argument("--limit", type=int, default=0, help="only the first N rows of each dataset")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--keep-activations", action="store_true", help="keep the extracted activations")
    s.add_argument("--steer", action="store_true", help="also sweep steering vectors")
    s.add_argument("--steer-metrics", default="toxicity,truthfulness")
    s.add_argument("--steer-layers", default="8,15,22")
    s.add_argument("--steer-strengths", default="1,2,4")
    s.add_argument("--steer-variant", default="code", choices=("code", "paper"))
    s.add_argument("--steer-prompts", type=int, default=64, help="prompts per metric")
    s.add_argument("--steer-tokens", type=int, default=64, help="greedy tokens per answer")
    s.add_argument("--steer-heldout", type=int, default=64, help="WikiText-2 paragraphs for perplexity")
    s.add_argument("--steer-from", default=None, help="checkpoint name the vectors come from (default: last)")
    s.add_argument("--steer-target", default=None, help="model spec to steer (default: the source)")
    s.set_defaults(fn=cmd_trace)

    s = sub.add_parser("evaluate", help="n sampled answers per prompt, scored, with high-probability bounds")
    s.add_argument("--model", default="smollm2")
    s.add_argument("--prompts", required=True, help=".json/.jsonl/.csv/.txt with 'prompt' or 'question' "
                   "(and 'answer' or 'reference' for rougeL / exact)")
    s.add_argument("--scorer", default="rougeL", choices=("rougeL", "exact", "toxicity"))
    s.add_argument("--n", type=int, default=128, help="samples per prompt")
    s.add_argument("--alpha", type=float, default=0.01, help="each bound holds with probability 1 - alpha")
    s.add_argument("--out", default="runs/evaluate")
    s.add_argument("--max-new-tokens", type=int, default=64)
    s.add_argument("--temperature", type=float, default=1.0)
    s.add_argument("--top-k", type=int, default=0)
    s.add_argument("--top-p", type=float, default=0.9)
    s.add_argument("--confident-p", type=float, default=1.0,
                   help="adaptive temperature: greedy at steps whose top probability reaches this (1 = off)")
    s.add_argument("--leak-threshold", type=float, default=None, help="a sample leaks at this score "
                   "(default: 1.0 for rougeL / exact, 0.5 for toxicity)")
    s.add_argument("--no-chat", action="store_true", help="feed prompts raw, not in the chat template")
    s.add_argument("--prompts-per-batch", type=int, default=8)
    s.add_argument("--limit", type=int, default=0, help="only the first N prompts")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(fn=cmd_evaluate)
    return p


def main(argv=None) -> None:
    args = build_parser().parse_args(argv)
    try:
        args.fn(args)
    except (FileNotFoundError, FileExistsError, ValueError) as e:
        raise SystemExit(f"jtrust {args.command}: {e}")


if __name__ == "__main__":
    main()
