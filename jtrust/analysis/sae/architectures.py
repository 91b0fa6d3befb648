"""Sparse autoencoder architectures as pure functions of a parameter dict.

x [B, d] -> latents f [B, F] -> reconstruction x_hat [B, d]. Every architecture shares one
parameter layout (SAELens's names): W_enc [d, F], b_enc [F], W_dec [F, d], b_dec [d], plus

  relu       the LFP paper's: f = ReLU(x W_enc + b_enc), tied: x_hat = f W_enc^T + b_dec, the
             dictionary's rows (W_enc's columns) renormalized to unit norm after every step;
             loss = mean_d (x - x_hat)^2 + l1_coef |f|_1 (the authors' MSELoss + L1)
  topk       f = TopK_k(ReLU((x - b_dec) W_enc + b_enc)), x_hat = f W_dec + b_dec ("Scaling and
             evaluating sparse autoencoders", Gao et al., arXiv 2406.04093)
  batchtopk  the B k largest pre-activations of the batch are kept ("BatchTopK Sparse
             Autoencoders", Bussmann et al., arXiv 2412.06410); at inference a threshold (the
             running mean of each batch's smallest kept activation) replaces the batch
  jumprelu   f = z H(z - theta), theta = exp(log_threshold) per latent, trained through a
             rectangle-kernel straight-through estimator of bandwidth eps; loss = squared error
             + l0_coef * L0 ("Jumping Ahead: Improving Reconstruction Fidelity with JumpReLU
             Sparse Autoencoders", Rajamanoharan et al., arXiv 2407.14435)

topk / batchtopk / jumprelu use the summed squared error per token (SAELens) and unit-norm
decoder rows (renormalized after every step). topk and batchtopk add the AuxK loss: the
error x - x_hat is reconstructed from the k_aux largest pre-activations among *dead* latents
(none fired for `dead_tokens` tokens), weighted by aux_coef, so dead latents get gradient and
revive. The count of tokens since each latent fired lives in the parameters
(`tokens_since_fired`, not trained: a stop-gradient input updated by `post_update`).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from jtrust.core.errors import InputError

ARCHITECTURES = ("relu", "topk", "batchtopk", "jumprelu")


@dataclasses.dataclass(frozen=True)
class SAEConfig:
    d_in: int
    width: int  # latents F (the paper: 1x and 2x d_in)
    architecture: str = "relu"
    l1_coef: float = 1e-3  # relu
    k: int = 32  # topk / batchtopk: latents kept per token
    k_aux: int | None = None  # AuxK latents (None: d_in // 2, as SAELens)
    aux_coef: float = 1 / 32
    dead_tokens: int = 1_000_000  # a latent is dead after this many tokens without firing
    l0_coef: float = 1e-3  # jumprelu
    bandwidth: float = 1e-3  # jumprelu's straight-through kernel width
    init_threshold: float = 1e-3  # jumprelu
    threshold_decay: float = 0.99  # batchtopk: EMA of the inference threshold

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise InputError(f"unknown SAE architecture {self.architecture!r}; choose from {ARCHITECTURES}")
        if self.d_in < 1 or self.width < 1:
            raise InputError(f"d_in and width must be >= 1, got {self.d_in} and {self.width}")
        if self.architecture in ("topk", "batchtopk") and not 1 <= self.k <= self.width:
            raise InputError(f"k must be in 1..{self.width} (the width), not {self.k}")
        if self.k_aux is not None and self.k_aux < 1:
            raise InputError(f"k_aux must be >= 1 (or None for d_in // 2), not {self.k_aux}")
        if min(self.l1_coef, self.l0_coef, self.aux_coef) < 0:
            raise InputError("l1_coef, l0_coef and aux_coef must be >= 0")
        if self.dead_tokens < 1:
            raise InputError(f"dead_tokens must be >= 1, not {self.dead_tokens}")
        if not (self.bandwidth > 0 and self.init_threshold > 0):
            raise InputError("jumprelu's bandwidth and init_threshold must be > 0")
        if not 0 <= self.threshold_decay < 1:
            raise InputError(f"threshold_decay must be in [0, 1), not {self.threshold_decay}")

    @property
    def aux_k(self) -> int:
        return min(self.width, self.k_aux if self.k_aux is not None else max(self.d_in // 2, 1))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


class SAEOutput(NamedTuple):
    latents: jax.Array  # [B, F]
    reconstruction: jax.Array  # [B, d]
    reconstruction_loss: jax.Array  # [B] per-token squared error (mean over d for relu, sum otherwise)
    sparsity_loss: jax.Array  # [B] l1_coef |f|_1 (relu), l0_coef * L0 (jumprelu), 0 (topk)
    aux_loss: jax.Array  # [B] aux_coef * AuxK error (topk, batchtopk), else 0
    pre_activations: jax.Array  # [B, F]


@functools.partial(jax.jit, static_argnames=("config",))  # one program per configuration for eager callers
def init(key: jax.Array, config: SAEConfig) -> dict[str, jax.Array]:
    """Parameters of one SAE: W_enc with unit-norm latent directions, W_dec = W_enc^T (the
    usual start), zero biases."""
    w = jax.random.normal(key, (config.d_in, config.width), jnp.float32)
    w = w / jnp.linalg.norm(w, axis=0, keepdims=True)
    params = {"W_enc": w, "b_enc": jnp.zeros(config.width), "b_dec": jnp.zeros(config.d_in)}
    if config.architecture != "relu":
        params["W_dec"] = w.T
    if config.architecture == "jumprelu":
        # float32, not weak-typed: the first step's inputs then match every later step's (one compile)
        params["log_threshold"] = jnp.full(config.width, np.log(config.init_threshold), jnp.float32)
    if config.architecture in ("topk", "batchtopk"):
        params["tokens_since_fired"] = jnp.zeros(config.width)
    if config.architecture == "batchtopk":
        params["threshold"] = jnp.zeros(())
    return params


def decoder(params: dict, config: SAEConfig) -> jax.Array:
    """The dictionary W_dec [F, d] (tied relu: W_enc^T)."""
    return params["W_enc"].T if config.architecture == "relu" else params["W_dec"]


@functools.partial(jax.jit, static_argnames=("config", "inference"))
def encode(params: dict, x: jax.Array, config: SAEConfig, *, inference: bool = True) -> tuple[jax.Array, jax.Array]:
    """(latents [B, F], pre-activations [B, F]) of x [B, d]. batchtopk keeps the batch's B k
    largest while training (inference=False) and its threshold at inference."""
    if config.architecture == "relu":
        pre = x @ params["W_enc"] + params["b_enc"]
        return jax.nn.relu(pre), pre
    pre = (x - params["b_dec"]) @ params["W_enc"] + params["b_enc"]
    if config.architecture == "topk":
        return topk_activation(pre, config.k), pre
    if config.architecture == "batchtopk":
        if inference:
            return jnp.where(pre > params["threshold"], pre, 0.0), pre
        return batch_topk_activation(pre, config.k), pre
    return jump_relu(pre, jnp.exp(params["log_threshold"]), config.bandwidth), pre


@functools.partial(jax.jit, static_argnames=("config", "inference"))
def forward(params: dict, x: jax.Array, config: SAEConfig, *, inference: bool = False,
            any_dead: jax.Array | None = None) -> SAEOutput:
    """Latents, reconstruction and per-token loss terms of x [B, d] (total = their sum).

    any_dead (topk, batchtopk): whether AuxK runs at all (default: some latent of this SAE is
    dead). While none is, its matmuls are skipped; `train_saes` passes one flag for the whole
    stack, since under vmap a per-SAE flag would turn the skip into computing both branches."""
    x = x.astype(jnp.float32)
    f, pre = encode(params, x, config, inference=inference)
    w_dec = decoder(params, config)
    x_hat = f @ w_dec + params["b_dec"]
    error = x - x_hat
    zeros = jnp.zeros(x.shape[0])
    if config.architecture == "relu":
        return SAEOutput(f, x_hat, jnp.mean(error ** 2, axis=-1),
                         config.l1_coef * jnp.sum(jnp.abs(f), axis=-1), zeros, pre)
    reconstruction = jnp.sum(error ** 2, axis=-1)
    if config.architecture == "jumprelu":
        theta = jnp.exp(params["log_threshold"])
        l0 = jnp.sum(step_function(pre, theta, config.bandwidth), axis=-1)
        return SAEOutput(f, x_hat, reconstruction, config.l0_coef * l0, zeros, pre)
    dead = jax.lax.stop_gradient(params["tokens_since_fired"]) >= config.dead_tokens
    any_dead = jnp.any(dead) if any_dead is None else any_dead
    aux = jax.lax.cond(any_dead, lambda: aux_k_loss(pre, dead, jax.lax.stop_gradient(error), w_dec, config.aux_k),
                       lambda: zeros)
    return SAEOutput(f, x_hat, reconstruction, zeros, config.aux_coef * aux, pre)


@functools.partial(jax.jit, static_argnames=("config",))
def loss(params: dict, x: jax.Array, config: SAEConfig) -> tuple[jax.Array, SAEOutput]:
    """(mean per-token loss, the forward's output) for x [B, d]."""
    out = forward(params, x, config)
    return jnp.mean(out.reconstruction_loss + out.sparsity_loss + out.aux_loss), out


def post_update(params: dict, fired: jax.Array, n_tokens: int, min_kept: jax.Array | None,
                config: SAEConfig) -> dict:
    """After an optimizer step: unit-norm dictionary rows; tokens since each latent fired
    (fired: [F] bool, some token of the step's n_tokens fired it); batchtopk's threshold EMA
    (min_kept: the step's smallest kept activation)."""
    params = dict(params)
    if config.architecture == "relu":
        params["W_enc"] = params["W_enc"] / jnp.maximum(jnp.linalg.norm(params["W_enc"], axis=0, keepdims=True), 1e-12)
    else:
        params["W_dec"] = params["W_dec"] / jnp.maximum(jnp.linalg.norm(params["W_dec"], axis=1, keepdims=True), 1e-12)
    if "tokens_since_fired" in params:
        params["tokens_since_fired"] = jnp.where(fired, 0.0, params["tokens_since_fired"] + n_tokens)
    if config.architecture == "batchtopk":
        d = config.threshold_decay
        first = params["threshold"] == 0
        params["threshold"] = jnp.where(first, min_kept, d * params["threshold"] + (1 - d) * min_kept)
    return params


# ---------------------------------------------------------------------------------------------
# activations

def topk_activation(pre: jax.Array, k: int) -> jax.Array:
    """Keep each row's k largest pre-activations (ReLU'd), zero the rest: [B, F] -> [B, F]."""
    values, index = jax.lax.top_k(pre, k)
    rows = jnp.arange(pre.shape[0])[:, None]
    return jnp.zeros_like(pre).at[rows, index].set(jax.nn.relu(values))


def batch_topk_activation(pre: jax.Array, k: int) -> jax.Array:
    """Keep the B k largest pre-activations of the whole batch (ReLU'd): [B, F] -> [B, F]."""
    flat = pre.reshape(-1)
    values, index = jax.lax.top_k(flat, k * pre.shape[0])
    return jnp.zeros_like(flat).at[index].set(jax.nn.relu(values)).reshape(pre.shape)


def aux_k_loss(pre: jax.Array, dead: jax.Array, error: jax.Array, w_dec: jax.Array, k_aux: int) -> jax.Array:
    """Per-token |error - TopK_{k_aux}(dead pre-activations) W_dec|^2 [B], weighted by
    min(dead / k_aux, 1) (0 when no latent is dead).

    pre [B, F], dead [F] bool, error [B, d] (x - x_hat, no gradient), w_dec [F, d]."""
    # no ReLU (as SAELens): a dead latent's pre-activation is often negative, and must get gradient
    values, index = jax.lax.top_k(jnp.where(dead, pre, -jnp.inf), k_aux)
    rows = jnp.arange(pre.shape[0])[:, None]
    aux = jnp.zeros_like(pre).at[rows, index].set(jnp.where(jnp.isfinite(values), values, 0.0))
    per_token = jnp.sum((error - aux @ w_dec) ** 2, axis=-1)
    scale = jnp.minimum(jnp.sum(dead) / k_aux, 1.0)  # SAELens: less weight while few are dead
    return scale * per_token


def _rectangle(u: jax.Array) -> jax.Array:
    return ((u > -0.5) & (u < 0.5)).astype(u.dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _jump(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    return z * (z > theta)


def _jump_fwd(z, theta, bandwidth):
    return _jump(z, theta, bandwidth), (z, theta)


def _jump_bwd(bandwidth, res, g):
    z, theta = res
    # d/dz: the gate itself; d/dtheta: -(theta / eps) K((z - theta) / eps), the pseudo-derivative
    d_theta = -(theta / bandwidth) * _rectangle((z - theta) / bandwidth) * g
    return (z > theta) * g, jnp.sum(d_theta.reshape(-1, theta.shape[-1]), axis=0)


_jump.defvjp(_jump_fwd, _jump_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _step(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    return (z > theta).astype(z.dtype)


def _step_fwd(z, theta, bandwidth):
    return _step(z, theta, bandwidth), (z, theta)


def _step_bwd(bandwidth, res, g):
    z, theta = res
    d_theta = -(1.0 / bandwidth) * _rectangle((z - theta) / bandwidth) * g
    return jnp.zeros_like(z), jnp.sum(d_theta.reshape(-1, theta.shape[-1]), axis=0)


_step.defvjp(_step_fwd, _step_bwd)


def jump_relu(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """z H(z - theta) for z [B, F], theta [F] > 0; theta's gradient is the straight-through
    estimate -(theta / eps) K((z - theta) / eps) with the rectangle kernel K."""
    return _jump(z, theta, bandwidth)


def step_function(z: jax.Array, theta: jax.Array, bandwidth: float) -> jax.Array:
    """H(z - theta) (the L0 of each latent) with theta's straight-through gradient
    -(1 / eps) K((z - theta) / eps); no gradient to z, as in the paper."""
    return _step(z, theta, bandwidth)
