"""Trust tracing (TracingLLM): probes, mutual information and steering over layers and checkpoints.

`trace(models, dims, out_dir)` runs, for every checkpoint c and trust dimension:
  probe cell  extraction of every block's last-token output, then `jtrust.probe.probe_layers`
  mi cell     I(X;T_l), I(T_l;Y) by normalized HSIC on the probe-training rows (X = block 0)
and optionally steering cells (`SteerOptions`): vectors from one checkpoint, a sweep of layers x
strengths on a target model, each with its trust rate and held-out perplexity.

Every cell is a JSON file written atomically under out_dir/cells/ with the key it was computed
from; a re-run skips cells whose key matches, so a crash loses at most the running cell. The
report (results.csv / results.json, PNG plots, report.md, report.html) is rebuilt from the cells.

Layout of out_dir:
  cells/<checkpoint>/<dimension>.probe.json, .mi.json, .vectors.npz (mass-mean, every layer)
  cells/steer/<source>-><target>/<metric>/<layer>_<strength>.json
  activations/<checkpoint>/<dimension>/   (jtrust.extract directories; removed after use
                                           unless keep_activations)
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
import shutil
import tempfile
import zipfile
from typing import Sequence

import numpy as np
import tqdm

from jtrust.data import TRUST_DATASETS, load_texts
from jtrust.extract import extract
from jtrust.model import Model, Series
from jtrust.mi import information_plane
from jtrust.probe import probe_layers, split_indices
from jtrust.steer import VARIANTS, mass_mean_vector

# what each dimension's probe separates (fairness is "related vs unrelated", not stereotype detection)
DIMENSION_TITLES = {
    "reliability": "reliability: TruthfulQA, true vs false answer",
    "toxicity": "toxicity: ToxiGen, toxic vs benign",
    "privacy": "privacy: ConfAIde, violating vs acceptable",
    "fairness": "fairness: stereoset (related vs unrelated)",
    "robustness": "robustness: SST-2, perturbed vs clean",
}
CELL_FORMAT = 1
MI_ESTIMATOR = "nocco-symmetric-expm1"  # changes when jtrust.mi's numerics change


@dataclasses.dataclass(frozen=True)
class TraceOptions:
    layers: tuple[int, ...] | None = None  # None = every block
    split: str = "order"  # "order" (the paper's 80/20 by row) or "shuffled"
    seed: int = 0
    c: float = 1.0  # inverse L2 strength, sklearn's C
    mi_samples: int = 2000  # probe-training rows used for nHSIC (seeded subset); 0 = all
    sigma: float = 50.0
    limit: int | None = None  # first `limit` rows of each dataset (quick runs)
    batch_size: int = 32
    keep_activations: bool = False


@dataclasses.dataclass(frozen=True)
class SteerOptions:
    metrics: tuple[str, ...] = ("toxicity", "truthfulness")
    layers: tuple[int, ...] = (8, 15, 22)
    strengths: tuple[float, ...] = (1.0, 2.0, 4.0)
    variant: str = "code"
    n_prompts: int = 64
    max_new_tokens: int = 64
    n_heldout: int = 64  # WikiText-2 paragraphs for perplexity
    source: str | None = None  # checkpoint name the vectors come from; None = the last one
    target: str | None = None  # model spec steered; None = the source checkpoint itself


def trace(models: Model | Series, dims: Sequence[str], out_dir: str | os.PathLike,
          options: TraceOptions = TraceOptions(), steer: SteerOptions | None = None,
          progress: bool = True) -> pathlib.Path:
    """Run every missing cell, then write the report. Returns the report's path (report.html)."""
    from jtrust.report import write_report
    out = pathlib.Path(out_dir)
    dims = _check_dims(dims)
    series = models if isinstance(models, Series) else None
    names = series.names if series else [models.name]
    if steer is not None:
        _check_steer(steer, names)
    checkpoints = iter(series) if series else iter([models])
    datasets = {d: _dataset(d, options.limit) for d in dims}
    bar = tqdm.tqdm(total=len(names) * len(dims), unit="cell", desc="trace", disable=not progress)
    steer_source = None
    for name in names:
        model = next(checkpoints)
        for dim in dims:
            _trace_cells(model, _safe(name), dim, datasets[dim], out, options, progress)
            bar.update(1)
        if steer is not None and name == (steer.source or names[-1]):
            steer_source = model
    bar.close()
    if steer is not None:
        if steer_source is None:
            raise ValueError(f"steering source {steer.source!r} is not a checkpoint of this run: {names}")
        run_steering(steer_source, steer, out, options, progress)
    steps = [c.step for c in series.checkpoints] if series else None
    return write_report(out, names, dims, steps)


