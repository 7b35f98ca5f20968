"""Causal self-attention (prefill, whole-sequence forward): the fused path against its jnp reference, and the
reference against the general attention over a zero-padded cache."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels.attention import attention_reference, self_attention_fused, self_attention_reference


def inputs(dtype, t=40, heads=8, kv_heads=2, d=64, seed=0):
    kq, kk, kv = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(kq, (2, t, heads, d), jnp.float32).astype(dtype)
    k = jax.random.normal(kk, (2, t, kv_heads, d), jnp.float32).astype(dtype)
    v = jax.random.normal(kv, (2, t, kv_heads, d), jnp.float32).astype(dtype)
    return q, k, v


@pytest.mark.parametrize("window", [None, 5])
def test_reference_equals_attention_over_a_padded_cache(window):
    """float32: the same arithmetic, so equal to rounding (1e-5)."""
    q, k, v = inputs(jnp.float32, seed=1)
    pad = ((0, 0), (0, 0), (0, 24), (0, 0))
    cache_k, cache_v = jnp.pad(k.transpose(0, 2, 1, 3), pad), jnp.pad(v.transpose(0, 2, 1, 3), pad)
    positions = jnp.arange(40, dtype=jnp.int32)
    expected = attention_reference(q, cache_k, cache_v, positions, jnp.arange(64, dtype=jnp.int32), scale=0.125,
                                   sliding_window=window)
    got = self_attention_reference(q, k, v, scale=0.125, sliding_window=window)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5, rtol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("window", [None, 7])
def test_gpu_fused_matches_reference_bf16(window):
    """bf16 inputs: the fused kernel accumulates in float32 in another order and rounds its probabilities to bf16
    at another point, so outputs (of magnitude ~1) agree to about 2e-2."""
    q, k, v = inputs(jnp.bfloat16, t=256, seed=2)
    expected = self_attention_reference(q, k, v, scale=0.125, sliding_window=window).astype(jnp.float32)
    got = self_attention_fused(q, k, v, scale=0.125, sliding_window=window).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=2e-2, rtol=2e-2)
