"""Dense layers' custom backward (jtrust.models.decoder.first_order_products, used by training
steps) against JAX's own autodiff of the plain products: the loss and every gradient of a whole
decoder, float32 and bfloat16 compute."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from jtrust.models import decoder
from jtrust.models.config import ModelConfig

CONFIG = ModelConfig(family="llama", vocab_size=97, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8,
                     d_ff=48, norm="rms", norm_eps=1e-5, position="rope", rotary_dim=8, qkv_bias=True)


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5), (jnp.bfloat16, 2e-2)])
def test_gradients_equal_autodiff(dtype, tol):
    params = decoder.init_params(CONFIG, jax.random.key(0))
    tokens = jax.random.randint(jax.random.key(1), (3, 7), 0, CONFIG.vocab_size)
    mask = jnp.ones((3, 7), bool).at[0, :2].set(False)

    def loss(p):
        logits = decoder.forward(p, tokens, mask, config=CONFIG, dtype=dtype).logits
        return jnp.mean(jax.nn.log_softmax(logits)[..., 5] * mask)

    want_value, want = jax.jit(jax.value_and_grad(loss))(params)

    @jax.jit
    def custom(p):
        with decoder.first_order_products():
            return jax.value_and_grad(loss)(p)

    value, got = custom(params)
    assert float(value) == pytest.approx(float(want_value), rel=1e-6)
    scale = max(float(jnp.abs(g).max()) for g in jax.tree.leaves(want))
    for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32), atol=tol * scale,
                                   err_msg=jax.tree_util.keystr(path))
