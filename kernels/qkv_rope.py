"""A sequence's Q/K/V projection with everything after it in the same launch: the biases (Qwen2.5), the q/k RMSNorm
(Qwen3), rope on q and k, and the new keys and values written into the cache in place (a prompt's prefill).

On XLA's path these are three cuBLAS products and six small kernels a layer, each followed by a ~1.5 us gap
(llama-3.2-1b at 1024 tokens: Q 14.4 us, K and V 6.3 each, the ropes 2.7 + 2.2, the cache transposes 2.0 each;
docs/PERF.md, session 22).

The grid is (batch, token block, head group) over the n + 2 kvh heads of q, k and v, heads fastest (the programs that
run together share their token block's rows in L2). A program computes a few heads' [block_t, head_dim] tiles over
the whole hidden dimension, one accumulator per head (each x tile loaded once for all of them), so the q/k norm is a
reduction over a tile's rows and the cache write one [block_t, head_dim] store a head. Rope without slicing registers: rotate_half(y) = y @ R for the signed permutation R
[d, d] (`rotate_half_matrix`), one tensor-core dot of y rounded to the model dtype; a column of R holds a single
+-1, so the product is exact.

Lowering: Triton. Its pipeliner streams the [block_t, block_k] and [head_dim, block_k] tiles through shared memory
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


def rotate_half_matrix(head_dim: int, dtype) -> jax.Array:
    """R [d, d] with y @ R = rotate_half(y) = concat(-y[d/2:], y[:d/2]) for a row y."""
    half = head_dim // 2
    r = np.zeros((head_dim, head_dim), np.float32)
    r[np.arange(half) + half, np.arange(half)] = -1.0
    r[np.arange(half), np.arange(half) + half] = 1.0
    return jnp.asarray(r, dtype)


def _kernel(*refs, seq, hidden, head_dim, num_heads, num_kv_heads, block_t, block_k, heads, has_bias, qk_norm,
            has_cache, eps, dtype, interpret):
    it = iter(refs)
    x_ref, wq_ref, wk_ref, wv_ref = next(it), next(it), next(it), next(it)
    bias_refs = (next(it), next(it), next(it)) if has_bias else (None,) * 3
    norm_refs = (next(it), next(it)) if qk_norm else (None,) * 2
    cos_ref, sin_ref, rot_ref = next(it), next(it), next(it)
    if has_cache:
        pos_ref = next(it)
        next(it), next(it)  # the caches as inputs: aliased to the cache outputs
    q_out, k_out, v_out = next(it), next(it), next(it)
    cache_outs = (next(it), next(it)) if has_cache else None
    b, t0, j = pl.program_id(0), pl.program_id(1) * block_t, pl.program_id(2)
    tokens = seq - t0  # rows of this block that hold tokens (the last block may be partial)
    partial = seq % block_t != 0

    def load(ref, cols):
        if not partial:
            return plt.load(ref)
        return plt.load(ref, mask=row_mask(block_t, cols, tokens), other=0)

    def store(ref, value, valid):
        plt.store(ref, value, mask=row_mask(block_t, head_dim, valid))

    def project(w_ref, h0):  # -> float32 [block_t, d] for each of heads h0..h0+heads-1: x rows @ w[h]^T
        def step(i, accs):
            k0 = pl.multiple_of(i * block_k, block_k)
            xs = load(x_ref.at[b, pl.ds(t0, block_t), pl.ds(k0, block_k)], block_k)
            return tuple(acc + dot(xs, plt.load(w_ref.at[h0 + e, pl.ds(0, head_dim), pl.ds(k0, block_k)]), NT,
                                   interpret)
                         for e, acc in enumerate(accs))

        zeros = tuple(jnp.zeros((block_t, head_dim), f32) for _ in range(heads))
        return lax.fori_loop(0, hidden // block_k, step, zeros)

    def finish(acc, bias_ref, norm_ref, h, rope: bool):  # rounded as the reference rounds -> dtype [block_t, d]
        y = acc.astype(dtype)
        if bias_ref is not None:
            y = y + plt.load(bias_ref.at[h, pl.ds(0, head_dim)])[None, :]
        if norm_ref is not None:
            y32 = y.astype(f32)
            rinv = 1.0 / jnp.sqrt(jnp.sum(y32 * y32, axis=1, keepdims=True) / head_dim + eps)
            y = (y32 * rinv).astype(dtype) * plt.load(norm_ref.at[pl.ds(0, head_dim)])[None, :]
        if rope:
            rotated = dot(y, plt.load(rot_ref.at[pl.ds(0, head_dim), pl.ds(0, head_dim)]), NN, interpret)
            cos = load(cos_ref.at[pl.ds(t0, block_t), pl.ds(0, head_dim)], head_dim).astype(f32)
            sin = load(sin_ref.at[pl.ds(t0, block_t), pl.ds(0, head_dim)], head_dim).astype(f32)
            y = y.astype(f32) * cos + rotated * sin
        return y.astype(dtype)

    def heads_of(w_ref, out, h0, which):  # which: 0 q, 1 k, 2 v
        for e, acc in enumerate(project(w_ref, h0)):
            h = h0 + e
            y = finish(acc, bias_refs[which], norm_refs[which] if which < 2 else None, h, rope=which < 2)
            store(out.at[b, pl.ds(t0, block_t), h, pl.ds(0, head_dim)], y, tokens)
            if has_cache and which:
                cache, row = cache_outs[which - 1], pos_ref[0] + t0
                store(cache.at[b, h, pl.ds(row, block_t), pl.ds(0, head_dim)], y,
                      jnp.minimum(tokens, cache.shape[2] - row))

    q_programs, kv_programs = num_heads // heads, num_kv_heads // heads

    @pl.when(j < q_programs)
    def _():
        heads_of(wq_ref, q_out, j * heads, 0)

    @pl.when((j >= q_programs) & (j < q_programs + kv_programs))
    def _():
        heads_of(wk_ref, k_out, (j - q_programs) * heads, 1)

    @pl.when(j >= q_programs + kv_programs)
    def _():
        heads_of(wv_ref, v_out, (j - q_programs - kv_programs) * heads, 2)


def qkv_rope(x, wq, wk, wv, cos, sin, caches=None, pos=0, *, eps: float = 1e-6, bias=None, qk_norm=None,
             block_t: int = 128, block_k: int = 64, heads: int = 1, num_warps: int = 4, num_stages: int = 4,
             interpret: bool | None = None):
    """qkv_rope_reference in one launch (shapes as there; donate the caches: they are updated in place).
    A program computes `heads` heads (dividing the number of KV heads) for block_t tokens, block_k hidden columns
    per pipeline step (block_k divides hidden)."""
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
            and block_k >= 16 and hidden % block_k == 0 and num_kv_heads % heads == 0 and num_heads % heads == 0):
        raise ValueError(f"head_dim ({head_dim}), block_t ({block_t}) and block_k ({block_k}, dividing hidden "
                         f"{hidden}) must be powers of 2 >= 16, and heads ({heads}) divide {num_kv_heads}")
    dtype = x.dtype
    interpret = interpret_default() if interpret is None else interpret
    inputs = [x, wq, wk, wv]
    if bias is not None:
        inputs += list(bias)
    if qk_norm is not None:
        inputs += list(qk_norm)
    inputs += [cos, sin, rotate_half_matrix(head_dim, dtype)]
    out_shape = [jax.ShapeDtypeStruct((batch, seq, heads, head_dim), dtype)
                 for heads in (num_heads, num_kv_heads, num_kv_heads)]
    aliases = {}
    if caches is not None:
        inputs += [jnp.reshape(pos, (1,)).astype(jnp.int32), *caches]
        out_shape += [jax.ShapeDtypeStruct(c.shape, c.dtype) for c in caches]
        aliases = {len(inputs) - 2: 3, len(inputs) - 1: 4}
    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, seq=seq, hidden=hidden, head_dim=head_dim, num_heads=num_heads, num_kv_heads=num_kv_heads,
        block_t=block_t, block_k=block_k, heads=heads, has_bias=bias is not None, qk_norm=qk_norm is not None,
        has_cache=caches is not None, eps=float(eps), dtype=dtype, interpret=interpret)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, pl.cdiv(seq, block_t), (num_heads + 2 * num_kv_heads) // heads),
        input_output_aliases=aliases,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="qkv_rope",
    )(*inputs)
    return outs[0], outs[1], outs[2], (None if caches is None else (outs[3], outs[4]))
