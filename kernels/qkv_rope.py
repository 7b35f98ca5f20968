"""A sequence's Q/K/V projection with everything after it in the same launch: the biases (Qwen2.5), the q/k RMSNorm
(Qwen3), rope on q and k, and the new keys and values written into the cache in place (a prompt's prefill).

On XLA's path these are three cuBLAS products and six small kernels a layer, each followed by a ~1.5 us gap
(llama-3.2-1b at 1024 tokens: Q 14.4 us, K and V 6.3 each, the ropes 2.7 + 2.2, the cache transposes 2.0 each;
docs/PERF.md, session 22).

The grid is (batch, token block, head) over the heads of q, k and v, heads fastest (the programs that run together
share their token block's rows in L2). A program computes one [block_t, width] tile over the whole hidden
dimension: one key or value head (width head_dim: its cache write is one [block_t, head_dim] store, its k norm a
reduction over the tile's rows), or `q_heads` query heads side by side (a wider tile feeds the tensor cores better
at head_dim 64). Rope without slicing registers: rotate_half(y) = y @ R for the block-diagonal signed permutation R
[width, width] (`rotate_half_matrix`), one tensor-core dot of y rounded to the model dtype; a column of R holds a
single +-1, so the product is exact.

Lowering: Triton. Its pipeliner streams the [block_t, block_k] and [width, block_k] tiles through shared memory
into the tensor cores over a loop; Mosaic GPU was not measured.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax import cache as kv
from tilert_jax.kernels.common import NN, NT, dot, interpret_default, is_pow2, row_mask, triton_params
from tilert_jax.kernels.rms_norm import rms_norm_reference
from tilert_jax.rope import apply_rope

f32 = jnp.float32


def qkv_rope_reference(
    x: jax.Array,  # [B, T, hidden] (normed)
    wq: jax.Array,  # [n, d, hidden]
    wk: jax.Array,  # [kvh, d, hidden]
    wv: jax.Array,  # [kvh, d, hidden]
    cos: jax.Array,  # [T, d] rope table at the tokens' positions (in the model dtype)
    sin: jax.Array,  # [T, d]
    caches: tuple[jax.Array, jax.Array] | None = None,  # k, v [B, kvh, max_len, d]
    pos: jax.Array | int = 0,  # int32 scalar: the first token's position (its cache row)
    *,
    eps: float = 1e-6,
    bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,  # bq [n, d], bk [kvh, d], bv [kvh, d]
    qk_norm: tuple[jax.Array, jax.Array] | None = None,  # q_norm [d], k_norm [d]
):
    """-> q [B, T, n, d], k [B, T, kvh, d], v [B, T, kvh, d] (q and k normed and roped), and the caches with k and v
    written at rows pos..pos+T-1 (None without caches)."""
    q, k, v = (jnp.einsum("bth,ndh->btnd", x, w) for w in (wq, wk, wv))
    if bias is not None:
        q, k, v = q + bias[0], k + bias[1], v + bias[2]
    if qk_norm is not None:
        q, k = rms_norm_reference(q, qk_norm[0], eps), rms_norm_reference(k, qk_norm[1], eps)
    q, k = apply_rope(q, cos[None], sin[None]), apply_rope(k, cos[None], sin[None])
    if caches is not None:
        caches = (kv.write(caches[0], k, pos), kv.write(caches[1], v, pos))
    return q, k, v, caches


def rotate_half_matrix(head_dim: int, dtype, heads: int = 1) -> jax.Array:
    """R [heads d, heads d] with y @ R = rotate_half(y) = concat(-y[d/2:], y[:d/2]) for each head's d columns of a row
    y (block-diagonal: its top-left [d, d] block serves one head)."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return jnp.asarray(np.kron(np.eye(heads, dtype=np.float32), r), dtype)


