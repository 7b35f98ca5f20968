"""DeepSeek-V3.2's lightning indexer at decode: one query token's score for every cached token,

    score[s] = sum_h w[h] * relu(q[h] . k[s] / sqrt(Di))    for s <= pos, -inf past pos,

read in one pass over the index-key cache. XLA's einsum writes the float32 [heads, S] products to memory and reads
them back for the weighted sum; here each program holds them in registers for its block of cached tokens (a
16-row tensor-core dot per block: every index head against the block's keys) and writes the block's S scores only.
Blocks wholly past pos read nothing. The top-k selection over the scores stays XLA's (`jax.lax.top_k`).

Lowering: Triton, as the decode attention kernels: one query row per head, masked blocks of the cache.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import NT, ROWS, dot, interpret_default, is_pow2, load_rows, next_pow2, triton_params

f32 = jnp.float32


def index_scores_reference(
    q: jax.Array,  # [B, Hi, Di] the token's indexer queries (rope applied)
    k: jax.Array,  # [B, S, Di] the index-key cache
    head_weights: jax.Array,  # [B, Hi] float32, already times Hi ** -0.5
    pos: jax.Array,  # int32 scalar: the token's position (keys at 0..pos count)
) -> jax.Array:  # [B, S] float32
    scale = q.shape[-1] ** -0.5
    per_head = jnp.einsum("bhd,bsd->bhs", q.astype(f32), k.astype(f32), preferred_element_type=f32) * scale
    scores = jnp.einsum("bh,bhs->bs", head_weights, jax.nn.relu(per_head))
    return jnp.where(jnp.arange(k.shape[1])[None, :] <= pos, scores, -jnp.inf)


def _kernel(q_ref, k_ref, w_ref, pos_ref, o_ref, *, heads, rows, bs, scale, dtype, interpret):
    b, j = pl.program_id(0), pl.program_id(1)
    s0 = pl.multiple_of(j * bs, bs)
    pos = pos_ref[0]
    window = o_ref.at[pl.ds(b, 1), pl.ds(s0, bs)]  # [1, bs]

    @pl.when(s0 <= pos)
    def _():
        q = load_rows(q_ref.at[b, pl.ds(0, rows), :], heads).astype(dtype)  # [rows, Di]
        keys = plt.load(k_ref.at[b, pl.ds(s0, bs), :], eviction_policy="evict_first").astype(dtype)  # [bs, Di]
        per_head = jnp.maximum(dot(q, keys, NT, interpret) * scale, 0.0)  # [rows, bs]
        weights = load_rows(w_ref.at[b, pl.ds(0, rows), :], heads).astype(f32)  # [rows, 1], 0 past the heads
        scores = jnp.sum(per_head * weights, axis=0, keepdims=True)  # [1, bs]
        cols = s0 + lax.broadcasted_iota(jnp.int32, (1, bs), 1)
        plt.store(window, jnp.where(cols <= pos, scores, -jnp.inf))

    @pl.when(s0 > pos)
    def _():
        plt.store(window, jnp.full((1, bs), -jnp.inf, f32))


def supported(length: int, head_dim: int) -> bool:
    """The shapes the kernel tiles: a power-of-2 head size (at least 16 on a GPU) and a cache length in blocks of
    16."""
    return is_pow2(head_dim) and (interpret_default() or head_dim >= ROWS) and length % ROWS == 0


def index_scores(
    q: jax.Array,  # [B, Hi, Di]
    k: jax.Array,  # [B, S, Di]
    head_weights: jax.Array,  # [B, Hi] float32
    pos: jax.Array,  # int32 scalar
    *,
    bs: int = 64,  # cached tokens per program (halved until it divides the cache length)
    num_warps: int = 4,
    interpret: bool | None = None,
) -> jax.Array:  # [B, S] float32
    """See index_scores_reference; the launch is described at the top of this file."""
    batch, heads, di = q.shape
    length = k.shape[1]
    if k.shape != (batch, length, di) or head_weights.shape != (batch, heads):
        raise ValueError(f"shapes q {q.shape}, k {k.shape}, head_weights {head_weights.shape} do not form one "
                         "indexer step")
    while bs > ROWS and length % bs:
        bs //= 2
    if not (is_pow2(bs) and length % bs == 0 and supported(length, di)):
        raise ValueError(f"index_head_dim ({di}) must be a power of 2 and the cache length ({length}) a multiple of "
                         f"{ROWS}")
    interpret = interpret_default() if interpret is None else interpret
    rows = max(ROWS, next_pow2(heads))
    dtype = jnp.promote_types(q.dtype, k.dtype)
    return pl.pallas_call(
        lambda *refs: _kernel(*refs, heads=heads, rows=rows, bs=bs, scale=di ** -0.5, dtype=dtype,
                              interpret=interpret),
        out_shape=jax.ShapeDtypeStruct((batch, length), f32),
        grid=(batch, length // bs),
        compiler_params=triton_params(num_warps, 2),
        interpret=interpret,
        name="index_scores",
    )(q, k, head_weights.astype(f32)[..., None], jnp.reshape(pos, (1,)).astype(jnp.int32))
