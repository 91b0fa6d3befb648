"""The trace report: results tables, PNG plots, and one page (report.md and report.html) linking them.

Built only from the cells under out_dir (`read_cells`; `jtrust.pipelines.trace` writes them), so it
can be redrawn at any time, also from a partial run.
"""

from __future__ import annotations

import csv
import html
import json
import os
import pathlib
from typing import Sequence

import numpy as np

from jtrust.analysis.steer import MAX_PERPLEXITY_RISE, choose_point
from jtrust.core import store
from jtrust.core.store import safe_name
from jtrust.data import DIMENSION_TITLES

ROW_FIELDS = ("dimension", "checkpoint", "layer", "accuracy", "low", "high", "n_test", "i_xt", "i_ty")
STEER_FIELDS = ("metric", "source", "target", "variant", "layer", "strength", "rate", "low", "high",
                "mean_score", "n", "perplexity")


def write_report(out_dir: str | os.PathLike, checkpoints: Sequence[str], dims: Sequence[str],
                 steps: Sequence[int | None] | None = None) -> pathlib.Path:
    """Tables, plots and report.{md,html} under out_dir; returns the HTML page's path.
    `steps` (training step per checkpoint) adds plots against step and the two-phase analysis."""
    out = pathlib.Path(out_dir)
    order = [safe_name(c) for c in checkpoints]
    rows, steering = read_cells(out)
    rows = [r for r in rows if r["checkpoint"] in order and r["dimension"] in dims]
    rows.sort(key=lambda r: (list(dims).index(r["dimension"]), order.index(r["checkpoint"]), r["layer"]))
    write_table(out / "results.csv", rows, ROW_FIELDS)
    write_table(out / "steering.csv", steering, STEER_FIELDS)
    store.write_text(out / "results.json", json.dumps(dict(checkpoints=order, dimensions=list(dims),
                                                        rows=rows, steering=steering), indent=1))
    plots = out / "plots"
    plots.mkdir(exist_ok=True)
    page = [("h1", f"jtrust trace: {order[-1] if len(order) == 1 else f'{len(order)} checkpoints'}"),
            ("p", f"Checkpoints: {', '.join(order)}. Tables: results.csv, results.json, steering.csv.")]
    best = best_layers(rows, order[-1])
    page += [("h2", "Best layer per dimension" + ("" if len(order) == 1 else f" ({order[-1]})")),
             ("table", ["dimension", "best layer", "test accuracy", "95% interval", "n test"],
              [[DIMENSION_TITLES.get(d, d), str(b["layer"]), f"{b['accuracy']:.3f}",
                f"[{b['low']:.3f}, {b['high']:.3f}]", str(b["n_test"])] for d, b in best.items()])]
    if rows:
        page += [("h2", "Probe accuracy over layers"), ("img", _plot_accuracy(rows, order[-1], plots))]
    by_step = steps is not None and len(order) > 1 and all(s is not None for s in steps)
    if by_step and rows and all(r["i_xt"] is not None for r in rows):
        page += _phases_section(rows, order, list(steps), dims)
    for dim in dims:
        dim_rows = [r for r in rows if r["dimension"] == dim]
        if not dim_rows:
            continue
        page += [("h2", DIMENSION_TITLES.get(dim, dim)),
                 ("img", _plot_heatmap(dim_rows, order, plots / f"accuracy_{dim}.png", dim))]
        if by_step:
            page.append(("img", _plot_over_steps(dim_rows, order, list(steps), plots / f"steps_{dim}.png", dim)))
        if all(r["i_xt"] is not None for r in dim_rows):
            page += [("img", _plot_mi(dim_rows, order, plots / f"mi_{dim}.png", dim)),
                     ("img", _plot_plane(dim_rows, order, plots / f"infoplane_{dim}.png", dim,
                                         steps if by_step else None))]
    if steering:
        page += _steering_section(steering, plots)
    page += [("h2", "Notes"),
             ("p", "Accuracy: L2 logistic regression on standardized last-token block outputs, "
                   "test split as configured, 95% Clopper-Pearson intervals. I(X;T), I(T;Y): "
                   "normalized HSIC (the released TracingLLM estimator); only trends are "
                   "meaningful, not absolute values. Fairness separates related from unrelated "
                   "StereoSet continuations; it is not a stereotype detector.")]
    store.write_text(out / "report.md", markdown(page))
    html_path = out / "report.html"
    store.write_text(html_path, html_page(page, "jtrust trace"))
    return html_path


