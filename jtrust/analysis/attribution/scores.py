"""Influence scores of training rows on query rows, and DDA's debias and denoise.

  scores(model, train, queries) -> [M, N]: scores[i, n] = grad m(q_i)^T H^-1 grad l(z_n)
with l the training loss and m the query measurement (`Task`), H^-1 by `Options.method`
(`curvature` states each option and its cost). Both gradients are of NLLs by default, so a
positive score means training on z_n made q_i's answer more likely.

Artifacts (with `cache_dir`): per checkpoint and parameter subset, the training rows' kernel
gradients (projected when `project` is set) in chunk files that a crashed run resumes from,
the fitted factors per method, and every score matrix, keyed by the rows' content. A second
query set on the same training rows costs only its own gradients. Layout:
  cache_dir/jtrust_attribution.json               the architecture the cache belongs to
  cache_dir/<checkpoint>/<subset>/train-<rows>/   grads-<i>.npz (chunk i), factors-<method>.npz,
                                                  scores-<method>-<queries>.npy
"""

from __future__ import annotations

import dataclasses
import functools
import json
import os
import pathlib
from typing import Iterator, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import tqdm
from jax.sharding import Mesh, NamedSharding

from jtrust.analysis.attribution import curvature as curv
from jtrust.analysis.attribution.task import Task, flat_grads, module_grads, module_io
from jtrust.core import store
from jtrust.core.errors import InputError
from jtrust.core.options import check, option
from jtrust.kernels.ghost import ghost_dot_auto
from jtrust.models import sites
from jtrust.models.config import ModelConfig
from jtrust.models.model import Model, Series
from jtrust.runtime import sharding
from jtrust.training.lm import Examples

CACHE_MARKER = "jtrust_attribution.json"
CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class Options:
    method: str = option("ekfac", "inverse-Hessian approximation (see docs/attribution.md for costs)",
                         choices=curv.METHODS)
    damping: float = option(0.1, "damping: a fraction of the mean eigenvalue of the curvature")
    project: int | None = option(None, "project each module's inputs and output gradients to k "
                                       "dimensions (k x k gradients per module; module methods only)")
    chunk: int = option(8, "rows per gradient batch (a multiple of the mesh's data x fsdp axes)")
    seed: int = option(0, "seed of the random projections")
    curvature: str = option("gauss_newton", "cg / lissa: Gauss-Newton or exact Hessian products",
                            choices=curv.CURVATURES)
    iterations: int = option(20, "cg / lissa: iterations (one Hessian-vector product each)")
    hessian_rows: int = option(16, "cg / lissa: training rows the Hessian is averaged over")

    def __post_init__(self):
        check(self.method in curv.METHODS, "method", f"choose from {curv.METHODS}")
        check(self.damping > 0, "damping", "must be > 0")
        check(self.project is None or self.project > 0, "project", "must be a positive dimension")
        check(self.project is None or self.method in curv.MODULE_METHODS, "project",
              f"projection works with the module methods {curv.MODULE_METHODS}, not {self.method}")
        check(self.chunk > 0, "chunk", "must be > 0")
        check(self.curvature in curv.CURVATURES, "curvature", f"choose from {curv.CURVATURES}")
        check(self.iterations > 0, "iterations", "must be > 0")
        check(self.hessian_rows > 0, "hessian_rows", "must be > 0")

    def key(self) -> str:
        parts = [self.method, f"d{self.damping:g}"]
        if self.method in curv.FREE_METHODS:
            parts += [self.curvature, f"i{self.iterations}", f"h{self.hessian_rows}"]
        return "-".join(parts)


# ---------------------------------------------------------------------------------------------
# public API

def scores(model: Model, train: Examples, queries: Examples, *, task: Task = Task(),
           options: Options = Options(), cache_dir: str | os.PathLike | None = None,
           mesh: Mesh | None = None, progress: bool = True, mean: bool = False) -> np.ndarray:
    """[M, N] float64 influence of every training row (train [N, T]) on every query row
    (queries [M, S]). mesh: training rows are split over its data (and fsdp) axes, parameters by the rules (same scores).
    mean: [1, N], the mean over queries, computed as one query (the score is linear in the query
    gradient), so a matrix-free method solves one system instead of M."""
    with sharding.keep_rows_split(mesh):
        return _Scorer(model, train, task, options, cache_dir, mesh, progress).scores(queries, mean)


