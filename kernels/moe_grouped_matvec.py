"""Grouped matrix-vector products over selected experts for decode, with in-kernel FP8 dequantization:
y[g] = x[g] @ W[ids[g]] for a handful of groups g (a token's k routed experts), W a stack [E, K, N] read in place.

XLA's path gathers the selected experts' weights into a fresh [G, K, N] array before multiplying (a copy of every
byte the step needs); here each program streams its expert's [bk, bn] tiles straight from the stack, converts FP8
tiles in registers (to float16 against bf16 activations: `_to_f16`) and applies each (128 x 128) block's scale to
the tile's partial product.
With `w2` (gate and up) the epilogue is silu(x @ W) * (x @ W2), one launch for both.

A plain Linear at decode (bf16 or FP8) is the one-group case (ids = [0], the weight viewed as a stack of one); a
narrow output splits K into float32 partial sums so that the grid fills the GPU (`default_config`), and FP8 stacks
of 2**31 elements or more are read as uint16 pairs (see `grouped_matvecs`, which also runs several products in one
launch). With arrival counters (`counters`) the program of an output tile that arrives last adds the tile's
partial sums (in order) and finishes it (the SwiGLU, the cast) inside the launch, so no XLA kernel runs between two
launches (`common.arrive_last`); without them XLA finishes the sums after the launch.

A group holds one to GROUP_ROWS rows: decode's token rows, or prefill's sorted tiles of one expert's rows
(models/moe.py, `experts_tiled`), whose dots then run on tensor cores as a grouped matmul.
A group whose id is negative reads nothing and yields zeros: under expert parallelism the pairs routed to another
device's experts cost no weight bytes here. A product's x rows may serve several groups (a token's routed experts
read its one row). A split launch may leave its float32 partial sums to the consumer (`finish=False`: o_proj and the
experts' down projection leave them pending on the residual stream, kernels/stream_norm.py), and the routed
experts' down projection weighs each group's output by its routing weight (`Product.group_weights`), so those
outputs are partial sums of the stream too. (Forming an x tile from partial sums in the prologue, e.g. the SwiGLU
of a split gate/up, was measured slower: Triton pipelines only the loads that feed a dot directly, so every other
load costs a memory round trip per loop step.)

Lowering: Triton, for the reasons given in matvec.py (one to sixteen rows, a memory-bound stream of tiles).
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels import fp8_matmul
from tilert_jax.kernels.common import NN, ROWS, arrive_last, check_counters, dot, interpret_default, is_pow2, \
    load_rows, load_sum, next_pow2, row_mask, store_rows, triton_params
from tilert_jax.kernels.tuning import SMS, grouped_entry

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class GroupedConfig:
    bn: int = 64  # output columns per program (a power of 2; clipped to divide N and the scale block)
    bk: int = 128  # weight rows per loop step (a power of 2; clipped to divide K and the scale block)
    split: int = 1  # K splits (at most; each product takes the largest divisor of its tile count up to this):
    # programs write float32 partial sums, added (and the SwiGLU applied) by XLA after, or with arrival counters by
    # the last program of each output tile to arrive (no XLA kernel between launches)
    num_warps: int = 4
    num_stages: int = 4
    f16: bool = True  # bf16 x with FP8 weights: multiply in float16 (see `_to_f16`), 15% to 30% faster (H200)
    fma: bool = False  # groups of one row: multiply-adds into a [bk, bn] float32 tile summed over K at the end,
    # no tensor-core dot (so no FP8 tile staged through shared memory into its operand layout)


GROUP_ROWS = 64  # rows a group may hold: decode's 1 to 16 (padded to ROWS by masked loads), prefill's expert tiles
RESIDENT_PLAIN = 3  # plain bf16 programs resident on an H200 multiprocessor: 4 pipeline stages of a [128, 64] bf16
# weight tile are 64 KB of its 228 KB of shared memory


def default_config(shapes: list[tuple[int, int, int, bool]], block: tuple[int, int] | None, swiglu: bool = False
                   ) -> GroupedConfig:
    """For a launch of products (groups, K, N, fp8): 128-byte weight row segments (bn = 128 FP8 columns or 64 bf16
    ones), and the K dimension split. A launch of plain products, or of FP8 ones, splits until its grid fills the
    GPU twice over (a single [7168, 576] weight would otherwise run on nine programs; a product whose K cannot split
    that far keeps its largest split; the FP8 kernel is bound by its instructions and gains from more programs a
    multiprocessor). A plain bf16 launch stops short of that where the next split would pass the programs resident
    at once, RESIDENT_PLAIN a multiprocessor (DeepSeek-V2-Lite's q beside kv_a: 228 programs 6.2 us a layer against
    456: 7.15, docs/PERF.md session 13). A bf16 launch holding a SwiGLU product (two weight tiles a pipeline stage:
    about one program resident per multiprocessor) splits only as far as one wave of SMS programs allows: more
    programs queue behind the first wave and pay their ramp again (DeepSeek-V2-Lite's routed gate/up: 132 programs
    against 264, 2.056 -> 2.015 ms a step; the router beside the shared gate/up: 90 programs 10.2 us against 180:
    11.0 and 360: 13.7. The same rule on DeepSeek-V3's FP8 launches: 2.088 against 1.848 ms; docs/PERF.md session
    12)."""
    fp8 = any(f for *_, f in shapes)
    cfg = GroupedConfig(bn=128 if fp8 else 64, bk=128)
    picked = [tiles(k, n, block if f else None, cfg) for _, k, n, f in shapes]
    if any(t is None for t in picked):
        return cfg
    most = max(_split_for(k, bk, k // bk) for (_, k, _, _), (bk, _) in zip(shapes, picked))

    def programs(split: int) -> int:
        return sum(g * (n // bn) * _split_for(k, bk, split) for (g, k, n, _), (bk, bn) in zip(shapes, picked))

    split = 1
    if swiglu and not fp8:
        while split < most and programs(split * 2) <= SMS:
            split *= 2
    else:
        while programs(split) < 2 * SMS and split < most and (fp8 or programs(split * 2) <= RESIDENT_PLAIN * SMS):
            split *= 2
    return dataclasses.replace(cfg, split=split)


def tuned_config(shapes: list[tuple[int, int, int, bool]], swiglus: list[bool], batch: int,
                 block: tuple[int, int] | None) -> GroupedConfig | None:
    """The launch's measured configuration (kernels/tuning.json, `tuning.grouped_entry`; its split taken as given) when
    one is recorded and tiles every product, else None."""
    entry = grouped_entry(batch, [(*shape, swiglu) for shape, swiglu in zip(shapes, swiglus)])
    if entry is None:
        return None
    cfg = GroupedConfig(**entry)
    picked = [tiles(k, n, block if fp8 else None, cfg) for _, k, n, fp8 in shapes]
    fits = all(t is not None and k % (cfg.split * t[0]) == 0 for (_, k, _, _), t in zip(shapes, picked))
    return cfg if fits else None


def launch_config(shapes: list[tuple[int, int, int, bool]], swiglus: list[bool], batch: int,
                  block: tuple[int, int] | None, config: GroupedConfig | None = None) -> tuple[GroupedConfig, bool]:
    """(the configuration a launch runs, whether its split is exact): `config` as given, else the tuning table's entry
    (`tuned_config`), both with their split taken as given; else `default_config`, whose split each product fits
    (`product_split`)."""
    given = config or tuned_config(shapes, swiglus, batch, block)
    return (given, True) if given else (default_config(shapes, block, swiglu=any(swiglus)), False)


def product_split(k_dim: int, bk: int, cfg: GroupedConfig, exact: bool) -> int:
    """The K split one product of the launch runs."""
    return cfg.split if exact else _split_for(k_dim, bk, cfg.split)


def _split_for(k_dim: int, bk: int, split: int) -> int:
    """The largest split <= `split` leaving each part a whole number of bk tiles, at least two: a power of 2, or
    when the tile count is odd any of its divisors, so that such a K splits at all (K = 10944 = 64 x 171, DeepSeek-V2's
    dense down projection: 9 ways)."""
    tiles_ = k_dim // bk
    return max((d for d in range(1, min(split, tiles_ // 2) + 1)
                if tiles_ % d == 0 and (is_pow2(d) or tiles_ % 2)), default=1)


def grouped_matvec_reference(
    x: jax.Array,  # [G, B, K]
    w: jax.Array,  # [E, K, N] (float8_e4m3fn with scale)
    ids: jax.Array,  # [G] int32: the expert of each group (negative: none, the group's output is zero)
    *,
    scale: jax.Array | None = None,  # [E, ceil(K / block_in), ceil(N / block_out)] float32
    block: tuple[int, int] | None = None,  # (block_out, block_in)
    w2: jax.Array | None = None,  # [E, K, N]: with w2 the result is silu(x @ w) * (x @ w2)
    scale2: jax.Array | None = None,
    group_weights: jax.Array | None = None,  # [G] float32: the float32 product times each group's weight
    out_dtype=None,
) -> jax.Array:  # [G, B, N]
    some = jnp.maximum(ids, 0)

    def product(weight, s):  # float32
        sel = weight[some]
        sel = sel.astype(x.dtype) if s is None else fp8_matmul.dequantize(sel, s[some], block, x.dtype)
        y = jnp.einsum("gbk,gkn->gbn", x, sel, preferred_element_type=f32)
        return jnp.where((ids >= 0)[:, None, None], y, 0.0)

    y = product(w, scale)
    if group_weights is not None:
        return (y * group_weights.astype(f32)[:, None, None]).astype(out_dtype or f32)
    y = y.astype(x.dtype)
    if w2 is not None:
        y = jax.nn.silu(y) * product(w2, scale2).astype(x.dtype)
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


@dataclasses.dataclass(frozen=True)
class Product:
    """One grouped product of a launch: y[g] = x[g] @ w[ids[g]], or silu(x[g] @ w[ids[g]]) * (x[g] @ w2[ids[g]])."""
    x: jax.Array  # [X, B, K] with X dividing G (group g reads x[g // (G / X)]), B <= 16
    w: jax.Array  # [E, K, N] (float8_e4m3fn with scale)
    ids: jax.Array  # [G] int32: the expert of each group (negative: none, zeros)
    scale: jax.Array | None = None  # [E, ceil(K / block_in), ceil(N / block_out)] float32
    w2: jax.Array | None = None  # [E, K, N], with scale2 exactly when w has a scale
    scale2: jax.Array | None = None
    group_weights: jax.Array | None = None  # [G] float32: each group's float32 output times its weight (no w2)
    out_dtype: object = None  # x's dtype by default (float32 with group_weights)


def product_reference(p: Product, block: tuple[int, int] | None = None) -> jax.Array:  # [G, B, N]
    x = jnp.repeat(p.x, p.ids.shape[0] // p.x.shape[0], axis=0)
    return grouped_matvec_reference(x, p.w, p.ids, scale=p.scale, block=block, w2=p.w2, scale2=p.scale2,
                                    group_weights=p.group_weights, out_dtype=p.out_dtype)


@dataclasses.dataclass(frozen=True)
class Epilogue:
    """Work for one program of a launch: the last of product `product`'s programs to finish runs
    body(*that product's output refs, *input refs, *output refs) once every one of them has stored its outputs (its
    partial sums [S, G, B, N] float32 when split and left to the consumer, else [G, B, N]). The other products'
    programs keep streaming beside it, which hides its serial tail: the router's last program routes the token while
    the shared expert's gate/up runs (kernels/moe_routing.py, `routing_epilogue`)."""
    product: int
    body: Callable
    inputs: tuple[jax.Array, ...] = ()
    out_shapes: tuple[jax.ShapeDtypeStruct, ...] = ()