def _trace_cells(model: Model, ckpt: str, dim: str, data, out: pathlib.Path, options: TraceOptions,
                 progress: bool) -> None:
    layers = list(range(model.config.n_layers)) if options.layers is None else sorted(set(options.layers))
    if layers[-1] >= model.config.n_layers or layers[0] < 0:
        raise ValueError(f"layers {layers} out of range for {model.name}'s {model.config.n_layers} blocks")
    key = dict(format=CELL_FORMAT, checkpoint_hash=model.checkpoint_hash, dataset_sha256=data.sha256,
               n=len(data.texts), layers=layers)
    probe_key = dict(key, split=options.split, seed=options.seed, c=options.c, solver="lbfgs")
    mi_key = dict(key, split=options.split, seed=options.seed, mi_samples=options.mi_samples,
                  sigma=options.sigma, estimator=MI_ESTIMATOR)
    probe_path = out / "cells" / ckpt / f"{dim}.probe.json"
    mi_path = out / "cells" / ckpt / f"{dim}.mi.json"
    vectors_path = out / "cells" / ckpt / f"{dim}.vectors.npz"
    if (_cell_done(probe_path, probe_key) and _cell_done(mi_path, mi_key)
            and _read_vectors(vectors_path, key) is not None):
        return
    acts_dir = out / "activations" / ckpt / dim
    mi_layers = sorted(set(layers) | {0})  # X = block 0's output stands for the input
    _drop_stale_activations(acts_dir, model, data, mi_layers, options.batch_size)
    acts = extract(model, data.texts, layers=mi_layers, pool="last", batch_size=options.batch_size,
                   out_dir=acts_dir, dataset_name=dim, progress=progress)
    features = np.stack([acts.get("resid_post", l) for l in layers])  # [L, n, d]
    if not _cell_done(probe_path, probe_key):
        r = probe_layers(features, data.labels, options.split, options.seed, options.c)
        _write_cell(probe_path, probe_key, dict(
            layers=layers, accuracy=r.accuracy.tolist(), low=r.low.tolist(), high=r.high.tolist(),
            n_test=r.n_test, n_train=len(data.texts) - r.n_test))
    if not _cell_done(mi_path, mi_key):
        train, _ = split_indices(len(data.texts), options.split, seed=options.seed)
        if options.mi_samples and len(train) > options.mi_samples:
            train = np.sort(np.random.default_rng(options.seed).choice(train, options.mi_samples, False))
        plane = information_plane(acts.get("resid_post", 0)[train], features[:, train],
                                  data.labels[train], sigma=options.sigma)
        _write_cell(mi_path, mi_key, dict(layers=layers, i_xt=plane.i_xt.tolist(),
                                          i_ty=plane.i_ty.tolist(), n=len(train)))
    if _read_vectors(vectors_path, key) is None:
        half = len(data.texts) // 2  # steering vectors come from the first half (REFERENCE.md)
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
    from jtrust.extract import dataset_hash
    try:
        manifest = json.loads((acts_dir / "manifest.json").read_text())
    except (OSError, json.JSONDecodeError):
        manifest = None
    wanted = dict(checkpoint_hash=model.checkpoint_hash, dataset_hash=dataset_hash(data.texts),
                  layers=layers, batch_size=batch_size, pool="last", sites=["resid_post"])
    if acts_dir.exists() and (manifest is None or any(manifest.get(k) != v for k, v in wanted.items())):
        shutil.rmtree(acts_dir)


def run_steering(source: Model, steer: SteerOptions, out: pathlib.Path, options: TraceOptions,
                 progress: bool = True) -> None:
    """Vectors from `source`, swept over layers x strengths on the target, one cell per point."""
    from jtrust import steer as st
    from jtrust.loading import load
    target = source if steer.target is None else load(steer.target)
    if isinstance(target, Series):
        raise ValueError("the steering target must be one checkpoint, not a series")
    if target.config.d_model != source.config.d_model:
        raise ValueError(f"cannot steer {target.name} (d_model {target.config.d_model}) with vectors "
                         f"from {source.name} (d_model {source.config.d_model})")
    too_deep = [l for l in steer.layers if not 0 <= l < min(source.config.n_layers, target.config.n_layers)]
    if too_deep:
        raise ValueError(f"steering layers {too_deep} do not exist in both {source.name} and {target.name}")
    scorer_model = _scorer_model(target)
    root = out / "cells" / "steer" / f"{_safe(source.name)}->{_safe(target.name)}"
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
            if not _cell_done(path, key):
                s = None if layer is None else st.Steer(layer, vectors[layer], strength)
                result = st.evaluate(target, metric, prompts, s, scorer_model, steer.max_new_tokens)
                result.update(layer=layer, strength=strength, variant=None if layer is None else steer.variant,
                              source=source.name, target=target.name,
                              perplexity=st.perplexity(target, heldout, s))
                _write_cell(path, key, result)
            bar.update(1)
    bar.close()


