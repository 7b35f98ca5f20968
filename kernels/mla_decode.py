"""One decode step of multi-head latent attention (DeepSeek V2 / V3) over the latent cache, absorbed form.

Per token the cache holds [latent (r = kv_lora_rank), rope key (dr)]; kv_b_proj's weight [r, H, dn + dv] is W_UK
(its first dn columns per head) beside W_UV (the last dv). With q = [q_nope, q_pe] per head:

    q_lat[h]  = W_UK[:, h, :] @ q_nope[h]                           absorb_query      grid (B, H, r / br)
    p[h, s]   = softmax_s(scale * (q_lat[h] . c_lat[s] + q_pe[h] . c_pe[s]))   for s <= pos
    o_lat[h]  = sum_s p[h, s] c_lat[s]                              latent_attention  grid (B, H / bh, P)
    out[h]    = o_lat[h] @ W_UV[:, h, :]                            absorb_output     grid (B, H, dv / bd)

Three launches in place of XLA's dozen (the absorbed einsums as multiply-reduce fusions, softmax pieces, casts,
the latent norm, the ropes and the cache write):
- absorb_query reads each head's W_UK tile in place from the kv_b weight (strided, no slice copy), FP8 tiles
  dequantized in registers, and q_nope in place from the query projection;
- latent_attention is split-sequence (flash-decoding): all heads of a block share each cache tile (a 16-row
  tensor-core dot per tile: the latent cache is one key/value "head" for every query head), and each of the P splits
  writes its unnormalised accumulator with its running max and sum. Its prologue applies the rope to q_pe and forms
  the new token's entry from kv_a's raw output (the latent's RMSNorm, the rope key's rope); the last split takes
  that entry from registers and writes it into the cache in place, so the loops read positions < pos only;
- absorb_output merges the P splits in its prologue, then multiplies by the head's W_UV tile.

The rope is loaded as a low and a high half (DeepSeek's interleaved pairs: the even and odd channels, a strided
load; rotate-half: the two halves), so its score is q_lo . k_lo + q_hi . k_hi with the cache's rope key stored in
the rope's output layout [low outputs, high outputs], as the XLA path stores it.

Lowering: Triton, for the reasons of decode_attention.py (dynamically bounded, masked loops over the cache and
16-row dots; matrix-vector products for the absorptions).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels import fp8_matmul
from tilert_jax.kernels.common import (NEG, NN, NT, ROWS, dot, interpret_default, is_pow2, load_rows,
                                       online_softmax_step, rms_apply, store_rows, triton_params)
from tilert_jax.kernels.rms_norm import rms_norm_reference
from tilert_jax.rope import apply_rope, rope_interleaved

f32 = jnp.float32


def new_entry_reference(
    q: jax.Array,  # [B, H, dn + dr]: the query projection, rope not applied
    compressed: jax.Array,  # [B, r + dr]: kv_a's output for the new token, before the latent norm and the rope
    latent_norm: jax.Array,  # [r]: kv_a_layernorm's weight
    rope: tuple[jax.Array, jax.Array],  # cos, sin [dr] at pos (cat(freqs, freqs) layout), in the rope's dtype
    *,
    eps: float,
    interleaved: bool,
):
    """-> q_pe [B, H, dr] with its rope, and the cache entry [B, r + dr] = [normed latent, rope key with its rope]."""
    dr = rope[0].shape[-1]
    r = compressed.shape[-1] - dr
    cos, sin = (t[None, None, :] for t in rope)
    rotate = rope_interleaved if interleaved else apply_rope
    q_pe = rotate(q[:, None, :, q.shape[-1] - dr:], cos, sin)[:, 0]
    k_pe = rotate(compressed[:, None, None, r:], cos, sin)[:, 0, 0]
    latent = rms_norm_reference(compressed[:, :r], latent_norm, eps)
    return q_pe, jnp.concatenate([latent, k_pe.astype(latent.dtype)], axis=-1)


def mla_decode_reference(
    q: jax.Array,  # [B, H, dn + dr]
    compressed: jax.Array,  # [B, r + dr]
    latent_norm: jax.Array,  # [r]
    rope: tuple[jax.Array, jax.Array],  # cos, sin [dr]
    w: jax.Array,  # [r, H * (dn + dv)] kv_b_proj weight (float8_e4m3fn with `w_scale`)
    w_scale: jax.Array | None,  # [ceil(r / block_in), ceil(H * (dn + dv) / block_out)] float32
    block: tuple[int, int] | None,  # (block_out, block_in)
    cache: jax.Array,  # [B, S, r + dr]: [latent, rope key] per token
    pos: jax.Array,  # int32 scalar: the new token's position (attends to positions 0..pos)
    *,
    softmax_scale: float,
    eps: float,
    interleaved: bool,
):
    """-> out [B, H, dv] in q's dtype, and the cache with the new token's entry written at pos."""
    dtype = q.dtype
    batch, heads, _ = q.shape
    dr = rope[0].shape[-1]
    r = cache.shape[-1] - dr
    dn = q.shape[-1] - dr
    q_pe, entry = new_entry_reference(q, compressed, latent_norm, rope, eps=eps, interleaved=interleaved)
    cache = jax.lax.dynamic_update_slice(cache, entry[:, None].astype(cache.dtype), (0, pos, 0))
    wkv = w.astype(dtype) if w_scale is None else fp8_matmul.dequantize(w, w_scale, block, dtype)
    wkv = wkv.reshape(r, heads, -1)
    q_lat = jnp.einsum("bhd,rhd->bhr", q[..., :dn], wkv[..., :dn])
    q_cat = jnp.concatenate([q_lat, q_pe.astype(q_lat.dtype)], axis=-1).astype(cache.dtype)
    scores = jnp.einsum("bhc,bsc->bhs", q_cat, cache, preferred_element_type=f32) * softmax_scale
    visible = jnp.arange(cache.shape[1]) <= pos
    probs = jax.nn.softmax(jnp.where(visible[None, None, :], scores, -jnp.inf), axis=-1).astype(cache.dtype)
    o_lat = jnp.einsum("bhs,bsr->bhr", probs, cache[..., :r], preferred_element_type=f32).astype(cache.dtype)
    return jnp.einsum("bhr,rhd->bhd", o_lat.astype(dtype), wkv[..., dn:]), cache


def _w_tile(w_ref, s_ref, r0, h, c0, br, width, block, row_width):
    """float32 [br, width] of the kv_b weight (viewed [r, H, dn + dv]) at rows r0.., head h, columns c0..; FP8
    tiles (which lie inside one scale block) times their block's scale."""
    t = plt.load(w_ref.at[pl.ds(r0, br), h, pl.ds(c0, width)], eviction_policy="evict_first").astype(f32)
    if s_ref is not None:
        block_out, block_in = block
        t = t * s_ref[r0 // block_in, (h * row_width + c0) // block_out]
    return t


def _absorb_query_kernel(q_ref, w_ref, *refs, dn, br, block, row_width, dtype):
    s_ref = refs[0] if len(refs) == 2 else None
    o_ref = refs[-1]  # [B, H, r]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    r0 = pl.multiple_of(j * br, br)
    width = dn if s_ref is None else min(dn, block[0])
    acc = jnp.zeros((br,), f32)
    for c0 in range(0, dn, width):  # FP8: one scale block of columns at a time
        q = plt.load(q_ref.at[b, pl.ds(h, 1), pl.ds(c0, width)]).astype(f32)  # [1, width]
        acc += jnp.sum(_w_tile(w_ref, s_ref, r0, h, c0, br, width, block, row_width) * q, axis=1)
    plt.store(o_ref.at[b, h, pl.ds(r0, br)], acc.astype(dtype))


def _attention_kernel(ql_ref, q_ref, comp_ref, nw_ref, cos_ref, sin_ref, c_ref, pos_ref, o_ref, m_ref, l_ref, c_out,
                      *, heads, rows, r, dn, dr, splits, bs, scale, eps, interleaved, rope_dtype, dtype, interpret):
    b, hb, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h0 = hb * rows
    half = dr // 2
    valid_heads = min(heads, rows)  # fewer than 16 heads: the dot's extra rows are masked
    pos = pos_ref[0]

    def rnd(t):  # as the reference rounds: each rope operation in the rope's dtype
        return t.astype(rope_dtype).astype(f32)

    def halves(ref, c0, nrows, valid):  # float32 (lo, hi) [nrows, half] of ref's rope channels c0..c0 + dr
        if not interleaved:
            return tuple(load_rows(ref(pl.ds(c, half)), valid).astype(f32) for c in (c0, c0 + half))
        # Interleaved pairs: the even and odd channels, picked by a product with a 0/1 matrix (exact; registers
        # cannot be sliced and strided loads do not interpret).
        x = load_rows(ref(pl.ds(c0, dr)), valid)  # [nrows, dr]
        i, j = (lax.broadcasted_iota(jnp.int32, (dr, half), axis) for axis in (0, 1))
        picks = (i == 2 * j, i == 2 * j + 1)  # [dr, half] each
        if nrows == 1:  # one row: multiply-reduce (a dot wants 16)
            xt = jnp.transpose(x.astype(f32))  # [dr, 1]
            return tuple(jnp.sum(jnp.where(pick, xt, 0.0), axis=0, keepdims=True) for pick in picks)
        return tuple(dot(x, pick.astype(x.dtype), NN, interpret) for pick in picks)

    def roped(ref, c0, nrows, valid):  # the rope of ref's rope channels -> (lo, hi) [nrows, half] float32
        lo, hi = (rnd(t) for t in halves(ref, c0, nrows, valid))
        c, s_ = cos_ref[pl.ds(0, half)].astype(f32)[None, :], sin_ref[pl.ds(0, half)].astype(f32)[None, :]
        return rnd(rnd(lo * c) - rnd(hi * s_)), rnd(rnd(hi * c) + rnd(lo * s_))

    q_lat = load_rows(ql_ref.at[b, pl.ds(h0, rows), pl.ds(0, r)], valid_heads).astype(dtype)  # [rows, r]
    q_lo, q_hi = roped(lambda cols: q_ref.at[b, pl.ds(h0, rows), cols], dn, rows, valid_heads)  # [rows, half]
    # The new token's entry: the latent's RMSNorm and the rope key's rope, rounded to the cache's dtype.
    k_lo, k_hi = (t.astype(dtype) for t in roped(lambda cols: comp_ref.at[pl.ds(b, 1), cols], r, 1, 1))  # [1, half]
    x_lat = plt.load(comp_ref.at[pl.ds(b, 1), pl.ds(0, r)]).astype(f32)  # [1, r]
    rinv = 1.0 / jnp.sqrt(jnp.sum(x_lat * x_lat, axis=1, keepdims=True) / r + eps)
    latent = rms_apply(x_lat, rinv, nw_ref[pl.ds(0, r)], comp_ref.dtype).astype(dtype)  # [1, r]
    q_lo, q_hi = q_lo.astype(dtype), q_hi.astype(dtype)

    per = (pos + splits - 1) // splits  # positions < pos come from the cache, split evenly
    start = p * per
    end = jnp.minimum(start + per, pos)
    nblocks = (jnp.maximum(end - start, 0) + bs - 1) // bs

    def body(t, carry):
        m, l, acc = carry  # [rows, 1], [rows, 1], [rows, r]
        t0 = start + t * bs
        valid = t0 + lax.broadcasted_iota(jnp.int32, (bs, 1), 0) < end  # [bs, 1]

        def tile(c0, width):
            return plt.load(c_ref.at[b, pl.ds(t0, bs), pl.ds(c0, width)], mask=jnp.broadcast_to(valid, (bs, width)),
                            other=0)

        c_lat = tile(0, r)
        s = (dot(q_lat, c_lat, NT, interpret) + dot(q_lo, tile(r, half), NT, interpret)
             + dot(q_hi, tile(r + half, half), NT, interpret)) * scale  # [rows, bs]
        return online_softmax_step(m, l, acc, s, valid, c_lat, dtype, interpret)

    init = (jnp.full((rows, 1), NEG, f32), jnp.zeros((rows, 1), f32), jnp.zeros((rows, r), f32))
    m, l, acc = lax.fori_loop(0, nblocks, body, init)

    # The new token, from registers, taken by the last split (which also writes its entry into the cache).
    last = p == splits - 1
    lat32 = latent.astype(f32)
    s_new = (jnp.sum(q_lat.astype(f32) * lat32, axis=1, keepdims=True)
             + jnp.sum(q_lo.astype(f32) * k_lo.astype(f32), axis=1, keepdims=True)
             + jnp.sum(q_hi.astype(f32) * k_hi.astype(f32), axis=1, keepdims=True)) * scale  # [rows, 1]
    m2 = jnp.maximum(m, s_new)
    alpha, p_new = jnp.exp(m - m2), jnp.exp(s_new - m2)
    m = jnp.where(last, m2, m)
    l = jnp.where(last, l * alpha + p_new, l)
    acc = jnp.where(last, acc * alpha + p_new.astype(dtype).astype(f32) * lat32, acc)

    @pl.when(last & (hb == 0))
    def _():
        plt.store(c_out.at[b, pl.ds(pos, 1), pl.ds(0, r)], latent)
        plt.store(c_out.at[b, pl.ds(pos, 1), pl.ds(r, half)], k_lo)
        plt.store(c_out.at[b, pl.ds(pos, 1), pl.ds(r + half, half)], k_hi)

    store_rows(o_ref.at[p, b, pl.ds(h0, rows), pl.ds(0, r)], acc, valid_heads)
    store_rows(m_ref.at[p, b, pl.ds(h0, rows), pl.ds(0, 1)], m, valid_heads)
    store_rows(l_ref.at[p, b, pl.ds(h0, rows), pl.ds(0, 1)], l, valid_heads)


def _absorb_output_kernel(o_ref, m_ref, l_ref, w_ref, *refs, dn, r, br, bd, splits, block, row_width, cache_dtype,
                          dtype):
    s_ref = refs[0] if len(refs) == 2 else None
    out_ref = refs[-1]  # [B, H, dv]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    c0 = dn + j * bd
    m = plt.load(m_ref.at[pl.ds(0, splits), b, h, pl.ds(0, 1)])  # [P, 1]: the splits' running maxima and sums
    weight = jnp.exp(m - jnp.max(m, axis=0, keepdims=True))  # [P, 1]
    norm = jnp.sum(weight * plt.load(l_ref.at[pl.ds(0, splits), b, h, pl.ds(0, 1)]), axis=0, keepdims=True)
    acc = jnp.zeros((bd,), f32)
    for r0 in range(0, r, br):
        parts = plt.load(o_ref.at[pl.ds(0, splits), b, h, pl.ds(r0, br)])  # [P, br] float32
        o_lat = (jnp.sum(weight * parts, axis=0, keepdims=True) / norm).astype(cache_dtype).astype(dtype)  # [1, br]
        tile = _w_tile(w_ref, s_ref, r0, h, c0, br, bd, block, row_width)  # [br, bd]
        acc += jnp.sum(tile * jnp.transpose(o_lat.astype(f32)), axis=0)
    plt.store(out_ref.at[b, h, pl.ds(j * bd, bd)], acc.astype(dtype))


def supported(heads: int, dn: int, dr: int, dv: int, r: int, block: tuple[int, int] | None) -> bool:
    """The shapes the kernels tile: powers of 2 (dots of at least 16 on a GPU, the rope's halves among them), heads
    in whole blocks of 16 (or fewer than 16), FP8 heads starting on scale-block edges."""
    dims = (dn, dr // 2, dv, r)
    if not all(is_pow2(d) for d in dims) or (not interpret_default() and min(dims) < 16):
        return False
    if heads > ROWS and heads % ROWS:
        return False
    if block is not None:
        block_out, block_in = block
        return dn % block_out == 0 and dv % block_out == 0 and is_pow2(block_in) and r % block_in == 0
    return True


def mla_decode(
    q: jax.Array,  # [B, H, dn + dr]: the query projection, rope not applied
    compressed: jax.Array,  # [B, r + dr]: kv_a's output for the new token, before the latent norm and the rope
    latent_norm: jax.Array,  # [r]
    rope: tuple[jax.Array, jax.Array],  # cos, sin [dr] at pos, in the rope's dtype
    w: jax.Array,  # [r, H * (dn + dv)]
    w_scale: jax.Array | None,
    block: tuple[int, int] | None,
    cache: jax.Array,  # [B, S, r + dr] (donate it: the new entry is written in place)
    pos: jax.Array,  # int32 scalar
    *,
    softmax_scale: float,
    eps: float,
    interleaved: bool,
    splits: int | None = None,  # sequence splits of latent_attention (default: about 128 programs, <= 32 splits)
    bs: int = 64,  # cache tokens per loop step
    num_warps: int = 4,
    interpret: bool | None = None,
):
    """-> out [B, H, dv] and the cache with the new entry at pos. See mla_decode_reference for the meaning; the three
    launches are described at the top of this file."""
    cos, sin = rope
    dr = cos.shape[-1]
    batch, heads = q.shape[:2]
    dn = q.shape[-1] - dr
    length, r = cache.shape[1], cache.shape[2] - dr
    row_width = w.shape[1] // heads
    dv = row_width - dn
    if (compressed.shape != (batch, r + dr) or cache.shape[0] != batch or w.shape != (r, heads * row_width)
            or latent_norm.shape != (r,) or sin.shape != (dr,)):
        raise ValueError(f"shapes q {q.shape}, compressed {compressed.shape}, latent_norm {latent_norm.shape}, "
                         f"rope {cos.shape}/{sin.shape}, w {w.shape}, cache {cache.shape} do not form one MLA decode "
                         "step")
    if (w_scale is None) != (block is None) or not supported(heads, dn, dr, dv, r, block):
        raise ValueError(f"unsupported MLA shapes dn={dn} dr={dr} dv={dv} r={r} block={block}")
    dtype = q.dtype
    interpret = interpret_default() if interpret is None else interpret
    params = triton_params(num_warps, 2)
    w3 = w.reshape(r, heads, row_width)
    scale_in = [] if w_scale is None else [w_scale.astype(f32)]
    br = min(r, 128) if block is None else min(r, 128, block[1])  # latent rows per weight tile (one scale block)

    q_lat = pl.pallas_call(
        lambda *refs: _absorb_query_kernel(*refs, dn=dn, br=br, block=block, row_width=row_width,
                                           dtype=dtype),
        out_shape=jax.ShapeDtypeStruct((batch, heads, r), dtype),
        grid=(batch, heads, r // br),
        compiler_params=params, interpret=interpret, name="mla_absorb_query",
    )(q, w3, *scale_in)

    rows = ROWS  # heads per latent_attention program: one 16-row dot per cache tile
    head_blocks = -(-heads // rows)
    if splits is None:  # measured (scripts/gpu/tune_mla.py, docs/PERF.md): 16 heads best at 32 splits, 128 at 16
        splits = max(1, min(32, 128 // (batch * head_blocks), length // 32))
        splits = 1 << (splits.bit_length() - 1)  # a power of 2: absorb_output loads the splits as one tile
    if not is_pow2(splits):
        raise ValueError(f"splits must be a power of 2, got {splits}")
    part = jax.ShapeDtypeStruct((splits, batch, heads, r), f32)
    stat = jax.ShapeDtypeStruct((splits, batch, heads, 1), f32)
    inputs = (q_lat.astype(cache.dtype), q, compressed, latent_norm, cos, sin, cache,
              jnp.reshape(pos, (1,)).astype(jnp.int32))
    o, m, l, cache = pl.pallas_call(
        lambda *refs: _attention_kernel(*refs, heads=heads, rows=rows, r=r, dn=dn, dr=dr, splits=splits, bs=bs,
                                        scale=float(softmax_scale), eps=float(eps), interleaved=interleaved,
                                        rope_dtype=cos.dtype, dtype=cache.dtype, interpret=interpret),
        out_shape=[part, stat, stat, jax.ShapeDtypeStruct(cache.shape, cache.dtype)],
        grid=(batch, head_blocks, splits),
        input_output_aliases={6: 3},
        compiler_params=params, interpret=interpret, name="mla_latent_attention",
    )(*inputs)

    bd = min(dv, 64) if block is None else min(dv, 64, block[0])
    out = pl.pallas_call(
        lambda *refs: _absorb_output_kernel(*refs, dn=dn, r=r, br=br, bd=bd, splits=splits, block=block,
                                            row_width=row_width, cache_dtype=cache.dtype, dtype=dtype),
        out_shape=jax.ShapeDtypeStruct((batch, heads, dv), dtype),
        grid=(batch, heads, dv // bd),
        compiler_params=params, interpret=interpret, name="mla_absorb_output",
    )(o, m, l, w3, *scale_in)
    return out, cache