def read_cells(out_dir: str | os.PathLike) -> tuple[list[dict], list[dict]]:
    """(probe/MI rows, steering rows) from the cells under out_dir, for tables and plots."""
    out = pathlib.Path(out_dir)
    rows = []
    for probe_path in sorted((out / "cells").glob("*/*.probe.json")):
        ckpt, dim = probe_path.parent.name, probe_path.name.split(".")[0]
        probe = json.loads(probe_path.read_text())["result"]
        mi_path = probe_path.with_name(f"{dim}.mi.json")
        mi = json.loads(mi_path.read_text())["result"] if mi_path.exists() else None
        for j, layer in enumerate(probe["layers"]):
            rows.append(dict(dimension=dim, checkpoint=ckpt, layer=layer, accuracy=probe["accuracy"][j],
                             low=probe["low"][j], high=probe["high"][j], n_test=probe["n_test"],
                             i_xt=None if mi is None else mi["i_xt"][j],
                             i_ty=None if mi is None else mi["i_ty"][j]))
    steering = [json.loads(p.read_text())["result"]
                for p in sorted((out / "cells" / "steer").glob("*/*/*.json"))]
    return rows, steering


def best_layers(rows: list[dict], checkpoint: str) -> dict[str, dict]:
    """dimension -> the row of the layer with the highest test accuracy at `checkpoint`."""
    best = {}
    for r in rows:
        if r["checkpoint"] == checkpoint and (r["dimension"] not in best
                                              or r["accuracy"] > best[r["dimension"]]["accuracy"]):
            best[r["dimension"]] = r
    return best


def _steering_section(steering: list[dict], plots: pathlib.Path) -> list:
    """One block per (source -> target, metric, variant), each against its own unsteered run."""
    page = [("h2", "Steering")]
    groups = sorted({(s["source"], s["target"], s["metric"], s["variant"]) for s in steering
                     if s["layer"] is not None})
    for source, target, metric, variant in groups:
        base = next((s for s in steering if s["layer"] is None and s["metric"] == metric
                     and (s["source"], s["target"]) == (source, target)), None)
        swept = sorted((s for s in steering if s["layer"] is not None and s["metric"] == metric
                        and (s["source"], s["target"], s["variant"]) == (source, target, variant)),
                       key=lambda s: (s["layer"], s["strength"]))
        better = "lower" if metric == "toxicity" else "higher"
        pair = "" if source == target else f", vectors of {source} steering {target}"
        page += [("h3", f"{metric} ({better} is better; {variant} vectors{pair})"),
                 ("table", ["layer", "strength", "rate", "95% interval", "perplexity"],
                  [[("unsteered" if s["layer"] is None else str(s["layer"])), f"{s['strength']:g}",
                    f"{s['rate']:.3f}", f"[{s['low']:.3f}, {s['high']:.3f}]", f"{s['perplexity']:.2f}"]
                   for s in ([base] if base else []) + swept])]
        if base is None:
            continue
        name = "_".join(_slug(x) for x in (metric, variant) + ((source, target) if pair else ()))
        page.append(("img", _plot_steering(base, swept, metric, plots / f"steering_{name}.png")))
        point = choose_point(swept, base, metric)
        page.append(("p", f"Unsteered rate {base['rate']:.3f} at perplexity {base['perplexity']:.2f}. "
                     + ("No swept point improves it while keeping perplexity within "
                        f"{1 + MAX_PERPLEXITY_RISE:.2f}x." if point is None else
                        f"Best point within {1 + MAX_PERPLEXITY_RISE:.2f}x perplexity: layer "
                        f"{point['layer']}, strength {point['strength']:g}: rate {point['rate']:.3f} "
                        f"[{point['low']:.3f}, {point['high']:.3f}] at perplexity "
                        f"{point['perplexity']:.2f}.")))
        examples = (point or base)["examples"][:3]
        page.append(("table", ["prompt", "output", "score"],
                     [[e["prompt"][:120], e["output"][:200], f"{e['score']:.2f}"] for e in examples]))
    return page


