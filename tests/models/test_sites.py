"""Activation sites as data and output taps, against transformers hooks on the tiny checkpoints.

Every linear layer's input (a site, `sites.LINEAR_INPUTS`) is compared with a forward pre-hook
on the torch module, and its output gradient (`jax.grad` wrt zero taps) with the gradient torch
retains on the module's output. GPT-2 and NeoX fuse q, k, v into one module whose output is
split here the way transformers splits it.
"""

from __future__ import annotations

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import jtrust
from helpers import random_tokens
from jtrust.models import sites
from jtrust.models.decoder import Capture, forward, zero_taps
from jtrust.models.interventions import SITES, Intervention, at_layer
from jtrust.models.lora import PROJECTIONS

FAMILIES = ("llama", "gpt2", "gpt_neox")
B, T = 2, 7

# torch module under a block -> the jtrust linear layers it computes (fused ones in output order)
TORCH_LINEARS = {
    "llama": {"self_attn.q_proj": ("q",), "self_attn.k_proj": ("k",), "self_attn.v_proj": ("v",),
              "self_attn.o_proj": ("o",), "mlp.gate_proj": ("gate",), "mlp.up_proj": ("up",),
              "mlp.down_proj": ("down",)},
    "gpt2": {"attn.c_attn": ("q", "k", "v"), "attn.c_proj": ("o",), "mlp.c_fc": ("up",),
             "mlp.c_proj": ("down",)},
    "gpt_neox": {"attention.query_key_value": ("q", "k", "v"), "attention.dense": ("o",),
                 "mlp.dense_h_to_4h": ("up",), "mlp.dense_4h_to_h": ("down",)},
}


def torch_blocks(torch_model):
    family = torch_model.config.model_type
    return {"llama": lambda m: m.model.layers, "gpt2": lambda m: m.transformer.h,
            "gpt_neox": lambda m: m.gpt_neox.layers}[family](torch_model)


def split_fused(family: str, names: tuple[str, ...], out: np.ndarray, n_heads: int) -> dict:
    """A fused module's output [..., 3 H h] -> {q, k, v: [..., H h]} (as transformers splits it)."""
    if len(names) == 1:
        return {names[0]: out}
    if family == "gpt2":  # Conv1D output is q | k | v
        return dict(zip(names, np.split(out, 3, axis=-1)))
    per_head = out.reshape(*out.shape[:-1], n_heads, 3, -1)  # NeoX: [H, (q|k|v), h]
    return {n: per_head[..., i, :].reshape(*out.shape[:-1], -1) for i, n in enumerate(names)}


def torch_inputs_and_grads(torch_model, tokens: np.ndarray, weights: np.ndarray):
    """Per linear layer: its input [L, B, T, d_in] (pre-hook) and dL/d(output) [L, B, T, d_out]
    for loss = sum(logits * weights), from one forward and backward of the torch model."""
    family = torch_model.config.model_type
    inputs, outputs, handles = {}, {}, []
    for block in torch_blocks(torch_model):
        for path, names in TORCH_LINEARS[family].items():
            module = block.get_submodule(path)
            handles.append(module.register_forward_pre_hook(
                lambda m, args, names=names: inputs.setdefault(names, []).append(args[0].detach())))

            def keep(m, args, out, names=names):
                out.retain_grad()  # a non-leaf: torch drops its gradient unless asked
                outputs.setdefault(names, []).append(out)
            handles.append(module.register_forward_hook(keep))
    try:
        logits = torch_model(torch.tensor(tokens, dtype=torch.long)).logits
        (logits * torch.tensor(weights)).sum().backward()
    finally:
        for h in handles:
            h.remove()
        torch_model.zero_grad(set_to_none=True)
    n_heads = torch_model.config.num_attention_heads
    x_in, g_out = {}, {}
    for names in inputs:
        stack = lambda ts: np.stack([t.numpy() for t in ts])
        grads = split_fused(family, names, stack([o.grad for o in outputs[names]]), n_heads)
        for name in names:
            x_in[name] = stack(inputs[names])
            g_out[name] = grads[name]
    return logits.detach().numpy(), x_in, g_out