def _kernel(*refs, seq, hidden, head_dim, q_programs, kv_heads, block_t, block_k, q_width, has_bias, qk_norm,
            has_cache, eps, dtype, interpret):
    it = iter(refs)
    x_ref, wq_ref, wk_ref, wv_ref = next(it), next(it), next(it), next(it)  # wq [n / q_heads, q_width, hidden]
    bias_refs = (next(it), next(it), next(it)) if has_bias else (None,) * 3  # bq [n / q_heads, q_width]
    norm_refs = (next(it), next(it)) if qk_norm else (None,) * 2
    cos_ref, sin_ref, rot_ref = next(it), next(it), next(it)  # [T, q_width] (tiled per head), [q_width, q_width]
    if has_cache:
        pos_ref = next(it)
        next(it), next(it)  # the caches as inputs: aliased to the cache outputs
    q_out, k_out, v_out = next(it), next(it), next(it)  # q_out [B, T, n / q_heads, q_width]
    cache_outs = (next(it), next(it)) if has_cache else None
    b, t0, j = pl.program_id(0), pl.program_id(1) * block_t, pl.program_id(2)
    tokens = seq - t0  # rows of this block that hold tokens (the last block may be partial)
    partial = seq % block_t != 0

    def load(ref, cols):
        if not partial:
            return plt.load(ref)
        return plt.load(ref, mask=row_mask(block_t, cols, tokens), other=0)

    def store(ref, value, valid):
        plt.store(ref, value, mask=row_mask(block_t, value.shape[1], valid))

    def project(w_ref, h, width):  # -> float32 [block_t, width]: x rows @ w[h]^T
        def step(i, acc):
            k0 = pl.multiple_of(i * block_k, block_k)
            xs = load(x_ref.at[b, pl.ds(t0, block_t), pl.ds(k0, block_k)], block_k)
            return acc + dot(xs, plt.load(w_ref.at[h, pl.ds(0, width), pl.ds(k0, block_k)]), NT, interpret)

        return lax.fori_loop(0, hidden // block_k, step, jnp.zeros((block_t, width), f32))

    def finish(which, w_ref, h, width):  # which: 0 q, 1 k, 2 v -> dtype [block_t, width], rounded as the reference
        y = project(w_ref, h, width).astype(dtype)
        if bias_refs[which] is not None:
            y = y + plt.load(bias_refs[which].at[h, pl.ds(0, width)])[None, :]
        if which < 2 and norm_refs[which] is not None:  # (one head a program: width == head_dim)
            y32 = y.astype(f32)
            rinv = 1.0 / jnp.sqrt(jnp.sum(y32 * y32, axis=1, keepdims=True) / head_dim + eps)
            y = (y32 * rinv).astype(dtype) * plt.load(norm_refs[which].at[pl.ds(0, head_dim)])[None, :]
        if which < 2:
            rotated = dot(y, plt.load(rot_ref.at[pl.ds(0, width), pl.ds(0, width)]), NN, interpret)
            cos = load(cos_ref.at[pl.ds(t0, block_t), pl.ds(0, width)], width).astype(f32)
            sin = load(sin_ref.at[pl.ds(t0, block_t), pl.ds(0, width)], width).astype(f32)
            y = y.astype(f32) * cos + rotated * sin
        return y.astype(dtype)

    def key_or_value(which, w_ref, out, h):
        y = finish(which, w_ref, h, head_dim)
        store(out.at[b, pl.ds(t0, block_t), h, pl.ds(0, head_dim)], y, tokens)
        if has_cache:
            cache, row = cache_outs[which - 1], pos_ref[0] + t0
            store(cache.at[b, h, pl.ds(row, block_t), pl.ds(0, head_dim)], y, jnp.minimum(tokens, cache.shape[2] - row))

    @pl.when(j < q_programs)
    def _():
        store(q_out.at[b, pl.ds(t0, block_t), j, pl.ds(0, q_width)], finish(0, wq_ref, j, q_width), tokens)

    @pl.when((j >= q_programs) & (j < q_programs + kv_heads))
    def _():
        key_or_value(1, wk_ref, k_out, j - q_programs)

    @pl.when(j >= q_programs + kv_heads)
    def _():
        key_or_value(2, wv_ref, v_out, j - q_programs - kv_heads)


def qkv_rope(x, wq, wk, wv, cos, sin, caches=None, pos=0, *, eps: float = 1e-6, bias=None, qk_norm=None,
             block_t: int = 128, block_k: int = 64, q_heads: int = 1, num_warps: int = 4, num_stages: int = 4,
             interpret: bool | None = None):
    """qkv_rope_reference in one launch (shapes as there; donate the caches: they are updated in place).
    A program computes block_t tokens of one key or value head, or of `q_heads` query heads as one
    [block_t, q_heads * d] tile (a wider tensor-core tile; without q/k norm), block_k hidden columns per pipeline
    step (block_k divides hidden)."""
    batch, seq, hidden = x.shape
    num_heads, head_dim, _ = wq.shape
    num_kv_heads = wk.shape[0]
    if wq.shape[2] != hidden or wk.shape != (num_kv_heads, head_dim, hidden) or wv.shape != wk.shape:
        raise ValueError(f"weights {wq.shape}/{wk.shape}/{wv.shape} do not fit x {x.shape}")
    if cos.shape != (seq, head_dim) or sin.shape != cos.shape:
        raise ValueError(f"cos/sin must be [{seq}, {head_dim}], got {cos.shape}/{sin.shape}")
    if caches is not None and (caches[0].shape != caches[1].shape or caches[0].shape[:2] != (batch, num_kv_heads)
                               or caches[0].shape[3] != head_dim):
        raise ValueError(f"caches {caches[0].shape}/{caches[1].shape} do not fit {num_kv_heads} heads of {head_dim}")
    if not (is_pow2(head_dim) and head_dim >= 16 and is_pow2(block_t) and block_t >= 16 and is_pow2(block_k)
            and block_k >= 16 and hidden % block_k == 0):
        raise ValueError(f"head_dim ({head_dim}), block_t ({block_t}) and block_k ({block_k}, dividing hidden "
                         f"{hidden}) must be powers of 2 >= 16")
    if num_heads % q_heads or (q_heads > 1 and qk_norm is not None):
        raise ValueError(f"q_heads ({q_heads}) must divide {num_heads} query heads and be 1 with q/k norm")
    dtype, q_width = x.dtype, q_heads * head_dim
    interpret = interpret_default() if interpret is None else interpret
    inputs = [x, wq.reshape(num_heads // q_heads, q_width, hidden), wk, wv]
    if bias is not None:
        inputs += [bias[0].reshape(num_heads // q_heads, q_width), bias[1], bias[2]]
    if qk_norm is not None:
        inputs += list(qk_norm)
    inputs += [jnp.tile(cos, (1, q_heads)), jnp.tile(sin, (1, q_heads)), rotate_half_matrix(head_dim, dtype, q_heads)]
    out_shape = [jax.ShapeDtypeStruct((batch, seq, num_heads // q_heads, q_width), dtype)]
    out_shape += [jax.ShapeDtypeStruct((batch, seq, num_kv_heads, head_dim), dtype)] * 2
    aliases = {}
    if caches is not None:
        inputs += [jnp.reshape(pos, (1,)).astype(jnp.int32), *caches]
        out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
        aliases = {len(inputs) - 2: 3, len(inputs) - 1: 4}
    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, seq=seq, hidden=hidden, head_dim=head_dim, q_programs=num_heads // q_heads, kv_heads=num_kv_heads,
        block_t=block_t, block_k=block_k, q_width=q_width, has_bias=bias is not None, qk_norm=qk_norm is not None,
        has_cache=caches is not None, eps=float(eps), dtype=dtype, interpret=interpret)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, pl.cdiv(seq, block_t), num_heads // q_heads + 2 * num_kv_heads),
        input_output_aliases=aliases,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="qkv_rope",
    )(*inputs)
    q = outs[0].reshape(batch, seq, num_heads, head_dim)
    return q, outs[1], outs[2], (None if caches is None else (outs[3], outs[4]))