def _slug(text: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in str(text))


def _figure(width=6.4, height=4.0):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    return plt, plt.figure(figsize=(width, height))


def save_figure(fig, path: pathlib.Path) -> None:
    """Lay out, write as PNG atomically (a crash leaves no half image), close."""
    import matplotlib.pyplot as plt
    fig.tight_layout()
    with store.atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    plt.close(fig)


def _save(plt, fig, path: pathlib.Path) -> str:
    save_figure(fig, path)
    return f"plots/{path.name}"


def _plot_accuracy(rows, checkpoint, plots) -> str:
    plt, fig = _figure()
    ax = fig.add_subplot()
    for dim in dict.fromkeys(r["dimension"] for r in rows):
        rs = [r for r in rows if r["dimension"] == dim and r["checkpoint"] == checkpoint]
        layers = [r["layer"] for r in rs]
        ax.plot(layers, [r["accuracy"] for r in rs], marker=".", label=dim)
        ax.fill_between(layers, [r["low"] for r in rs], [r["high"] for r in rs], alpha=0.2)
    ax.set(xlabel="layer (block output)", ylabel="test accuracy", title=f"probe accuracy, {checkpoint}")
    ax.legend()
    return _save(plt, fig, plots / "accuracy_layers.png")


def _grid(rows, order, field) -> tuple[np.ndarray, list[int]]:
    layers = sorted({r["layer"] for r in rows})
    grid = np.full((len(order), len(layers)), np.nan)
    for r in rows:
        grid[order.index(r["checkpoint"]), layers.index(r["layer"])] = r[field]
    return grid, layers


