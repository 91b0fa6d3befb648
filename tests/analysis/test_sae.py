"""Sparse autoencoders against closed forms and peers: planted sparse codes reconstructed exactly
and recovered by training, AuxK reviving dead latents, the JumpReLU straight-through gradients
against finite differences of the kernel-smoothed objective, independence of SAEs trained in one
program, metrics against sklearn, CE-loss score at its two ends, SAELens reading the files."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtrust
from jtrust.analysis import sae
from jtrust.analysis.sae import architectures as arch
from jtrust.core.errors import InputError
from jtrust.training.lm import Examples

from helpers import make_tiny_hf_dir, random_tokens

D, F = 32, 16


def planted(n: int = 2048, k: int = 3, seed: int = 0):
    """(dictionary [F, d] with orthonormal rows, codes [n, F] with k positive entries per row, x = codes D)."""
    rng = np.random.default_rng(seed)
    dictionary = np.linalg.qr(rng.normal(size=(D, F)))[0].T.astype(np.float32)
    codes = np.zeros((n, F), np.float32)
    for row in codes:
        row[rng.choice(F, k, replace=False)] = rng.uniform(0.5, 2.0, k)
    return dictionary, codes, codes @ dictionary


def planted_params(config: sae.SAEConfig, dictionary: np.ndarray) -> dict:
    params = sae.init(jax.random.key(0), config)
    params.update(W_enc=jnp.asarray(dictionary.T), b_enc=jnp.zeros(F), b_dec=jnp.zeros(D))
    if "W_dec" in params:
        params["W_dec"] = jnp.asarray(dictionary)
    return params


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
def test_planted_dictionary_reconstructs_its_sparse_codes_exactly(architecture):
    dictionary, codes, x = planted(256)
    config = sae.SAEConfig(d_in=D, width=F, architecture=architecture, k=3, init_threshold=0.1)
    out = sae.forward(planted_params(config, dictionary), jnp.asarray(x), config)
    np.testing.assert_allclose(out.latents, codes, atol=1e-5)
    np.testing.assert_allclose(out.reconstruction, x, atol=1e-5)
    assert float(jnp.max(out.reconstruction_loss)) < 1e-9


def test_training_recovers_a_planted_dictionary(tmp_path):
    dictionary, _, x = planted(4096)
    config = sae.SAEConfig(d_in=D, width=F, architecture="topk", k=3)
    run = sae.train_saes(x[None], config, sae.sae_train_config(300, batch_size=256, learning_rate=3e-3),
                         tmp_path / "run", progress=False)
    learned = np.asarray(sae.decoder(run.one(0), config))
    assert sae.mmcs(learned, dictionary) > 0.95
    assert sae.reconstruction_metrics(run.one(0), config, x)["explained_variance"] > 0.95


def test_auxk_revives_planted_dead_latents(tmp_path):
    """Latents 8..15 point away from every input, so TopK never picks them: without AuxK they get no
    gradient and stay dead; with it they do (AuxK takes the dead latents' pre-activations without a
    ReLU, as SAELens) and fire again after training."""
    dictionary, _, x = planted(4096, k=2)
    results = {}
    for aux_coef in (0.0, 1 / 32):
        config = sae.SAEConfig(d_in=D, width=F, architecture="topk", k=2, k_aux=8, aux_coef=aux_coef,
                               dead_tokens=256)
        params = sae.init(jax.random.key(1), config)
        params["W_enc"] = params["W_enc"].at[:, 8:].set(-jnp.asarray(dictionary[:8].T) - 0.3)
        params["b_enc"] = params["b_enc"].at[8:].set(-3.0)
        before = sae.forward(params, jnp.asarray(x), config).latents
        assert not np.any(np.asarray(before[:, 8:]) > 0)  # planted dead
        dead = jnp.zeros(F).at[8:].set(1e9)  # what training counts once they have not fired for 256 tokens
        grads = jax.grad(lambda p: sae.loss(dict(p, tokens_since_fired=dead), jnp.asarray(x[:256]),
                                            config)[0])(params)
        results[aux_coef] = float(jnp.abs(grads["W_enc"][:, 8:]).sum())
        run = _train_from(params, config, x, tmp_path / f"aux{aux_coef}")
        fired = np.asarray(sae.forward(run, jnp.asarray(x), config).latents[:, 8:] > 0).any(axis=0)
        results[(aux_coef, "revived")] = int(fired.sum())
    assert results[0.0] == 0 and results[1 / 32] > 0  # only AuxK reaches the dead latents
    assert results[(0.0, "revived")] == 0
    assert results[(1 / 32, "revived")] >= 1  # 2 of 8 within 400 steps when written


def _train_from(params, config, x, out):
    """Train starting from given parameters (the library's init replaced through init_stack)."""
    import jtrust.analysis.sae.train as train_module
    original = train_module.init_stack
    train_module.init_stack = lambda *a: jax.tree.map(lambda v: v[None], params)
    try:
        run = sae.train_saes(x[None], config, sae.sae_train_config(400, batch_size=256, learning_rate=3e-3),
                             out, progress=False)
    finally:
        train_module.init_stack = original
    return run.one(0)


def _rect_cdf(u):
    return np.clip(u + 0.5, 0.0, 1.0)


def test_jumprelu_straight_through_gradients_against_finite_differences():
    """The pseudo-derivatives are derivatives of the kernel-smoothed objectives: sum_i H(z_i - t)
    smoothed is sum_i C((z_i - t) / eps) (C the rectangle kernel's CDF), exactly; z H(z - t)
    smoothed is z C(...), whose derivative -(z / eps) K differs from the paper's -(t / eps) K by
    at most eps / 2 per contributing sample."""
    rng = np.random.default_rng(0)
    eps = 0.05
    z = rng.normal(0.3, 0.2, size=(4000, 1))
    theta = np.array([0.31])
    g_step = jax.grad(lambda t: jnp.sum(sae.step_function(jnp.asarray(z, jnp.float32), t, eps)))(
        jnp.asarray(theta, jnp.float32))
    g_jump = jax.grad(lambda t: jnp.sum(sae.jump_relu(jnp.asarray(z, jnp.float32), t, eps)))(
        jnp.asarray(theta, jnp.float32))
    h = 1e-7
    smooth_l0 = lambda t: np.sum(_rect_cdf((z - t) / eps))
    smooth_jump = lambda t: np.sum(z * _rect_cdf((z - t) / eps))
    fd_l0 = (smooth_l0(theta + h) - smooth_l0(theta - h)) / (2 * h)
    fd_jump = (smooth_jump(theta + h) - smooth_jump(theta - h)) / (2 * h)
    inside = np.sum(np.abs(z - theta) < eps / 2)
    assert inside > 50
    assert float(g_step[0]) == pytest.approx(fd_l0, rel=1e-3)
    assert abs(float(g_jump[0]) - fd_jump) <= (eps / 2) * inside / eps + 1e-3
    assert float(g_jump[0]) == pytest.approx(-(theta[0] / eps) * inside, rel=1e-4)
    # and the gradient to z passes through the gate only
    gz = jax.grad(lambda v: jnp.sum(sae.jump_relu(v, jnp.asarray(theta, jnp.float32), eps)))(
        jnp.asarray(z, jnp.float32))
    np.testing.assert_array_equal(np.asarray(gz), (z > theta).astype(np.float32))


def test_saes_in_one_program_train_as_if_alone(tmp_path):
    """SAE 1 of a run on [X1, X2] equals SAE 1 of a run on [X3, X2]: the others' data never reach it."""
    _, _, x1 = planted(1024, seed=1)
    _, _, x2 = planted(1024, seed=2)
    _, _, x3 = planted(1024, seed=3)
    config = sae.SAEConfig(d_in=D, width=F, architecture="batchtopk", k=3)
    train = sae.sae_train_config(20, batch_size=128)
    a = sae.train_saes(np.stack([x1, x2]), config, train, tmp_path / "a", progress=False)
    b = sae.train_saes(np.stack([x3, x2]), config, train, tmp_path / "b", progress=False)
    jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6), a.one(1), b.one(1))
    assert not np.allclose(a.one(0)["W_enc"], b.one(0)["W_enc"])


