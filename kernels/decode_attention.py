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
turn (`arrivals`).

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
from tilert_jax.kernels.attention import attention_reference
from tilert_jax.kernels.common import (NEG, NT, ROWS, arrive_last, check_counters, dot, interpret_default, is_pow2,
                                       load_rows, next_pow2, online_softmax_step, publish, store_rows, stream_rows,
                                       sum_parts, triton_params, wait_epoch, zero_counters)
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
    wo: jax.Array | None = None,  # [N, n * d]: the output projection, with `residual` (see decode_attention)
    residual: jax.Array | None = None,  # [B, N]
):
    """-> out [B, n, d] (with wo: residual + out @ wo^T [B, N], the kv heads' float32 partial sums added in order),
    k_cache, v_cache (with the new token written at pos)."""
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
                              sliding_window=sliding_window)[:, 0]  # [B, n, d]
    if wo is not None:
        batch, n, d = out.shape
        parts = jnp.einsum("bhgd,nhgd->hbn", out.reshape(batch, num_kv_heads, n // num_kv_heads, d),
                           wo.reshape(wo.shape[0], num_kv_heads, n // num_kv_heads, d), preferred_element_type=f32)
        out = (residual.astype(f32) + sum_parts(parts)).astype(residual.dtype)
    return out, k_cache, v_cache


def _merge_splits(acc_ws, ml_ws, b, h, splits: int, rows: int, head_dim: int) -> jax.Array:
    """The splits' softmax states of (batch b, kv head h) merged -> the normalised output [rows, d] float32.

    Every load is issued before the arithmetic that uses it (all maxima and sums, then all accumulators), so their
    latencies overlap. Plain loads are safe: no other program of this launch read these lines (each (b, h) owns
    whole 128-byte lines of both workspaces), and L1 starts each launch empty."""
    def at(ref, p, c0, width):
        return plt.load(ref.at[b, h, jnp.int32(p), pl.ds(0, rows), pl.ds(c0, width)])

    ms = [at(ml_ws, p, 0, 1) for p in range(splits)]  # [rows, 1] each
    ls = [at(ml_ws, p, 1, 1) for p in range(splits)]
    mx = functools.reduce(jnp.maximum, ms)
    weights = [jnp.exp(m - mx) for m in ms]
    total = sum(w * l for w, l in zip(weights, ls))
    acc = sum(w * at(acc_ws, p, 0, head_dim) for p, w in enumerate(weights))  # [rows, d]
    return acc / total


LINE = 32  # int32 counters per 128-byte line: each kind of counter on lines of its own, so that the polls of one
# kind never share a line with the atomics of another


def _line_up(n: int) -> int:
    return -(-n // LINE) * LINE


def counters_needed(batch: int, num_kv_heads: int, projection_tiles: int = 0) -> int:
    """int32 counters a launch needs: the splits' arrivals [B * kvh], and with the output projection a flag line per
    (batch row, kv head, column tile) and an arrival line per column tile."""
    heads = batch * num_kv_heads
    if not projection_tiles:
        return heads
    return _line_up(heads) + LINE * projection_tiles * (heads + 1)


def _flag(batch, num_kv_heads, n_tiles, b, h, j):
    return _line_up(batch * num_kv_heads) + LINE * ((b * num_kv_heads + h) * n_tiles + j)


def _out_projection(wo_ref, o_ref, x_ref, parts_ref, xo_ref, counters, epoch, local, *, batch, groups, bn,
                    num_kv_heads, interpret):
    """Program `local` of the output projection: kv head h's share of out @ wo^T over its query heads' K range for
    output columns n0.., stored as float32 partial sums [B, bn] in parts_ref[h]. It requests its weight tiles first
    and then waits until every batch row's output of kv head h is stored, so the weight streams while the attention
    runs. The last of a column tile's kv heads to arrive adds the tile's partial sums (in order) to the residual x
    and stores x_new."""
    head_dim = o_ref.shape[-1]
    n_tiles = wo_ref.shape[0] // bn
    tile_arrivals = _line_up(batch * num_kv_heads) + LINE * n_tiles * batch * num_kv_heads
    j, h = local // num_kv_heads, local % num_kv_heads
    n0 = pl.multiple_of(j * bn, bn)
    tiles = [plt.load(wo_ref.at[pl.ds(n0, bn), pl.ds((h * groups + r) * head_dim, head_dim)],
                      eviction_policy="evict_first") for r in range(groups)]  # [bn, d] per query head
    zero = sum(wait_epoch(counters, _flag(batch, num_kv_heads, n_tiles, b, h, j), epoch, interpret)
               for b in range(batch))
    head0 = h * groups + zero  # (the loads below follow the waits)
    if batch == 1:  # multiply-adds in registers
        rows = 1
        acc = sum(t.astype(f32) * plt.load(o_ref.at[jnp.int32(0), pl.ds(head0 + r, 1), pl.ds(0, head_dim)])
                  .astype(f32) for r, t in enumerate(tiles))  # [bn, d]
        y = jnp.sum(acc, axis=1).reshape(1, bn)
    else:
        rows = max(ROWS, next_pow2(batch))
        y = sum(dot(load_rows(o_ref.at[pl.ds(0, rows), head0 + r, pl.ds(0, head_dim)], batch), t, NT,
                    interpret) for r, t in enumerate(tiles))  # [rows, bn]
    store_rows(parts_ref.at[h, pl.ds(0, rows), pl.ds(n0, bn)], y, batch)

    @pl.when(arrive_last(counters, tile_arrivals + j, num_kv_heads, interpret))
    def _():
        x_new = stream_rows(x_ref, (parts_ref,), 0, rows, batch, n0, bn, xo_ref.dtype)
        store_rows(xo_ref.at[pl.ds(0, rows), pl.ds(n0, bn)], x_new.astype(xo_ref.dtype), batch)


def _kernel(*refs, batch, n_parts, has_bias, qk_norm, splits, block, num_heads, num_kv_heads, head_dim, rows,
            scale, eps, window, dtype, out_bn, interpret):
    groups = num_heads // num_kv_heads
    half = head_dim // 2
    it = iter(refs)
    qkv_ref = next(it)  # [B, n + 2 kvh, d], or [S, B, n + 2 kvh, d] float32
    bq_ref, bk_ref, bv_ref = (next(it), next(it), next(it)) if has_bias else (None,) * 3  # [n, d], [kvh, d] x2
    qn_ref, kn_ref = (next(it), next(it)) if qk_norm else (None, None)  # [d], [d]
    cos_ref, sin_ref = next(it), next(it)  # [d], [d]
    pos_ref = next(it)  # [1] int32
    epoch_ref = next(it) if out_bn else None  # [1] int32
    if splits > 1 or out_bn:
        next(it)  # the counters [>= counters_needed(...)] (aliased to `arrived`)
    wo_ref, x_ref = (next(it), next(it)) if out_bn else (None, None)  # [N, n * d], [B, N]
    kc_ref, vc_ref = next(it), next(it)  # [B, kvh, max_len, d] (aliased to the two cache outputs)
    o_ref = next(it)  # [B, n, d]
    if splits > 1:  # the workspace: float32 acc [B, kvh, P, rows, d] and (m, l) [B, kvh, P, rows, 2]
        acc_ws, ml_ws = next(it), next(it)
    parts_ref, xo_ref = (next(it), next(it)) if out_bn else (None, None)  # [kvh, B, N] float32, [B, N]
    arrived = next(it) if splits > 1 or out_bn else None  # [C] int32
    kc_out, vc_out = next(it), next(it)  # [B, kvh, max_len, d]
    attention_programs = batch * num_kv_heads * splits
    pid = pl.program_id(0)

    def stored(b, h):  # (b, h)'s output is in o_ref: the output projection's programs of kv head h may read it
        if out_bn:
            n_tiles = wo_ref.shape[0] // out_bn
            publish(arrived, _flag(batch, num_kv_heads, n_tiles, b, h, 0), n_tiles, LINE, epoch_ref[0], interpret)

    def attend(b, h, p):  # split p of (batch row b, kv head h)
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
                ss = jnp.sum(lo * lo, axis=1, keepdims=True) + jnp.sum(hi * hi, axis=1, keepdims=True)
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
        s_new = (jnp.sum(q_lo * k_lo, axis=1, keepdims=True) + jnp.sum(q_hi * k_hi, axis=1, keepdims=True)) * scale
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

        out = o_ref.at[b, pl.ds(h * groups, rows), pl.ds(0, head_dim)]
        if splits == 1:
            store_rows(out, (acc / l).astype(dtype), groups)
            stored(b, h)
            return
        for ref, c0, value in ((acc_ws, 0, acc), (ml_ws, 0, m), (ml_ws, 1, l)):
            plt.store(ref.at[b, h, p, pl.ds(0, rows), pl.ds(c0, value.shape[1])], value)

        @pl.when(arrive_last(arrived, b * num_kv_heads + h, splits, interpret))  # the last split of this launch
        def _():
            store_rows(out, _merge_splits(acc_ws, ml_ws, b, h, splits, rows, head_dim).astype(dtype), groups)
            stored(b, h)

    @pl.when(pid < attention_programs)
    def _():
        attend(pid // (num_kv_heads * splits), pid // splits % num_kv_heads, pid % splits)

    if out_bn:
        @pl.when(pid >= attention_programs)
        def _():
            _out_projection(wo_ref, o_ref, x_ref, parts_ref, xo_ref, arrived, epoch_ref[0], pid - attention_programs,
                            batch=batch, groups=groups, bn=out_bn, num_kv_heads=num_kv_heads, interpret=interpret)


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
    arrivals: jax.Array | None = None,  # int32 [>= counters_needed(...)] zeros (None: fresh), returned zero
    wo: jax.Array | None = None,  # [N, n * d]: the output projection too, in the same launch
    residual: jax.Array | None = None,  # [B, N]: the residual stream the projection is added to (with wo)
    out_bn: int = 32,  # the output projection's columns per program
    epoch=1,  # int32 scalar (with wo): this launch's flag value, above every earlier launch's on the same counters
    interpret: bool | None = None,
):
    """-> out [B, n, d], k_cache, v_cache, arrivals (the counters after this launch, for the next layer's launch; as
    given with one split and no wo). See decode_attention_reference for the meaning of the rest.

    With `wo` the launch also runs the output projection and its residual add, and the first result is the residual
    stream after it, residual + out @ wo^T [B, N]. Its programs (kvh * N / out_bn, after the attention's in the grid)
    request their [out_bn, d] weight tiles of one kv head's query heads first and then wait until that head's
    output is stored (`common.wait_and_release`): the weight streams while the attention runs, and no launch is paid
    for the projection. The last of a column tile's kv heads to arrive adds their partial sums to the residual."""
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
    if wo is not None and (wo.ndim != 2 or wo.shape[1] != num_heads * head_dim or not is_pow2(out_bn)
                           or out_bn < 16 or wo.shape[0] % out_bn):
        raise ValueError(f"wo must be [N, {num_heads * head_dim}] with N a multiple of out_bn ({out_bn}, a power of "
                         f"2 >= 16), got {wo.shape}")
    if (wo is None) != (residual is None) or (wo is not None and residual.shape != (batch, wo.shape[0])):
        raise ValueError(f"wo and residual [{batch}, N] come together, got {None if wo is None else wo.shape} and "
                         f"{None if residual is None else residual.shape}")
    dtype = k_cache.dtype
    rows = max(ROWS, next_pow2(num_heads // num_kv_heads))
    interpret = interpret_default() if interpret is None else interpret
    inputs = [qkv.astype(f32) if n_parts else qkv]
    if bias is not None:
        inputs += [bias[0], bias[1], bias[2]]
    if qk_norm is not None:
        inputs += [qk_norm[0], qk_norm[1]]
    inputs += [cos, sin, jnp.reshape(pos, (1,)).astype(jnp.int32)]
    if wo is not None:
        inputs.append(jnp.reshape(epoch, (1,)).astype(jnp.int32))
    out_shape = [jax.ShapeDtypeStruct((batch, num_heads, head_dim), dtype)]
    if splits > 1:
        out_shape += [jax.ShapeDtypeStruct((batch, kvh, splits, rows, width), f32) for width in (head_dim, 2)]
    if wo is not None:  # the kv heads' partial sums, and the residual stream after the projection
        out_shape += [jax.ShapeDtypeStruct((kvh, batch, wo.shape[0]), f32), jax.ShapeDtypeStruct(residual.shape,
                                                                                                  residual.dtype)]
    aliases = {}
    counted = splits > 1 or wo is not None
    if counted:
        needed = counters_needed(batch, kvh, 0 if wo is None else wo.shape[0] // out_bn)
        arrivals = zero_counters(needed) if arrivals is None else arrivals
        check_counters(arrivals, needed, "decode_attention")
        aliases[len(inputs)] = len(out_shape)
        inputs.append(arrivals)
        out_shape.append(jax.ShapeDtypeStruct(arrivals.shape, jnp.int32))
    if wo is not None:
        inputs += [wo, residual]
    inputs += [k_cache, v_cache]
    out_shape += [jax.ShapeDtypeStruct(k_cache.shape, dtype), jax.ShapeDtypeStruct(v_cache.shape, dtype)]
    n_in, n_out = len(inputs), len(out_shape)
    aliases.update({n_in - 2: n_out - 2, n_in - 1: n_out - 1})
    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, batch=batch, n_parts=n_parts, has_bias=bias is not None, qk_norm=qk_norm is not None,
        splits=splits, block=block, num_heads=num_heads, num_kv_heads=num_kv_heads, head_dim=head_dim, rows=rows,
        scale=float(scale), eps=float(eps), window=sliding_window, dtype=dtype, out_bn=out_bn if wo is not None else 0,
        interpret=interpret)
    projection_programs = 0 if wo is None else kvh * (wo.shape[0] // out_bn)
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(batch * kvh * splits + projection_programs,),
        input_output_aliases=aliases,
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="decode_attention",
    )(*inputs)
    first = outs[0] if wo is None else outs[-4]
    return first, outs[-2], outs[-1], outs[-3] if counted else arrivals
