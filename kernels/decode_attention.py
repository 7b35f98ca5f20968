"""One decode step of grouped-query attention over the KV cache, with everything around it in the same launch:
the Q/K/V partial sums of a split-K projection are added, the biases (Qwen2.5) and q/k RMSNorm (Qwen3) applied,
rope applied to q and k, the new k and v written into the cache in place, and attention taken over positions
<= pos only.

Split-sequence (flash-decoding): the grid is (batch, kv head, split); split p covers its share of [0, pos) (blocks
past pos are never read), and the last split also takes the new token from registers and writes it to the cache.
With one split the program normalises and writes the output itself. With more, each split writes its unnormalised
accumulator and its running max and sum to a float32 workspace and counts its arrival on an int32 counter of its
(batch, kv head); the split that arrives last merges the workspace and writes the output (the "last block" pattern
of a split-K reduction). That replaces the two XLA fusions that merged the splits after the launch: attention
took 7.6 us per llama-3.2-1b layer against 5.2 + 3.2 before (docs/PERF.md, session 9). The last split sets its
counter back to zero (kernels/common.py: `arrive_last`), so one zeroed array serves a whole decode step's layers in
turn (`arrivals`). With `partials` the splits write their normalised outputs and log-sum-exps instead
(stream_attention.Partials) and the layer launch that follows merges them in its output projection's prologue, under
its weight stream: at llama-3.2-1b the launch takes 5.0 us against 7.2 and the step 0.809 to 0.814 ms against 0.829
to 0.834 (session 31; at llama-3.1-8b that merge costs more than it saves, see tuning.ATTENTION_SPLITS).

Rope without slicing registers: the rotate-half layout pairs channel c with c + d/2, so q and k are loaded as a
low and a high half and the score is q_lo . k_lo + q_hi . k_hi (two 16-row tensor-core dots).

Lowering: Triton. The work per program is a few KB of cache per block with a 16-row (padded query group) dot; the
Triton lowering expresses masked, dynamically bounded loops over the cache directly, which Mosaic GPU's
warpgroup-level (64-row wgmma) model does not suit at one query row per head. Measured on the H200 as part of the
decode step (docs/PERF.md: with the fused Q/K/V projection it takes llama-3.1-8b from 4.53 to 4.35 ms per token);
a Mosaic GPU version was not measured.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax import cache as kv
from tilert_jax.kernels import stream_attention as sa
from tilert_jax.kernels.attention import attention_reference
from tilert_jax.kernels.common import (NEG, NT, ROWS, arrive_last, check_counters, dot, interpret_default, is_pow2,
                                       load_rows, next_pow2, online_softmax_step, row_mask, store_rows,
                                       triton_params, zero_counters)
from tilert_jax.kernels.rms_norm import rms_norm_reference
from tilert_jax.rope import apply_rope

f32 = jnp.float32


def _split_qkv(qkv, num_heads, num_kv_heads, dtype):
    if qkv.ndim == 4:  # [S, B, Nh, d] float32 partial sums
        qkv = jnp.sum(qkv, axis=0).astype(dtype)
    q = qkv[:, :num_heads]
    k = qkv[:, num_heads:num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads:]
    return q, k, v


def decode_attention_reference(
    qkv: jax.Array,  # [B, n + 2 kvh, d], or float32 partial sums [S, B, n + 2 kvh, d]
    k_cache: jax.Array,  # [B, kvh, max_len, d]
    v_cache: jax.Array,  # [B, kvh, max_len, d]
    pos: jax.Array,  # int32 scalar: the new token's position
    cos: jax.Array,  # [d] rope table at pos (in the model dtype)
    sin: jax.Array,  # [d]
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    eps: float = 1e-6,
    bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,  # bq [n, d], bk [kvh, d], bv [kvh, d]
    qk_norm: tuple[jax.Array, jax.Array] | None = None,  # q_norm [d], k_norm [d]
    sliding_window: int | None = None,
):
    """-> out [B, n, d], k_cache, v_cache (with the new token written at pos)."""
    q, k, v = _split_qkv(qkv, num_heads, num_kv_heads, k_cache.dtype)
    if bias is not None:
        q, k, v = q + bias[0], k + bias[1], v + bias[2]
    if qk_norm is not None:
        q = rms_norm_reference(q, qk_norm[0], eps)
        k = rms_norm_reference(k, qk_norm[1], eps)
    c, s = cos[None, None, :], sin[None, None, :]
    q, k = apply_rope(q[:, None], c, s), apply_rope(k[:, None], c, s)  # [B, 1, heads, d]
    k_cache = kv.write(k_cache, k, pos)
    v_cache = kv.write(v_cache, v[:, None], pos)
    k_pos = jnp.arange(k_cache.shape[2], dtype=jnp.int32)
    out = attention_reference(q, k_cache, v_cache, jnp.reshape(pos, (1,)).astype(jnp.int32), k_pos, scale=scale,
                              sliding_window=sliding_window)
    return out[:, 0], k_cache, v_cache


def _merge_splits(acc_ws, ml_ws, b, h, held, groups: int, rows: int, head_dim: int) -> jax.Array:
    """The splits' softmax states of (batch b, kv head h) merged -> the normalised output [rows, d] float32 (its
    first `groups` rows; the rest are not stored).

    Only what was stored is read: the first `groups` rows of the splits whose `held[p]` (a bool scalar) is True, the
    splits that covered part of the cache or took the new token; the other loads are masked off, so they cost no
    memory traffic (a split's share rounds up to whole blocks, so the last splits can be empty: at position 1100,
    llama-3.1-8b's 16 splits of 32-token blocks cover 96 tokens each and the last 4 hold none; and a group of 4 query
    heads fills a quarter of the 16 rows). Every load is issued before the arithmetic that uses it (all
    maxima and sums, then all accumulators), so their latencies overlap. Plain loads are safe: no other program of
    this launch read these lines (each (b, h) owns whole 128-byte lines of both workspaces), and L1 starts each
    launch empty."""
    def at(ref, p, c0, width, other):
        mask = row_mask(rows, width, groups) & held[p]
        return plt.load(ref.at[b, h, jnp.int32(p), pl.ds(0, rows), pl.ds(c0, width)], mask=mask, other=other)

    splits = len(held)
    ms = [at(ml_ws, p, 0, 1, NEG) for p in range(splits)]  # [rows, 1] each (NEG: a split that holds no work)
    ls = [at(ml_ws, p, 1, 1, 0) for p in range(splits)]
    mx = functools.reduce(jnp.maximum, ms)
    weights = [jnp.exp(m - mx) for m in ms]
    total = sum(w * l for w, l in zip(weights, ls))
    acc = sum(w * at(acc_ws, p, 0, head_dim, 0) for p, w in enumerate(weights))  # [rows, d]
    return acc / total


def _kernel(*refs, batch, n_parts, has_bias, qk_norm, splits, block, num_heads, num_kv_heads, head_dim, rows,
            scale, eps, window, partials, dtype, interpret):
    groups = num_heads // num_kv_heads
    half = head_dim // 2
    it = iter(refs)
    qkv_ref = next(it)  # [B, n + 2 kvh, d], or [S, B, n + 2 kvh, d] float32
    bq_ref, bk_ref, bv_ref = (next(it), next(it), next(it)) if has_bias else (None,) * 3  # [n, d], [kvh, d] x2
    qn_ref, kn_ref = (next(it), next(it)) if qk_norm else (None, None)  # [d], [d]
    cos_ref, sin_ref = next(it), next(it)  # [d], [d]
    pos_ref = next(it)  # [1] int32
    merging = splits > 1 and not partials  # the last split to arrive merges
    if merging:
        next(it)  # the arrival counters [>= B * kvh] (aliased to `arrived`)
    kc_ref, vc_ref = next(it), next(it)  # [B, kvh, max_len, d] (aliased to the two cache outputs)
    if partials:  # each split's normalised output and base-2 log-sum-exp [P, kvh, rows, 8 d] float32: a row's first
        # d columns are row 8 j of sa.Partials' [P, kvh, 8 rows, d] (the same bytes: a strided store without strides)
        out_ws, lse_ws = next(it), next(it)
    else:
        o_ref = next(it)  # [B, n, d]
    if merging:  # the workspace: float32 acc [B, kvh, P, rows, d] and (m, l) [B, kvh, P, rows, 2]; the counters
        acc_ws, ml_ws, arrived = next(it), next(it), next(it)
    kc_out, vc_out = next(it), next(it)  # [B, kvh, max_len, d]

    b, h, p = pl.program_id(0), pl.program_id(1), pl.program_id(2)
    pos = pos_ref[0]

    def load_qkv(row0, nrows, valid, c0, width):  # float32 [nrows, width] (rows >= valid read as 0)
        if n_parts:
            t = sum(load_rows(qkv_ref.at[jnp.int32(i), b, pl.ds(row0, nrows), pl.ds(c0, width)], valid)
                    for i in range(n_parts))
            return t.astype(dtype).astype(f32)
        return load_rows(qkv_ref.at[b, pl.ds(row0, nrows), pl.ds(c0, width)], valid).astype(f32)

    def rnd(t):
        return t.astype(dtype).astype(f32)

    def prepare(row0, nrows, valid, b_ref, brow0, n_ref):  # -> (lo, hi) [nrows, half], normed and roped
        lo = load_qkv(row0, nrows, valid, 0, half)
        hi = load_qkv(row0, nrows, valid, half, half)
        if has_bias:
            lo = rnd(lo + load_rows(b_ref.at[pl.ds(brow0, nrows), pl.ds(0, half)], valid).astype(f32))
            hi = rnd(hi + load_rows(b_ref.at[pl.ds(brow0, nrows), pl.ds(half, half)], valid).astype(f32))
        if qk_norm:
            ss = jnp.sum(lo * lo + hi * hi, axis=1, keepdims=True)  # one reduction across the threads
            rinv = 1.0 / jnp.sqrt(ss / head_dim + eps)
            lo = rnd(rnd(lo * rinv) * n_ref[pl.ds(0, half)].astype(f32)[None, :])
            hi = rnd(rnd(hi * rinv) * n_ref[pl.ds(half, half)].astype(f32)[None, :])
        c_lo, c_hi = cos_ref[pl.ds(0, half)].astype(f32)[None, :], cos_ref[pl.ds(half, half)].astype(f32)[None, :]
        s_lo, s_hi = sin_ref[pl.ds(0, half)].astype(f32)[None, :], sin_ref[pl.ds(half, half)].astype(f32)[None, :]
        return rnd(lo * c_lo - hi * s_lo), rnd(hi * c_hi + lo * s_hi)

    # This split's share of the cache, and its first block requested before q and k are formed (the two sets of
    # loads overlap); each loop step then requests the next block before its arithmetic.
    lo_pos = 0 if window is None else jnp.maximum(pos - window + 1, 0)
    span = pos - lo_pos
    if splits > 1:
        per = ((span + splits - 1) // splits + block - 1) // block * block
        start = lo_pos + p * per
        end = jnp.minimum(start + per, pos)
    else:
        start, end = lo_pos, pos
    nblocks = (jnp.maximum(end - start, 0) + block - 1) // block

    def cache_block(t0):  # -> valid [block, 1], k_lo, k_hi [block, half], v [block, d] (zeros past `end`)
        valid = t0 + lax.broadcasted_iota(jnp.int32, (block, 1), 0) < end
        k_lo, k_hi, v = (plt.load(ref.at[b, h, pl.ds(t0, block), pl.ds(c0, width)],
                                  mask=jnp.broadcast_to(valid, (block, width)), other=0)
                         for ref, c0, width in ((kc_ref, 0, half), (kc_ref, half, half), (vc_ref, 0, head_dim)))
        return valid, k_lo, k_hi, v

    first = cache_block(start)
    q_lo, q_hi = prepare(h * groups, rows, groups, bq_ref, h * groups, qn_ref)  # [rows, half]
    k_lo, k_hi = prepare(num_heads + h, 1, 1, bk_ref, h, kn_ref)  # [1, half]
    v_new = load_qkv(num_heads + num_kv_heads + h, 1, 1, 0, head_dim)  # [1, d]
    if has_bias:
        v_new = rnd(v_new + bv_ref[pl.ds(h, 1), :].astype(f32))
    q_lo_b, q_hi_b = q_lo.astype(dtype), q_hi.astype(dtype)

    def body(t, carry):
        m, l, acc, (valid, kb_lo, kb_hi, vb) = carry  # [rows, 1], [rows, 1], [rows, d]; block t's tiles
        following = cache_block(start + (t + 1) * block)  # requested before block t's arithmetic
        s = (dot(q_lo_b, kb_lo, NT, interpret) + dot(q_hi_b, kb_hi, NT, interpret)) * scale  # [rows, block]
        return (*online_softmax_step(m, l, acc, s, valid, vb, dtype, interpret), following)

    init = (jnp.full((rows, 1), NEG, f32), jnp.zeros((rows, 1), f32), jnp.zeros((rows, head_dim), f32), first)
    m, l, acc, _ = lax.fori_loop(0, nblocks, body, init)

    # The new token (its key and value are still in registers), taken by the last split.
    last = p == splits - 1
    s_new = jnp.sum(q_lo * k_lo + q_hi * k_hi, axis=1, keepdims=True) * scale  # [rows, 1]
    m2 = jnp.maximum(m, s_new)
    a2 = jnp.exp(m - m2)
    p2 = jnp.exp(s_new - m2)
    m = jnp.where(last, m2, m)
    l = jnp.where(last, l * a2 + p2, l)
    acc = jnp.where(last, acc * a2 + rnd(p2) * v_new, acc)

    @pl.when(last)
    def _():
        plt.store(kc_out.at[b, h, pl.ds(pos, 1), pl.ds(0, half)], k_lo.astype(kc_out.dtype))
        plt.store(kc_out.at[b, h, pl.ds(pos, 1), pl.ds(half, half)], k_hi.astype(kc_out.dtype))
        plt.store(vc_out.at[b, h, pl.ds(pos, 1), pl.ds(0, head_dim)], v_new.astype(vc_out.dtype))

    if partials:  # query head j in row 8 j (sa.Partials); a split that held no token leaves weight 0 to the merge
        held = l > 0
        total = jnp.where(held, l, 1.0)  # [rows, 1]
        lse = jnp.where(held, (m + jnp.log(total)) * sa.LOG2E, NEG)
        out = jnp.where(held, acc / total, 0.0)
        for ref, value in ((out_ws, out), (lse_ws, jnp.broadcast_to(lse, out.shape))):
            store_rows(ref.at[p, h, pl.ds(0, rows), pl.ds(0, head_dim)], value, groups)
        return
    out = o_ref.at[b, pl.ds(h * groups, rows), pl.ds(0, head_dim)]
    if splits == 1:
        store_rows(out, (acc / l).astype(dtype), groups)
        return
    for ref, c0, value in ((acc_ws, 0, acc), (ml_ws, 0, m), (ml_ws, 1, l)):
        store_rows(ref.at[b, h, p, pl.ds(0, rows), pl.ds(c0, value.shape[1])], value, groups)
    @pl.when(arrive_last(arrived, b * num_kv_heads + h, splits, interpret))  # the last split of this launch
    def _():
        held = [(lo_pos + i * per < pos) | (i == splits - 1) for i in range(splits)]
        store_rows(out, _merge_splits(acc_ws, ml_ws, b, h, held, groups, rows, head_dim).astype(dtype), groups)


def decode_attention(
    qkv: jax.Array,  # [B, n + 2 kvh, d], or float32 partial sums [S, B, n + 2 kvh, d]
    k_cache: jax.Array,  # [B, kvh, max_len, d] (donate it: it is updated in place)
    v_cache: jax.Array,  # [B, kvh, max_len, d]
    pos: jax.Array,  # int32 scalar
    cos: jax.Array,  # [d]
    sin: jax.Array,  # [d]
    *,
    num_heads: int,
    num_kv_heads: int,
    scale: float,
    eps: float = 1e-6,
    bias: tuple[jax.Array, jax.Array, jax.Array] | None = None,
    qk_norm: tuple[jax.Array, jax.Array] | None = None,
    sliding_window: int | None = None,
    splits: int = 1,
    block: int = 64,
    num_warps: int = 4,
    num_stages: int = 2,
    arrivals: jax.Array | None = None,  # int32 [>= B * kvh] arrival counters, zero (None: fresh), returned zero
    partials: bool = False,  # leave the splits to the next launch's merge (batch 1)
    interpret: bool | None = None,
):
    """-> out [B, n, d], k_cache, v_cache, arrivals (the counters after this launch, for the next layer's launch; as
    given with one split or with partials). With partials, out is the splits' sa.Partials, for
    kernels/layer_decode.py's output projection to merge: the merge leaves this launch (2 us of 7.2 at llama-3.2-1b)
    for the next one's prologue, where the weight stream runs under it. See decode_attention_reference for the
    meaning of the rest."""
    batch, kvh, max_len, head_dim = k_cache.shape
    n_parts = qkv.shape[0] if qkv.ndim == 4 else 0
    nh = num_heads + 2 * num_kv_heads
    if qkv.shape[-3:] != (batch, nh, head_dim):
        raise ValueError(f"qkv must end in {(batch, nh, head_dim)}, got {qkv.shape}")
    if v_cache.shape != k_cache.shape or kvh != num_kv_heads or num_heads % num_kv_heads:
        raise ValueError(f"bad cache {k_cache.shape}/{v_cache.shape} for {num_heads}/{num_kv_heads} heads")
    if not (is_pow2(head_dim) and head_dim >= 32 and is_pow2(block) and block >= 16):
        raise ValueError(f"head_dim ({head_dim}) and block ({block}) must be powers of 2 (>= 32, >= 16)")
    if cos.shape != (head_dim,) or sin.shape != (head_dim,):
        raise ValueError(f"cos/sin must be [{head_dim}], got {cos.shape}")
    if splits < 1:
        raise ValueError(f"splits must be >= 1, got {splits}")
    if partials and batch != 1:
        raise ValueError(f"partials are one sequence's, got a batch of {batch}")
    dtype = k_cache.dtype
    rows = max(ROWS, next_pow2(num_heads // num_kv_heads))
    interpret = interpret_default() if interpret is None else interpret
    inputs = [qkv.astype(f32) if n_parts else qkv]
    if bias is not None:
        inputs += [bias[0], bias[1], bias[2]]
    if qk_norm is not None:
        inputs += [qk_norm[0], qk_norm[1]]
    inputs += [cos, sin, jnp.reshape(pos, (1,)).astype(jnp.int32)]
    if partials:
        out_shape = [jax.ShapeDtypeStruct((splits, kvh, rows, 8 * head_dim), f32)] * 2
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype)]
    aliases = {}
    merging = splits > 1 and not partials
    if merging:
        arrivals = zero_counters(batch * kvh) if arrivals is None else arrivals
        check_counters(arrivals, batch * kvh, "decode_attention")
        aliases[len(inputs)] = 3
        inputs.append(arrivals)
        out_shape += [jax.ShapeDtypeStruct((batch, kvh, splits, rows, width), f32) for width in (head_dim, 2)]
        out_shape.append(jax.ShapeDtypeStruct(arrivals.shape, jnp.int32))
    inputs += [k_cache, v_cache]
    out_shape += [jax.ShapeDtypeStruct(k_cache.shape, dtype), jax.ShapeDtypeStruct(v_cache.shape, dtype)]
    n_in, n_out = len(inputs), len(out_shape)
    aliases.update({n_in - 2: n_out - 2, n_in - 1: n_out - 1})
    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, batch=batch, n_parts=n_parts, has_bias=bias is not None, qk_norm=qk_norm is not None,
        splits=splits, block=block, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rows=rows,
        scale=float(scale), eps=float(eps), window=sliding_window, partials=partials, dtype=dtype,
        interpret=interpret)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch, kvh, splits),
        input_output_aliases=aliases,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*inputs)
    if partials:
        return sa.Partials(*(t.reshape(splits, kvh, 8 * rows, head_dim) for t in outs[:2])), outs[2], outs[3], arrivals
    if splits == 1:
        return outs[0], outs[1], outs[2], arrivals
    return outs[0], outs[-2], outs[-1], outs[3]