def test_resume_after_a_stop_equals_a_straight_run(tmp_path):
    _, _, x = planted(1024)
    config = sae.SAEConfig(d_in=D, width=F, architecture="relu")
    train = sae.sae_train_config(12, batch_size=64, save_steps=(4, 8))
    straight = sae.train_saes(x[None], config, train, tmp_path / "straight", progress=False)
    sae.train_saes(x[None], config, train, tmp_path / "resumed", progress=False, stop_after=5)
    resumed = sae.train_saes(x[None], config, train, tmp_path / "resumed", progress=False)
    jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
    norms = np.linalg.norm(np.asarray(straight.params["W_enc"][0]), axis=0)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # the paper's renormalized rows


def test_reconstruction_metrics_against_sklearn_and_numpy():
    from sklearn.metrics import r2_score
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, D)).astype(np.float32) + 2.0
    config = sae.SAEConfig(d_in=D, width=F, architecture="relu", l1_coef=0.0)
    params = sae.init(jax.random.key(3), config)
    params["b_enc"] = params["b_enc"].at[:3].set(-100.0)  # three latents never fire
    out = sae.forward(params, jnp.asarray(x), config, inference=True)
    x_hat, f = np.asarray(out.reconstruction, np.float64), np.asarray(out.latents)
    m = sae.reconstruction_metrics(params, config, x, batch=128)
    assert m["explained_variance"] == pytest.approx(r2_score(x, x_hat, multioutput="variance_weighted"), rel=1e-4)
    assert m["mse"] == pytest.approx(np.mean((x - x_hat) ** 2), rel=1e-5)
    assert m["l0"] == pytest.approx(np.mean(np.sum(f > 0, axis=1)))
    assert m["dead_fraction"] == pytest.approx(np.mean(~(f > 0).any(axis=0))) and m["dead_fraction"] >= 3 / F
    assert m["dense_fraction"] == pytest.approx(np.mean((f > 0).mean(axis=0) > 0.1))
    assert m["shrinkage"] == pytest.approx(np.mean(np.linalg.norm(x_hat, axis=1) / np.linalg.norm(x, axis=1)), rel=1e-5)


