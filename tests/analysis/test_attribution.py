"""Influence functions against closed forms: explicit per-example gradients, dense Kronecker and
Hessian solves (numpy), and the DDA arithmetic. The kronfluence comparison lives beside this file."""

from __future__ import annotations

import functools
import os
import pathlib
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tokenizers
from jax.flatten_util import ravel_pytree

from helpers import tiny_tokenizer_json
from jtrust.analysis import attribution as attr
from jtrust.analysis.attribution import task as task_lib
from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import forward, init_params
from jtrust.models.model import Model
from jtrust.models.tokenizer import Tokenizer
from jtrust.training.lm import Examples

CONFIG = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=2, n_kv_heads=1,
                     head_dim=8, d_ff=24, norm="rms", norm_eps=1e-5, position="rope", rotary_dim=8)
TASK = attr.Task(modules=attr.Modules(("q", "down"), (0, 1)))
NAMES = ("down", "q")  # ravel_pytree's (sorted) order of the subset


def tiny_model(seed: int = 0, config: ModelConfig = CONFIG) -> Model:
    tok = Tokenizer(tokenizers.Tokenizer.from_str(tiny_tokenizer_json()), bos_id=1, eos_id=2, pad_id=0)
    shapes = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    rng = np.random.default_rng(seed)
    params = jax.tree.map(lambda s: rng.normal(0, 0.3, s.shape).astype(np.float32), shapes)
    return Model(config, params, tok, f"tiny{seed}", f"hash{seed}")


def rows(n: int, t: int, seed: int) -> Examples:
    """Random rows with right padding (the last two positions) and some unweighted tokens."""
    r = np.random.default_rng(seed)
    tokens = r.integers(3, 64, (n, t)).astype(np.int32)
    mask = np.ones((n, t), np.int32)
    mask[:, t - 2:] = 0
    weights = (r.random((n, t)) > 0.3).astype(np.float32) * mask
    weights[:, 0] = 1.0
    return Examples(tokens, mask, np.roll(tokens, -1, 1), weights)


MODEL = tiny_model()
TRAIN, QUERIES = rows(10, 7, 0), rows(3, 7, 1)  # one length: shared compiles


@functools.partial(jax.jit, static_argnames=("task",))
def row_grad(params, row: Examples, task) -> jax.Array:
    def loss(s):
        logits = forward(task_lib.merge(s, params, task, CONFIG), row.tokens, row.mask, config=CONFIG).logits
        return task.loss(logits, row)[0]
    return ravel_pytree(jax.grad(loss)(task_lib.split(params, task, CONFIG)))[0]


def explicit_grads(model: Model, examples: Examples, task=TASK) -> np.ndarray:
    """[N, D] per-row gradients, one jax.grad per row in a Python loop (the oracle of vmap and taps)."""
    return np.stack([np.asarray(row_grad(model.params, Examples(*(jnp.asarray(x[i:i + 1]) for x in examples)),
                                         task), np.float64) for i in range(examples.tokens.shape[0])])


G_TRAIN = explicit_grads(MODEL, TRAIN)
G_QUERY = explicit_grads(MODEL, QUERIES)  # the measurement is the training loss (the default)


def blocks(g: np.ndarray) -> list[np.ndarray]:
    """Split raveled gradients [N, D] into per-module matrices [N, d_in, d_out] (names sorted, layers)."""
    out, start = [], 0
    for shape in [(24, 16), (24, 16), (16, 16), (16, 16)]:  # down l0, down l1, q l0, q l1
        size = shape[0] * shape[1]
        out.append(g[:, start:start + size].reshape(-1, *shape))
        start += size
    return out


def module_inputs(model: Model, examples: Examples):
    """Per module (same order as `blocks`) the real-token inputs and output gradients [tokens, d]."""
    io = task_lib.module_io(model.params, Examples(*map(jnp.asarray, examples)), config=model.config, task=TASK)
    out = []
    for name in NAMES:
        a, g = (np.asarray(x, np.float64) for x in io[name])
        for j in range(2):
            real = examples.mask.astype(bool)
            out.append((a[:, j][real], g[:, j][real]))
    return out


def options(method, **kw):
    return attr.Options(method=method, chunk=4, **kw)


