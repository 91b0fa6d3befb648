"""How good a sparse autoencoder is, with SAELens's metric names.

On token activations x [N, d]:
  mse                 mean over tokens and dimensions of (x - x_hat)^2
  fvu                 fraction of variance unexplained, sum |x - x_hat|^2 / sum |x - mean(x)|^2
  explained_variance  1 - fvu
  l0                  mean number of latents firing per token
  dead_fraction       latents that never fire on these tokens
  dense_fraction      latents firing on more than `dense_above` (10%) of the tokens
  shrinkage           mean |x_hat| / |x| (l2_ratio: below 1 when the L1 penalty shrinks codes)
In the model (`spliced_losses`): next-token cross-entropy with the reconstruction spliced in at
the SAE's site and layer, with the site zero-ablated, and clean; ce_loss_score = (CE_zero -
CE_sae) / (CE_zero - CE_clean) (1: as good as the model, 0: as bad as deleting the site), and
the mean per-token KL(clean || spliced).
Dictionaries: mean max cosine similarity (MMCS) between two dictionaries, with Hungarian
matching (one-to-one, the LFP authors' code) or plain (each small atom's best match).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from jtrust.analysis.sae import architectures as arch
from jtrust.analysis.sae.architectures import SAEConfig
from jtrust.core.errors import InputError
from jtrust.models.interventions import Intervention, at_layer
from jtrust.models.model import Model
from jtrust.models.decoder import forward
from jtrust.training.lm import Examples


def reconstruction_metrics(params: dict, config: SAEConfig, x: np.ndarray, *, batch: int = 4096,
                           dense_above: float = 0.1) -> dict[str, float]:
    """The metrics of one SAE on token activations x [N, d] (module docstring)."""
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != config.d_in or len(x) == 0:
        raise InputError(f"x must be [tokens, {config.d_in}], got {x.shape}")
    run = jax.jit(lambda p, xs: _batch_sums(p, xs, config))
    totals = None
    for start in range(0, len(x), batch):
        part = run(params, jnp.asarray(x[start:start + batch]))
        totals = part if totals is None else jax.tree.map(jnp.add, totals, part)
    t = jax.tree.map(np.asarray, totals)
    n = len(x)
    centred = t["sq_norm"] - np.sum(t["sum_x"].astype(np.float64) ** 2) / n  # sum |x - mean|^2
    fvu = float(t["sq_error"] / centred)
    rate = t["fires"] / n
    return {"mse": float(t["sq_error"] / (n * config.d_in)), "fvu": fvu, "explained_variance": 1.0 - fvu,
            "l0": float(t["l0"] / n), "dead_fraction": float(np.mean(rate == 0)),
            "dense_fraction": float(np.mean(rate > dense_above)), "shrinkage": float(t["ratio"] / n)}


def _batch_sums(params, x, config):
    out = arch.forward(params, x, config, inference=True)
    fired = out.latents > 0
    x64 = x.astype(jnp.float32)
    norm_x = jnp.linalg.norm(x64, axis=-1)
    return {"sq_error": jnp.sum((x64 - out.reconstruction) ** 2), "sq_norm": jnp.sum(x64 ** 2),
            "sum_x": jnp.sum(x64, axis=0), "l0": jnp.sum(fired), "fires": jnp.sum(fired, axis=0),
            "ratio": jnp.sum(jnp.linalg.norm(out.reconstruction, axis=-1) / jnp.maximum(norm_x, 1e-12))}


def splice(params: dict, config: SAEConfig, n_layers: int, layer: int, site: str = "mlp_out") -> Intervention:
    """The SAE's reconstruction in place of `site` at `layer` (every position)."""
    reconstruct = lambda p, x: arch.forward(p, x.reshape(-1, x.shape[-1]), config,
                                            inference=True).reconstruction.reshape(x.shape)
    return at_layer(n_layers, layer, jnp.zeros(config.d_in), site=site, kind="splice", position="all",
                    fn=reconstruct, fn_params=params)