def self_influence(model: Model, train: Examples, *, task: Task = Task(), options: Options = Options(),
                   cache_dir: str | os.PathLike | None = None, mesh: Mesh | None = None,
                   progress: bool = True) -> np.ndarray:
    """[N] float64: grad l(z_n)^T H^-1 grad l(z_n) (large for rows the model finds surprising)."""
    with sharding.keep_rows_split(mesh):
        return _Scorer(model, train, task, options, cache_dir, mesh, progress).self_influence()


def top_k(score_matrix: np.ndarray, k: int) -> np.ndarray:
    """[M, k] indices of the k highest-scoring training rows per query, best first."""
    if not 0 < k <= score_matrix.shape[1]:
        raise InputError(f"k={k} must be in 1..{score_matrix.shape[1]} (the number of training rows)")
    return np.argsort(-score_matrix, axis=1, kind="stable")[:, :k]


def token_scores(model: Model, train: Examples, query: Examples, *, task: Task = Task(),
                 options: Options = Options(), cache_dir: str | os.PathLike | None = None,
                 mesh: Mesh | None = None, progress: bool = True) -> np.ndarray:
    """[S, N]: the score of one query row (query [1, S]) split over its measured tokens (rows of
    weight 0 are zero); the rows sum to `scores(...)` of the query (the gradient is linear)."""
    if query.tokens.shape[0] != 1:
        raise InputError(f"token_scores takes one query row, not {query.tokens.shape[0]}")
    weights = np.asarray(query.weights[0])
    measured = np.flatnonzero(weights)
    if not len(measured):
        raise InputError("the query row has no measured token (every weight is zero)")
    one_hot = np.zeros((len(measured), weights.shape[0]), np.float32)
    one_hot[np.arange(len(measured)), measured] = weights[measured]
    rows = Examples(*(np.repeat(np.asarray(x), len(measured), axis=0) for x in query[:3]), one_hot)
    per_token = scores(model, train, rows, task=task, options=options, cache_dir=cache_dir, mesh=mesh,
                       progress=progress)
    out = np.zeros((weights.shape[0], per_token.shape[1]))
    out[measured] = per_token
    return out


def dda(checkpoints: Sequence[Model] | Series, base: Model, train: Examples, queries: Examples, *,
        task: Task = Task(), options: Options = Options(), correct: Examples | None = None,
        beta: float = 1.0, cache_dir: str | os.PathLike | None = None, mesh: Mesh | None = None,
        progress: bool = True, mean: bool = False) -> dict[str, np.ndarray]:
    """DDA's corrected influence (Wu et al., arXiv 2410.01285), every variant: name -> [M, N].

    checkpoints: the fine-tuning checkpoints in training order (e.g. one per epoch; the last is
      the fine-tuned model); base: the model before fine-tuning.
      raw          scores on the last checkpoint
      debias       raw - beta * (scores on the base model)       the base model's prior knowledge out
      denoise      mean over checkpoints                         smooths the fitting-stage noise
      dda          denoise - beta * base                         both
    correct: rows with the correct answers to the same queries (row i pairs with query i); adds
      the other reading of debias, influence toward the error minus toward the correct answer:
      contrastive  (error - correct) on the last checkpoint;  contrastive_denoise  its mean.
    mean: every variant as [1, N], the mean over queries (see `scores`).
    """
    models = list(checkpoints)
    if not models:
        raise InputError("no fine-tuning checkpoints given")
    if correct is not None and correct.tokens.shape[0] != queries.tokens.shape[0]:
        raise InputError(f"{correct.tokens.shape[0]} correct answers for {queries.tokens.shape[0]} "
                         "queries: give one correct answer row per query row")
    for m in models:
        if m.config != base.config:
            raise InputError(f"checkpoint {m.name} has another architecture than the base model "
                             f"{base.name}; DDA compares checkpoints of one fine-tuning run")
    run = lambda model, rows: scores(model, train, rows, task=task, options=options, cache_dir=cache_dir,
                                     mesh=mesh, progress=progress, mean=mean)
    per_ckpt = [run(m, queries) for m in models]
    prior = run(base, queries)
    out = {"raw": per_ckpt[-1], "debias": per_ckpt[-1] - beta * prior,
           "denoise": np.mean(per_ckpt, axis=0), "dda": np.mean(per_ckpt, axis=0) - beta * prior}
    if correct is not None:
        contrast = [s - run(m, correct) for s, m in zip(per_ckpt, models)]
        out["contrastive"] = contrast[-1]
        out["contrastive_denoise"] = np.mean(contrast, axis=0)
    return out