def test_per_example_gradients_three_ways_agree():
    batch = Examples(*map(jnp.asarray, TRAIN))
    flat = np.asarray(task_lib.flat_grads(MODEL.params, batch, config=CONFIG, task=TASK))
    grads = task_lib.module_grads(task_lib.module_io(MODEL.params, batch, config=CONFIG, task=TASK))
    taps = np.concatenate([np.asarray(grads[n]).reshape(10, -1) for n in NAMES], axis=1)
    np.testing.assert_allclose(flat, G_TRAIN, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(taps, G_TRAIN, rtol=1e-4, atol=1e-6)


def test_identity_scores_are_gradient_dot_products():
    expected = G_QUERY @ G_TRAIN.T
    ghost = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=options("identity"), progress=False)
    np.testing.assert_allclose(ghost, expected, rtol=1e-4, atol=1e-6)


def test_diagonal_matches_explicit_empirical_fisher():
    fisher = np.mean(G_TRAIN ** 2, axis=0)
    parts, expected = blocks(fisher[None]), 0.0
    for f, q, t in zip(parts, blocks(G_QUERY), blocks(G_TRAIN)):
        f = f[0]
        expected = expected + np.einsum("mio,nio->mn", q / (f + 0.1 * f.mean()), t)
    got = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=options("diagonal"), progress=False)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def kronecker_terms():
    """Per module (as `blocks`): the token covariances A [d_in, d_in] and S [d_out, d_out]."""
    io = module_inputs(MODEL, TRAIN)
    n_tokens = TRAIN.mask.sum()
    return [(a.T @ a / n_tokens, g.T @ g / n_tokens) for a, g in io]


def test_kfac_matches_dense_kronecker_solve():
    expected = 0.0
    for (A, S), q, t in zip(kronecker_terms(), blocks(G_QUERY), blocks(G_TRAIN)):
        ea, es = np.linalg.eigvalsh(A), np.linalg.eigvalsh(S)
        damping = 0.1 * np.mean(np.outer(ea, es))
        # vec in row-major order of G [d_in, d_out]: the Kronecker factor is A (x) S
        H = np.kron(A, S) + damping * np.eye(A.shape[0] * S.shape[0])
        x = np.linalg.solve(H, q.reshape(len(q), -1).T).T
        expected = expected + x @ t.reshape(len(t), -1).T
    got = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=options("kfac"), progress=False)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)


def test_ekfac_matches_dense_eigenbasis_solve():
    expected = 0.0
    for (A, S), q, t in zip(kronecker_terms(), blocks(G_QUERY), blocks(G_TRAIN)):
        _, qa = np.linalg.eigh(A)
        _, qs = np.linalg.eigh(S)
        Q = np.kron(qa, qs)  # eigenbasis of A (x) S in row-major vec order
        lam = np.mean((t.reshape(len(t), -1) @ Q) ** 2, axis=0)  # refitted eigenvalues
        H = Q @ np.diag(lam + 0.1 * lam.mean()) @ Q.T
        x = np.linalg.solve(H, q.reshape(len(q), -1).T).T
        expected = expected + x @ t.reshape(len(t), -1).T
    got = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=options("ekfac"), progress=False)
    np.testing.assert_allclose(got, expected, rtol=2e-3, atol=1e-5)


SMALL = attr.Task(modules=attr.Modules(("q",), (1,)))  # D = 256: dense Hessians stay cheap


def dense_curvature(kind: str, rows_: Examples) -> np.ndarray:
    """The mean over rows of the loss's Hessian or Gauss-Newton matrix in SMALL's subset, dense [D, D]."""
    flat, full = task_lib.ravel_subset(MODEL.params, SMALL, CONFIG)
    r = Examples(*map(jnp.asarray, rows_))
    logits_of = lambda v: forward(full(v), r.tokens, r.mask, config=CONFIG).logits
    if kind == "hessian":
        loss = lambda v: jnp.sum(task_lib.row_nll(logits_of(v), r)) / r.tokens.shape[0]
        return np.asarray(jax.hessian(loss)(flat), np.float64)
    J = np.asarray(jax.jacobian(logits_of)(flat), np.float64)  # [B, T, V, D]
    p = np.asarray(jax.nn.softmax(logits_of(flat), -1), np.float64)
    H = 0.0
    for b in range(J.shape[0]):
        for t in range(J.shape[1]):
            w = float(rows_.weights[b, t])
            if w:
                h_out = np.diag(p[b, t]) - np.outer(p[b, t], p[b, t])
                H = H + w * J[b, t].T @ h_out @ J[b, t]
    return H / J.shape[0]