def _vectors(source: Model, out: pathlib.Path, dimension: str, toward: int, steer: SteerOptions,
             options: TraceOptions) -> dict[int, np.ndarray]:
    """layer -> steering vector toward label `toward`: from the source's trace cell when it was
    traced with these rows, else extracted now (the first half of the set) and kept beside it."""
    from jtrust.steer import steering_vectors
    data = _dataset(dimension, options.limit)
    key = dict(format=CELL_FORMAT, checkpoint_hash=source.checkpoint_hash, dataset_sha256=data.sha256,
               n=len(data.texts))
    sign = 1.0 if toward == 1 else -1.0  # both variants flip sign with the direction
    for path in (out / "cells" / _safe(source.name) / f"{dimension}.vectors.npz",
                 out / "cells" / "steer" / _safe(source.name) / f"{dimension}.vectors.npz"):
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
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(dir=path.parent, suffix=".npz", delete=False) as f:
        np.savez(f, key=np.array(json.dumps(key)), **arrays)
    os.replace(f.name, path)


def _sha256(items: Sequence[str]) -> str:
    import hashlib
    return hashlib.sha256("\x00".join(items).encode()).hexdigest()[:16]


def _scorer_hash(metric: str) -> str:
    from jtrust.scorers import load_scorer
    s = load_scorer(metric)
    return _sha256([s.checkpoint_hash, s.weights.tobytes().hex(), str(s.bias)])


def _scorer_model(target: Model) -> Model:
    """The model the shipped scorers read: the embedded one (reused if it is the target)."""
    from jtrust.loading import load
    from jtrust.scorers import load_scorer
    wanted = load_scorer("toxicity").checkpoint_hash
    return target if target.checkpoint_hash == wanted else load("smollm2")


def _dataset(dim: str, limit: int | None):
    data = load_texts(dim, require_labels=True)
    if limit is not None:
        data = data._replace(texts=data.texts[:limit], labels=data.labels[:limit])
    half, cut = len(data.texts) // 2, int(round(0.8 * len(data.texts)))
    for rows, use in ((data.labels, "the set"), (data.labels[:half], "the first half (steering vectors)"),
                      (data.labels[:cut], "the first 80% (probe training)")):
        if len(set(rows.tolist())) < 2:
            raise ValueError(f"{use} of {dim}{f' cut to {limit} rows' if limit else ''} holds one "
                             "class only; raise --limit")
    return data


def _check_steer(steer: SteerOptions, names: list[str]) -> None:
    """Fail before hours of tracing, not after."""
    from jtrust.steer import METRICS, VARIANTS
    unknown = [m for m in steer.metrics if m not in METRICS]
    if unknown or not steer.metrics:
        raise ValueError(f"unknown steering metrics {unknown}; choose from {sorted(METRICS)}")
    if steer.variant not in VARIANTS:
        raise ValueError(f"steering variant must be one of {VARIANTS}, not {steer.variant!r}")
    if steer.source is not None and steer.source not in names:
        raise ValueError(f"--steer-from {steer.source!r} is not a checkpoint of this run: {names}")
    if not steer.layers or not steer.strengths:
        raise ValueError("steering needs at least one layer and one strength")


def _check_dims(dims: Sequence[str]) -> list[str]:
    dims = [d.strip() for d in dims if d.strip()]
    dims = list(TRUST_DATASETS) if dims == ["all"] else list(dict.fromkeys(dims))
    unknown = [d for d in dims if d not in TRUST_DATASETS]
    if unknown or not dims:
        raise ValueError(f"unknown dimensions {unknown}; choose from {list(TRUST_DATASETS)} or 'all'")
    return dims


def _safe(name: str) -> str:
    """A checkpoint name as one path component."""
    return name.strip("/").replace("/", "_").replace(os.sep, "_") or "model"


def _cell_done(path: pathlib.Path, key: dict) -> bool:
    if not path.exists():
        return False
    try:
        return json.loads(path.read_text())["key"] == json.loads(json.dumps(key))
    except (json.JSONDecodeError, KeyError):
        return False  # a damaged cell is recomputed


def _write_cell(path: pathlib.Path, key: dict, result: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(dict(key=key, result=result), indent=1))
    os.replace(tmp, path)


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

