"""Hugging Face tensor names -> jtrust parameter paths, one table per family.

Each row: (source name with `{i}` for the layer, target path, transform). Rows
with `{i}` are stacked over layers into the scanned `blocks` subtree. Every
converted tensor is checked against the shape the config implies, so a config
that does not match the checkpoint fails with the tensor's name.
"""

from __future__ import annotations

import re
from typing import Callable

import jax
import numpy as np

from jtrust.core.errors import InputError
from jtrust.models.config import ModelConfig
from jtrust.models.decoder import init_params

Transform = Callable[[np.ndarray], np.ndarray]
T = lambda w: w.T  # torch Linear stores [out, in]; Flax Dense wants [in, out]
ID = lambda w: w

# buffers some checkpoints carry that hold no learned parameters
_IGNORED = re.compile(r"(rotary_emb\.inv_freq|\d\.attn\.(masked_)?bias|\d\.attention\.(masked_)?bias)$")


def _llama(c: ModelConfig):
    rows = [
        ("model.embed_tokens.weight", ("embed", "embedding"), ID),
        ("model.norm.weight", ("final_norm", "scale"), ID),
        ("model.layers.{i}.input_layernorm.weight", ("ln1", "scale"), ID),
        ("model.layers.{i}.post_attention_layernorm.weight", ("ln2", "scale"), ID),
    ]
    for p in "qkvo":
        rows.append((f"model.layers.{{i}}.self_attn.{p}_proj.weight", ("attn", p, "kernel"), T))
    if c.qkv_bias:
        rows += [(f"model.layers.{{i}}.self_attn.{p}_proj.bias", ("attn", p, "bias"), ID) for p in "qkv"]
    if c.out_bias:
        rows.append(("model.layers.{i}.self_attn.o_proj.bias", ("attn", "o", "bias"), ID))
    for p in ("gate", "up", "down"):
        rows.append((f"model.layers.{{i}}.mlp.{p}_proj.weight", ("mlp", p, "kernel"), T))
    if not c.tie_embeddings:
        rows.append(("lm_head.weight", ("lm_head", "kernel"), T))
    return rows


def _neox_qkv(c: ModelConfig, which: int, is_bias: bool) -> Transform:
    # the fused projection is laid out per head as [H, (q|k|v), h]
    def split(w):
        w = w.reshape(c.n_heads, 3, c.head_dim, *w.shape[1:])[:, which]
        w = w.reshape(c.n_heads * c.head_dim, *w.shape[2:])
        return w if is_bias else w.T
    return split


def _gpt_neox(c: ModelConfig):
    L = "gpt_neox.layers.{i}."
    rows = [
        ("gpt_neox.embed_in.weight", ("embed", "embedding"), ID),
        ("gpt_neox.final_layer_norm.weight", ("final_norm", "scale"), ID),
        ("gpt_neox.final_layer_norm.bias", ("final_norm", "bias"), ID),
        ("lm_head.weight", ("lm_head", "kernel"), T),
    ]
    for ln, name in (("ln1", "input_layernorm"), ("ln2", "post_attention_layernorm")):
        rows += [(L + f"{name}.weight", (ln, "scale"), ID), (L + f"{name}.bias", (ln, "bias"), ID)]
    for which, p in enumerate("qkv"):
        rows.append((L + "attention.query_key_value.weight", ("attn", p, "kernel"), _neox_qkv(c, which, False)))
        rows.append((L + "attention.query_key_value.bias", ("attn", p, "bias"), _neox_qkv(c, which, True)))
    for src, dst in (("attention.dense", ("attn", "o")), ("mlp.dense_h_to_4h", ("mlp", "up")),
                     ("mlp.dense_4h_to_h", ("mlp", "down"))):
        rows += [(L + src + ".weight", dst + ("kernel",), T), (L + src + ".bias", dst + ("bias",), ID)]
    return rows


