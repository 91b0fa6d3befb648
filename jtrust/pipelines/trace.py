"""Trust tracing (TracingLLM): probes, mutual information and steering over layers and checkpoints.

`trace(models, dims, out_dir)` runs, for every checkpoint c and trust dimension:
  probe cell  extraction of every block's last-token output, then `jtrust.analysis.probe.probe_layers`
  mi cell     I(X;T_l), I(T_l;Y) by normalized HSIC on the probe-training rows (X = block 0)
and optionally steering cells (`SteerOptions`): vectors from one checkpoint, a sweep of layers x
strengths on a target model, each with its trust rate and held-out perplexity.

Every cell is a JSON file written atomically under out_dir/cells/ with the key it was computed
from; a re-run skips cells whose key matches, so a crash loses at most the running cell. The
report (results.csv / results.json, PNG plots, report.md, report.html) is rebuilt from the cells.
One trace at a time writes an out_dir: the call holds its lock (out_dir/.jtrust.lock).

Layout of out_dir:
  cells/<checkpoint>/<dimension>.probe.json, .mi.json, .vectors.npz (mass-mean, every layer)
  cells/steer/<source>-><target>/<metric>/<layer>_<strength>.json
  activations/<checkpoint>/<dimension>/   (jtrust.runtime.extract directories; removed after use
                                           unless keep_activations)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import zipfile
from typing import Sequence

import numpy as np
import tqdm
from jax.sharding import Mesh

from jtrust.core.errors import InputError
from jtrust.analysis.mi import information_plane
from jtrust.analysis.probe import probe_layers, split_indices
from jtrust.analysis.steer import METRICS, VARIANTS, mass_mean_vector
from jtrust.core import store
from jtrust.core.options import check, option
from jtrust.core.store import safe_name
from jtrust.data import TRUST_DATASETS, load_texts
from jtrust.models.model import Model, Series
from jtrust.pipelines.report import write_report
from jtrust.runtime.extract import extract

CELL_FORMAT = 1
MI_ESTIMATOR = "nocco-symmetric-expm1"  # changes when jtrust.analysis.mi's numerics change


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    layers: tuple[int, ...] | None = option(None, "blocks to probe: comma-separated indices, or all")
    split: str = option("order", "test split: 'order' (the paper's last 20% by row) or 'shuffled'",
                        choices=("order", "shuffled"))
    seed: int = option(0, "seed of the shuffled split and of the nHSIC subset")
    c: float = option(1.0, "inverse L2 strength of the probes (sklearn's C)")
    mi_samples: int = option(2000, "probe-training rows used for nHSIC (a seeded subset); 0 = all")
    sigma: float = option(50.0, "Gaussian kernel width of nHSIC")
    limit: int | None = option(None, "only the first N rows of each dataset (quick runs)")
    batch_size: int = option(32, "texts per forward pass during extraction")
    keep_activations: bool = option(False, "keep the extracted activations under out/activations")

    def __post_init__(self):
        check(self.limit is None or self.limit >= 1, "limit", f"must be at least 1 row, not {self.limit}")
        check(self.mi_samples >= 0, "mi_samples", f"must be >= 0 (0 = all rows), not {self.mi_samples}")
        check(self.batch_size >= 1, "batch_size", f"must be at least 1, not {self.batch_size}")
        check(self.c > 0 and self.sigma > 0, "c" if self.c <= 0 else "sigma", "must be positive")
        check(self.layers is None or len(self.layers) > 0, "layers", "give at least one block, or all")


@dataclasses.dataclass(frozen=True)
class SteerOptions:
    metrics: tuple[str, ...] = option(("toxicity", "truthfulness"), "what to steer (comma-separated)")
    layers: tuple[int, ...] | None = option(None, "blocks to steer at; default: the depths below")
    depths: tuple[float, ...] = option((0.27, 0.5, 0.73), "blocks to steer at as fractions of depth "
                                       "(block round(f * n_layers)), used when no layers are given")
    strengths: tuple[float, ...] = option((1.0, 2.0, 4.0), "steering strengths (multiples of the vector)")
    variant: str = option("code", "mass-mean vector: 'code' (the released code's) or 'paper' (unit "
                          "direction times the class-mean gap)", choices=("code", "paper"))
    n_prompts: int = option(64, "prompts per metric", flag="prompts")
    max_new_tokens: int = option(64, "greedy tokens per answer", flag="tokens")
    n_heldout: int = option(64, "WikiText-2 paragraphs for perplexity", flag="heldout")
    source: str | None = option(None, "checkpoint name the vectors come from (default: the last)",
                                flag="from")
    target: str | None = option(None, "model spec to steer (default: the source checkpoint)")
    scorer_model: str = option("smollm2", "model the shipped scorers read: the embedded model they "
                               "were trained on (reused when it is the target)")

    def __post_init__(self):
        unknown = [m for m in self.metrics if m not in METRICS]
        check(not unknown and len(self.metrics) > 0, "metrics",
              f"unknown steering metrics {unknown}; choose from {sorted(METRICS)}")
        check(self.layers is None or len(self.layers) > 0, "layers", "give at least one block")
        check(len(self.depths) > 0 and all(0 <= f <= 1 for f in self.depths), "depths",
              f"fractions of the model's depth, in [0, 1], at least one: {self.depths}")
        check(len(self.strengths) > 0, "strengths", "give at least one strength")
        for name in ("n_prompts", "max_new_tokens", "n_heldout"):
            check(getattr(self, name) >= 1, name, f"must be at least 1, not {getattr(self, name)}")

    def layers_of(self, n_layers: int) -> tuple[int, ...]:
        """The blocks steered in an n_layers-deep model: `layers`, or `depths` resolved."""
        if self.layers is not None:
            return self.layers
        return tuple(sorted({min(int(round(f * n_layers)), n_layers - 1) for f in self.depths}))


def trace(models: Model | Series, dims: Sequence[str], out_dir: str | os.PathLike,
          options: TraceOptions = TraceOptions(), steer: SteerOptions | None = None,
          progress: bool = True, wait: float = 0.0, mesh: Mesh | None = None) -> pathlib.Path:
    """Run every missing cell, then write the report. Returns the report's path (report.html).

    dims: bundled dimension names ('all' = every one) and/or paths of labelled .csv/.jsonl files
      (a text column and a 0/1 label), each traced, steered and reported like a bundled one
      under its file stem.
    wait: seconds to wait for another process tracing into out_dir to finish (then InputError);
      the whole call holds out_dir's lock (`jtrust.core.store.lock_dir`).
    mesh: extraction runs on it (rows over data / fsdp, weights split by `jtrust.runtime.sharding`)
      and the probes' layers are split over its devices; the devices of this process (several
      hosts: one trace, or one sweep worker, per host).
    """
    out = pathlib.Path(out_dir)
    if mesh is not None and not all(d.process_index == mesh.devices.flat[0].process_index for d in mesh.devices.flat):
        raise InputError("trace runs on the devices of one process; on several hosts run one trace (or one "
                         "`jtrust sweep --worker i` worker) per host, each with a mesh of its own devices")
    datasets = _dimensions(dims, options.limit)
    dims = list(datasets)
    series = models if isinstance(models, Series) else None
    names = series.names if series else [models.name]
    if steer is not None:
        _check_steer(steer, names)
    with store.lock_dir(out, wait):
        store.clean_temp(out, recursive=True)  # left by a killed run (cells, vectors, plots)
        return _trace(models, series, names, dims, datasets, out, options, steer, progress, mesh)


def _trace(models, series, names, dims, datasets, out, options, steer, progress, mesh) -> pathlib.Path:
    checkpoints = iter(series) if series else iter([models])
    bar = tqdm.tqdm(total=len(names) * len(dims), unit="cell", desc="trace", disable=not progress)
    steer_source = None
    for name in names:
        model = next(checkpoints)
        for dim in dims:
            _trace_cells(model, safe_name(name), dim, datasets[dim], out, options, progress, mesh)
            bar.update(1)
        if steer is not None and name == (steer.source or names[-1]):
            steer_source = model
    bar.close()
    if steer is not None:
        if steer_source is None:
            raise InputError(f"steering source {steer.source!r} is not a checkpoint of this run: {names}")
        run_steering(steer_source, steer, out, options, progress)
    steps = [c.step for c in series.checkpoints] if series else None
    return write_report(out, names, dims, steps)


def _trace_cells(model: Model, ckpt: str, dim: str, data, out: pathlib.Path, options: TraceOptions,
                 progress: bool, mesh: Mesh | None) -> None:
    layers = list(range(model.config.n_layers)) if options.layers is None else sorted(set(options.layers))
    if layers[-1] >= model.config.n_layers or layers[0] < 0:
        raise InputError(f"layers {layers} out of range for {model.name}'s {model.config.n_layers} blocks")
    key = dict(format=CELL_FORMAT, checkpoint_hash=model.checkpoint_hash, dataset_sha256=data.sha256,
               n=len(data.texts), layers=layers)
    probe_key = dict(key, split=options.split, seed=options.seed, c=options.c, solver="lbfgs")
    mi_key = dict(key, split=options.split, seed=options.seed, mi_samples=options.mi_samples,
                  sigma=options.sigma, estimator=MI_ESTIMATOR)
    probe_path = out / "cells" / ckpt / f"{dim}.probe.json"
    mi_path = out / "cells" / ckpt / f"{dim}.mi.json"
    vectors_path = out / "cells" / ckpt / f"{dim}.vectors.npz"
    if (_done(probe_path, probe_key) and _done(mi_path, mi_key)
            and _read_vectors(vectors_path, key) is not None):
        return
    acts_dir = out / "activations" / ckpt / dim
    mi_layers = sorted(set(layers) | {0})  # X = block 0's output stands for the input
    _drop_stale_activations(acts_dir, model, data, mi_layers, options.batch_size)
    acts = extract(model, data.texts, layers=mi_layers, pool="last", batch_size=options.batch_size,
                   out_dir=acts_dir, dataset_name=dim, progress=progress, mesh=mesh)
    features = np.stack([acts.get("resid_post", l) for l in layers])  # [L, n, d]
    if not _done(probe_path, probe_key):
        r = probe_layers(features, data.labels, options.split, options.seed, options.c, mesh=mesh)
        store.write_cell(probe_path, probe_key, dict(
            layers=layers, accuracy=r.accuracy.tolist(), low=r.low.tolist(), high=r.high.tolist(),
            n_test=r.n_test, n_train=len(data.texts) - r.n_test))
    if not _done(mi_path, mi_key):
        train, _ = split_indices(len(data.texts), options.split, seed=options.seed)
        if options.mi_samples and len(train) > options.mi_samples:
            train = np.sort(np.random.default_rng(options.seed).choice(train, options.mi_samples, False))
        plane = information_plane(acts.get("resid_post", 0)[train], features[:, train],
                                  data.labels[train], sigma=options.sigma)
        store.write_cell(mi_path, mi_key, dict(layers=layers, i_xt=plane.i_xt.tolist(),
                                          i_ty=plane.i_ty.tolist(), n=len(train)))
    if _read_vectors(vectors_path, key) is None:
        half = len(data.texts) // 2  # steering vectors come from the first half (TracingLLM's split)
        _write_vectors(vectors_path, key, {
            variant: np.stack([mass_mean_vector(f[:half], data.labels[:half], variant) for f in features])
            for variant in VARIANTS})
    del acts, features
    if not options.keep_activations:
        shutil.rmtree(acts_dir, ignore_errors=True)


def _drop_stale_activations(acts_dir: pathlib.Path, model: Model, data, layers: list[int],
                            batch_size: int) -> None:
    """The activations folder is the trace's scratch: one left by other settings is removed
    (extract would refuse to mix them)."""
    from jtrust.runtime.extract import FORMAT, dataset_hash
    try:
        manifest = json.loads((acts_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    wanted = dict(format=FORMAT, checkpoint_hash=model.checkpoint_hash,
                  dataset_hash=dataset_hash(data.texts), layers=layers, batch_size=batch_size,
                  pool="last", sites=["resid_post"])
    if acts_dir.exists() and (manifest is None or any(manifest.get(k) != v for k, v in wanted.items())):
        shutil.rmtree(acts_dir)


def run_steering(source: Model, steer: SteerOptions, out: pathlib.Path, options: TraceOptions,
                 progress: bool = True) -> None:
    """Vectors from `source`, swept over layers x strengths on the target, one cell per point."""
    from jtrust.analysis import steer as st
    from jtrust.io.loading import load
    target = source if steer.target is None else load(steer.target)
    if isinstance(target, Series):
        raise InputError("the steering target must be one checkpoint, not a series")
    if target.config.d_model != source.config.d_model:
        raise InputError(f"cannot steer {target.name} (d_model {target.config.d_model}) with vectors "
                         f"from {source.name} (d_model {source.config.d_model})")
    steer = dataclasses.replace(steer, layers=steer.layers_of(min(source.config.n_layers, target.config.n_layers)))
    too_deep = [l for l in steer.layers if not 0 <= l < min(source.config.n_layers, target.config.n_layers)]
    if too_deep:
        raise InputError(f"steering layers {too_deep} do not exist in both {source.name} and {target.name}")
    scorer_model = _scorer_model(target, steer.scorer_model)
    root = out / "cells" / "steer" / f"{safe_name(source.name)}->{safe_name(target.name)}"
    heldout = st.heldout_texts(steer.n_heldout)
    points = [(None, 0.0)] + [(l, s) for l in steer.layers for s in steer.strengths]
    bar = tqdm.tqdm(total=len(steer.metrics) * len(points), unit="cell", desc="steer",
                    disable=not progress)
    for metric in steer.metrics:
        dimension, toward = st.METRICS[metric]
        vectors = _vectors(source, out, dimension, toward, steer, options)
        prompts = (st.toxicity_prompts if metric == "toxicity" else st.truthfulqa_questions)(steer.n_prompts)
        for layer, strength in points:
            name = "unsteered" if layer is None else f"{steer.variant}_{layer}_{strength:g}"
            path = root / metric / f"{name}.json"
            key = dict(format=CELL_FORMAT, target_hash=target.checkpoint_hash, layer=layer,
                       strength=strength, prompts=_sha256(prompts), max_new_tokens=steer.max_new_tokens,
                       n_heldout=steer.n_heldout, scorer=_scorer_hash(metric))
            if layer is not None:  # the vector itself: its source, rows, variant and sign
                key.update(variant=steer.variant, vector=_sha256([vectors[layer].tobytes().hex()]))
            if not _done(path, key):
                s = None if layer is None else st.Steer(layer, vectors[layer], strength)
                result = st.evaluate(target, metric, prompts, s, scorer_model, steer.max_new_tokens)
                result.update(layer=layer, strength=strength, variant=None if layer is None else steer.variant,
                              source=source.name, target=target.name,
                              perplexity=st.perplexity(target, heldout, s))
                store.write_cell(path, key, result)
            bar.update(1)
    bar.close()


def _vectors(source: Model, out: pathlib.Path, dimension: str, toward: int, steer: SteerOptions,
             options: TraceOptions) -> dict[int, np.ndarray]:
    """layer -> steering vector toward label `toward`: from the source's trace cell when it was
    traced with these rows, else extracted now (the first half of the set) and kept beside it."""
    from jtrust.analysis.steer import steering_vectors
    data = _dataset(dimension, options.limit)
    key = dict(format=CELL_FORMAT, checkpoint_hash=source.checkpoint_hash, dataset_sha256=data.sha256,
               n=len(data.texts))
    sign = 1.0 if toward == 1 else -1.0  # both variants flip sign with the direction
    for path in (out / "cells" / safe_name(source.name) / f"{dimension}.vectors.npz",
                 out / "cells" / "steer" / safe_name(source.name) / f"{dimension}.vectors.npz"):
        saved = _read_vectors(path, None)
        if saved is not None and steer.variant in saved and set(steer.layers) <= set(saved["key"]["layers"]) \
                and all(saved["key"][k] == v for k, v in key.items()):
            rows = saved["key"]["layers"]
            return {l: sign * saved[steer.variant][rows.index(l)] for l in steer.layers}
    vectors = steering_vectors(source, dimension, steer.layers, steer.variant, 1, options.batch_size,
                               options.limit, progress=False)
    _write_vectors(path, dict(key, layers=list(steer.layers)),
                   {steer.variant: np.stack([vectors[l] for l in steer.layers])})
    return {l: sign * vectors[l] for l in steer.layers}


def _read_vectors(path: pathlib.Path, key: dict | None) -> dict | None:
    """{"key": dict, variant: [L, d]} from a vectors cell, or None if absent, damaged or (with
    `key`) computed from something else."""
    try:
        with np.load(path) as f:
            saved = {name: f[name] for name in f.files}
        saved["key"] = json.loads(str(saved["key"]))
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile):
        return None  # absent or damaged: recomputed
    if key is not None and saved["key"] != json.loads(json.dumps(key)):
        return None
    return saved


def _write_vectors(path: pathlib.Path, key: dict, arrays: dict[str, np.ndarray]) -> None:
    store.save_npz(path, key=np.array(json.dumps(key)), **arrays)


def _sha256(items: Sequence[str]) -> str:
    return store.text_hash(items)[:16]


def _scorer_hash(metric: str) -> str:
    from jtrust.analysis.scorers import load_scorer
    s = load_scorer(metric)
    return _sha256([s.checkpoint_hash, s.weights.tobytes().hex(), str(s.bias)])


def _scorer_model(target: Model, spec: str) -> Model:
    """The model the shipped scorers read (`SteerOptions.scorer_model`), or the target itself
    when it is that model (no second copy)."""
    from jtrust.io.loading import load
    from jtrust.analysis.scorers import load_scorer
    wanted = load_scorer("toxicity").checkpoint_hash
    return target if target.checkpoint_hash == wanted else load(spec)


def _dataset(dim: str, limit: int | None):
    data = load_texts(dim, require_labels=True)
    if limit is not None:
        data = data._replace(texts=data.texts[:limit], labels=data.labels[:limit])
    half, cut = len(data.texts) // 2, int(round(0.8 * len(data.texts)))
    for rows, use in ((data.labels, "the set"), (data.labels[:half], "the first half (steering vectors)"),
                      (data.labels[:cut], "the first 80% (probe training)")):
        if len(set(rows.tolist())) < 2:
            raise InputError(f"{use} of {dim}{f' cut to {limit} rows' if limit else ''} holds one "
                             "class only; raise --limit")
    return data


def _check_steer(steer: SteerOptions, names: list[str]) -> None:
    """Fail before hours of tracing, not after."""
    from jtrust.analysis.steer import METRICS, VARIANTS
    unknown = [m for m in steer.metrics if m not in METRICS]
    if unknown or not steer.metrics:
        raise InputError(f"unknown steering metrics {unknown}; choose from {sorted(METRICS)}")
    if steer.variant not in VARIANTS:
        raise InputError(f"steering variant must be one of {VARIANTS}, not {steer.variant!r}")
    if steer.source is not None and steer.source not in names:
        raise InputError(f"--steer-from {steer.source!r} is not a checkpoint of this run: {names}")
    if (steer.layers is not None and not steer.layers) or not steer.depths or not steer.strengths:
        raise InputError("steering needs at least one layer (or depth) and one strength")
    if steer.layers is None and not all(0 <= f <= 1 for f in steer.depths):
        raise InputError(f"steering depths are fractions of the model's depth, in [0, 1]: {steer.depths}")


def _dimensions(specs: Sequence[str], limit: int | None) -> dict:
    """name -> LabelledTexts for bundled dimension names ('all' = every one) and users' labelled
    files (.csv/.jsonl with a text and a binary label), a file named by its stem."""
    specs = [d.strip() for d in specs if d.strip()]
    specs = list(TRUST_DATASETS) if specs == ["all"] else list(dict.fromkeys(specs))
    unknown = [d for d in specs if d not in TRUST_DATASETS and not pathlib.Path(d).expanduser().is_file()]
    if unknown or not specs:
        raise InputError(f"unknown dimensions {unknown}; choose from {list(TRUST_DATASETS)} or 'all', "
                         "or give a labelled .csv/.jsonl file (a 'text' and a 0/1 'label' column)")
    names = [d if d in TRUST_DATASETS else pathlib.Path(d).stem for d in specs]
    for spec, name in zip(specs, names):
        if names.count(name) > 1 or (spec not in TRUST_DATASETS and name in TRUST_DATASETS):
            raise InputError(f"{spec}: a dimension named {name!r} is already traced; rename the "
                             "file (a dimension is named by its file's stem)")
    return {name: _dataset(spec, limit) for spec, name in zip(specs, names)}


def _done(path: pathlib.Path, key: dict) -> bool:
    return store.read_cell(path, key) is not None
