"""RMSNorm, computed in float32 and cast back as transformers does."""

import jax.numpy as jnp


def rms_norm_reference(x: jnp.ndarray, weight: jnp.ndarray, eps: float) -> jnp.ndarray:
    """x: [..., dim]; weight: [dim]. Returns x's dtype."""
    x32 = x.astype(jnp.float32)
    normed = x32 * jnp.reciprocal(jnp.sqrt(jnp.mean(x32 * x32, axis=-1, keepdims=True) + eps))
    return weight * normed.astype(x.dtype)