def test_mmcs_against_a_brute_force_matching():
    import itertools
    rng = np.random.default_rng(5)
    small, big = rng.normal(size=(4, 6)), rng.normal(size=(6, 6))
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = unit(small) @ unit(big).T
    best = max(np.mean([cos[i, p[i]] for i in range(4)]) for p in itertools.permutations(range(6), 4))
    assert sae.mmcs(small, big) == pytest.approx(best)
    assert sae.mmcs(small, big, hungarian=False) == pytest.approx(cos.max(axis=1).mean())
    assert sae.mmcs(big, big) == pytest.approx(1.0)


def test_ce_loss_score_is_one_for_an_identity_sae_and_zero_for_a_zero_map(tmp_path):
    make_tiny_hf_dir(tmp_path / "m", "llama")
    model = jtrust.load(tmp_path / "m")
    d = model.config.d_model
    tokens = random_tokens((6, 12), seed=2)
    ones = np.ones_like(tokens)
    examples = Examples(tokens[:, :-1], ones[:, :-1], tokens[:, 1:], ones[:, 1:].astype(np.float32))
    config = sae.SAEConfig(d_in=d, width=2 * d, architecture="topk", k=d)
    eye = np.eye(d, dtype=np.float32)
    identity = {"W_enc": jnp.asarray(np.concatenate([eye, -eye], 1)), "b_enc": jnp.zeros(2 * d),
                "W_dec": jnp.asarray(np.concatenate([eye, -eye], 0)), "b_dec": jnp.zeros(d),
                "tokens_since_fired": jnp.zeros(2 * d)}
    out = sae.spliced_losses(model, examples, identity, config, layer=1)
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-4) and out["kl"] == pytest.approx(0.0, abs=1e-5)
    zero = dict(identity, W_dec=jnp.zeros((2 * d, d)))
    out = sae.spliced_losses(model, examples, zero, config, layer=1)
    assert out["ce_loss_score"] == pytest.approx(0.0, abs=1e-5) and out["kl"] > 0
    assert out["ce_sae"] == pytest.approx(out["ce_zero"]) and out["ce_zero"] != out["ce_clean"]


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
def test_saelens_format_round_trip_and_sae_lens_reads_it(tmp_path, architecture):
    config = sae.SAEConfig(d_in=D, width=F, architecture=architecture, k=4, init_threshold=0.2)
    params = sae.init(jax.random.key(7), config)
    params["b_dec"] = params["b_dec"] + 0.1
    if architecture == "batchtopk":
        params["threshold"] = jnp.asarray(0.15)
    x = np.random.default_rng(6).normal(size=(64, D)).astype(np.float32)
    ours = sae.forward(params, jnp.asarray(x), config, inference=True)
    path = sae.save(tmp_path / "sae", params, config, hook_name="blocks.3.hook_mlp_out")

    from safetensors.numpy import load_file  # the documented keys and shapes
    weights = load_file(str(path / "sae_weights.safetensors"))
    cfg = json.loads((path / "cfg.json").read_text())
    assert weights["W_enc"].shape == (D, F) and weights["W_dec"].shape == (F, D)
    assert weights["b_enc"].shape == (F,) and weights["b_dec"].shape == (D,)
    assert (cfg["d_in"], cfg["d_sae"]) == (D, F)
    loaded, loaded_config = sae.load(path)
    assert loaded_config == config
    again = sae.forward(loaded, jnp.asarray(x), loaded_config, inference=True)
    np.testing.assert_allclose(again.latents, ours.latents, atol=1e-6)
    with pytest.raises(InputError, match="already exists"):
        sae.save(path, params, config)

    sae_lens = pytest.importorskip("sae_lens")  # installed by setup.sh's test oracles
    import torch
    peer = sae_lens.SAE.load_from_disk(str(path), device="cpu")
    with torch.no_grad():
        latents = peer.encode(torch.from_numpy(x))
        reconstruction = peer.decode(latents)
    np.testing.assert_allclose(latents.numpy(), ours.latents, atol=1e-5)
    np.testing.assert_allclose(reconstruction.numpy(), ours.reconstruction, atol=1e-5)


def test_bad_input_is_refused(tmp_path):
    with pytest.raises(InputError, match="unknown SAE architecture"):
        sae.SAEConfig(d_in=4, width=8, architecture="gated")
    config = sae.SAEConfig(d_in=D, width=F)
    with pytest.raises(InputError, match="width 8"):
        sae.train_saes(np.zeros((1, 100, 8), np.float32), config, sae.sae_train_config(2, batch_size=10), tmp_path / "r")
    with pytest.raises(InputError, match="fewer than one batch"):
        sae.train_saes(np.zeros((1, 5, D), np.float32), config, sae.sae_train_config(2, batch_size=10), tmp_path / "r")
    (tmp_path / "broken").mkdir()
    with pytest.raises(InputError, match="not an SAE directory"):
        sae.load(tmp_path / "broken")