def _gpt2(c: ModelConfig):
    L = "transformer.h.{i}."
    d = c.d_model
    rows = [
        ("transformer.wte.weight", ("embed", "embedding"), ID),
        ("transformer.wpe.weight", ("pos_embed", "embedding"), ID),
        ("transformer.ln_f.weight", ("final_norm", "scale"), ID),
        ("transformer.ln_f.bias", ("final_norm", "bias"), ID),
    ]
    for ln, name in (("ln1", "ln_1"), ("ln2", "ln_2")):
        rows += [(L + f"{name}.weight", (ln, "scale"), ID), (L + f"{name}.bias", (ln, "bias"), ID)]
    for which, p in enumerate("qkv"):  # Conv1D stores [in, out] with out = q|k|v
        sl = slice(which * d, (which + 1) * d)
        rows.append((L + "attn.c_attn.weight", ("attn", p, "kernel"), lambda w, sl=sl: w[:, sl]))
        rows.append((L + "attn.c_attn.bias", ("attn", p, "bias"), lambda w, sl=sl: w[sl]))
    for src, dst in (("attn.c_proj", ("attn", "o")), ("mlp.c_fc", ("mlp", "up")),
                     ("mlp.c_proj", ("mlp", "down"))):
        rows += [(L + src + ".weight", dst + ("kernel",), ID), (L + src + ".bias", dst + ("bias",), ID)]
    return rows


TABLES = {"llama": _llama, "gpt_neox": _gpt_neox, "gpt2": _gpt2}


def normalise_names(tensors: dict[str, np.ndarray], family: str) -> dict[str, np.ndarray]:
    """Accept checkpoints saved from the bare model class (no `model.` / `transformer.` prefix)."""
    prefix = {"llama": "model.", "gpt_neox": "gpt_neox.", "gpt2": "transformer."}[family]
    out = {}
    for name, w in tensors.items():
        if _IGNORED.search(name):
            continue
        if name == "embed_out.weight":  # Pythia's name before transformers 5
            name = "lm_head.weight"
        if not name.startswith(prefix) and name != "lm_head.weight":
            name = prefix + name
        out[name] = w
    return out


def hf_to_params(tensors: dict[str, np.ndarray], config: ModelConfig, source: str = "checkpoint"):
    """Convert HF-named float arrays to the jtrust pytree (float32 numpy), checking every shape.

    Raises InputError (a ValueError) naming `source` and the tensor when something is missing,
    unexpected or of the wrong shape. Finiteness is checked where tensors are read
    (`jtrust.io.raw.check_finite`, by the GGUF and Hugging Face readers).
    """
    tensors = normalise_names(tensors, config.family)
    if config.tie_embeddings:  # some writers keep the tied copy; the embedding is the source of truth
        tensors.pop("lm_head.weight", None)
    expected = jax.eval_shape(lambda: init_params(config, jax.random.key(0)))
    params: dict = {}
    used = set()
    for src, path, fn in TABLES[config.family](config):
        layers = range(config.n_layers) if "{i}" in src else [None]
        stacked = []
        for i in layers:
            name = src.format(i=i)
            if name not in tensors:
                raise InputError(f"{source}: tensor {name!r} is missing (does the config match "
                                 f"the weights? expected a {config.family} model with "
                                 f"{config.n_layers} layers)")
            used.add(name)
            raw = np.asarray(tensors[name])
            try:
                stacked.append(np.asarray(fn(raw), np.float32))
            except (ValueError, IndexError, TypeError) as err:  # a reshape the shape cannot take
                raise InputError(f"{source}: tensor {name!r} has shape {raw.shape}, which does not "
                                 f"fit the {config.family} config ({err}); the config does not "
                                 "match the weights") from None
        odd = next((i for i, w in enumerate(stacked) if w.shape != stacked[0].shape), None)
        if odd is not None:
            raise InputError(f"{source}: tensor {src.format(i=odd)!r} has shape {stacked[odd].shape} "
                             f"after conversion but {src.format(i=0)!r} has {stacked[0].shape}; "
                             "every layer must have the same shapes")
        value = stacked[0] if layers == [None] else np.stack(stacked)
        full = ("blocks",) + path if "{i}" in src else path
        want = tree_get(expected, full).shape
        if value.shape != tuple(want):
            raise InputError(f"{source}: tensor {src.format(i=0)!r} has shape {value.shape} after "
                             f"conversion but the config implies {tuple(want)}; the config does not "
                             "match the weights")
        tree_set(params, full, value)
    unexpected = sorted(set(tensors) - used)
    if unexpected:
        raise InputError(f"{source}: {len(unexpected)} tensors the {config.family} config does not "
                         f"account for, e.g. {unexpected[:3]}; the config does not match the weights")
    return params


def tree_get(tree, path):
    for p in path:
        tree = tree[p]
    return tree


def tree_set(tree, path, value):
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value
