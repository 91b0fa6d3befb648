"""The unlearning case study of "A Probabilistic Perspective on Unlearning and Alignment" on the
embedded model and TOFU: fine-tune, unlearn six ways, evaluate greedy vs sampled with bounds.

    python experiments/tofu_unlearning.py --config experiments/configs/tofu_smollm2.json

  1. fine-tune SmolLM2 on TOFU's forget01 (40 fictitious-author questions) plus a retain subset
     until it answers them (greedy ROUGE-L recall before and after);
  2. unlearn forget01 from the fine-tuned model with gradient ascent, gradient difference and
     NPO, each without and with entropy optimization (lambda_f = 1, lambda_r = -0.25);
  3. evaluate every model: greedy ROUGE-L recall on the forget, retain, real-author and
     world-fact questions; on forget questions also n sampled answers (T = 1, top-p 0.9) with
     the jtrust.analysis.bounds summary, plain and with adaptive temperature (greedy at steps where the
     top next-token probability reaches confident_p);
  4. out/report.md with the tables and out/plots/*.png.
Every stage is kept on disk (training runs resume, evaluations are cached as JSON), so a re-run
continues where a killed one stopped.
"""

from __future__ import annotations

import json
import pathlib
import sys
import time

import numpy as np

import jtrust
from jtrust import training as T
from jtrust.core import store
from jtrust.data import tofu
from jtrust.analysis.rouge import rouge_l_recall
from jtrust.pipelines.evaluate import EvaluateOptions, evaluate, write
from jtrust.runtime.generate import generate
from jtrust.models.model import Model
from jtrust.pipelines.report import save_figure
from jtrust.training.unlearn import unlearning_objective
from jtrust.pipelines.experiment import experiment_args

UTILITY_SETS = ("retain", "real_authors", "world_facts")


def question_sets(cfg: dict) -> dict[str, list[dict]]:
    d = cfg["data"]
    return {"forget": tofu("forget01"), "retain": tofu("retain99")[: d["retain_train"]],
            "real_authors": tofu("real_authors_perturbed")[: d["real_authors"]],
            "world_facts": tofu("world_facts_perturbed")[: d["world_facts"]]}


def examples(model: Model, rows: list[dict], cfg: dict) -> T.Examples:
    pairs = [(cfg["data"]["prompt"].format(question=r["question"]), " " + r["answer"]) for r in rows]
    return T.prompt_answer_examples(model.tokenizer, pairs, cfg["data"]["seq_len"])


def greedy_rouge(model: Model, rows: list[dict], cfg: dict) -> dict:
    """Greedy answers and their ROUGE-L recall against the reference answers."""
    prompts = [cfg["data"]["prompt"].format(question=r["question"]) for r in rows]
    out = generate(model, prompts, max_new_tokens=cfg["evaluate"]["max_new_tokens"])
    answers = [t[0].strip() for t in out.texts]
    scores = [rouge_l_recall(a, r["answer"]) for a, r in zip(answers, rows)]
    return {"rougeL": float(np.mean(scores)), "scores": scores, "examples": answers[:3]}


def sampled(model: Model, rows: list[dict], cfg: dict, adaptive: bool, out_dir: pathlib.Path) -> dict:
    e = cfg["evaluate"]
    rows = rows[: e["sampled_questions"]]
    options = EvaluateOptions(scorer="rougeL", n=e["n"], alpha=e["alpha"], temperature=e["temperature"],
                              top_p=e["top_p"], confident_p=e["confident_p"] if adaptive else 1.0,
                              max_new_tokens=e["max_new_tokens"], chat=False, seed=e["seed"],
                              prompts_per_batch=e["prompts_per_batch"])
    ev = evaluate(model, [cfg["data"]["prompt"].format(question=r["question"]) for r in rows],
                  [r["answer"] for r in rows], options)
    write(ev, out_dir)
    return ev.aggregate


def evaluate_model(model: Model, name: str, sets: dict, cfg: dict, out: pathlib.Path, adaptive: bool) -> dict:
    """Every evaluation of one model, cached in out/eval/<name>.json."""
    path = out / "eval" / f"{name}.json"
    if path.exists():
        return json.loads(path.read_text())
    t = time.perf_counter()
    result = {name_: greedy_rouge(model, rows, cfg) for name_, rows in sets.items()}
    result["sampled"] = sampled(model, sets["forget"], cfg, False, out / "samples" / name)
    if adaptive:
        result["sampled_adaptive"] = sampled(model, sets["forget"], cfg, True, out / "samples" / f"{name}_adaptive")
    k = cfg["evaluate"]["sampled_questions"]
    result["forget_greedy_sampled_questions"] = float(np.mean(result["forget"]["scores"][:k]))
    result["seconds"] = time.perf_counter() - t
    store.write_json(path, result)
    return result