def _plot_heatmap(rows, order, path, dim) -> str:
    grid, layers = _grid(rows, order, "accuracy")
    plt, fig = _figure(height=max(2.2, 0.35 * len(order) + 1.6))
    ax = fig.add_subplot()
    image = ax.imshow(grid, aspect="auto", cmap="viridis", vmin=0.5, vmax=1.0, origin="lower")
    step = max(1, len(layers) // 15)  # columns are the traced layers, which need not be consecutive
    ax.set_xticks(range(0, len(layers), step), [str(l) for l in layers[::step]])
    ax.set_yticks(range(len(order)), order if len(order) <= 20 else None)
    if len(order) > 20:
        ax.set_yticks([])
    ax.set(xlabel="layer", ylabel="checkpoint", title=f"{dim}: probe accuracy")
    fig.colorbar(image, ax=ax)
    return _save(plt, fig, path)


def _plot_mi(rows, order, path, dim) -> str:
    plt, fig = _figure(width=9.0)
    colours = plt.cm.viridis(np.linspace(0, 1, len(order)))
    for k, (field, label) in enumerate((("i_xt", "I(X;T)"), ("i_ty", "I(T;Y)"))):
        ax = fig.add_subplot(1, 2, k + 1)
        grid, layers = _grid(rows, order, field)
        for c, values in enumerate(grid):
            ax.plot(layers, values, color=colours[c], label=order[c] if len(order) <= 8 else None)
        ax.set(xlabel="layer", ylabel=f"{label} (nHSIC)", title=f"{dim}: {label}")
        if len(order) <= 8 and len(order) > 1:
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _phases_section(rows, order, steps, dims) -> list:
    """Where the fitting and compression phases appear (jtrust.analysis.mi.fitting_compression)."""
    from jtrust.analysis.mi import fitting_compression
    table, found = [], {}
    for dim in dims:
        dim_rows = [r for r in rows if r["dimension"] == dim]
        if not dim_rows:
            continue
        xt, layers = _grid(dim_rows, order, "i_xt")
        ty, _ = _grid(dim_rows, order, "i_ty")
        for j, layer in enumerate(layers):
            if layer == 0:  # X is block 0's output: I(X;T_0) is I(X;X)
                continue
            ph = fitting_compression(steps, xt[:, j], ty[:, j])
            table.append([dim, str(layer), "yes" if ph.two_phases else "no", str(ph.peak_step),
                          f"{ph.rise:+.3f}", f"{ph.fall:+.3f}", f"{ph.ty_change:+.4f}"])
            if ph.two_phases:
                found.setdefault(dim, []).append((layer, ph.peak_step))
    if found:
        summary = "The two phases appear for " + "; ".join(
            f"{dim} at layers {', '.join(str(l) for l, _ in v)} (compression from step "
            f"{', '.join(str(s) for _, s in v)})" for dim, v in found.items()) + "."
    else:
        summary = "The two phases do not appear at any layer (see the table and the plots for what does happen)."
    return [("h2", "Fitting and compression (two phases)"),
            ("p", summary + " Rule: I(X;T) rises to an interior peak by at least 5% of the peak "
                            "(fitting), then falls by at least 5% (compression), while I(T;Y) at the "
                            "last checkpoint is not below its value at the peak. Rise and fall are "
                            "relative to the peak; layer 0 is X itself and is left out."),
            ("table", ["dimension", "layer", "two phases", "I(X;T) peak step", "rise", "fall",
                       "I(T;Y) after peak"], table)]


def _plot_over_steps(rows, order, steps, path, dim) -> str:
    """Accuracy, I(X;T), I(T;Y) against training step, one line per layer."""
    plt, fig = _figure(width=12.0, height=3.6)
    layers = sorted({r["layer"] for r in rows})
    colours = plt.cm.plasma(np.linspace(0, 0.9, len(layers)))
    for k, (field, label) in enumerate((("accuracy", "probe accuracy"), ("i_xt", "I(X;T) (nHSIC)"),
                                        ("i_ty", "I(T;Y) (nHSIC)"))):
        ax = fig.add_subplot(1, 3, k + 1)
        grid, _ = _grid(rows, order, field)
        for j, layer in enumerate(layers):
            ax.plot(steps, grid[:, j], color=colours[j], marker=".", markersize=3, label=f"layer {layer}")
        ax.set_xscale("symlog", linthresh=10)
        ax.set(xlabel="training step", ylabel=label, title=f"{dim}: {label}")
        if k == 0:
            ax.legend(fontsize=7)
    return _save(plt, fig, path)


def _plot_plane(rows, order, path, dim, steps=None) -> str:
    plt, fig = _figure(width=6.0, height=5.0)
    ax = fig.add_subplot()
    xt, layers = _grid(rows, order, "i_xt")
    ty, _ = _grid(rows, order, "i_ty")
    if len(order) == 1:  # one checkpoint: a point per layer, coloured by depth
        points = ax.scatter(xt[0], ty[0], c=layers, cmap="plasma")
        fig.colorbar(points, ax=ax, label="layer")
    else:  # a trajectory per layer, coloured by training order
        for j in range(len(layers)):
            ax.plot(xt[:, j], ty[:, j], color="0.7", linewidth=0.8, zorder=1)
        if steps is None:  # colour by position in the series
            colour = np.repeat(np.arange(len(order))[:, None], len(layers), axis=1)
            points = ax.scatter(xt.ravel(), ty.ravel(), c=colour.ravel(), cmap="viridis", s=12, zorder=2)
            bar = fig.colorbar(points, ax=ax, label="checkpoint")
            ticks = sorted({0, len(order) - 1})
            bar.set_ticks(ticks, labels=[order[t] for t in ticks])
        else:  # colour by training step, log scale (the series is dense early)
            import matplotlib.colors
            colour = np.repeat(np.asarray(steps, float)[:, None] + 1, len(layers), axis=1)
            points = ax.scatter(xt.ravel(), ty.ravel(), c=colour.ravel(), cmap="viridis", s=12, zorder=2,
                                norm=matplotlib.colors.LogNorm())
            fig.colorbar(points, ax=ax, label="training step + 1")
            for j, layer in enumerate(layers):
                ax.annotate(f"L{layer}", (xt[-1, j], ty[-1, j]), fontsize=7)
    ax.set(xlabel="I(X;T) (nHSIC)", ylabel="I(T;Y) (nHSIC)", title=f"{dim}: information plane")
    return _save(plt, fig, path)


def _plot_steering(base, swept, metric, path) -> str:
    plt, fig = _figure(width=9.0)
    left, right = fig.add_subplot(1, 2, 1), fig.add_subplot(1, 2, 2)
    for layer in sorted({s["layer"] for s in swept}):
        cells = [base] + [s for s in swept if s["layer"] == layer]
        strengths = [0.0] + [s["strength"] for s in cells[1:]]
        left.plot(strengths, [s["rate"] for s in cells], marker="o", label=f"layer {layer}")
        right.plot(strengths, [s["perplexity"] for s in cells], marker="o", label=f"layer {layer}")
    right.axhline(base["perplexity"] * (1 + MAX_PERPLEXITY_RISE), color="red", linestyle="--",
                  label=f"{1 + MAX_PERPLEXITY_RISE:.2f}x unsteered")
    left.set(xlabel="strength", ylabel=f"{metric} rate", title=f"{metric} under steering")
    right.set(xlabel="strength", ylabel="perplexity (WikiText-2)", yscale="log", title="perplexity")
    left.legend(fontsize=8)
    right.legend(fontsize=8)
    return _save(plt, fig, path)


def write_table(path: pathlib.Path, rows: list[dict], fields: Sequence[str]) -> None:
    """rows as a CSV file with the header `fields` (written atomically)."""
    with store.atomic_path(path) as tmp, open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(fields), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)