@functools.lru_cache(maxsize=None)
def dense_solution(curvature: str, damping: float) -> np.ndarray:
    """Scores g_q^T (H + lambda I)^-1 g_n with lambda = damping x the empirical Fisher's mean eigenvalue."""
    g_train, g_query = explicit_grads(MODEL, TRAIN, task=SMALL), explicit_grads(MODEL, QUERIES, SMALL)
    H = dense_curvature(curvature, TRAIN)
    lam = damping * np.mean(np.sum(g_train ** 2, axis=1)) / g_train.shape[1]
    assert np.linalg.eigvalsh(H + lam * np.eye(len(H)))[0] > 0  # CG and LiSSA need a PD system
    return np.linalg.solve(H + lam * np.eye(len(H)), g_query.T).T @ g_train.T


@pytest.mark.parametrize("curvature,damping", [("gauss_newton", 0.1), ("hessian", 500.0)])
def test_cg_matches_dense_solve(curvature, damping):
    expected = dense_solution(curvature, damping)
    got = attr.scores(MODEL, TRAIN, QUERIES, task=SMALL, progress=False,
                      options=options("cg", curvature=curvature, damping=damping, iterations=100, hessian_rows=10))
    np.testing.assert_allclose(got, expected, rtol=1e-3, atol=1e-3 * np.abs(expected).max())
    mean = attr.scores(MODEL, TRAIN, QUERIES, task=SMALL, progress=False, mean=True,
                       options=options("cg", curvature=curvature, damping=damping, iterations=100, hessian_rows=10))
    np.testing.assert_allclose(mean[0], expected.mean(0), rtol=1e-3, atol=1e-3 * np.abs(expected).max())


def test_lissa_converges_to_the_dense_solve():
    expected = dense_solution("gauss_newton", 1.0)
    got = attr.scores(MODEL, TRAIN, QUERIES, task=SMALL, progress=False,
                      options=options("lissa", iterations=300, hessian_rows=10, damping=1.0))
    np.testing.assert_allclose(got, expected, rtol=2e-2, atol=2e-2 * np.abs(expected).max())


def test_cg_on_an_indefinite_hessian_is_refused():
    with pytest.raises(InputError, match="positive definite"):
        attr.scores(MODEL, TRAIN, QUERIES, task=SMALL, progress=False,
                    options=options("cg", curvature="hessian", damping=1e-6, iterations=100, hessian_rows=10))


def test_self_influence_token_scores_and_top_k():
    opts = options("ekfac")
    full = attr.scores(MODEL, TRAIN, TRAIN, task=TASK, options=opts, progress=False)
    np.testing.assert_allclose(attr.self_influence(MODEL, TRAIN, task=TASK, options=opts, progress=False),
                               np.diag(full), rtol=1e-4)
    one = Examples(*(x[:1] for x in QUERIES))
    per_token = attr.token_scores(MODEL, TRAIN, one, task=TASK, options=opts, progress=False)
    assert per_token.shape == (7, 10)
    assert np.all(per_token[one.weights[0] == 0] == 0)
    whole = attr.scores(MODEL, TRAIN, one, task=TASK, options=opts, progress=False)
    np.testing.assert_allclose(per_token.sum(0), whole[0], rtol=1e-4, atol=1e-6)
    best = attr.top_k(whole, 3)
    np.testing.assert_array_equal(best[0], np.argsort(-whole[0])[:3])


def test_projection_is_a_factored_sketch_of_the_gradients():
    # identity on k x k projections = dot products of P_in^T G P_out: close to exact for k >= d
    exact = G_QUERY @ G_TRAIN.T
    sketched = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=options("identity", project=64),
                           progress=False)
    corr = np.corrcoef(exact.ravel(), sketched.ravel())[0, 1]
    assert corr > 0.8, corr


def test_dda_variants_combine_checkpoint_scores():
    ckpts, base = [tiny_model(1), tiny_model(2)], MODEL
    opts = options("identity")
    correct = rows(3, 7, 7)
    out = attr.dda(ckpts, base, TRAIN, QUERIES, task=TASK, options=opts, correct=correct, beta=0.5)
    s = lambda m, q: attr.scores(m, TRAIN, q, task=TASK, options=opts, progress=False)
    last, first, prior = s(ckpts[1], QUERIES), s(ckpts[0], QUERIES), s(base, QUERIES)
    np.testing.assert_allclose(out["raw"], last)
    np.testing.assert_allclose(out["debias"], last - 0.5 * prior)
    np.testing.assert_allclose(out["denoise"], (first + last) / 2)
    np.testing.assert_allclose(out["dda"], (first + last) / 2 - 0.5 * prior)
    np.testing.assert_allclose(out["contrastive"], last - s(ckpts[1], correct))
    np.testing.assert_allclose(out["contrastive_denoise"],
                               (first - s(ckpts[0], correct) + last - s(ckpts[1], correct)) / 2)
    means = attr.dda(ckpts, base, TRAIN, QUERIES, task=TASK, options=options("ekfac"), correct=correct, mean=True)
    full = attr.dda(ckpts, base, TRAIN, QUERIES, task=TASK, options=options("ekfac"), correct=correct)
    for variant, matrix in full.items():
        np.testing.assert_allclose(means[variant][0], matrix.mean(0), rtol=1e-4, atol=1e-6 * np.abs(matrix).max())


