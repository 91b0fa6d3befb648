"""Sparse autoencoders against closed forms and peers: planted sparse codes reconstructed exactly
and recovered by training (every architecture), the LFP authors' PyTorch training step, AuxK
reviving dead latents, the JumpReLU straight-through gradients against finite differences of the
kernel-smoothed objective, SAEs trained in one program equal to each trained alone, resume,
metrics against sklearn / numpy, the CE-loss score at its two ends, SAELens reading the files."""

from __future__ import annotations

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from helpers import random_llama
from jtrust.analysis import sae
from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.model import Model
from jtrust.training.lm import Examples

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
    np.testing.assert_allclose(out.latents, codes, atol=1e-5)  # the right support and values
    np.testing.assert_allclose(out.reconstruction, x, atol=1e-5)
    assert float(jnp.max(out.reconstruction_loss)) < 1e-9


# settings under which each architecture finds the planted dictionary (d 32, 16 atoms, 3 per token);
# the other training tests reuse them, so each step program compiles once (conftest's XLA cache)
RECOVERY = {"relu": (dict(l1_coef=0.01), 300), "topk": (dict(k=3, k_aux=8, dead_tokens=256), 150),
            "batchtopk": (dict(k=3), 150),
            "jumprelu": (dict(l0_coef=0.3, bandwidth=0.1, init_threshold=0.1), 300)}


def config_of(architecture: str) -> sae.SAEConfig:
    return sae.SAEConfig(d_in=D, width=F, architecture=architecture, **RECOVERY[architecture][0])


def train_config(steps: int, **kw):
    return sae.sae_train_config(steps, batch_size=256, learning_rate=1e-2, **kw)


@pytest.mark.parametrize("architecture", sae.ARCHITECTURES)
def test_training_recovers_a_planted_dictionary(tmp_path, architecture):
    dictionary, _, x = planted(4096)
    config = config_of(architecture)
    run = sae.train_saes(x[None], config, train_config(RECOVERY[architecture][1]), tmp_path / "run", progress=False)
    learned = np.asarray(sae.decoder(run.one(0), config))
    assert sae.mmcs(learned, dictionary) > 0.98
    m = sae.reconstruction_metrics(run.one(0), config, x)
    assert m["explained_variance"] > 0.95 and m["l0"] == pytest.approx(3.0, abs=0.3)