# ---------------------------------------------------------------------------------------------
# the work

def check_rows(rows: Examples, config: ModelConfig, what: str) -> None:
    shapes = {np.shape(a) for a in rows}
    if len(shapes) != 1 or len(next(iter(shapes))) != 2:
        raise InputError(f"the {what} must be four [N, T] arrays (jtrust.training.Examples), "
                         f"got shapes {sorted(shapes)}")
    if rows.tokens.shape[0] == 0:
        raise InputError(f"no {what} rows")
    top, low = int(np.max(rows.tokens)), int(np.min(rows.tokens))
    if top >= config.vocab_size or low < 0:
        raise InputError(f"token id {top if top >= config.vocab_size else low} in the {what} is outside "
                         f"the model's vocabulary of {config.vocab_size}: they were tokenized for "
                         "another model; tokenize training rows and queries with this model's tokenizer")
    if not np.all(np.asarray(rows.weights).sum(axis=1) > 0):
        empty = int(np.flatnonzero(np.asarray(rows.weights).sum(axis=1) <= 0)[0])
        raise InputError(f"{what} row {empty} has no weighted token: nothing to differentiate")


@functools.partial(jax.jit, static_argnames=("config", "task", "fn", "want"))
def _module_pass(params, batch: Examples, projections, *, config: ModelConfig, task: Task, fn: str,
                 want: str):
    """One chunk: "io" -> name -> (a, g) projected; "grads" -> (kernel gradients, covariance sums)."""
    io = module_io(params, batch, config=config, task=task, fn=fn)
    if projections:
        io = {n: (jnp.einsum("bjti,jik->bjtk", a, projections[n][0]),
                  jnp.einsum("bjto,jok->bjtk", g, projections[n][1])) for n, (a, g) in io.items()}
    if want == "io":
        return io
    cov = {n: {"A": jnp.einsum("bjti,bjtk->jik", a, a), "S": jnp.einsum("bjto,bjtp->jop", g, g)}
           for n, (a, g) in io.items()}
    return module_grads(io), cov


_flat_pass = jax.jit(flat_grads, static_argnames=("config", "task", "fn"))


@jax.jit
def _ghost_block(q_io: dict, io: dict) -> jax.Array:
    """Identity scores [M, B] of two chunks from their module inputs and output gradients,
    summed over modules and layers, with no per-example gradient formed (`kernels.ghost`)."""
    total = 0.0
    for name, (a, g) in io.items():
        qa, qg = q_io[name]
        for j in range(a.shape[1]):
            total = total + ghost_dot_auto(qa[:, j], qg[:, j], a[:, j], g[:, j])
    return total