def test_cache_resumes_and_refuses_another_model(tmp_path):
    opts = options("ekfac")
    first = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=opts, cache_dir=tmp_path, progress=False)
    chunk_files = sorted(tmp_path.rglob("grads-*.npz"))
    assert len(chunk_files) == 3  # 10 rows in chunks of 4
    assert sorted(p.name.split("-")[0] for p in tmp_path.rglob("*.np*")) == ["factors", "grads", "grads",
                                                                               "grads", "scores"]
    # a crash after two chunks: the third is recomputed, the factors and scores anew
    chunk_files[-1].unlink()
    for p in tmp_path.rglob("factors-*"):
        p.unlink()
    for p in tmp_path.rglob("scores-*"):
        p.unlink()
    np.testing.assert_allclose(attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=opts, cache_dir=tmp_path,
                                           progress=False), first, rtol=1e-6)
    # a second query set reuses the training gradients and factors (their files are not rewritten)
    stamps = {p: p.stat().st_mtime_ns for p in tmp_path.rglob("grads-*")}
    attr.scores(MODEL, TRAIN, rows(2, 7, 3), task=TASK, options=opts, cache_dir=tmp_path, progress=False)
    assert stamps == {p: p.stat().st_mtime_ns for p in tmp_path.rglob("grads-*")}
    other = tiny_model(0, ModelConfig(**{**CONFIG.__dict__, "d_ff": 32}))
    with pytest.raises(InputError, match="different attribution cache"):
        attr.scores(other, TRAIN, QUERIES, task=TASK, options=opts, cache_dir=tmp_path, progress=False)


def test_bad_input_says_what_to_do():
    foreign = QUERIES._replace(tokens=QUERIES.tokens + 100)
    with pytest.raises(InputError, match="another model"):
        attr.scores(MODEL, TRAIN, foreign, task=TASK, progress=False)
    with pytest.raises(InputError, match="no training rows"):
        attr.scores(MODEL, Examples(*(x[:0] for x in TRAIN)), QUERIES, task=TASK, progress=False)
    with pytest.raises(InputError, match="another architecture"):
        other = tiny_model(0, ModelConfig(**{**CONFIG.__dict__, "d_ff": 32}))
        attr.dda([other], MODEL, TRAIN, QUERIES, task=TASK)
    with pytest.raises(InputError, match="per linear layer"):
        attr.scores(MODEL, TRAIN, QUERIES, task=attr.Task(modules=None), options=options("ekfac"))
    with pytest.raises(InputError, match="layers"):
        attr.scores(MODEL, TRAIN, QUERIES, task=attr.Task(modules=attr.Modules(("q",), (5,))))
    with pytest.raises(InputError, match="project"):
        attr.Options(method="cg", project=8)


MESH_SCRIPT = """
import os
os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"  # before jax starts
import jax, numpy as np
from jtrust.runtime.sharding import make_mesh
from test_attribution import MODEL, TRAIN, QUERIES, TASK, attr
assert len(jax.devices()) == 8
for method in ("ekfac", "identity"):  # the matrix-free path chunks rows the same way
    opts = attr.Options(method=method, chunk=8, iterations=5)
    one = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=opts, progress=False)
    # rows over 8 data devices; rows over data x fsdp with weights split over fsdp (and model)
    for sizes in (dict(data=8), dict(data=2, fsdp=4), dict(data=2, fsdp=2, model=2)):
        sharded = attr.scores(MODEL, TRAIN, QUERIES, task=TASK, options=opts, mesh=make_mesh(**sizes),
                              progress=False)
        np.testing.assert_allclose(sharded, one, rtol=1e-4, atol=1e-6 * np.abs(one).max(), err_msg=str(sizes))
print("ok")
"""


def test_scores_on_data_fsdp_and_model_meshes_equal_one_device():
    here = pathlib.Path(__file__).parent
    env = dict(os.environ, JAX_PLATFORMS="cpu",
               PYTHONPATH=os.pathsep.join([str(here), str(here.parent), str(here.parents[1])]))
    result = subprocess.run([sys.executable, "-c", MESH_SCRIPT], env=env, capture_output=True, text=True,
                            timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.strip().endswith("ok")