@pytest.fixture(scope="module")
def models(tiny_checkpoints):
    """family -> (jtrust Model, torch model)."""
    return {f: (jtrust.load(str(tiny_checkpoints[f][0])), tiny_checkpoints[f][1]) for f in FAMILIES}


def jtrust_inputs_and_grads(model, tokens: np.ndarray, weights: np.ndarray):
    """Logits, every site (pool "all", [L, B, T, w]) and dL/d(taps) in one compiled program."""
    config = model.config
    mask = np.ones_like(tokens)

    def loss(taps):
        out = forward(model.params, tokens, mask, config=config, capture=Capture(SITES, "all"),
                      taps=taps)
        return jnp.sum(out.logits * weights), (out.logits, out.captures)

    grads, (logits, captures) = jax.jit(jax.grad(loss, has_aux=True))(zero_taps(config, *tokens.shape))
    return np.asarray(logits), jax.tree.map(np.asarray, captures), jax.tree.map(np.asarray, grads)


def close(got, want, rtol=1e-4, **kw):
    """float32 agreement relative to the array's scale (gradients are not O(1))."""
    chex.assert_trees_all_close(got, want, rtol=rtol, atol=rtol * float(np.abs(want).max()), **kw)


@pytest.mark.parametrize("family", FAMILIES)
def test_linear_inputs_and_output_gradients_match_torch(models, family):
    model, torch_model = models[family]
    config = model.config
    tokens = random_tokens((B, T), seed=3)
    weights = np.random.RandomState(4).randn(B, T, config.vocab_size).astype(np.float32)
    t_logits, t_inputs, t_grads = torch_inputs_and_grads(torch_model, tokens, weights)
    logits, captures, grads = jtrust_inputs_and_grads(model, tokens, weights)
    close(logits, t_logits)  # zero taps leave the model as it was
    L = config.n_layers
    assert set(captures) == set(SITES)  # the decoder emits every registered site
    for site in SITES:
        chex.assert_shape(captures[site], (L, B, T, sites.width(site, config)))
    assert set(grads) == set(sites.linears(config)) == {n for ns in TORCH_LINEARS[family].values() for n in ns}
    for name in sites.linears(config):
        chex.assert_shape(grads[name], (L, B, T, sites.linear_width(name, config)))
        close(captures[sites.LINEAR_INPUTS[name]], t_inputs[name],
              custom_message=f"{family}: input of {name} ({sites.LINEAR_INPUTS[name]})")
        close(grads[name], t_grads[name], custom_message=f"{family}: output gradient of {name}")


def test_capture_pools_any_width_with_padding(models):
    """last / mean pooling of d_ff- and H*h-wide sites on a left-padded batch vs unpadded torch rows."""
    model, torch_model = models["llama"]
    tokens = random_tokens((B, T), seed=5)
    mask = np.ones_like(tokens)
    mask[1, :3] = 0  # row 1 has 4 real tokens, left padded
    rows = [tokens[b][mask[b].astype(bool)] for b in range(B)]
    oracle = [torch_inputs_and_grads(torch_model, r[None], np.zeros((1, len(r), 300), np.float32))[1]
              for r in rows]
    pick = {"mlp_hidden": "down", "attn_heads": "o"}
    for pool, reduce in (("last", lambda x: x[:, -1]), ("mean", lambda x: x.mean(1))):
        out = model.apply(tokens, mask, capture=Capture(tuple(pick), pool), logits=False)
        for site, linear in pick.items():
            chex.assert_shape(out.captures[site], (3, B, sites.width(site, model.config)))
            want = np.stack([reduce(o[linear][:, 0]) for o in oracle], axis=1)  # [L, B, w]
            close(np.asarray(out.captures[site]), want, custom_message=f"{pool} {site}")