@dataclasses.dataclass(frozen=True)
class _Plan:
    """A product's static shape in the launch: its programs are first ... first + programs - 1 of the 1-D grid,
    ordered (group, column tile, K split)."""
    groups: int
    x_groups: int
    batch: int
    k_dim: int
    n_dim: int
    bk: int
    bn: int
    split: int
    fp8: bool
    packed: bool
    swiglu: bool
    weighted: bool
    f16: bool
    fma: bool
    in_dtype: object
    out_dtype: object
    first: int
    counter: int | None  # finished in the launch: the arrival counter of its first (group, column tile)

    @property
    def programs(self) -> int:
        return self.groups * (self.n_dim // self.bn) * self.split

    @property
    def num_inputs(self) -> int:  # ids, x, w [, scale] [, w2 [, scale2]] [, group weights]
        return 3 + self.fp8 + self.swiglu * (1 + self.fp8) + self.weighted

    @property
    def num_outputs(self) -> int:  # y, and/or the float32 partial sums of w (and of w2)
        if self.split == 1:
            return 1
        return (self.counter is not None) + 1 + self.swiglu


def _finish(plan: _Plan, total, total2=None):
    """A product's output from its float32 sums (of w, and of w2): the SwiGLU or the sum, in out_dtype."""
    return (total if total2 is None else _swiglu(total, total2, plan.in_dtype)).astype(plan.out_dtype)


def _product(plan: _Plan, block, interpret, in_refs, out_refs, counters, local):
    """The program `local` of one product: a [rows, bn] output tile over its K range (split: its partial sums,
    and when it arrives last at its counter the finished tile)."""
    it = iter(in_refs)
    ids_ref, x_ref = next(it), next(it)  # [G], [X, B, K]
    w_ref = next(it)  # [E, K, N] ([E, K, N / 2] uint16 packed)
    s_ref = next(it) if plan.fp8 else None  # [E, K / bi, N / bo]
    w2_ref = next(it) if plan.swiglu else None
    s2_ref = next(it) if plan.swiglu and plan.fp8 else None
    gw_ref = next(it) if plan.weighted else None  # [G] float32
    o_ref = out_refs[0] if plan.split == 1 or plan.counter is not None else None  # [G, B, N]
    parts = out_refs[-1 - plan.swiglu:] if plan.split > 1 else ()  # [split, G, B, N] float32 (of w, and of w2)

    batch, bk, bn, split, packed = plan.batch, plan.bk, plan.bn, plan.split, plan.packed
    rows = 1 if plan.fma else max(ROWS, next_pow2(batch))
    n_tiles = plan.n_dim // bn
    g = local // (n_tiles * split)
    xg = g // (plan.groups // plan.x_groups)  # the x rows this group reads
    n0 = pl.multiple_of((local // split) % n_tiles * bn, bn)
    part = local % split
    k_begin = part * (plan.k_dim // split)
    e = ids_ref[g]
    block_out, block_in = block if plan.fp8 else (1, 1)
    phases = 2 if packed else 1  # packed: even and odd columns are two products of bn / 2 columns each
    width = bn // phases

    def partial(wr, sr, k0, xt, x_scale):  # -> per phase [rows, width] float32 ("fma": [bk, width])
        if packed:
            tiles_ = _fp8_pairs(plt.load(wr.at[e, pl.ds(k0, bk), pl.ds(n0 // 2, width)],
                                         eviction_policy="evict_first"))
        else:
            tiles_ = (plt.load(wr.at[e, pl.ds(k0, bk), pl.ds(n0, bn)], eviction_policy="evict_first"),)
        if plan.fma:  # xt [bk, 1] float32, the block's scale folded in
            xs = xt if sr is None else xt * sr[e, k0 // block_in, n0 // block_out]
            return [t.astype(f32) * xs for t in tiles_]
        out = [dot(xt, t.astype(xt.dtype), NN, interpret) for t in tiles_]
        if x_scale is not None:
            out = [p * x_scale for p in out]
        if sr is not None:
            out = [p * sr[e, k0 // block_in, n0 // block_out] for p in out]
        return out

    def body(i, accs):
        k0 = pl.multiple_of(k_begin + i * bk, bk)
        if plan.fma:
            xt, x_scale = plt.load(x_ref.at[xg, jnp.int32(0), pl.ds(k0, bk)]).astype(f32)[:, None], None  # [bk, 1]
        else:
            xt = load_rows(x_ref.at[xg, pl.ds(0, rows), pl.ds(k0, bk)], batch).astype(plan.in_dtype)  # [rows, bk]
            xt, x_scale = _to_f16(xt) if plan.f16 else (xt, None)
        weights = ((w_ref, s_ref), (w2_ref, s2_ref)) if plan.swiglu else ((w_ref, s_ref),)
        return tuple(tuple(a + p for a, p in zip(acc, partial(wr, sr, k0, xt, x_scale)))
                     for acc, (wr, sr) in zip(accs, weights))

    zeros = tuple(jnp.zeros((bk if plan.fma else rows, width), f32) for _ in range(phases))
    init = (zeros, zeros) if plan.swiglu else (zeros,)
    accs = lax.cond(e >= 0, lambda: lax.fori_loop(0, plan.k_dim // split // bk, body, init),
                    lambda: init)  # a group without an expert reads nothing
    if plan.fma:  # [bk, width] -> [1, width]
        accs = tuple(tuple(jnp.sum(a, axis=0, keepdims=True) for a in acc) for acc in accs)
    if plan.weighted:
        accs = (tuple(a * gw_ref[g] for a in accs[0]),)

    def window(phase):  # the index of this program's [rows, width] output (packed: [.., 2, N / 2], even odd halves)
        if packed:
            return g, pl.ds(0, rows), jnp.int32(phase), pl.ds(n0 // 2, width)
        return g, pl.ds(0, rows), pl.ds(n0, bn)

    for phase in range(phases):
        if split == 1:
            store_rows(o_ref.at[window(phase)], _finish(plan, *(acc[phase] for acc in accs)), batch)
        for ref, acc in zip(parts, accs):
            store_rows(ref.at[(part, *window(phase))], acc[phase], batch)
    if plan.counter is None:  # (unsplit, or left to XLA or the consumer)
        return
    masked = dict(mask=row_mask(rows, width, batch), other=0) if rows > batch else {}

    @pl.when(arrive_last(counters, plan.counter + local // split, split, interpret))  # the tile's last split
    def _():
        for phase in range(phases):
            sums = (load_sum(ref, *window(phase), **masked) for ref in parts)  # in order s = 0, 1, ...
            store_rows(o_ref.at[window(phase)], _finish(plan, *sums), batch)


def _kernel(*refs, plans, block, epilogue, epilogue_counter, counted, interpret):
    """Each product's programs are a contiguous range of the 1-D grid; a program runs the product it falls in (and,
    last of the epilogue's product to arrive, the epilogue)."""
    epi_in, epi_out = (len(epilogue.inputs), len(epilogue.out_shapes)) if epilogue else (0, 0)
    num_in = sum(p.num_inputs for p in plans) + epi_in + counted
    ins, outs = iter(refs[:num_in]), iter(refs[num_in:])
    counters = refs[-1] if counted else None  # [C] int32 (the output aliased to the counters given)
    product_ins = [[next(ins) for _ in range(p.num_inputs)] for p in plans]
    product_outs = [[next(outs) for _ in range(p.num_outputs)] for p in plans]
    epi_refs = [next(ins) for _ in range(epi_in)] + [next(outs) for _ in range(epi_out)]
    pid = pl.program_id(0)
    for i, plan in enumerate(plans):
        def run(local, i=i, plan=plan):
            _product(plan, block, interpret, product_ins[i], product_outs[i], counters, local)
            if epilogue is not None and epilogue.product == i:
                pl.when(arrive_last(counters, epilogue_counter, plan.programs, interpret))(
                    lambda: epilogue.body(*product_outs[i], *epi_refs))
        if len(plans) == 1:
            run(pid)
        else:
            pl.when((pid >= plan.first) & (pid < plan.first + plan.programs))(lambda run=run, plan=plan: run(
                pid - plan.first))


def _check(p: Product, block) -> tuple[int, int, int, bool]:
    """(groups, K, N, fp8) of a product, or a ValueError naming what does not fit."""
    x_groups, batch, k_dim = p.x.shape if p.x.ndim == 3 else (0, 0, -1)
    groups = p.ids.shape[0] if p.ids.ndim == 1 else -1
    if p.w.ndim != 3 or groups < 1 or not x_groups or groups % x_groups or p.w.shape[1] != k_dim:
        raise ValueError(f"shapes x {p.x.shape}, w {p.w.shape}, ids {p.ids.shape} do not form a grouped product")
    if batch > GROUP_ROWS:
        raise ValueError(f"{batch} rows per group > {GROUP_ROWS}: use the XLA path")
    if p.scale is not None and block is None:
        raise ValueError("FP8 weights need their block size")
    if p.w2 is not None and (p.w2.shape != p.w.shape or (p.scale2 is None) != (p.scale is None)):
        raise ValueError("w2 must match w (and carry a scale exactly when w does)")
    if p.group_weights is not None and (p.w2 is not None or p.group_weights.shape != (groups,)):
        raise ValueError(f"group_weights must be [{groups}] and the product plain (no w2)")
    return groups, k_dim, p.w.shape[2], p.scale is not None


def grouped_matvecs(
    products: list[Product],
    *,
    block: tuple[int, int] | None = None,  # (block_out, block_in) of the FP8 products
    config: GroupedConfig | None = None,
    packed: bool | None = None,
    finish: bool = True,
    counters: jax.Array | None = None,  # [C] int32 zeros: arrival counters (common.zero_counters), returned zero
    epilogue: Epilogue | None = None,
    interpret: bool | None = None,
) -> list | tuple:  # per product [G, B, N], or (finish=False, split) float32 partial sums [S, G, B, N]
    """Several grouped products in one launch (the routed experts beside the shared expert, q beside kv_a): fewer
    launches, and each product's programs fill the GPU beside the others'. The launch parameters: `launch_config`.
    finish=False leaves a split plain product's partial sums to its consumer.

    Without `counters` XLA adds a split product's partial sums (and applies the SwiGLU) after the launch, and the
    result is the list. With them the launch finishes those products itself (the last program of each output tile
    to arrive adds the tile's partial sums, in order, and finishes it) and the result is (list, counters after the
    launch: zero again, for the next launch). Each such product takes the next G * N / bn counters, one per (group g,
    column tile t) at g * (N / bn) + t, so a launch needs C >= the sum of G * N / bn over the split products it
    finishes (a ValueError names the count otherwise).

    An `epilogue` (which needs counters: it takes one more, after the products') runs in the last program of its
    product to finish; the result is then (list, the epilogue's outputs, counters).

    packed: read FP8 stacks as uint16 pairs. Pallas' Triton lowering computes element offsets in 32 bits up to
    2**32 bytes, which wraps past 2**31 one-byte elements (a DeepSeek-V3 expert stack holds 3.8e9): read as pairs the
    same bytes are half as many elements. Default: exactly for the stacks of 2**31 elements or more."""
    shapes = [_check(p, block) for p in products]
    if epilogue is not None and (counters is None or not 0 <= epilogue.product < len(products)):
        raise ValueError(f"an epilogue needs arrival counters and one of the {len(products)} products, got product "
                         f"{epilogue.product}{'' if counters is not None else ' without counters'}")
    cfg, exact = launch_config(shapes, [p.w2 is not None for p in products], max(p.x.shape[1] for p in products),
                               block, config)
    interpret = interpret_default() if interpret is None else interpret
    plans, inputs, out_shapes, first, needed = [], [], [], 0, 0
    for p, (groups, k_dim, n_dim, fp8) in zip(products, shapes):
        picked = tiles(k_dim, n_dim, block if fp8 else None, cfg)
        if picked is None:
            raise ValueError(f"K={k_dim}, N={n_dim} do not tile by powers of 2 >= 16")
        bk, bn = picked
        assert is_pow2(bk) and is_pow2(bn)
        split = product_split(k_dim, bk, cfg, exact)
        if k_dim % (split * bk):
            raise ValueError(f"K={k_dim} must be a multiple of split * bk = {split} * {bk}")
        is_packed = fp8 and p.w.size >= 2 ** 31 if packed is None else packed
        if is_packed and (not fp8 or bn < 32):
            raise ValueError("packed reads need FP8 weights and bn >= 32")
        x_groups, batch, _ = p.x.shape
        in_dtype = p.x.dtype
        weighted = p.group_weights is not None
        in_launch = counters is not None and split > 1 and (finish or p.w2 is not None)
        plan = _Plan(groups=groups, x_groups=x_groups, batch=batch, k_dim=k_dim, n_dim=n_dim,
                     bk=bk, bn=bn, split=split, fp8=fp8, packed=is_packed, swiglu=p.w2 is not None, weighted=weighted,
                     f16=cfg.f16 and fp8 and in_dtype == jnp.bfloat16, fma=cfg.fma and batch == 1,
                     in_dtype=in_dtype,
                     out_dtype=jnp.dtype(p.out_dtype or (f32 if weighted else in_dtype)), first=first,
                     counter=needed if in_launch else None)
        plans.append(plan)
        first += plan.programs
        needed += in_launch * groups * (n_dim // bn)
        w, w2 = p.w, p.w2
        if is_packed:
            w, w2 = (None if a is None else lax.bitcast_convert_type(a.reshape(*a.shape[:-1], n_dim // 2, 2),
                                                                     jnp.uint16) for a in (w, w2))
        inputs += [p.ids.astype(jnp.int32), p.x, w] + ([p.scale.astype(f32)] if fp8 else [])
        if plan.swiglu:
            inputs += [w2] + ([p.scale2.astype(f32)] if fp8 else [])
        if weighted:
            inputs.append(p.group_weights.astype(f32))
        columns = (2, n_dim // 2) if is_packed else (n_dim,)
        if split == 1 or in_launch:
            out_shapes.append(jax.ShapeDtypeStruct((groups, plan.batch, *columns), plan.out_dtype))
        if split > 1:  # the partial sums (with counters: a workspace the launch finishes from)
            out_shapes += [jax.ShapeDtypeStruct((split, groups, plan.batch, *columns), f32)] * (1 + plan.swiglu)
    epilogue_counter = needed
    if epilogue is not None:
        inputs += list(epilogue.inputs)
        out_shapes += list(epilogue.out_shapes)
        needed += 1
    counted = needed > 0
    if counters is not None:
        check_counters(counters, needed, "grouped_matvecs")
    if counted:
        inputs.append(counters)
        out_shapes.append(jax.ShapeDtypeStruct(counters.shape, jnp.int32))
    outs = pl.pallas_call(
        functools.partial(_kernel, plans=tuple(plans), block=block, epilogue=epilogue,
                          epilogue_counter=epilogue_counter, counted=counted, interpret=interpret),
        out_shape=out_shapes,
        grid=(first,),
        input_output_aliases={len(inputs) - 1: len(out_shapes) - 1} if counted else {},
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="moe_grouped_matvec",
    )(*inputs)
    results, it = [], iter(outs)
    for plan in plans:
        out = [next(it) for _ in range(plan.num_outputs)]
        if plan.split > 1 and plan.counter is None and (finish or plan.swiglu):  # finished here, by XLA
            out = [_finish(plan, *(a.sum(0) for a in out))]
        y = out[0]  # packed: [..., 2, N / 2] (even columns, then odd ones) -> [..., N]
        results.append(jnp.swapaxes(y, -1, -2).reshape(*y.shape[:-2], plan.n_dim) if plan.packed else y)
    if counters is None:
        return results
    counters = outs[-1] if counted else counters
    if epilogue is None:
        return results, counters
    return results, tuple(next(it) for _ in epilogue.out_shapes), counters


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
    """One grouped product in its own launch (see `grouped_matvecs`)."""
    return grouped_matvecs([Product(x=x, w=w, ids=ids, scale=scale, w2=w2, scale2=scale2, out_dtype=out_dtype)],
                           block=block, config=config, packed=packed, interpret=interpret)[0]
