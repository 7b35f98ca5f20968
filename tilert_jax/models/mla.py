"""Multi-head latent attention (DeepSeek V2 / V3) and the lightning indexer of DeepSeek Sparse Attention (V3.2).

Per token the cache stores only the compressed latent (kv_lora_rank, after its RMSNorm) and the shared rope key
(qk_rope_head_dim), side by side in one buffer [B, max_len, kv_lora_rank + qk_rope_head_dim], plus for V3.2 the
indexer's key [B, max_len, index_head_dim].

Two equivalent forms of the attention:
- expanded (the whole-sequence forward, no cache): kv_b_proj turns each latent into per-head keys and values, as
  transformers does;
- absorbed (prefill and decode over the cache): W_UK is folded into the query and W_UV applied after the weighted sum,
  so scores are `[q_nope @ W_UK, q_pe] . [latent, k_pe]` and the values are the latents themselves.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def attend_expanded(q: jnp.ndarray,  # [B, T, H, dn + dr]
                    k: jnp.ndarray,  # [B, S, H, dn + dr]
                    v: jnp.ndarray,  # [B, S, H, dv]
                    visible: jnp.ndarray,  # [B or 1, T, S] bool
                    scale: float) -> jnp.ndarray:  # [B, T, H, dv]
    scores = jnp.einsum("bthd,bshd->bhts", q, k, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(v.dtype)
    return jnp.einsum("bhts,bshd->bthd", probs, v, preferred_element_type=jnp.float32).astype(v.dtype)


def attend_latent(q: jnp.ndarray,  # [B, T, H, r + dr]: [q_nope @ W_UK, q_pe]
                  kv: jnp.ndarray,  # [B, S, r + dr]: [latent, k_pe] per cached token
                  visible: jnp.ndarray,  # [B or 1, T, S] bool
                  scale: float, kv_lora_rank: int) -> jnp.ndarray:  # [B, T, H, r] (latent-space output)
    scores = jnp.einsum("bthc,bsc->bhts", q, kv, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(kv.dtype)
    return jnp.einsum("bhts,bsr->bthr", probs, kv[..., :kv_lora_rank],
                      preferred_element_type=jnp.float32).astype(kv.dtype)


def attend_latent_selected(q: jnp.ndarray,  # [B, T, H, r + dr]
                           kv: jnp.ndarray,  # [B, S, r + dr]
                           index: jnp.ndarray,  # [B, T, K] int32: the cached tokens each query attends to
                           visible: jnp.ndarray,  # [B, T, K] bool
                           scale: float, kv_lora_rank: int) -> jnp.ndarray:  # [B, T, H, r]
    """Sparse attention: only the K selected tokens of each query are gathered and read."""
    batch, t, k = index.shape
    selected = jnp.take_along_axis(kv, index.reshape(batch, t * k, 1), axis=1).reshape(batch, t, k, kv.shape[-1])
    scores = jnp.einsum("bthc,btkc->bhtk", q, selected, preferred_element_type=jnp.float32) * scale
    scores = jnp.where(visible[:, None], scores, -jnp.inf)
    probs = jax.nn.softmax(scores, axis=-1).astype(kv.dtype)
    return jnp.einsum("bhtk,btkr->bthr", probs, selected[..., :kv_lora_rank],
                      preferred_element_type=jnp.float32).astype(kv.dtype)


def layer_norm(x: jnp.ndarray, weight: jnp.ndarray, bias: jnp.ndarray, eps: float) -> jnp.ndarray:
    """torch.nn.LayerNorm over the last axis (float32 statistics, x's dtype out)."""
    x32 = x.astype(jnp.float32)
    mean = jnp.mean(x32, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(x32 - mean), axis=-1, keepdims=True)
    normed = (x32 - mean) * jax.lax.rsqrt(var + eps)
    return (normed * weight.astype(jnp.float32) + bias.astype(jnp.float32)).astype(x.dtype)


def index_scores(q: jnp.ndarray,  # [B, T, Hi, Di] indexer queries (rope applied)
                 k: jnp.ndarray,  # [B, S, Di] indexer keys (cached)
                 head_weights: jnp.ndarray,  # [B, T, Hi] float32, already times Hi ** -0.5
                 visible: jnp.ndarray,  # [B or 1, T, S] bool (causal)
                 ) -> jnp.ndarray:  # [B, T, S] float32, -inf where not visible
    """The lightning indexer: sum_h w[t, h] * relu(q[t, h] . k[s] / sqrt(Di)), in float32."""
    scale = q.shape[-1] ** -0.5
    per_head = jnp.einsum("bthd,bsd->bths", q.astype(jnp.float32), k.astype(jnp.float32),
                          preferred_element_type=jnp.float32) * scale
    scores = jnp.einsum("bth,bths->bts", head_weights, jax.nn.relu(per_head))
    return jnp.where(visible, scores, -jnp.inf)


def select_top(scores: jnp.ndarray,  # [B, T, S] float32
               topk: int) -> jnp.ndarray:  # [B, T, min(topk, S)] int32
    return jax.lax.top_k(scores, min(topk, scores.shape[-1]))[1].astype(jnp.int32)


def selection_mask(index: jnp.ndarray,  # [B, T, K] int32
                   length: int) -> jnp.ndarray:  # [B, T, length] bool: True at the selected tokens
    batch, t, _ = index.shape
    mask = jnp.zeros((batch, t, length), bool)
    b = jnp.arange(batch)[:, None, None]
    q = jnp.arange(t)[None, :, None]
    return mask.at[b, q, index].set(True)