def zero_ablation(d: int, n_layers: int, layer: int, site: str = "mlp_out") -> Intervention:
    return at_layer(n_layers, layer, jnp.zeros(d), site=site, kind="replace", position="all")


def spliced_losses(model: Model, examples: Examples, params: dict, config: SAEConfig, layer: int,
                   site: str = "mlp_out", *, batch_size: int = 8) -> dict[str, float]:
    """ce_clean, ce_sae, ce_zero (token-weighted next-token cross-entropy of `examples`),
    ce_loss_score and kl (mean per weighted token of KL(clean || spliced))."""
    n_layers = model.config.n_layers
    edits = {"sae": (splice(params, config, n_layers, layer, site),),
             "zero": (zero_ablation(config.d_in, n_layers, layer, site),)}
    run = jax.jit(_losses, static_argnames=("config",))
    sums = None
    for start in range(0, len(examples.tokens), batch_size):
        rows = np.arange(start, min(start + batch_size, len(examples.tokens)))
        batch = Examples(*(a[rows] for a in examples))
        part = run(model.params, batch, edits, config=model.config)
        sums = part if sums is None else jax.tree.map(jnp.add, sums, part)
    s = {k: float(v) for k, v in sums.items()}
    if s["weight"] == 0:
        raise InputError("no weighted tokens in the examples")
    ce = {k: s[k] / s["weight"] for k in ("clean", "sae", "zero")}
    score = (ce["zero"] - ce["sae"]) / (ce["zero"] - ce["clean"]) if ce["zero"] != ce["clean"] else float("nan")
    return {"ce_clean": ce["clean"], "ce_sae": ce["sae"], "ce_zero": ce["zero"], "ce_loss_score": score,
            "kl": s["kl"] / s["weight"]}


def _losses(params, batch: Examples, edits, *, config):
    w = batch.weights.astype(jnp.float32)

    def logp(interventions):
        logits = forward(params, batch.tokens, batch.mask, config=config, interventions=interventions).logits
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def nll(lp):
        return -jnp.take_along_axis(lp, batch.targets[..., None], axis=-1)[..., 0]

    clean, sae, zero = logp(()), logp(edits["sae"]), logp(edits["zero"])
    kl = jnp.sum(jnp.exp(clean) * (clean - sae), axis=-1)
    return {"clean": jnp.sum(nll(clean) * w), "sae": jnp.sum(nll(sae) * w), "zero": jnp.sum(nll(zero) * w),
            "kl": jnp.sum(kl * w), "weight": jnp.sum(w)}


def mmcs(small: np.ndarray, big: np.ndarray, hungarian: bool = True) -> float:
    """Mean max cosine similarity of dictionaries small [F1, d] and big [F2, d] (F1 <= F2):
    each small atom's cosine with its match in big, matched one-to-one (Hungarian) or freely."""
    small, big = np.asarray(small, np.float64), np.asarray(big, np.float64)
    if small.ndim != 2 or big.ndim != 2 or small.shape[1] != big.shape[1]:
        raise InputError(f"dictionaries must be [F, d] with the same d, got {small.shape} and {big.shape}")
    if len(small) > len(big):
        small, big = big, small
    unit = lambda w: w / np.maximum(np.linalg.norm(w, axis=1, keepdims=True), 1e-12)
    cos = unit(small) @ unit(big).T
    if not hungarian:
        return float(cos.max(axis=1).mean())
    rows, cols = scipy.optimize.linear_sum_assignment(-cos)
    return float(cos[rows, cols].mean())


def mmcs_by_layer(small: dict, big: dict, small_config: SAEConfig, big_config: SAEConfig,
                  n: int, hungarian: bool = True) -> list[float]:
    """MMCS of SAE s of two stacked runs (`SAERun.params`) for s in range(n)."""
    return [mmcs(np.asarray(arch.decoder(jax.tree.map(lambda a: a[s], small), small_config)),
                 np.asarray(arch.decoder(jax.tree.map(lambda a: a[s], big), big_config)), hungarian)
            for s in range(n)]
