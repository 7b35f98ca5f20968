"""Causal grouped-query attention of new queries against a key/value sequence (a cache or the sequence itself)."""

import jax
import jax.numpy as jnp


def attention_reference(
    q: jnp.ndarray,  # [B, T, num_heads, head_dim]
    k: jnp.ndarray,  # [B, num_kv_heads, S, head_dim]
    v: jnp.ndarray,  # [B, num_kv_heads, S, head_dim_v]
    q_pos: jnp.ndarray,  # [T] int32: the position of each query
    k_pos: jnp.ndarray,  # [S] int32: the position of each key (a key at a later position than a query is masked)
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jnp.ndarray:  # [B, T, num_heads, head_dim_v]
    """Scores and softmax in float32, probabilities cast to v's dtype before the weighted sum (as transformers)."""
    batch, t, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    groups = num_heads // num_kv_heads
    q = q.reshape(batch, t, num_kv_heads, groups, head_dim)
    scores = jnp.einsum("btkgd,bksd->bkgts", q, k, preferred_element_type=jnp.float32) * scale
    visible = k_pos[None, :] <= q_pos[:, None]  # [T, S]
    if sliding_window is not None:
        visible &= k_pos[None, :] > q_pos[:, None] - sliding_window
    scores = jnp.where(visible, scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    out = jnp.einsum("bkgts,bksd->btkgd", probs, v, preferred_element_type=jnp.float32)
    return out.reshape(batch, t, num_heads, v.shape[-1]).astype(v.dtype)



def self_attention_reference(
    q: jnp.ndarray,  # [B, T, num_heads, head_dim]
    k: jnp.ndarray,  # [B, T, num_kv_heads, head_dim]: the keys of the same T tokens
    v: jnp.ndarray,  # [B, T, num_kv_heads, head_dim]
    *,
    scale: float,
    sliding_window: int | None = None,
) -> jnp.ndarray:  # [B, T, num_heads, head_dim]
    """Causal attention of a sequence over itself (a prompt's prefill, the whole-sequence forward)."""
    positions = jnp.arange(q.shape[1], dtype=jnp.int32)
    return attention_reference(q, k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3), positions, positions,
                               scale=scale, sliding_window=sliding_window)


def self_attention_fused(q, k, v, *, scale: float, sliding_window: int | None = None) -> jnp.ndarray:
    """self_attention_reference fused by cuDNN (flash attention: no [T, T] score matrix in memory) on a GPU in 16-bit
    floats; elsewhere the reference. Shapes as self_attention_reference."""
    if jax.default_backend() != "gpu" or q.dtype not in (jnp.bfloat16, jnp.float16):
        return self_attention_reference(q, k, v, scale=scale, sliding_window=sliding_window)
    window = None if sliding_window is None else (sliding_window - 1, 0)
    return jax.nn.dot_product_attention(q, k, v, scale=scale, is_causal=True, local_window_size=window,
                                        implementation="cudnn")
