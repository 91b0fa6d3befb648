"""Interventions at named sites: each kind against its closed form, sweeps without recompiles."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jtrust
from jtrust.models.model import forward_jit
from jtrust.models.decoder import Capture, KVCache, init_cache
from helpers import random_tokens


@pytest.fixture(scope="module")
def model(tiny_checkpoints):
    return jtrust.load(tiny_checkpoints["llama"][0])


def captured(model, tokens, mask, interventions=(), site="resid_post", layer=1, pool="all"):
    out = model.apply(tokens, mask, interventions=tuple(interventions), capture=Capture((site,), pool),
                      upto_layer=layer)
    return np.asarray(out.captures[site][layer])


def test_add_at_last_position_only(model):
    tokens = random_tokens((2, 6))
    mask = np.ones_like(tokens)
    mask[1, :2] = 0  # left padding: the last real token is still position 5
    v = np.random.RandomState(1).randn(model.config.d_model).astype(np.float32)
    base = captured(model, tokens, mask)
    steered = captured(model, tokens, mask, [jtrust.at_layer(3, 1, v, 2.5, position="last")])
    expected = base.copy()
    expected[:, -1] += 2.5 * v
    np.testing.assert_allclose(steered, expected, atol=1e-4)


def test_replace_project_out_splice(model):
    tokens = random_tokens((2, 5), seed=2)
    mask = np.ones_like(tokens)
    d = model.config.d_model
    v = np.random.RandomState(3).randn(d).astype(np.float32)
    replaced = captured(model, tokens, mask, [jtrust.at_layer(3, 1, v, 1.0, kind="replace", position="all")])
    np.testing.assert_allclose(replaced, np.broadcast_to(v, replaced.shape), atol=1e-5)
    projected = captured(model, tokens, mask, [jtrust.at_layer(3, 1, v, 1.0, kind="project_out",
                                                               position="all")])
    np.testing.assert_allclose(projected @ (v / np.linalg.norm(v)), 0, atol=1e-3)
    base = captured(model, tokens, mask, site="mlp_out")
    halve = jtrust.at_layer(3, 1, np.zeros(d), 1.0, kind="splice", position="all", site="mlp_out",
                            fn=lambda p, x: x * p)
    halve = halve.replace(fn_params=jnp.float32(0.5))
    spliced = captured(model, tokens, mask, [halve], site="mlp_out")
    np.testing.assert_allclose(spliced, 0.5 * base, atol=1e-5)
    # layers with scale 0 are untouched: layer 0's output does not change
    np.testing.assert_allclose(captured(model, tokens, mask, [halve], layer=0),
                               captured(model, tokens, mask, layer=0), atol=0)


def test_strength_sweep_is_one_program(model):
    tokens = random_tokens((1, 8), seed=4)
    mask = np.ones_like(tokens)
    v = np.random.RandomState(5).randn(model.config.d_model).astype(np.float32)
    unit = jtrust.at_layer(3, 2, v, 1.0)
    loop = []
    sizes = set()
    for s in (0.0, 0.5, 4.0):
        iv = unit.replace(scales=unit.scales * s)
        loop.append(np.asarray(model.apply(tokens, mask, interventions=(iv,)).logits))
        sizes.add(forward_jit._cache_size())
    assert len(sizes) == 1
    vmapped = jax.vmap(lambda s: model.apply(tokens, mask, interventions=(
        unit.replace(scales=unit.scales * s),)).logits)(jnp.array([0.0, 0.5, 4.0]))
    np.testing.assert_allclose(np.asarray(vmapped), np.stack(loop), atol=1e-4)
    assert not np.allclose(loop[0], loop[2], atol=1e-3)


def test_cached_step_default_positions_ignore_left_padding(model):
    """A decode step with positions=None gets the position that counts real tokens only."""
    tokens = random_tokens((2, 7), seed=6)
    mask = np.ones_like(tokens)
    mask[0, :3] = 0
    full = np.asarray(model.apply(tokens, mask).logits)
    cache = init_cache(model.config, 2, 7)
    prefill_valid = np.concatenate([mask[:, :6], np.zeros((2, 1), mask.dtype)], 1)
    cache = KVCache(cache.k, cache.v, jnp.asarray(prefill_valid, bool))
    prefill = model.apply(tokens[:, :6], mask[:, :6], cache=cache, cache_index=0)
    cache = prefill.cache._replace(valid=jnp.asarray(mask, bool))
    step = model.apply(tokens[:, 6:], mask[:, 6:], cache=cache, cache_index=6)
    np.testing.assert_allclose(np.asarray(step.logits)[:, 0], full[:, 6], atol=1e-4)


def test_bad_intervention_arguments():
    with pytest.raises(ValueError, match="unknown site"):
        jtrust.at_layer(3, 0, np.zeros(4), site="resid_mid")
    with pytest.raises(ValueError, match="out of range"):
        jtrust.at_layer(3, 3, np.zeros(4))
    with pytest.raises(ValueError, match="splice"):
        jtrust.at_layer(3, 0, np.zeros(4), kind="splice")