class _Scorer:
    """Scores of one model's parameters against one training set (its artifacts in one place)."""

    def __init__(self, model: Model, train: Examples, task: Task, options: Options,
                 cache_dir, mesh: Mesh | None, progress: bool):
        self.model, self.task, self.options, self.mesh, self.progress = model, task, options, mesh, progress
        check_rows(train, model.config, "training")
        self.train = Examples(*(np.asarray(x) for x in train))
        if task.modules is None and options.method in ("kfac", "ekfac"):
            raise InputError(f"{options.method} works per linear layer: give Task(modules=Modules(...))")
        if task.modules is not None:
            task.modules.check(model.config)
        self.params = model.params if mesh is None else sharding.shard_params(model.params, mesh)
        if mesh is not None and options.chunk % sharding.row_groups(mesh):
            raise InputError(f"chunk={options.chunk} must be a multiple of the mesh's data x fsdp axes "
                             f"({sharding.row_groups(mesh)})")
        self.dir = None if cache_dir is None else _cache_dir(pathlib.Path(cache_dir), model, task,
                                                             options, self.train)
        self.projections = self._projections() if options.project else {}

    # -- rows in chunks ---------------------------------------------------------------------

    def _chunks(self, rows: Examples, desc: str) -> Iterator[tuple[slice, Examples]]:
        n, size = rows.tokens.shape[0], self.options.chunk
        starts = range(0, n, size)
        for start in tqdm.tqdm(starts, desc=desc, unit="chunk", disable=not self.progress, leave=False):
            stop = min(start + size, n)
            pad = size - (stop - start)  # one shape, one compile: padding rows are empty (mask 0)
            batch = Examples(*(np.concatenate([x[start:stop], np.zeros((pad,) + x.shape[1:], x.dtype)])
                               for x in rows))
            if self.mesh is not None:
                split = NamedSharding(self.mesh, sharding.rows_spec(self.mesh))
                batch = Examples(*(jax.device_put(x, split) for x in batch))
            yield slice(start, stop), batch

    def _projections(self) -> dict:
        """Per module a seeded Gaussian [l, d, k] / sqrt(k) for inputs and output gradients."""
        k, config = self.options.project, self.model.config
        layers = len(self.task.modules.check(config))
        out = {}
        for i, name in enumerate(self.task.modules.names):
            key = jax.random.fold_in(jax.random.key(self.options.seed), i)
            d_in = sites.width(sites.LINEAR_INPUTS[name], config)
            d_out = sites.linear_width(name, config)
            k_in, k_out = jax.random.split(key)
            out[name] = (jax.random.normal(k_in, (layers, d_in, k), jnp.float32) / np.sqrt(k),
                         jax.random.normal(k_out, (layers, d_out, k), jnp.float32) / np.sqrt(k))
        return out

    def _fn(self, fn: str) -> str:
        """"loss" when the measurement is the training loss (the default): one compile for both."""
        return "loss" if getattr(self.task, fn) is self.task.loss else fn

    def _pass(self, rows, fn, want):
        return _module_pass(self.params, rows, self.projections, config=self.model.config,
                            task=self.task, fn=self._fn(fn), want=want)

    # -- training gradients (cached, resumable) ---------------------------------------------

    @functools.cached_property
    def _train(self) -> tuple[list, dict]:
        return self._train_pass()

    def _train_grads(self) -> tuple[list, dict]:
        """(a list of loaders of chunk gradients name -> [B, l, d_in, d_out], normalized covariances);
        one pass per scorer, kept in memory or (with a cache) in chunk files."""
        return self._train

    def _train_pass(self) -> tuple[list, dict]:
        loaders, sums, tokens = [], {}, 0.0
        for i, (rows, batch) in enumerate(self._chunks(self.train, "training gradients")):
            path = None if self.dir is None else self.dir / f"grads-{i:05d}.npz"
            if path is not None and path.exists():
                with np.load(path) as f:
                    cov = {n: {"A": f[f"A/{n}"], "S": f[f"S/{n}"]} for n in self.task.modules.names}
                    chunk_tokens = float(f["tokens"])
            else:
                grads, cov = self._pass(batch, "loss", "grads")
                n = rows.stop - rows.start
                grads = {k: np.asarray(v)[:n] for k, v in grads.items()}
                cov = jax.tree.map(np.asarray, cov)
                chunk_tokens = float(np.sum(self.train.mask[rows]))
                if path is None:
                    loaders.append(functools.partial(lambda g: g, grads))
                else:
                    store.save_npz(path, tokens=np.float64(chunk_tokens),
                                   **{f"G/{k}": v for k, v in grads.items()},
                                   **{f"{m}/{k}": c[m] for k, c in cov.items() for m in ("A", "S")})
            if path is not None:
                loaders.append(functools.partial(_load_grads, path, self.task.modules.names))
            for name, c in cov.items():
                s = sums.setdefault(name, {"A": 0.0, "S": 0.0})
                s["A"] = s["A"] + np.asarray(c["A"], np.float64)
                s["S"] = s["S"] + np.asarray(c["S"], np.float64)
            tokens += chunk_tokens
        return loaders, curv.normalize_covariances(sums, tokens)

    def _factors(self, loaders, cov) -> dict:
        method = self.options.method
        path = None if self.dir is None else self.dir / f"factors-{method}-d{self.options.damping:g}.npz"
        if path is not None and path.exists():
            with np.load(path) as f:
                return _unflatten_factors(f)
        factors = curv.fit_module_factors(method, lambda: (load() for load in loaders), cov,
                                          self.options.damping)
        if path is not None:
            store.save_npz(path, **_flatten_factors(factors))
        return factors

    # -- scores -----------------------------------------------------------------------------

    def scores(self, queries: Examples, mean: bool = False) -> np.ndarray:
        check_rows(queries, self.model.config, "query")
        queries = Examples(*(np.asarray(x) for x in queries))
        name = f"scores-{self.options.key()}-{store.arrays_hash(queries)}{'-mean' if mean else ''}.npy"
        path = None if self.dir is None else self.dir / name
        if path is not None and path.exists():
            return np.load(path)
        if self.options.method in curv.FREE_METHODS or self.task.modules is None:
            out = self._flat_scores(queries, mean)
        elif self.options.method == "identity" and not self.options.project and self.dir is None:
            out = self._ghost_scores(queries)  # nothing to cache: no per-example gradient is formed
            out = out.mean(0, keepdims=True) if mean else out
        else:
            out = self._module_scores(queries, mean)
        if path is not None:
            store.save_npy(path, out)
        return out

    def _query_grads(self, queries: Examples) -> dict[str, np.ndarray]:
        parts = [(rows, self._pass(batch, "measure", "grads")[0]) for rows, batch in
                 self._chunks(queries, "query gradients")]
        return {n: np.concatenate([np.asarray(g[n])[: r.stop - r.start] for r, g in parts])
                for n in self.task.modules.names}

    def _module_scores(self, queries: Examples, mean: bool) -> np.ndarray:
        loaders, cov = self._train_grads()
        factors = self._factors(loaders, cov)
        q = self._query_grads(queries)
        if mean:
            q = {n: g.mean(0, keepdims=True) for n, g in q.items()}
        pq = curv.apply_module_factors(q, factors)
        out = np.zeros((len(next(iter(q.values()))), self.train.tokens.shape[0]))
        start = 0
        for load in loaders:
            grads = load()
            n = len(next(iter(grads.values())))
            out[:, start:start + n] = sum(np.asarray(jnp.einsum("mjio,bjio->mb", pq[k], grads[k],
                                                                precision=jax.lax.Precision.HIGHEST))
                                          for k in grads)
            start += n
        return out

    def _ghost_scores(self, queries: Examples) -> np.ndarray:
        q_parts = [(rows, self._pass(batch, "measure", "io")) for rows, batch in
                   self._chunks(queries, "query gradients")]
        out = np.zeros((queries.tokens.shape[0], self.train.tokens.shape[0]))
        for rows, batch in self._chunks(self.train, "training gradients"):
            io = self._pass(batch, "loss", "io")
            for q_rows, q_io in q_parts:
                block = np.asarray(_ghost_block(q_io, io))
                out[q_rows, rows] = block[: q_rows.stop - q_rows.start, : rows.stop - rows.start]
        return out

    def self_influence(self) -> np.ndarray:
        if self.options.method in curv.FREE_METHODS or self.task.modules is None:
            return self._flat_self_influence()
        loaders, cov = self._train_grads()
        factors = self._factors(loaders, cov)
        values = []
        for load in loaders:
            grads = load()
            pre = curv.apply_module_factors(grads, factors)
            values.append(sum(np.einsum("bjio,bjio->b", np.asarray(pre[k], np.float64), grads[k]) for k in grads))
        return np.concatenate(values)

    # -- matrix-free and whole-model paths --------------------------------------------------

    def _flat(self, rows: Examples, fn: str, desc: str) -> Iterator[tuple[slice, np.ndarray]]:
        """Raveled per-row gradients [B, D] chunk by chunk (`ravel_pytree` order: names sorted).
        With modules they come from the module pass, and the training rows' from its cache."""
        if self.task.modules is None:
            for sl, batch in self._chunks(rows, desc):
                g = _flat_pass(self.params, batch, config=self.model.config, task=self.task, fn=self._fn(fn))
                yield sl, np.asarray(g)[: sl.stop - sl.start]
            return
        ravel = lambda grads, n: np.concatenate([np.asarray(grads[k])[:n].reshape(n, -1)
                                                 for k in sorted(grads)], axis=1)
        if rows is self.train:
            start = 0
            for load in self._train_grads()[0]:
                grads = load()
                n = len(next(iter(grads.values())))
                yield slice(start, start + n), ravel(grads, n)
                start += n
            return
        for sl, batch in self._chunks(rows, desc):
            yield sl, ravel(self._pass(batch, fn, "grads")[0], sl.stop - sl.start)

    def _preconditioner(self):
        """v [M, D] -> H^-1 v for the flat methods (identity, diagonal, cg, lissa)."""
        method, o = self.options.method, self.options
        if method == "identity":
            return lambda v: v
        if method == "diagonal":
            total, n = 0.0, 0
            for _, g in self._flat(self.train, "loss", "diagonal Fisher"):
                total, n = total + np.sum(np.square(g.astype(np.float64)), axis=0), n + len(g)
            diag = total / n
            return lambda v: v / (diag + o.damping * diag.mean())
        hrows = Examples(*(x[: o.hessian_rows] for x in self.train))
        grads = np.concatenate([g for _, g in self._flat(hrows, "loss", "damping")])
        damping = o.damping * float(np.mean(np.sum(np.square(grads.astype(np.float64)), axis=1))) / grads.shape[1]
        rows = Examples(*(jnp.asarray(x) for x in hrows))
        solve = functools.partial(curv.damped_solve, self.params, rows, damping=jnp.float32(damping),
                                  config=self.model.config, task=self.task, curvature=o.curvature,
                                  method=method, iterations=o.iterations, seed=o.seed)

        def apply(v):
            x = np.asarray(solve(jnp.asarray(v, jnp.float32)), np.float64)
            if not np.all(np.isfinite(x)):
                raise InputError(f"{method} diverged: the {o.curvature.replace('_', '-')} matrix plus damping "
                                 f"{damping:.3g} is not positive definite on these rows; raise damping "
                                 "(it is a fraction of the mean eigenvalue) or use curvature='gauss_newton'")
            return x

        return apply

    def _flat_scores(self, queries: Examples, mean: bool) -> np.ndarray:
        pre = self._preconditioner()
        q = np.concatenate([g for _, g in self._flat(queries, "measure", "query gradients")])
        pq = pre(q.mean(0, keepdims=True) if mean else q)
        out = np.zeros((q.shape[0], self.train.tokens.shape[0]))
        for sl, g in self._flat(self.train, "loss", "training gradients"):
            out[:, sl] = pq @ g.astype(np.float64).T
        return out

    def _flat_self_influence(self) -> np.ndarray:
        pre = self._preconditioner()
        values = []
        for _, g in self._flat(self.train, "loss", "self-influence"):
            values.append(np.sum(pre(g) * g.astype(np.float64), axis=1))
        return np.concatenate(values)


