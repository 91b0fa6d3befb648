"""Save and load sparse autoencoders in SAELens's directory format (cfg.json +
sae_weights.safetensors), which `sae_lens.SAE.load_from_disk` reads.

Weights (float32): W_enc [d_in, d_sae], b_enc [d_sae], W_dec [d_sae, d_in], b_dec [d_in], and
threshold [d_sae] for JumpReLU. Architectures map to SAELens's inference classes:
  relu       "standard", apply_b_dec_to_input false (the LFP paper encodes x, not x - b_dec),
             W_dec written out as W_enc^T (tied)
  topk       "topk" with k
  batchtopk  "jumprelu" with every threshold equal to the learnt global one (as SAELens saves
             its own BatchTopK SAEs)
  jumprelu   "jumprelu", threshold = exp(log_threshold)
jtrust's training state (tokens since each latent fired) is not part of the format; `load`
gives inference parameters and the jtrust `SAEConfig` (kept under cfg.json's "jtrust" key, so
a file written by jtrust loads back as the same architecture).
"""

from __future__ import annotations

import json
import os
import pathlib

import jax.numpy as jnp
import numpy as np

from jtrust.analysis.sae import architectures as arch
from jtrust.analysis.sae.architectures import SAEConfig
from jtrust.core import store
from jtrust.core.errors import InputError

WEIGHTS = "sae_weights.safetensors"
CONFIG = "cfg.json"
_ARCHITECTURE = {"relu": "standard", "topk": "topk", "batchtopk": "jumprelu", "jumprelu": "jumprelu"}


def save(directory: str | os.PathLike, params: dict, config: SAEConfig, *, hook_name: str = "",
         model_name: str = "", context_size: int | None = None) -> pathlib.Path:
    """Write one SAE (unstacked parameters) to `directory` atomically; returns the directory."""
    from safetensors.numpy import save_file
    f32 = lambda a: np.ascontiguousarray(np.asarray(a, np.float32))
    weights = {"W_enc": f32(params["W_enc"]), "b_enc": f32(params["b_enc"]),
               "W_dec": f32(arch.decoder(params, config)), "b_dec": f32(params["b_dec"])}
    if config.architecture == "jumprelu":
        weights["threshold"] = f32(np.exp(params["log_threshold"]))
    if config.architecture == "batchtopk":
        weights["threshold"] = np.full(config.width, float(params["threshold"]), np.float32)
    cfg = {"architecture": _ARCHITECTURE[config.architecture], "d_in": config.d_in, "d_sae": config.width,
           "dtype": "float32", "device": "cpu", "apply_b_dec_to_input": config.architecture != "relu",
           "normalize_activations": "none", "reshape_activations": "none",
           "metadata": {"model_name": model_name, "hook_name": hook_name, "context_size": context_size,
                        "prepend_bos": False},
           "jtrust": config.to_dict()}
    if config.architecture == "topk":
        cfg["k"] = config.k
    target = pathlib.Path(directory)
    if target.exists():
        raise InputError(f"{target} already exists; save the SAE to a new directory")
    with store.atomic_dir(target) as tmp:
        save_file(weights, str(tmp / WEIGHTS))
        (tmp / CONFIG).write_text(json.dumps(cfg, indent=1))
    return target


def load(directory: str | os.PathLike) -> tuple[dict, SAEConfig]:
    """(inference parameters, SAEConfig) of an SAE directory in SAELens's format. Files from
    other tools load as the nearest jtrust architecture (standard -> untied ReLU is not one:
    refused; topk; jumprelu)."""
    from safetensors.numpy import load_file
    path = pathlib.Path(directory)
    if not (path / CONFIG).is_file() or not (path / WEIGHTS).is_file():
        raise InputError(f"{path} is not an SAE directory: it needs {CONFIG} and {WEIGHTS}")
    try:
        cfg = json.loads((path / CONFIG).read_text())
        weights = load_file(str(path / WEIGHTS))
    except Exception as e:  # JSON, OS and safetensors' own errors alike mean a damaged file
        raise InputError(f"cannot read the SAE in {path}: {e}; the files are damaged, save it again") from e
    if "jtrust" in cfg:
        config = SAEConfig(**cfg["jtrust"])
    elif cfg.get("architecture") in ("topk", "jumprelu"):
        config = SAEConfig(d_in=cfg["d_in"], width=cfg["d_sae"], architecture=cfg["architecture"],
                           k=cfg.get("k", 32))
    else:
        raise InputError(f"{path} holds a {cfg.get('architecture')!r} SAE; jtrust reads topk, jumprelu "
                         "and the SAEs it wrote itself")
    expected = {"W_enc": (config.d_in, config.width), "b_enc": (config.width,),
                "W_dec": (config.width, config.d_in), "b_dec": (config.d_in,)}
    for key, shape in expected.items():
        if key not in weights or weights[key].shape != shape:
            raise InputError(f"{path}: {key} should be {shape}, found "
                             f"{weights[key].shape if key in weights else 'nothing'}")
    params = {k: jnp.asarray(weights[k]) for k in ("W_enc", "b_enc", "b_dec")}
    if config.architecture != "relu":
        params["W_dec"] = jnp.asarray(weights["W_dec"])
    if config.architecture == "jumprelu":
        params["log_threshold"] = jnp.log(jnp.asarray(weights["threshold"]))
    if config.architecture == "batchtopk":
        params["threshold"] = jnp.asarray(weights["threshold"][0])
    if config.architecture in ("topk", "batchtopk"):
        params["tokens_since_fired"] = jnp.zeros(config.width)
    return params, config