def main(argv=None) -> None:
    args, cfg, out = experiment_args(__doc__, "experiments/configs/tofu_smollm2.json", argv)
    started = time.perf_counter()
    base = jtrust.load(args.model or cfg["model"])
    sets = question_sets(cfg)
    forget_ex, retain_ex = examples(base, sets["forget"], cfg), examples(base, sets["retain"], cfg)
    print(f"tofu: {base.name}; forget {len(sets['forget'])}, retain {len(sets['retain'])}, real authors "
          f"{len(sets['real_authors'])}, world facts {len(sets['world_facts'])} questions -> {out}")

    results = {"base": evaluate_model(base, "base", sets, cfg, out, adaptive=False)}
    both = T.Examples(*(np.concatenate([f, r]) for f, r in zip(forget_ex, retain_ex)))
    ft = T.train(base, both, T.TrainConfig(**cfg["finetune"]), out / "finetune",
                 evals=[T.perplexity_eval(forget_ex, name="forget"), T.perplexity_eval(retain_ex, name="retain")])
    finetuned = ft.model.with_params(ft.model.params, name="finetuned")
    results["finetuned"] = evaluate_model(finetuned, "finetuned", sets, cfg, out, adaptive=True)
    print(f"tofu: fine-tuned; forget ROUGE-L {results['base']['forget']['rougeL']:.3f} -> "
          f"{results['finetuned']['forget']['rougeL']:.3f}, retain {results['base']['retain']['rougeL']:.3f} "
          f"-> {results['finetuned']['retain']['rougeL']:.3f}")

    u = dict(cfg["unlearn"])
    methods, entropies = u.pop("methods"), u.pop("entropy")
    objective_args = {k: u.pop(k) for k in ("beta", "lambda_forget", "lambda_retain")}
    for method in methods:
        for entropy in entropies:
            name = method + ("_eo" if entropy else "")
            objective = unlearning_objective(method, entropy=entropy, **objective_args)
            run = T.train(finetuned, {"forget": forget_ex, "retain": retain_ex}, T.TrainConfig(**u),
                          out / "unlearn" / name, objective=objective, reference=finetuned.params)
            model = run.model.with_params(run.model.params, name=name)
            results[name] = evaluate_model(model, name, sets, cfg, out, adaptive=True)
            r = results[name]
            print(f"tofu: {name}: forget greedy {r['forget_greedy_sampled_questions']:.3f}, sampled mean "
                  f"{r['sampled']['mean']:.3f} (bound {r['sampled']['mean_upper']:.3f}), best of "
                  f"{cfg['evaluate']['n']} {r['sampled']['max_sample']:.3f}; adaptive mean "
                  f"{r['sampled_adaptive']['mean']:.3f}, best {r['sampled_adaptive']['max_sample']:.3f}; "
                  f"retain {r['retain']['rougeL']:.3f}")
    report = write_report(results, cfg, out)
    print(f"tofu: done in {(time.perf_counter() - started) / 60:.1f} min; report: {report}")


def write_report(results: dict, cfg: dict, out: pathlib.Path) -> pathlib.Path:
    e = cfg["evaluate"]
    lines = ["# TOFU unlearning: greedy vs probabilistic evaluation", "",
             f"Model {cfg['model']}; forget01 (40 questions), {cfg['data']['retain_train']} retain questions "
             f"trained beside it. Sampled: {e['sampled_questions']} forget questions x n = {e['n']}, "
             f"T = {e['temperature']}, top-p {e['top_p']}, bounds at alpha = {e['alpha']}; adaptive "
             f"temperature = greedy at steps whose top next-token probability is >= {e['confident_p']}.",
             "", "ROUGE-L recall against the reference answer (greedy = the same questions' greedy answers).", "",
             "| model | forget greedy (all 40) | forget greedy (sampled qs) | sample mean | mean bound | std bound "
             "| best of n | P(leak) bound | adaptive: mean | adaptive: best of n | retain | real authors "
             "| world facts |", "|" + "---|" * 13]
    for name, r in results.items():
        s, a = r["sampled"], r.get("sampled_adaptive")
        cell = lambda d, k: f"{d[k]:.3f}" if d else "-"
        lines.append(f"| {name} | {r['forget']['rougeL']:.3f} | {r['forget_greedy_sampled_questions']:.3f} | "
                     f"{s['mean']:.3f} | {s['mean_upper']:.3f} | {s['std_upper']:.3f} | {s['max_sample']:.3f} | "
                     f"{s['leak_upper']:.3f} | {cell(a, 'mean')} | {cell(a, 'max_sample')} | "
                     f"{r['retain']['rougeL']:.3f} | {r['real_authors']['rougeL']:.3f} | "
                     f"{r['world_facts']['rougeL']:.3f} |")
    lines += ["", "Per-model score distributions: `samples/<model>/scores.png` (greedy marked).", "",
              "![greedy vs sampled](plots/greedy_vs_sampled.png)", ""]
    _plot(results, out / "plots" / "greedy_vs_sampled.png")
    path = out / "report.md"
    store.write_text(path, "\n".join(lines) + "\n")
    return path


def _plot(results: dict, path: pathlib.Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = list(results)
    series = {"greedy": [results[n]["forget_greedy_sampled_questions"] for n in names],
              "sample mean": [results[n]["sampled"]["mean"] for n in names],
              "mean bound": [results[n]["sampled"]["mean_upper"] for n in names],
              "best of n": [results[n]["sampled"]["max_sample"] for n in names],
              "adaptive best of n": [results[n].get("sampled_adaptive", {}).get("max_sample", np.nan) for n in names]}
    x = np.arange(len(names))
    width = 0.8 / len(series)
    fig, ax = plt.subplots(figsize=(max(7, 1.1 * len(names)), 3.8))
    for i, (label, values) in enumerate(series.items()):
        ax.bar(x + (i - len(series) / 2 + 0.5) * width, values, width, label=label)
    ax.set_xticks(x, names)
    ax.set_ylabel("forget ROUGE-L recall")
    ax.set_ylim(0, 1.05)
    ax.legend(fontsize=8, ncol=3)
    ax.set_title("forget questions: greedy vs sampled answers (higher = more leakage)")
    path.parent.mkdir(parents=True, exist_ok=True)
    save_figure(fig, path)


if __name__ == "__main__":
    sys.exit(main())