# ---------------------------------------------------------------------------------------------
# the cache

def _cache_dir(root: pathlib.Path, model: Model, task: Task, options: Options, train: Examples) -> pathlib.Path:
    """The directory of this checkpoint, subset and training set; the root must belong to this
    architecture (a cache of another model is refused, not silently mixed)."""
    marker = root / CACHE_MARKER
    identity = {"format": CACHE_FORMAT, "model_config": json.loads(model.config.to_json())}
    if marker.exists():
        try:
            stored = json.loads(marker.read_text())
        except json.JSONDecodeError:
            raise InputError(f"{marker} is damaged; delete {root} to recompute the cache") from None
        store.check_same_run(root, stored, identity, ["format", "model_config"], what="attribution cache")
    elif root.exists() and any(not store.is_internal(p) for p in root.iterdir()):
        raise InputError(f"{root} is not empty and is not an attribution cache; choose another cache_dir")
    else:
        root.mkdir(parents=True, exist_ok=True)
        store.write_json(marker, identity, indent=2)
    subset = "all" if task.modules is None else task.modules.key()
    if options.project:
        subset += f"-p{options.project}-s{options.seed}"
    d = root / store.safe_name(model.checkpoint_hash) / subset / f"train-{store.arrays_hash(train)}-c{options.chunk}"
    d.mkdir(parents=True, exist_ok=True)
    return d


def _load_grads(path: pathlib.Path, names: Sequence[str]) -> dict[str, np.ndarray]:
    with np.load(path) as f:
        return {n: f[f"G/{n}"] for n in names}


def _flatten_factors(factors: dict) -> dict[str, np.ndarray]:
    flat = {}
    for name, f in factors.items():
        for key, value in f.items():
            if value is not None:
                flat[f"{name}/{key}"] = np.asarray(value)
    return flat


def _unflatten_factors(f) -> dict:
    factors: dict[str, dict] = {}
    for key in f.files:
        name, part = key.split("/")
        factors.setdefault(name, {"q_in": None, "q_out": None})[part] = f[key]
    return factors
