"""How good a sparse autoencoder is, with SAELens's metric names (sae_lens 6 `evals.py`).

On token activations x [N, d] (`reconstruction_metrics`):
  mse                 mean over tokens of |x - x_hat|^2 (summed over d, as SAELens; the LFP
                      paper's training MSE is this / d)
  explained_variance  1 - sum |x - x_hat|^2 / sum |x - mean(x)|^2 over all tokens (SAELens's
                      current definition, not its per-token "legacy" one)
  fvu                 1 - explained_variance (fraction of variance unexplained, sparsify's name)
  cossim              mean cosine of x and x_hat
  l0, l1              mean number of firing latents / mean |f|_1 per token
  l2_norm_in, l2_norm_out   mean |x| and mean |x_hat|
  l2_ratio            mean |x_hat| / |x| (|x| < 1e-4 counts as 1); `shrinkage` is the same
                      number (below 1: the L1 penalty shrinks the codes)
  relative_reconstruction_bias   mean |x_hat|^2 / mean <x, x_hat> ("Improving Dictionary
                      Learning with Gated Sparse Autoencoders", arXiv 2404.16014, eq. 10)
  dead_fraction       latents that never fire on these tokens
  dense_fraction      latents firing on more than `dense_above` (10%) of the tokens
In the model (`spliced_losses`), next-token cross-entropy per weighted token with the
reconstruction spliced in at the SAE's site and layer (ce_loss_with_sae), with the site zero-
ablated (ce_loss_with_ablation) and clean (ce_loss_without_sae); ce_loss_score = (ablation -
sae) / (ablation - clean): 1 is as good as the model, 0 as bad as deleting the site. The same
for the mean per-token KL(clean || edited): kl_div_with_sae, kl_div_with_ablation and
kl_div_score = (ablation - sae) / ablation.
Dictionaries: mean max cosine similarity (MMCS) between two dictionaries, with Hungarian
matching (one-to-one, the LFP authors' code) or plain (each small atom's best match).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import scipy.optimize

from jtrust.analysis.sae import architectures as arch
from jtrust.analysis.sae.architectures import SAEConfig
from jtrust.core.errors import InputError
from jtrust.models.decoder import forward
from jtrust.models.interventions import Intervention, at_layer
from jtrust.models.model import Model
from jtrust.training.lm import Examples


def reconstruction_metrics(params: dict, config: SAEConfig, x: np.ndarray, *, batch: int = 4096,
                           dense_above: float = 0.1) -> dict[str, float]:
    """The metrics of one SAE (unstacked parameters) on token activations x [N, d] (module
    docstring); inference mode (batchtopk uses its threshold)."""
    if not hasattr(x, "shape") or len(x.shape) != 2 or x.shape[1] != config.d_in or len(x) == 0:
        raise InputError(f"x must be [tokens, {config.d_in}], got {getattr(x, 'shape', type(x))}")
    totals = None
    for start in range(0, len(x), batch):
        part = _batch_sums(params, jnp.asarray(np.asarray(x[start:start + batch], np.float32)), config=config)
        part = {k: np.asarray(v, np.float64) for k, v in part.items()}  # float64 across batches: Var(x) cancels
        totals = part if totals is None else {k: totals[k] + part[k] for k in totals}
    t, n = totals, len(x)
    total_variance = t["sq_norm"] - np.sum(t["sum_x"] ** 2) / n  # sum over tokens of |x - mean|^2
    fvu = float(t["sq_error"] / total_variance) if total_variance > 0 else float("nan")
    rate = t["fires"] / n
    l2_ratio = float(t["l2_ratio"] / n)
    return {"mse": float(t["sq_error"] / n), "explained_variance": 1.0 - fvu, "fvu": fvu,
            "cossim": float(t["cossim"] / n), "l0": float(t["l0"] / n), "l1": float(t["l1"] / n),
            "l2_norm_in": float(t["norm_in"] / n), "l2_norm_out": float(t["norm_out"] / n),
            "l2_ratio": l2_ratio, "shrinkage": l2_ratio,
            "relative_reconstruction_bias": float(t["sq_norm_out"] / t["dot"]),
            "dead_fraction": float(np.mean(rate == 0)), "dense_fraction": float(np.mean(rate > dense_above))}


@functools.partial(jax.jit, static_argnames=("config",))
def _batch_sums(params, x, *, config):
    """Sums over the tokens of x [b, d] that the metrics need."""
    out = arch.forward(params, x, config, inference=True)
    x_hat, f = out.reconstruction, out.latents
    fired = f > 0
    norm_in, norm_out = jnp.linalg.norm(x, axis=-1), jnp.linalg.norm(x_hat, axis=-1)
    cos = jnp.sum(x * x_hat, axis=-1) / jnp.maximum(norm_in * norm_out, 1e-12)
    return {"sq_error": jnp.sum((x - x_hat) ** 2), "sq_norm": jnp.sum(x ** 2), "sum_x": jnp.sum(x, axis=0),
            "cossim": jnp.sum(cos), "l0": jnp.sum(fired), "l1": jnp.sum(jnp.abs(f)), "fires": jnp.sum(fired, axis=0),
            "norm_in": jnp.sum(norm_in), "norm_out": jnp.sum(norm_out),
            "l2_ratio": jnp.sum(norm_out / jnp.where(norm_in < 1e-4, 1.0, norm_in)),  # SAELens's guard
            "sq_norm_out": jnp.sum(norm_out ** 2), "dot": jnp.sum(x * x_hat)}


@functools.lru_cache(maxsize=None)
def _reconstruct(config: SAEConfig):
    """The splice function of one configuration: the same object every call, so the compiled
    model forward (whose interventions' functions are static) is reused."""
    return lambda p, x: arch.forward(p, x.reshape(-1, x.shape[-1]), config,
                                     inference=True).reconstruction.reshape(x.shape)


def splice(params: dict, config: SAEConfig, n_layers: int, layer: int, site: str = "mlp_out") -> Intervention:
    """The SAE's reconstruction in place of `site` at `layer` (every position)."""
    return at_layer(n_layers, layer, jnp.zeros(config.d_in), site=site, kind="splice", position="all",
                    fn=_reconstruct(config), fn_params=params)


def zero_ablation(d: int, n_layers: int, layer: int, site: str = "mlp_out") -> Intervention:
    """Zeros in place of `site` at `layer` (every position): SAELens's ablation baseline."""
    return at_layer(n_layers, layer, jnp.zeros(d), site=site, kind="replace", position="all")


def spliced_losses(model: Model, examples: Examples, params: dict, config: SAEConfig, layer: int,
                   site: str = "mlp_out", *, batch_size: int = 8) -> dict[str, float]:
    """ce_loss_without_sae, ce_loss_with_sae, ce_loss_with_ablation, ce_loss_score, kl_div_with_sae,
    kl_div_with_ablation, kl_div_score (module docstring) of one SAE spliced at `site`, `layer`,
    over the weighted next-token predictions of `examples` (e.g. `jtrust.training.packed_examples`
    of held-out text; weights 1 on every real token). One compiled program serves every layer
    and every SAE of one configuration (the last batch is padded with zero-weight rows)."""
    n_layers = model.config.n_layers
    if not 0 <= layer < n_layers:
        raise InputError(f"layer {layer} out of range for a {n_layers}-layer model")
    if len(examples.tokens) == 0 or batch_size < 1:
        raise InputError("spliced_losses needs at least one example and batch_size >= 1")
    edits = {"sae": (splice(params, config, n_layers, layer, site),),
             "zero": (zero_ablation(config.d_in, n_layers, layer, site),)}
    sums = None
    for start in range(0, len(examples.tokens), batch_size):
        rows = np.arange(start, start + batch_size)
        real = rows < len(examples.tokens)
        batch = Examples(*(a[np.where(real, rows, 0)] for a in examples))
        batch = batch._replace(weights=batch.weights * real[:, None])  # padding rows weigh nothing
        part = {k: np.float64(v) for k, v in _losses(model.params, batch, edits, config=model.config).items()}
        sums = part if sums is None else {k: sums[k] + part[k] for k in sums}
    if sums["weight"] == 0:
        raise InputError("no weighted tokens in the examples")
    s = {k: v / sums["weight"] for k, v in sums.items()}
    ce_gap, kl_gap = s["ce_zero"] - s["ce_clean"], s["kl_zero"]
    return {"ce_loss_without_sae": s["ce_clean"], "ce_loss_with_sae": s["ce_sae"],
            "ce_loss_with_ablation": s["ce_zero"],
            "ce_loss_score": (s["ce_zero"] - s["ce_sae"]) / ce_gap if ce_gap != 0 else float("nan"),
            "kl_div_with_sae": s["kl_sae"], "kl_div_with_ablation": s["kl_zero"],
            "kl_div_score": (s["kl_zero"] - s["kl_sae"]) / kl_gap if kl_gap != 0 else float("nan")}


@functools.partial(jax.jit, static_argnames=("config",))
def _losses(params, batch: Examples, edits, *, config):
    """Weighted sums of the next-token NLL and KL(clean || edited) of one batch, clean / SAE / zero."""
    w = batch.weights.astype(jnp.float32)

    def logp(interventions):
        logits = forward(params, batch.tokens, batch.mask, config=config, interventions=interventions).logits
        return jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)

    def nll(lp):
        return -jnp.take_along_axis(lp, batch.targets[..., None], axis=-1)[..., 0]

    def kl(lp):
        return jnp.sum(jnp.exp(clean) * (clean - lp), axis=-1)

    clean, sae, zero = logp(()), logp(edits["sae"]), logp(edits["zero"])
    return {"ce_clean": jnp.sum(nll(clean) * w), "ce_sae": jnp.sum(nll(sae) * w), "ce_zero": jnp.sum(nll(zero) * w),
            "kl_sae": jnp.sum(kl(sae) * w), "kl_zero": jnp.sum(kl(zero) * w), "weight": jnp.sum(w)}


def mmcs(small: np.ndarray, big: np.ndarray, hungarian: bool = True) -> float:
    """Mean max cosine similarity of dictionaries small [F1, d] and big [F2, d] (F1 <= F2; swapped
    otherwise): each small atom's cosine with its match in big, matched one-to-one by the
    Hungarian algorithm (scipy's linear_sum_assignment, as the LFP authors) or freely (plain max)."""
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