def test_the_papers_sae_trains_as_the_authors_pytorch_code(tmp_path):
    """The LFP authors' training step (their SparseAutoencoder, tied): encoder rows renormalized at
    each forward, MSELoss + l1_coef * mean_tokens |f|_1, Adam; from the same start, 5 steps."""
    torch = pytest.importorskip("torch")
    _, _, x = planted(1024, seed=3)
    config = config_of("relu")
    run = sae.train_saes(x[None], config, train_config(5), tmp_path / "run", progress=False)

    w0 = np.asarray(sae.init_stack(config, 1, (0,))["W_enc"][0]).T  # torch layout [F, d]
    w = torch.nn.Parameter(torch.tensor(w0))
    b_e, b_d = torch.nn.Parameter(torch.zeros(F)), torch.nn.Parameter(torch.zeros(D))
    opt = torch.optim.Adam([w, b_e, b_d], lr=1e-2)
    from jtrust.training.loop import batch_indices
    for step in range(5):
        data = torch.tensor(x[np.sort(batch_indices(len(x), 256, step, 0))])
        w.data = torch.nn.functional.normalize(w, p=2, dim=1)
        f = torch.relu(data @ w.T + b_e)
        loss = torch.nn.functional.mse_loss(f @ w + b_d, data) + config.l1_coef * torch.norm(f, 1, dim=-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    w_final = torch.nn.functional.normalize(w, p=2, dim=1).detach().numpy()  # the next forward's weights
    ours = run.one(0)
    np.testing.assert_allclose(np.asarray(ours["W_enc"]).T, w_final, atol=2e-5)
    np.testing.assert_allclose(ours["b_enc"], b_e.detach().numpy(), atol=2e-5)
    np.testing.assert_allclose(ours["b_dec"], b_d.detach().numpy(), atol=2e-5)


def test_auxk_revives_planted_dead_latents(tmp_path):
    """Latents 8..15 point away from every input, so TopK never picks them: without AuxK they get no
    gradient (and Adam leaves them where they are); with it they do (AuxK takes the dead latents'
    pre-activations without a ReLU, as SAELens) and fire again after training."""
    dictionary, _, x = planted(4096)
    config = config_of("topk")  # k_aux 8, dead after 256 tokens without firing
    params = sae.init(jax.random.key(1), config)
    params["W_enc"] = params["W_enc"].at[:, 8:].set(-jnp.asarray(dictionary[:8].T) - 0.3)
    params["b_enc"] = params["b_enc"].at[8:].set(-3.0)
    assert not np.any(np.asarray(sae.forward(params, jnp.asarray(x), config).latents[:, 8:]) > 0)
    dead = jnp.zeros(F).at[8:].set(1e9)  # what training counts once they have not fired for 256 tokens
    for aux_coef in (0.0, 1 / 32):
        c = dataclasses.replace(config, aux_coef=aux_coef)
        loss = lambda p: sae.loss(dict(p, tokens_since_fired=dead), jnp.asarray(x[:256]), c)[0]
        grads = jax.jit(jax.grad(loss))(params)
        reached = float(jnp.abs(grads["W_enc"][:, 8:]).sum()) + float(jnp.abs(grads["b_enc"][8:]).sum())
        assert (reached > 0) == (aux_coef > 0)  # only AuxK reaches the dead latents
    run = sae.train_saes(x[None], config, train_config(100), tmp_path / "run", progress=False,
                         init_params=jax.tree.map(lambda v: v[None], params))
    fired = np.asarray(sae.forward(run.one(0), jnp.asarray(x), config).latents[:, 8:] > 0).any(axis=0)
    assert fired.sum() >= 4, fired  # 8 of 8 when written


def _rect_cdf(u):
    return np.clip(u + 0.5, 0.0, 1.0)


def test_jumprelu_straight_through_gradients_against_finite_differences():
    """The pseudo-derivatives are derivatives of the kernel-smoothed objectives: sum_i H(z_i - t)
    smoothed is sum_i C((z_i - t) / eps) (C the rectangle kernel's CDF), exactly; z H(z - t)
    smoothed is z C(...), whose derivative -(z / eps) K differs from the paper's -(t / eps) K by
    at most eps / 2 per contributing sample. The custom_vjp equals the paper's formula."""
    rng = np.random.default_rng(0)
    eps = 0.05
    z = rng.normal(0.3, 0.2, size=(4000, 1))
    theta = np.array([0.31])
    g_step = jax.jit(jax.grad(lambda t: jnp.sum(sae.step_function(jnp.asarray(z, jnp.float32), t, eps))))(
        jnp.asarray(theta, jnp.float32))
    g_jump = jax.jit(jax.grad(lambda t: jnp.sum(sae.jump_relu(jnp.asarray(z, jnp.float32), t, eps))))(
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
    # the gradient to z passes through the gate only
    gz = jax.jit(jax.grad(lambda v: jnp.sum(sae.jump_relu(v, jnp.asarray(theta, jnp.float32), eps))))(
        jnp.asarray(z, jnp.float32))
    np.testing.assert_array_equal(np.asarray(gz), (z > theta).astype(np.float32))
    # through the loss: d loss / d log_threshold = theta * (the formulas above), per latent
    config = sae.SAEConfig(d_in=D, width=F, architecture="jumprelu", l0_coef=0.7, bandwidth=eps, init_threshold=0.05)
    params = sae.init(jax.random.key(2), config)
    xs = jnp.asarray(rng.normal(size=(64, D)), jnp.float32)
    out = sae.forward(params, xs, config)
    pre, t = np.asarray(out.pre_activations), np.exp(np.asarray(params["log_threshold"]))
    kernel = (np.abs(pre - t) < eps / 2).sum(axis=0)
    g = jax.jit(jax.grad(lambda p: jnp.sum(sae.forward(p, xs, config).sparsity_loss)))(params)
    np.testing.assert_allclose(g["log_threshold"], t * (-0.7 / eps) * kernel, rtol=1e-5, atol=1e-6)


def test_saes_in_one_program_equal_each_trained_alone(tmp_path):
    """2 layers x 2 seeds trained in one vmapped program; SAE (layer 1, seed 1) and (layer 0,
    seed 0) trained alone from the same start on their layer's rows end with the same weights."""
    _, _, x0 = planted(1024, seed=1)
    _, _, x1 = planted(1024, seed=2)
    config = config_of("batchtopk")
    train = train_config(20)
    together = sae.train_saes(np.stack([x0, x1]), config, train, tmp_path / "together", seeds=(0, 1),
                              progress=False)
    start = sae.init_stack(config, 2, (0, 1))
    for layer, seed, x in ((1, 1, x1), (0, 0, x0)):
        s = 2 * layer + seed
        alone = sae.train_saes([x], config, train, tmp_path / f"alone{s}", progress=False,
                               init_params=jax.tree.map(lambda a: a[s:s + 1], start))
        jax.tree.map(lambda u, v: np.testing.assert_allclose(u, v, rtol=1e-5, atol=1e-6),
                     together.one(layer, seed), alone.one(0))
    assert not np.allclose(together.one(1, 0)["W_dec"], together.one(1, 1)["W_dec"])  # seeds differ


def test_resume_after_a_stop_equals_a_straight_run(tmp_path):
    _, _, x = planted(1024)
    config = config_of("topk")
    train = train_config(12, save_steps=(4, 8))
    straight = sae.train_saes(x[None], config, train, tmp_path / "straight", progress=False)
    sae.train_saes(x[None], config, train, tmp_path / "resumed", progress=False, stop_after=5)
    resumed = sae.train_saes(x[None], config, train, tmp_path / "resumed", progress=False)
    jax.tree.map(np.testing.assert_array_equal, straight.params, resumed.params)
    norms = np.linalg.norm(np.asarray(straight.params["W_dec"][0]), axis=1)
    np.testing.assert_allclose(norms, 1.0, rtol=1e-5)  # unit dictionary rows after every step


def test_reconstruction_metrics_against_sklearn_and_numpy():
    from sklearn.metrics import r2_score
    rng = np.random.default_rng(4)
    x = rng.normal(size=(500, D)).astype(np.float32) + 2.0
    config = sae.SAEConfig(d_in=D, width=F, architecture="relu", l1_coef=0.0)
    params = sae.init(jax.random.key(3), config)
    params["b_enc"] = params["b_enc"].at[:3].set(-100.0).at[3].set(100.0)  # three latents never fire, one always
    out = sae.forward(params, jnp.asarray(x), config, inference=True)
    x_hat, f = np.asarray(out.reconstruction, np.float64), np.asarray(out.latents, np.float64)
    m = sae.reconstruction_metrics(params, config, x, batch=100)
    ev = r2_score(x, x_hat, multioutput="variance_weighted")
    assert m["explained_variance"] == pytest.approx(ev, rel=1e-5) and m["fvu"] == pytest.approx(1 - ev, rel=1e-4)
    assert m["mse"] == pytest.approx(np.mean(np.sum((x - x_hat) ** 2, axis=1)), rel=1e-5)
    assert m["l0"] == pytest.approx(np.mean(np.sum(f > 0, axis=1)))
    assert m["l1"] == pytest.approx(np.mean(np.sum(np.abs(f), axis=1)), rel=1e-5)
    assert m["dead_fraction"] == pytest.approx(np.mean(~(f > 0).any(axis=0))) and m["dead_fraction"] >= 3 / F
    assert m["dense_fraction"] == pytest.approx(np.mean((f > 0).mean(axis=0) > 0.1)) and m["dense_fraction"] >= 1 / F
    norm_in, norm_out = np.linalg.norm(x, axis=1), np.linalg.norm(x_hat, axis=1)
    assert m["shrinkage"] == m["l2_ratio"] == pytest.approx(np.mean(norm_out / norm_in), rel=1e-5)
    assert m["l2_norm_in"] == pytest.approx(norm_in.mean(), rel=1e-5)
    assert m["cossim"] == pytest.approx(np.mean(np.sum(x * x_hat, axis=1) / (norm_in * norm_out)), rel=1e-5)
    assert m["relative_reconstruction_bias"] == pytest.approx(np.mean(norm_out ** 2) / np.mean(np.sum(x * x_hat, 1)),
                                                              rel=1e-5)


def test_mmcs_against_a_brute_force_matching():
    import itertools
    rng = np.random.default_rng(5)
    small, big = rng.normal(size=(4, 6)), rng.normal(size=(6, 6))
    unit = lambda w: w / np.linalg.norm(w, axis=1, keepdims=True)
    cos = unit(small) @ unit(big).T
    best = max(np.mean([cos[i, p[i]] for i in range(4)]) for p in itertools.permutations(range(6), 4))
    assert sae.mmcs(small, big) == pytest.approx(best)
    assert sae.mmcs(big, small) == pytest.approx(best)  # the smaller dictionary is matched into the bigger
    assert sae.mmcs(small, big, hungarian=False) == pytest.approx(cos.max(axis=1).mean())
    assert sae.mmcs(big[::-1] * 3.0, big) == pytest.approx(1.0)  # order and scale do not matter


def tiny_model() -> Model:
    """A tiny random Llama built in place (no checkpoint files, no transformers)."""
    config = ModelConfig(family="llama", vocab_size=64, d_model=16, n_layers=2, n_heads=4, n_kv_heads=2,
                         head_dim=4, d_ff=32, norm="rms", norm_eps=1e-5, position="rope", rotary_dim=4,
                         max_positions=32)
    return random_llama(config)


def test_ce_loss_score_is_one_for_an_identity_sae_and_zero_for_a_zero_map():
    model = tiny_model()
    d = model.config.d_model
    tokens = np.random.default_rng(2).integers(0, 64, (5, 12)).astype(np.int32)
    ones = np.ones_like(tokens)
    weights = np.random.default_rng(3).uniform(size=tokens[:, 1:].shape).astype(np.float32)
    examples = Examples(tokens[:, :-1], ones[:, :-1], tokens[:, 1:], weights)
    config = sae.SAEConfig(d_in=d, width=2 * d, architecture="topk", k=d)
    eye = np.eye(d, dtype=np.float32)  # latents +x and -x: TopK with k = d keeps the positive half exactly
    identity = {"W_enc": jnp.asarray(np.concatenate([eye, -eye], 1)), "b_enc": jnp.zeros(2 * d),
                "W_dec": jnp.asarray(np.concatenate([eye, -eye], 0)), "b_dec": jnp.zeros(d),
                "tokens_since_fired": jnp.zeros(2 * d)}
    out = sae.spliced_losses(model, examples, identity, config, layer=1, batch_size=2)  # a padded last batch
    assert out["ce_loss_score"] == pytest.approx(1.0, abs=1e-4)
    assert out["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-5)
    assert out["kl_div_score"] == pytest.approx(1.0, abs=1e-4)
    zero = dict(identity, W_dec=jnp.zeros((2 * d, d)))
    out = sae.spliced_losses(model, examples, zero, config, layer=1, batch_size=2)
    assert out["ce_loss_score"] == pytest.approx(0.0, abs=1e-5) and out["kl_div_score"] == pytest.approx(0.0, abs=1e-5)
    assert out["ce_loss_with_sae"] == pytest.approx(out["ce_loss_with_ablation"])
    # the clean loss: the weighted mean NLL over all rows, in numpy from one forward of every row
    logits = np.asarray(model.apply(examples.tokens, examples.mask).logits, np.float64)
    lp = logits - logits.max(-1, keepdims=True)
    lp -= np.log(np.exp(lp).sum(-1, keepdims=True))
    nll = -np.take_along_axis(lp, examples.targets[..., None], -1)[..., 0]
    assert out["ce_loss_without_sae"] == pytest.approx(np.sum(nll * weights) / weights.sum(), rel=1e-5)
    assert out["ce_loss_with_ablation"] > out["ce_loss_without_sae"]


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
    assert ("threshold" in weights) == (architecture in ("jumprelu", "batchtopk"))
    assert (cfg["d_in"], cfg["d_sae"], cfg["dtype"]) == (D, F, "float32")
    assert cfg["metadata"]["hook_name"] == "blocks.3.hook_mlp_out"
    loaded, loaded_config = sae.load(path)
    assert loaded_config == config
    again = sae.forward(loaded, jnp.asarray(x), loaded_config, inference=True)
    np.testing.assert_allclose(again.latents, ours.latents, atol=1e-6)
    with pytest.raises(InputError, match="already exists"):
        sae.save(path, params, config)

    sae_lens = pytest.importorskip("sae_lens")  # installed by setup.sh's test oracles, without its dependencies
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
    with pytest.raises(InputError, match="k must be in 1..8"):
        sae.SAEConfig(d_in=4, width=8, architecture="topk", k=9)
    with pytest.raises(InputError, match="bandwidth"):
        sae.SAEConfig(d_in=4, width=8, architecture="jumprelu", bandwidth=0.0)
    config = sae.SAEConfig(d_in=D, width=F)
    train = sae.sae_train_config(2, batch_size=10)
    with pytest.raises(InputError, match="width 8"):
        sae.train_saes(np.zeros((1, 100, 8), np.float32), config, train, tmp_path / "r")
    with pytest.raises(InputError, match="fewer than one batch"):
        sae.train_saes(np.zeros((1, 5, D), np.float32), config, train, tmp_path / "r")
    with pytest.raises(InputError, match="same tokens"):
        sae.train_saes([np.zeros((50, D)), np.zeros((40, D))], config, train, tmp_path / "r")
    with pytest.raises(InputError, match="NaN"):
        sae.train_saes([np.full((50, D), np.nan)], config, train, tmp_path / "r")
    with pytest.raises(InputError, match="init_params should have"):
        sae.train_saes([np.zeros((50, D))], config, train, tmp_path / "r",
                       init_params=sae.init(jax.random.key(0), config))
    with pytest.raises(InputError, match=r"x must be \[tokens, 32\]"):
        sae.reconstruction_metrics(sae.init(jax.random.key(0), config), config, np.zeros((4, 8)))
    (tmp_path / "broken").mkdir()
    with pytest.raises(InputError, match="not an SAE directory"):
        sae.load(tmp_path / "broken")
    (tmp_path / "broken" / "cfg.json").write_text("{not json")
    (tmp_path / "broken" / "sae_weights.safetensors").write_bytes(b"\0" * 10)
    with pytest.raises(InputError, match="damaged"):
        sae.load(tmp_path / "broken")