def markdown(page) -> str:
    """A page (blocks ("h1"|"h2"|"h3"|"p", text), ("img", path), ("table", header, rows)) as Markdown."""
    lines = []
    for block in page:
        kind = block[0]
        if kind in ("h1", "h2", "h3"):
            lines += ["#" * int(kind[1]) + " " + block[1], ""]
        elif kind == "p":
            lines += [block[1], ""]
        elif kind == "img":
            lines += [f"![{block[1]}]({block[1]})", ""]
        elif kind == "table":
            cell = lambda t: str(t).replace("|", "\\|").replace("\n", " ")
            lines += ["| " + " | ".join(block[1]) + " |", "|" + "---|" * len(block[1])]
            lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in block[2]] + [""]
    return "\n".join(lines)


def html_page(page, title: str = "jtrust") -> str:
    """The same page as one self-contained HTML document."""
    body = []
    for block in page:
        kind = block[0]
        if kind in ("h1", "h2", "h3", "p"):
            body.append(f"<{kind}>{html.escape(block[1])}</{kind}>")
        elif kind == "img":
            body.append(f'<p><a href="{block[1]}"><img src="{block[1]}" style="max-width:100%"></a></p>')
        elif kind == "table":
            head = "".join(f"<th>{html.escape(h)}</th>" for h in block[1])
            rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(c))}</td>" for c in row) + "</tr>"
                           for row in block[2])
            body.append(f"<table><tr>{head}</tr>{rows}</table>")
    style = ("body{font-family:sans-serif;max-width:60em;margin:auto}"
             "table{border-collapse:collapse}td,th{border:1px solid #ccc;padding:2px 6px}")
    return (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>"
            f"<style>{style}</style></head><body>{''.join(body)}</body></html>")


def say(progress: bool, text: str) -> None:
    """A pipeline's progress line (flushed, so a log shows it as it happens)."""
    if progress:
        print(text, flush=True)
