"""Pallas kernels for jtrust, each beside a plain jax.numpy reference with the same signature."""