@pytest.mark.parametrize("family, site, module, position", [
    ("llama", "mlp_hidden", "mlp.down_proj", "all"),
    ("gpt2", "attn_heads", "attn.c_proj", "last"),
])
def test_intervention_at_a_linear_input_matches_a_torch_pre_hook(models, family, site, module, position):
    model, torch_model = models[family]
    layer, strength = 1, 1.5
    v = np.random.RandomState(6).randn(sites.width(site, model.config)).astype(np.float32)
    tokens = random_tokens((B, T), seed=7)
    iv = at_layer(model.config.n_layers, layer, v, strength, site=site, position=position)
    got = np.asarray(model.apply(tokens, np.ones_like(tokens), interventions=(iv,)).logits)

    def add(m, args):
        delta = torch.tensor(strength * v)
        if position == "last":
            delta = torch.zeros(T, len(v)).index_fill(0, torch.tensor([T - 1]), 1) * delta
        return (args[0] + delta,) + args[1:]
    handle = torch_blocks(torch_model)[layer].get_submodule(module).register_forward_pre_hook(add)
    try:
        with torch.no_grad():
            want = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    finally:
        handle.remove()
    close(got, want)
    with torch.no_grad():
        base = torch_model(torch.tensor(tokens, dtype=torch.long)).logits.numpy()
    assert np.abs(want - base).max() > 1e-2  # the edit is visible, so the match means something


@pytest.mark.parametrize("family", FAMILIES)
def test_registry_agrees_with_the_parameters(models, family):
    """Each linear layer's kernel is [L, width(LINEAR_INPUTS[name]), linear_width(name)]."""
    config = models[family][0].config
    params = models[family][0].params
    assert set(SITES) == set(sites.SITES) and set(sites.RESIDUAL_SITES) <= set(SITES)
    assert set(sites.LINEAR_INPUTS) == set(PROJECTIONS)
    for name in sites.linears(config):
        group, proj = PROJECTIONS[name]
        chex.assert_shape(params["blocks"][group][proj]["kernel"],
                          (config.n_layers, sites.width(sites.LINEAR_INPUTS[name], config),
                           sites.linear_width(name, config)))
    assert ("gate" in sites.linears(config)) == (config.mlp == "swiglu")


def test_taps_with_upto_layer_and_bad_arguments(models):
    model = models["llama"][0]
    config = model.config
    tokens = random_tokens((1, 4), seed=8)
    mask = np.ones_like(tokens)
    zero = zero_taps(config, 1, 4, names=("o",))
    beyond = {"o": zero["o"].at[2].set(1.0)}  # a tap on layer 2, which upto_layer=1 never runs
    run = lambda taps: model.apply(tokens, mask, capture=Capture(("resid_post",), "all"), upto_layer=1,
                                   taps=taps)
    out, ref = run(beyond), run(zero)  # one program: the taps differ only in values
    chex.assert_trees_all_close(out.captures, ref.captures, atol=0)
    chex.assert_shape(out.captures["resid_post"], (2, 1, 4, config.d_model))
    with pytest.raises(ValueError, match="no linear layer 'proj'"):
        model.apply(tokens, mask, taps={"proj": jnp.zeros((3, 1, 4, 64))})
    with pytest.raises(ValueError, match=r"expected \(3, 1, 4, 64\)"):
        model.apply(tokens, mask, taps={"o": jnp.zeros((2, 1, 4, 64))})
    gpt2 = models["gpt2"][0].config
    with pytest.raises(ValueError, match="no linear layer 'gate'"):
        zero_taps(gpt2, 1, 4, names=("gate",))
    with pytest.raises(ValueError, match="unknown site"):
        Capture(("mlp_act",))
    with pytest.raises(ValueError, match="width 64 but the site's activations have width 96"):
        model.apply(tokens, mask, interventions=(at_layer(3, 0, np.ones(64), site="mlp_hidden"),))
    assert isinstance(at_layer(3, 0, np.ones(96), site="mlp_hidden"), Intervention)
