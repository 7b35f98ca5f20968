"""Grouped matrix-vector products over selected experts for decode, with in-kernel FP8 dequantization:
y[g] = x[g] @ W[ids[g]] for a handful of groups g (a token's k routed experts), W a stack [E, K, N] read in place.

XLA's path gathers the selected experts' weights into a fresh [G, K, N] array before multiplying (a copy of every
byte the step needs); here each program streams its expert's [bk, bn] tiles straight from the stack, converts FP8
tiles to the activation dtype in registers and applies each (128 x 128) block's scale to the tile's partial product.
With `w2` (gate and up) the epilogue is silu(x @ W) * (x @ W2), one launch for both.

A plain Linear at decode (bf16 or FP8) is the one-group case (ids = [0], the weight viewed as a stack of one); a
narrow output splits K into float32 partial sums so that the grid fills the GPU (`default_config`), and FP8 stacks
of 2**31 elements or more are read as uint16 pairs (see `grouped_matvec`).

Lowering: Triton, for the reasons given in matvec.py (one to sixteen rows, a memory-bound stream of tiles).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels import fp8_matmul
from tilert_jax.kernels.common import NN, ROWS, dot, interpret_default, is_pow2, load_rows, next_pow2, store_rows, \
    triton_params
from tilert_jax.kernels.tuning import SMS

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GroupedConfig:
    bn: int = 64  # output columns per program (a power of 2; clipped to divide N and the scale block)
    bk: int = 128  # weight rows per loop step (a power of 2; clipped to divide K and the scale block)
    split: int = 1  # K splits: programs write float32 partial sums, added (and the SwiGLU applied) by XLA after
    num_warps: int = 4
    num_stages: int = 4
    f16: bool = True  # bf16 x with FP8 weights: multiply in float16 (see `_to_f16`), 15% to 30% faster (H200)


def default_config(groups: int, k_dim: int, n_dim: int, block: tuple[int, int] | None) -> GroupedConfig:
    """128-byte weight row segments (bn = 128 FP8 columns or 64 bf16 ones), and the K dimension split until the
    grid fills the GPU twice over: a single [7168, 576] weight would otherwise run on nine programs."""
    bn, bk = (64 if block is None else 128), 128
    picked = tiles(k_dim, n_dim, block, GroupedConfig(bn=bn, bk=bk))
    if picked is None:
        return GroupedConfig(bn=bn, bk=bk)
    bk, bn = picked
    programs, split = groups * (n_dim // bn), 1
    while programs * split < 2 * SMS and (k_dim // (2 * split)) % bk == 0 and k_dim // (2 * split) >= 2 * bk:
        split *= 2
    return GroupedConfig(bn=bn, bk=bk, split=split)


def grouped_matvec_reference(
    x: jax.Array,  # [G, B, K]
    w: jax.Array,  # [E, K, N] (float8_e4m3fn with scale)
    ids: jax.Array,  # [G] int32: the expert of each group
    *,
    scale: jax.Array | None = None,  # [E, ceil(K / block_in), ceil(N / block_out)] float32
    block: tuple[int, int] | None = None,  # (block_out, block_in)
    w2: jax.Array | None = None,  # [E, K, N]: with w2 the result is silu(x @ w) * (x @ w2)
    scale2: jax.Array | None = None,
    out_dtype=None,
) -> jax.Array:  # [G, B, N]
    def product(weight, s):
        sel = weight[ids]
        sel = sel.astype(x.dtype) if s is None else fp8_matmul.dequantize(sel, s[ids], block, x.dtype)
        return jnp.einsum("gbk,gkn->gbn", x, sel, preferred_element_type=f32).astype(x.dtype)

    y = product(w, scale)
    if w2 is not None:
        y = jax.nn.silu(y) * product(w2, scale2)
    return y.astype(out_dtype or x.dtype)


def _swiglu(gate: jax.Array, up: jax.Array, dtype) -> jax.Array:
    """silu(gate) * up from float32 sums, rounded as the reference rounds (each product, then the silu, in dtype)."""
    g = gate.astype(dtype).astype(f32)
    return (g / (1.0 + jnp.exp(-g))).astype(dtype).astype(f32) * up.astype(dtype).astype(f32)


def _largest_pow2_divisor(n: int, cap: int) -> int:
    b = 1
    while b * 2 <= cap and n % (b * 2) == 0:
        b *= 2
    return b


def tiles(k_dim: int, n_dim: int, block: tuple[int, int] | None, config: GroupedConfig | None = None
          ) -> tuple[int, int] | None:
    """(bk, bn) for a [K, N] weight, or None when the shapes do not tile (the caller keeps the XLA path)."""
    cfg = config or GroupedConfig()
    cap_k, cap_n = cfg.bk, cfg.bn
    if block is not None:
        block_out, block_in = block
        cap_k, cap_n = min(cap_k, _largest_pow2_divisor(block_in, block_in)), min(cap_n, _largest_pow2_divisor(
            block_out, block_out))
    bk, bn = _largest_pow2_divisor(k_dim, cap_k), _largest_pow2_divisor(n_dim, cap_n)
    if bk < 16 or bn < 16:
        return None
    return bk, bn


def _fp8_pairs(t):
    """uint16 [..., n] holding two FP8 values each -> (even columns, odd columns) as float8_e4m3fn [..., n]
    (little-endian: the low byte is the even column)."""
    lo = lax.bitcast_convert_type((t & 0xFF).astype(jnp.uint8), jnp.float8_e4m3fn)
    hi = lax.bitcast_convert_type((t >> 8).astype(jnp.uint8), jnp.float8_e4m3fn)
    return lo, hi


def _to_f16(xt):
    """bf16 [rows, bk] -> (float16 [rows, bk], float32 [rows, 1]) with xt = result * scale: each row divided by the
    power of 2 at or above its largest magnitude, so every value keeps its 8 significant bits in float16 (down to
    2**-13 of the row's largest: the power of 2 is below twice the largest) and none overflows."""
    top = jnp.max(jnp.abs(xt.astype(f32)), axis=1, keepdims=True)
    # The power of 2 from the bits (exp2 of a log2 need not be exact): round the exponent up unless the mantissa is 0.
    bits = jnp.minimum((lax.bitcast_convert_type(top, jnp.int32) + 0x7FFFFF) & 0x7F800000, 0x7F000000)
    scale = jnp.where(top > 0, lax.bitcast_convert_type(bits, f32), 1.0)
    return (xt.astype(f32) / scale).astype(jnp.float16), scale


def _kernel(ids_ref, x_ref, w_ref, *refs, batch, rows, k_dim, bk, bn, split, block, fp8, packed, swiglu, in_dtype,
            out_dtype, f16, interpret):
    it = iter(refs)
    s_ref = next(it) if fp8 else None  # [E, K / bi, N / bo]
    w2_ref = next(it) if swiglu else None  # [E, K, N] ([E, K, N / 2] uint16 pairs when packed)
    s2_ref = next(it) if swiglu and fp8 else None
    o_ref = next(it)  # [G, B, N], or [split, G, B, N] float32 partial sums
    o2_ref = next(it) if swiglu and split > 1 else None  # the up projection's partial sums

    g = pl.program_id(0)
    n0 = pl.multiple_of(pl.program_id(1) * bn, bn)
    k_begin = pl.program_id(2) * (k_dim // split)
    e = ids_ref[g]
    block_out, block_in = block if fp8 else (1, 1)
    phases = 2 if packed else 1  # packed: even and odd columns are two products of bn / 2 columns each
    width = bn // phases

    def partial(wr, sr, k0, xt, x_scale):  # -> per phase [rows, width] float32
        if packed:
            tiles_ = _fp8_pairs(plt.load(wr.at[e, pl.ds(k0, bk), pl.ds(n0 // 2, width)],
                                         eviction_policy="evict_first"))
        else:
            tiles_ = (plt.load(wr.at[e, pl.ds(k0, bk), pl.ds(n0, bn)], eviction_policy="evict_first"),)
        out = [dot(xt, t.astype(xt.dtype), NN, interpret) for t in tiles_]
        if x_scale is not None:
            out = [p * x_scale for p in out]
        if sr is not None:
            out = [p * sr[e, k0 // block_in, n0 // block_out] for p in out]
        return out

    def body(i, accs):
        k0 = pl.multiple_of(k_begin + i * bk, bk)
        xt = load_rows(x_ref.at[g, pl.ds(0, rows), pl.ds(k0, bk)], batch).astype(in_dtype)  # [rows, bk]
        xt, x_scale = _to_f16(xt) if f16 else (xt, None)
        weights = ((w_ref, s_ref), (w2_ref, s2_ref)) if swiglu else ((w_ref, s_ref),)
        return tuple(tuple(a + p for a, p in zip(acc, partial(wr, sr, k0, xt, x_scale)))
                     for acc, (wr, sr) in zip(accs, weights))

    zeros = tuple(jnp.zeros((rows, width), f32) for _ in range(phases))
    accs = lax.fori_loop(0, k_dim // split // bk, body, (zeros, zeros) if swiglu else (zeros,))

    def window(ref, phase, *lead):  # this program's [rows, width] output (packed: [.., 2, N / 2], even odd halves)
        if packed:
            return ref.at[(*lead, g, pl.ds(0, rows), jnp.int32(phase), pl.ds(n0 // 2, width))]
        return ref.at[(*lead, g, pl.ds(0, rows), pl.ds(n0, bn))]

    for phase in range(phases):
        if split > 1:
            for ref, acc in zip((o_ref, o2_ref), accs):
                store_rows(window(ref, phase, pl.program_id(2)), acc[phase], batch)
            continue
        y = _swiglu(accs[0][phase], accs[1][phase], in_dtype) if swiglu else accs[0][phase]
        store_rows(window(o_ref, phase), y.astype(out_dtype), batch)


def grouped_matvec(
    x: jax.Array,  # [G, B, K], B <= 16
    w: jax.Array,  # [E, K, N]
    ids: jax.Array,  # [G] int32
    *,
    scale: jax.Array | None = None,  # [E, ceil(K / block_in), ceil(N / block_out)] float32 (w is FP8)
    block: tuple[int, int] | None = None,
    w2: jax.Array | None = None,
    scale2: jax.Array | None = None,
    out_dtype=None,
    config: GroupedConfig | None = None,
    packed: bool | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [G, B, N]
    """packed: read an FP8 stack as uint16 pairs. Pallas' Triton lowering computes element offsets in 32 bits up to
    2**32 bytes, which wraps past 2**31 one-byte elements (a DeepSeek-V3 expert stack holds 3.8e9): read as pairs the
    same bytes are half as many elements. Default: exactly when the stack has 2**31 elements or more."""
    if x.ndim != 3 or w.ndim != 3 or ids.ndim != 1 or ids.shape[0] != x.shape[0] or w.shape[1] != x.shape[2]:
        raise ValueError(f"shapes x {x.shape}, w {w.shape}, ids {ids.shape} do not form a grouped product")
    groups, batch, k_dim = x.shape
    n_dim = w.shape[2]
    cfg = config or default_config(groups, k_dim, n_dim, block if scale is not None else None)
    if batch > ROWS:
        raise ValueError(f"{batch} rows per group > {ROWS}: use the XLA path")
    fp8 = scale is not None
    if fp8 and block is None:
        raise ValueError("FP8 weights need their block size")
    if w2 is not None and (w2.shape != w.shape or (scale2 is None) != (scale is None)):
        raise ValueError("w2 must match w (and carry a scale exactly when w does)")
    picked = tiles(k_dim, n_dim, block if fp8 else None, cfg)
    if picked is None:
        raise ValueError(f"K={k_dim}, N={n_dim} do not tile by powers of 2 >= 16")
    bk, bn = picked
    assert is_pow2(bk) and is_pow2(bn)
    split = cfg.split
    if k_dim % (split * bk):
        raise ValueError(f"K={k_dim} must be a multiple of split * bk = {split} * {bk}")
    rows = max(ROWS, next_pow2(batch))
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    interpret = interpret_default() if interpret is None else interpret
    swiglu = w2 is not None
    if packed is None:
        packed = fp8 and w.size >= 2 ** 31
    if packed and (not fp8 or bn < 32):
        raise ValueError("packed reads need FP8 weights and bn >= 32")
    if packed:
        w, w2 = (None if a is None else lax.bitcast_convert_type(a.reshape(*a.shape[:-1], n_dim // 2, 2), jnp.uint16)
                 for a in (w, w2))
    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, batch=batch, rows=rows, k_dim=k_dim, bk=bk, bn=bn, split=split, block=block, fp8=fp8,
        packed=packed, swiglu=swiglu, in_dtype=x.dtype, out_dtype=out_dtype, f16=cfg.f16 and fp8 and x.dtype == jnp.bfloat16,
        interpret=interpret)
    inputs = [ids.astype(jnp.int32), x, w] + ([scale.astype(f32)] if fp8 else [])
    if swiglu:
        inputs += [w2] + ([scale2.astype(f32)] if fp8 else [])
    columns = (2, n_dim // 2) if packed else (n_dim,)
    if split == 1:
        out_shape = jax.ShapeDtypeStruct((groups, batch, *columns), out_dtype)
    else:
        out_shape = [jax.ShapeDtypeStruct((split, groups, batch, *columns), f32)] * (2 if swiglu else 1)
    out = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(groups, n_dim // bn, split),
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="moe_grouped_matvec",
    )(*inputs)
    if packed:  # [..., 2, N / 2] (even columns, then odd ones) -> [..., N]
        out = jax.tree.map(lambda a: jnp.swapaxes(a, -1, -2).reshape(*a.shape[:-2], n_dim), out)
    if split == 1:
        return out
    if swiglu:
        return _swiglu(out[0].sum(0), out[1].sum(0), x.dtype).astype(out_dtype)
    return out[0].sum(0).astype(out_dtype)
