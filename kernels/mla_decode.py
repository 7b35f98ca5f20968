"""One decode step of multi-head latent attention (DeepSeek V2 / V3) over the latent cache, absorbed form, from the
query and kv_a projections' outputs as they leave their launch (float32 partial sums of a split-K product, or
finished) to the heads' outputs, the new token's cache entry written on the way.

Per token the cache holds [latent (r = kv_lora_rank), rope key (dr)]; kv_b_proj's weight [r, H, dn + dv] is W_UK
(its first dn columns per head) beside W_UV (the last dv). With q = [q_nope, q_pe] per head and kv_a's output
[c_lat, c_pe]:

    cache[pos] = [rmsnorm(c_lat), rope(c_pe)], q_pe = rope(q_pe)       absorb_query      grid (B, H, r / br + 1)
    q_lat[h]  = W_UK[:, h, :] @ q_nope[h]
    p[h, s]   = softmax_s(scale * (q_lat[h] . c_lat[s] + q_pe[h] . c_pe[s]))   for s <= pos
    o_lat[h]  = sum_s p[h, s] c_lat[s]                              latent_attention  grid (B, H / bh, P)
    out[h]    = o_lat[h] @ W_UV[:, h, :]                            absorb_output     grid (B, H, dv / bd * R)

Three launches in place of XLA's dozen (the absorbed einsums as multiply-reduce fusions, softmax pieces, casts, and
the split sums, rope, latent norm and cache write before them: four more kernels per layer on a GPU):
- absorb_query adds each head's partial sums as it loads them and reads each head's W_UK tile in place from the kv_b
  weight (strided, no slice copy), FP8 tiles dequantized in registers. One more program per head ropes the head's
  q_pe, and the first of them also normalises the latent, ropes the rope key and writes both into the cache
  (aliased: in place), which the next launch reads. (Done at the end of a weight-streaming program instead, they
  made the launch 4.6 us per DeepSeek-V2-Lite layer against 2.9 without them: docs/PERF.md, session 10.);
- latent_attention is split-sequence (flash-decoding): all heads of a block share each cache tile (a 16-row
  tensor-core dot per tile: the latent cache is one key/value "head" for every query head), and each of the P splits
  writes its unnormalised accumulator with its running max and sum;
- absorb_output merges the P splits in its prologue, then multiplies by the head's W_UV tile. With few heads
  (DeepSeek-V2-Lite's 16) the latent rows are cut into R slices, so that about 128 programs share the work; each
  slice's product goes to a float32 workspace and the last slice of a column tile to arrive (kernels/common.py:
  `arrive_last`) adds them in order and writes the output: a single program per tile ran four merge-and-multiply
  steps back to back (7.0 us a V2-Lite layer for 2 MB, docs/PERF.md session 10). The output projection stays a
  launch of its own: inside this one (a program per head and 256 output columns, recomputing its head's output) it
  took 11.2 us against 5.0 + 4.6 for the two launches at V2-Lite's shapes (session 19).

Rope pairs channel i with i + dr/2 (rotate-half) or, DeepSeek's default, channel 2i with 2i + 1 (interleaved): both
halves are loaded by index (a gather of dr/2 values), so the kernel needs no register shuffle for either layout.

Lowering: Triton, for the reasons of decode_attention.py (dynamically bounded, masked loops over the cache and
16-row dots; matrix-vector products for the absorptions). Positions past `pos` are never read.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels import fp8_matmul
from tilert_jax.kernels.common import (NEG, NT, ROWS, arrive_last, check_counters, dot, interpret_default, is_pow2,
                                       load_rows, load_sum, online_softmax_step, rms_apply, rms_inverse, store_rows,
                                       sum_parts, triton_params, zero_counters)
from tilert_jax.kernels.rms_norm import rms_norm_reference
from tilert_jax.rope import apply_rope, apply_rope_interleaved

f32 = jnp.float32


def prepare_reference(
    q: jax.Array,  # [S, B, H, dn + dr] partial sums of the query projection (S = 1: finished)
    compressed: jax.Array,  # [S, B, r + dr] partial sums of kv_a: [latent before its norm, rope key before rope]
    kv_norm: jax.Array,  # [r] the latent's RMSNorm weight
    cos: jax.Array,  # [dr] float32 rope table at pos (cat(freqs, freqs) layout, attention scaling applied)
    sin: jax.Array,  # [dr]
    cache: jax.Array,  # [B, S_max, r + dr]
    pos: jax.Array,  # int32 scalar: the new token's position
    *,
    interleaved: bool,  # DeepSeek's interleaved rope pairs (2i, 2i + 1); else rotate-half pairs (i, i + dr / 2)
    eps: float,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # q_nope [B, H, dn], q_pe [B, H, dr] roped, the cache with the entry
    dtype = cache.dtype
    dr = cos.shape[-1]
    # the projections' outputs as their own epilogue rounds them: [B, H, dn + dr], [B, r + dr]
    q, c = sum_parts(q).astype(dtype), sum_parts(compressed).astype(dtype)
    r = c.shape[-1] - dr
    rotate = apply_rope_interleaved if interleaved else apply_rope
    cs, sn = cos[None, None], sin[None, None]  # [1, 1, dr]
    q_pe = rotate(q[:, None, :, -dr:], cs, sn)[:, 0].astype(dtype)
    k_pe = rotate(c[:, None, None, r:], cs, sn)[:, 0, 0].astype(dtype)
    latent = rms_norm_reference(c[:, :r], kv_norm, eps).astype(dtype)
    entry = jnp.concatenate([latent, k_pe], axis=-1)[:, None]  # [B, 1, r + dr]
    return q[..., :-dr], q_pe, lax.dynamic_update_slice(cache, entry, (0, pos, 0))


def mla_decode_reference(
    q: jax.Array,  # [S, B, H, dn + dr] (see prepare_reference)
    compressed: jax.Array,  # [S, B, r + dr]
    kv_norm: jax.Array,  # [r]
    cos: jax.Array,  # [dr]
    sin: jax.Array,  # [dr]
    w: jax.Array,  # [r, H * (dn + dv)] kv_b_proj weight (float8_e4m3fn with `w_scale`)
    w_scale: jax.Array | None,  # [ceil(r / block_in), ceil(H * (dn + dv) / block_out)] float32
    block: tuple[int, int] | None,  # (block_out, block_in)
    cache: jax.Array,  # [B, S_max, r + dr]
    pos: jax.Array,  # int32 scalar: the new token's position; attend to positions 0..pos
    *,
    softmax_scale: float,
    interleaved: bool,
    eps: float,
) -> tuple[jax.Array, jax.Array]:  # out [B, H, dv] in the cache's dtype, the cache with the new entry
    q_nope, q_pe, cache = prepare_reference(q, compressed, kv_norm, cos, sin, cache, pos, interleaved=interleaved,
                                            eps=eps)
    dtype = cache.dtype
    batch, heads, dn = q_nope.shape
    r = cache.shape[-1] - q_pe.shape[-1]
    wkv = w.astype(dtype) if w_scale is None else fp8_matmul.dequantize(w, w_scale, block, dtype)
    wkv = wkv.reshape(r, heads, -1)
    q_lat = jnp.einsum("bhd,rhd->bhr", q_nope, wkv[..., :dn])
    q_cat = jnp.concatenate([q_lat, q_pe], axis=-1).astype(dtype)
    scores = jnp.einsum("bhc,bsc->bhs", q_cat, cache, preferred_element_type=f32) * softmax_scale
    visible = jnp.arange(cache.shape[1]) <= pos
    probs = jax.nn.softmax(jnp.where(visible[None, None, :], scores, -jnp.inf), axis=-1).astype(dtype)
    o_lat = jnp.einsum("bhs,bsr->bhr", probs, cache[..., :r], preferred_element_type=f32).astype(dtype)
    return jnp.einsum("bhr,rhd->bhd", o_lat, wkv[..., dn:]), cache


def _w_tile(w_ref, s_ref, r0, h, c0, br, width, block, row_width):
    """float32 [br, width] of the kv_b weight (viewed [r, H, dn + dv]) at rows r0.., head h, columns c0..; FP8
    tiles (which lie inside one scale block) times their block's scale."""
    t = plt.load(w_ref.at[pl.ds(r0, br), h, pl.ds(c0, width)], eviction_policy="evict_first").astype(f32)
    if s_ref is not None:
        block_out, block_in = block
        t = t * s_ref[r0 // block_in, (h * row_width + c0) // block_out]
    return t


def _rope(ref, index, base, half, interleaved, cos_ref, sin_ref, dtype):
    """The two halves float32 [dr / 2] of the rope of ref[:, *index, base:base + dr] (summed, rounded to dtype):
    pairs (2i, 2i + 1) interleaved, else (i, i + dr / 2), each half gathered by its channel indices."""
    i = lax.broadcasted_iota(jnp.int32, (half,), 0)
    first = base + (2 * i if interleaved else i)
    second = first + (1 if interleaved else half)
    x1, x2 = (load_sum(ref, *index, cols).astype(dtype).astype(f32) for cols in (first, second))
    c, s = plt.load(cos_ref.at[pl.ds(0, half)]), plt.load(sin_ref.at[pl.ds(0, half)])
    return x1 * c - x2 * s, x2 * c + x1 * s


def _absorb_query_kernel(q_ref, c_ref, nw_ref, cos_ref, sin_ref, pos_ref, w_ref, *refs, dn, r, dr, br, block,
                         row_width, interleaved, eps, dtype):
    s_ref = refs[0] if len(refs) == 5 else None  # then the cache (aliased, not read) and the outputs:
    ql_ref, qp_ref, cache_ref = refs[-3:]  # [B, H, r], [B, H, dr], [B, S_max, r + dr]
    b, h, j = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    half = dr // 2

    @pl.when(j < r // br)  # a [br] slice of the head's q_lat
    def _():
        r0 = pl.multiple_of(j * br, br)
        width = dn if s_ref is None else min(dn, block[0])
        acc = jnp.zeros((br,), f32)
        for c0 in range(0, dn, width):  # FP8: one scale block of columns at a time
            q = load_sum(q_ref, b, pl.ds(h, 1), pl.ds(c0, width)).astype(dtype).astype(f32)  # [1, width]
            acc += jnp.sum(_w_tile(w_ref, s_ref, r0, h, c0, br, width, block, row_width) * q, axis=1)
        plt.store(ql_ref.at[b, h, pl.ds(r0, br)], acc.astype(dtype))

    @pl.when(j == r // br)  # the head's rope query, beside the weight streams
    def _():
        for k, y in enumerate(_rope(q_ref, (b, h), dn, half, interleaved, cos_ref, sin_ref, dtype)):
            plt.store(qp_ref.at[b, h, pl.ds(k * half, half)], y.astype(dtype))

    @pl.when((j == r // br) & (h == 0))  # and the new token's cache entry: the normed latent and the roped key
    def _():
        pos = pos_ref[0]
        latent = load_sum(c_ref, pl.ds(b, 1), pl.ds(0, r)).astype(dtype).astype(f32)  # [1, r]
        rinv = rms_inverse(lambda k0, size: latent, r, r, eps)
        normed = rms_apply(latent, rinv, plt.load(nw_ref.at[pl.ds(0, r)]), dtype)
        plt.store(cache_ref.at[b, pl.ds(pos, 1), pl.ds(0, r)], normed.astype(cache_ref.dtype))
        for k, y in enumerate(_rope(c_ref, (b,), r, half, interleaved, cos_ref, sin_ref, dtype)):
            plt.store(cache_ref.at[b, pos, pl.ds(r + k * half, half)], y.astype(cache_ref.dtype))


def _attention_kernel(ql_ref, qp_ref, c_ref, pos_ref, o_ref, m_ref, l_ref, *, heads, rows, r, dr, splits, bs,
                      scale, dtype, interpret):
    b, hb, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    h0 = hb * rows
    valid_heads = min(heads, rows)  # fewer than 16 heads: the dot's extra rows are masked
    q_lat = load_rows(ql_ref.at[b, pl.ds(h0, rows), pl.ds(0, r)], valid_heads).astype(dtype)  # [rows, r]
    q_pe = load_rows(qp_ref.at[b, pl.ds(h0, rows), pl.ds(0, dr)], valid_heads).astype(dtype)  # [rows, dr]
    total = pos_ref[0] + 1
    per = (total + splits - 1) // splits
    start = p * per
    end = jnp.minimum(start + per, total)
    nblocks = (jnp.maximum(end - start, 0) + bs - 1) // bs

    def body(t, carry):
        m, l, acc = carry  # [rows, 1], [rows, 1], [rows, r]
        t0 = start + t * bs
        valid = t0 + lax.broadcasted_iota(jnp.int32, (bs, 1), 0) < end  # [bs, 1]
        c_lat = plt.load(c_ref.at[b, pl.ds(t0, bs), pl.ds(0, r)], mask=jnp.broadcast_to(valid, (bs, r)), other=0)
        c_pe = plt.load(c_ref.at[b, pl.ds(t0, bs), pl.ds(r, dr)], mask=jnp.broadcast_to(valid, (bs, dr)), other=0)
        s = (dot(q_lat, c_lat, NT, interpret) + dot(q_pe, c_pe, NT, interpret)) * scale  # [rows, bs]
        return online_softmax_step(m, l, acc, s, valid, c_lat, dtype, interpret)

    init = (jnp.full((rows, 1), NEG, f32), jnp.zeros((rows, 1), f32), jnp.zeros((rows, r), f32))
    m, l, acc = lax.fori_loop(0, nblocks, body, init)
    store_rows(o_ref.at[p, b, pl.ds(h0, rows), pl.ds(0, r)], acc, valid_heads)
    store_rows(m_ref.at[p, b, pl.ds(h0, rows), pl.ds(0, 1)], m, valid_heads)
    store_rows(l_ref.at[p, b, pl.ds(h0, rows), pl.ds(0, 1)], l, valid_heads)


def _absorb_output_kernel(o_ref, m_ref, l_ref, w_ref, *refs, dn, r, br, bd, column_tiles, r_parts, splits, block,
                          row_width, dtype, interpret):
    s_ref = refs[0] if len(refs) in (2, 5) else None
    out_ref = refs[-1] if r_parts == 1 else refs[-3]  # [B, H, dv]
    b, h, i = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    j, rp = i // r_parts, i % r_parts  # this program's column tile and slice of the latent rows
    c0 = dn + j * bd
    m = plt.load(m_ref.at[pl.ds(0, splits), b, h, pl.ds(0, 1)])  # [P, 1]: the splits' running maxima and sums
    weight = jnp.exp(m - jnp.max(m, axis=0, keepdims=True))  # [P, 1]
    norm = jnp.sum(weight * plt.load(l_ref.at[pl.ds(0, splits), b, h, pl.ds(0, 1)]), axis=0, keepdims=True)
    products = jnp.zeros((br, bd), f32)  # summed over the latent rows once, after the loop: one reduction
    rows = r // r_parts
    for r0 in range(0, rows, br):
        r0 = rp * rows + r0
        parts = plt.load(o_ref.at[pl.ds(0, splits), b, h, pl.ds(r0, br)])  # [P, br] float32
        o_lat = (jnp.sum(weight * parts, axis=0, keepdims=True) / norm).astype(dtype)  # [1, br]
        tile = _w_tile(w_ref, s_ref, r0, h, c0, br, bd, block, row_width)  # [br, bd]
        products += tile * jnp.transpose(o_lat.astype(f32))
    acc = jnp.sum(products, axis=0)  # [bd]
    out = out_ref.at[b, h, pl.ds(j * bd, bd)]
    if r_parts == 1:
        plt.store(out, acc.astype(dtype))
        return
    ws_ref, count_ref = refs[-2:]  # the workspace [R, B, H, dv] float32, the counters (aliased)
    plt.store(ws_ref.at[rp, b, h, pl.ds(j * bd, bd)], acc)

    @pl.when(arrive_last(count_ref, (b * out_ref.shape[1] + h) * column_tiles + j, r_parts, interpret))
    def _():  # the last slice of the latent rows to arrive adds the slices' products in order
        plt.store(out, load_sum(ws_ref, b, h, pl.ds(j * bd, bd)).astype(dtype))


def supported(heads: int, dn: int, dr: int, dv: int, r: int, block: tuple[int, int] | None) -> bool:
    """The shapes the kernels tile: powers of 2 (dots of at least 16 on a GPU), heads in whole blocks of 16 (or
    fewer than 16), FP8 heads starting on scale-block edges."""
    dims = (dn, dr, dv, r)
    if not all(is_pow2(d) for d in dims) or (not interpret_default() and min(dims) < 16):
        return False
    if heads > ROWS and heads % ROWS:
        return False
    if block is not None:
        block_out, block_in = block
        return dn % block_out == 0 and dv % block_out == 0 and is_pow2(block_in) and r % block_in == 0
    return True


def mla_decode(
    q: jax.Array,  # [S, B, H, dn + dr] float32 partial sums of the query projection, or [1, ...] finished
    compressed: jax.Array,  # [S, B, r + dr] the same of kv_a
    kv_norm: jax.Array,  # [r]
    cos: jax.Array,  # [dr] float32
    sin: jax.Array,  # [dr] float32
    w: jax.Array,  # [r, H * (dn + dv)]
    w_scale: jax.Array | None,
    block: tuple[int, int] | None,
    cache: jax.Array,  # [B, S_max, r + dr] (donate it: the new entry is written in place)
    pos: jax.Array,  # int32 scalar
    *,
    softmax_scale: float,
    interleaved: bool,
    eps: float,
    splits: int | None = None,  # sequence splits of latent_attention (default: about 128 programs, <= 32 splits)
    bs: int = 64,  # cache tokens per loop step
    bd: int = 64,  # output columns per absorb_output program (clipped to dv and the FP8 scale block)
    r_parts: int | None = None,  # absorb_output's slices of the latent rows (default: about 128 programs)
    counters: jax.Array | None = None,  # int32 arrival counters, zero (see kernels/common.py: arrive_last)
    num_warps: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array | None]:  # out [B, H, dv] in the cache's dtype, the cache, counters
    """See mla_decode_reference for the meaning; the three launches are described at the top of this file. Returns
    the counters zero again (for the next launch that counts arrivals; as given when absorb_output needs none)."""
    parts, batch, heads, q_width = q.shape
    length, dr = cache.shape[1], cos.shape[-1]
    r, dn = cache.shape[2] - dr, q_width - dr
    row_width = w.shape[1] // heads
    dv = row_width - dn
    if (compressed.shape[1:] != (batch, r + dr) or cache.shape[0] != batch or w.shape != (r, heads * row_width)
            or kv_norm.shape != (r,) or cos.shape != (dr,) or sin.shape != (dr,)):
        raise ValueError(f"shapes q {q.shape}, compressed {compressed.shape}, w {w.shape}, cache {cache.shape}, "
                         f"kv_norm {kv_norm.shape}, cos {cos.shape} do not form one MLA decode step")
    if (w_scale is None) != (block is None) or not supported(heads, dn, dr, dv, r, block):
        raise ValueError(f"unsupported MLA shapes dn={dn} dr={dr} dv={dv} r={r} block={block}")
    dtype = cache.dtype
    interpret = interpret_default() if interpret is None else interpret
    params = triton_params(num_warps, 2)
    w3 = w.reshape(r, heads, row_width)
    scale_in = [] if w_scale is None else [w_scale.astype(f32)]
    br = min(r, 128) if block is None else min(r, 128, block[1])  # latent rows per weight tile (one scale block)

    pos1 = jnp.reshape(pos, (1,)).astype(jnp.int32)
    inputs = [q, compressed, kv_norm, cos.astype(f32), sin.astype(f32), pos1, w3, *scale_in, cache]
    q_lat, q_pe, cache = pl.pallas_call(
        lambda *refs: _absorb_query_kernel(*refs, dn=dn, r=r, dr=dr, br=br, block=block, row_width=row_width,
                                           interleaved=interleaved, eps=float(eps), dtype=dtype),
        out_shape=[jax.ShapeDtypeStruct((batch, heads, r), dtype), jax.ShapeDtypeStruct((batch, heads, dr), dtype),
                   jax.ShapeDtypeStruct(cache.shape, dtype)],
        grid=(batch, heads, r // br + 1),  # the last column ropes (and writes the cache entry)
        input_output_aliases={len(inputs) - 1: 2},
        compiler_params=params, interpret=interpret, name="mla_absorb_query",
    )(*inputs)

    rows = ROWS  # heads per latent_attention program: one 16-row dot per cache tile
    head_blocks = -(-heads // rows)
    if splits is None:  # measured (scripts/gpu/tune_mla.py, docs/PERF.md): 16 heads best at 32 splits, 128 at 16
        splits = max(1, min(32, 128 // (batch * head_blocks), length // 32))
        splits = 1 << (splits.bit_length() - 1)  # a power of 2: absorb_output loads the splits as one tile
    if not is_pow2(splits):
        raise ValueError(f"splits must be a power of 2, got {splits}")
    part = jax.ShapeDtypeStruct((splits, batch, heads, r), f32)
    stat = jax.ShapeDtypeStruct((splits, batch, heads, 1), f32)
    o, m, l = pl.pallas_call(
        lambda *refs: _attention_kernel(*refs, heads=heads, rows=rows, r=r, dr=dr, splits=splits, bs=bs,
                                        scale=float(softmax_scale), dtype=dtype, interpret=interpret),
        out_shape=[part, stat, stat],
        grid=(batch, head_blocks, splits),
        compiler_params=params, interpret=interpret, name="mla_latent_attention",
    )(q_lat, q_pe, cache, pos1)

    bd = min(dv, bd) if block is None else min(dv, bd, block[0])
    column_tiles = dv // bd
    if r_parts is None:  # split the latent rows until the launch has about 128 programs
        r_parts = max(1, min(r // 16, 128 // (batch * heads * column_tiles)))
        r_parts = 1 << (r_parts.bit_length() - 1)
    if not is_pow2(r_parts) or r_parts > r // 16:
        raise ValueError(f"r_parts must be a power of 2 of at most r / 16 = {r // 16}, got {r_parts}")
    br = min(br, r // r_parts)
    inputs, out_shape, aliases = [o, m, l, w3, *scale_in], [jax.ShapeDtypeStruct((batch, heads, dv), dtype)], {}
    if r_parts > 1:
        counters = zero_counters(batch * heads * column_tiles) if counters is None else counters
        check_counters(counters, batch * heads * column_tiles, "mla_absorb_output")
        aliases[len(inputs)] = 2
        inputs.append(counters)
        out_shape += [jax.ShapeDtypeStruct((r_parts, batch, heads, dv), f32),
                      jax.ShapeDtypeStruct(counters.shape, jnp.int32)]
    outs = pl.pallas_call(
        lambda *refs: _absorb_output_kernel(*refs, dn=dn, r=r, br=br, bd=bd, column_tiles=column_tiles,
                                            r_parts=r_parts, splits=splits, block=block, row_width=row_width,
                                            dtype=dtype, interpret=interpret),
        out_shape=out_shape,
        grid=(batch, heads, column_tiles * r_parts),
        input_output_aliases=aliases,
        compiler_params=params, interpret=interpret, name="mla_absorb_output",
    )(*inputs)
    return outs[0], cache, (outs[2] if r_parts > 1 else counters)
