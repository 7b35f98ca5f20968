"""A batch-1 decode layer's weight products in one Mosaic GPU launch: the weights of every product as one continuous
TMA stream per SM, the products separated by grid barriers that the stream does not wait for.

    x1 = x + sum(x_parts) + attn @ W_o^T                  the output projection (when attn and w_o are given)
    m = silu(h @ W_gate^T) * (h @ W_up^T),                h = rms_norm(x1, mlp_norm)
    x2 = x1 + m @ W_down^T
    qkv = rms_norm(x2, next_norm) @ [W_q; W_k; W_v]^T     the next layer's Q/K/V (when next_norm, next_qkv are given)
    attention(qkv, the next layer's KV cache)             its attention (when next_attention is given)

Every product but gate/up is split along K into 64-row tiles x K splits (`Splits`), each tile's result a float32
partial sum: the output projection's are added by the gate/up prologue, the down product's by the Q/K/V prologue (or
returned, pending on x_new, to the next launch), the Q/K/V projection's by the attention kernel
(kernels/decode_attention.py) or by this launch's last phase, the next layer's attention
(kernels/stream_attention.py: its splits are `attn` to the next launch, which merges them in the output
projection's prologue). Each program (one per SM) owns a contiguous run of every product's tiles. Its memory
warpgroup issues the TMA copies of all its weight blocks, product after product, into `stages` shared buffers and
waits only for a free buffer, so the next product's weights are in flight while a product drains and the grid
barrier waits. Its compute warpgroup multiplies each [64, tk] block by the activation with wgmma, the weights as the
64-row operand and the activation as the 8-column one (row 0 the token, rows 1-7 whatever the buffer holds: only
column 0 of each product is kept, by a select, so what those rows hold never reaches a result).

The activations reach the wgmma operand's row 0 without HBM: attn and h are written from registers through an
aliased view of the operand's tiles (`_activations`). The SwiGLU product crosses between programs through HBM, as a
row of an [8, F] buffer (the kernel's scratch output) written and read by TMA, and so do the partial sums. The grid
barriers count on an int32 array that the caller passes from launch to launch (`counters`: the kernel leaves it
zero), so no launch needs a memset.

The memory warpgroup keeps at most `in_flight` steps requested and not landed (tuning.stream_in_flight), though
`stages` buffers hold them: every request in flight queues ahead of the grid barriers' stores and counters, and at
llama-3.2-1b a barrier released 4 us after its last arrival with all 11 stages requested (the regions Mosaic GPU's
profiler records, `profile_dir`; docs/PERF.md, session 28).

Measured on the H200 (docs/PERF.md, sessions 26 to 28; scripts/gpu/probe_weight_stream.py): the whole layer's
weights (the output projection, the MLP, the next Q/K/V) take 36.0 to 36.3 us a layer at llama-3.2-1b (3.4 TB/s;
40.5 for the three launches it replaces), 111.3 at llama-3.1-8b (114.8) and 100.4 at qwen3-8b (104.2); a decode
step 0.822 to 0.835 ms, 3.993 to 4.001 ms and 4.242 ms against 0.865 (the MLP alone in one launch), 4.163 and 4.481
(the Triton kernels), so it is those shapes' default (tuning.ONE_LAUNCH). Tested on the GPU only
(tests/test_layer_decode.py): jax's Mosaic GPU interpreter (0.10) does not take the transposed wgmma operand the
activation is.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir

from tilert_jax.kernels import stream_attention as sa
from tilert_jax.kernels import tuning
from tilert_jax.kernels.common import check_counters, zero_counters
from tilert_jax.kernels.decode_attention import decode_attention_reference
from tilert_jax.kernels.matvec import combine_reference
from tilert_jax.kernels.rms_norm import rms_norm_reference
from tilert_jax.kernels.swiglu_matvec import swiglu_matvec_reference

ROWS = 64  # weight rows per block: the wgmma's M
COLS = 8  # the activation buffer's rows: the wgmma's N (row 0 is the token)
SWIZZLE = 128  # bytes: shared buffers as [8, 64] tiles of 128-byte rows (16-bit elements), swizzled
TILE_COLS = SWIZZLE // 2
SMS = 132  # an H200's multiprocessors: the programs the split rule plans for where no device says otherwise
f32 = jnp.float32


class Splits(NamedTuple):
    """The K splits of the split products: each is that many float32 partial sums."""
    o: int = 1
    down: int = 1
    qkv: int = 1


def supported(x: jax.Array) -> bool:
    """Whether the kernel runs here: a Hopper GPU (wgmma), 16-bit floats, one token."""
    device = jax.devices()[0]
    return (device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")
            and x.dtype in (jnp.bfloat16, jnp.float16) and x.shape[0] == 1)


def default_programs() -> int:
    """The kernel's programs by default: one per multiprocessor."""
    return getattr(jax.devices()[0], "core_count", SMS)


def _split_product(inp, w, splits: int):
    """inp [1, K] @ w[N, K]^T as `splits` float32 partial sums over K blocks -> [splits, 1, N]."""
    k = inp.shape[1] // splits
    return jnp.stack([jnp.matmul(inp[:, i * k:(i + 1) * k], w[:, i * k:(i + 1) * k].T, preferred_element_type=f32)
                      for i in range(splits)])


def layer_decode_reference(x, mlp_norm, eps, w_gate, w_up, w_down, *, x_parts=None, attn=None, w_o=None,
                           next_norm=None, next_qkv=None, next_attention: sa.Attention | None = None,
                           splits: Splits = Splits()):
    """-> (parts, x_new): the down product's float32 partial sums [splits.down, 1, H] pending on x_new = x1 [1, H];
    with the next layer's Q/K/V, that projection's [splits.qkv, 1, N_q + N_k + N_v] and x_new = x2 (no sums
    pending on it). attn may be the previous launch's sa.Partials. With next_attention, the next layer's attention
    on that Q/K/V follows: (parts, x_new, its output [1, n * d], k_cache, v_cache)."""
    if isinstance(attn, sa.Partials):
        attn = sa.merge_reference(attn, w_o.shape[1] // (attn.out.shape[1] * attn.out.shape[3]), x.dtype)
    if attn is not None:
        o = _split_product(attn, w_o, splits.o)
        x_parts = o if x_parts is None else jnp.concatenate([x_parts, o])
    x1 = combine_reference(x, x_parts)
    down = _split_product(swiglu_matvec_reference(x1, mlp_norm, eps, w_gate, w_up), w_down, splits.down)
    if next_qkv is None:
        return down, x1
    x2 = combine_reference(x1, down)
    qkv = _split_product(rms_norm_reference(x2, next_norm, eps), jnp.concatenate(next_qkv), splits.qkv)
    if next_attention is None:
        return qkv, x2
    att = next_attention
    _, kvh, _, d = att.k_cache.shape
    out, k_cache, v_cache = decode_attention_reference(
        qkv.reshape(qkv.shape[0], 1, -1, d), att.k_cache, att.v_cache, att.pos, att.cos, att.sin,
        num_heads=att.num_heads, num_kv_heads=kvh, scale=att.scale)
    return qkv, x2, out.reshape(1, att.num_heads * d), k_cache, v_cache


def _shared_bytes(operand_cols: int, tk: int, stages: int, attention_bytes: int = 0) -> int:
    """Shared memory the kernel asks for (bf16): the activation operands or the attention's buffers (see
    _activations), the weight stream, the staging of a SwiGLU tile and of an output tile."""
    return max(2 * COLS * operand_cols, attention_bytes) + 2 * (stages * 2 * ROWS * tk + ROWS) + 4 * ROWS


SHARED_LIMIT = 220 * 1024  # of the H200's 227 KB a block may take, leaving room for the barriers
PROFILED_REGIONS = 128  # a warpgroup's named regions in a launch (a loop's body is a region in each step)
MAX_STAGES = 11  # weight blocks in flight per SM by default (two [64, tk] blocks each), where they fit


def _share(row_tiles: int, splits: int, programs: int) -> float:
    """The largest share of a split product's weight one program streams (its tiles are spread evenly)."""
    return -(-row_tiles * splits // programs) / splits


def product_splits(row_tiles: int, k: int, tk: int = 64, programs: int = SMS, fits=lambda splits: True,
                   cost=lambda splits: 0) -> int | None:
    """The K split of a product of `row_tiles` 64-row tiles that gives one program the smallest largest share of its
    weight (ties: the least `cost`, then the fewest partial sums) among those that divide K into 2 * tk-wide steps and
    fit; None: none. llama-3.2-1b: o 4 (128 tiles), down 4, Q/K/V 8 (384 tiles: 3 or fewer of 32 KB a program)."""
    candidates = [s for s in (1, 2, 4, 8, 16) if k % (s * 2 * tk) == 0 and fits(s)]
    return min(candidates, key=lambda s: (_share(row_tiles, s, programs), cost(s), s), default=None)


def _spans_heads(attn_width: int, splits: int, kv_heads: int) -> bool:
    return (attn_width // splits) % (attn_width // kv_heads) == 0


def o_splits(hidden: int, attn_width: int, tk: int = 64, programs: int = SMS,
             merged: tuple[int, int] | None = None) -> int | None:
    """The output projection's K split (product_splits). Merging the attention's splits (merged: their number and the
    KV heads), a split spans whole KV heads (`sa.merge`), and among equal weight shares the one whose programs read
    the fewest bytes in the prologues wins: a program's share of the splits' outputs and log-sum-exps (8 bytes a
    column a split), then the s pending sums (llama-3.1-8b: 4 splits, not 2, 192 against 288 KB; llama-3.2-1b 4)."""
    if merged is None:
        return product_splits(hidden // ROWS, attn_width, tk, programs)
    parts, kv_heads = merged
    return product_splits(hidden // ROWS, attn_width, tk, programs, lambda s: _spans_heads(attn_width, s, kv_heads),
                          lambda s: 8 * attn_width * parts // s + 4 * hidden * s)


def down_splits(hidden: int, ffn: int, tk: int = 64, stages: int = 2, programs: int = SMS) -> int | None:
    """The down product's K split (product_splits) where the SwiGLU product's K split fits shared memory beside
    `stages` weight buffers (by default the fewest the kernel runs with): llama-3.2-1b 4, llama-3.1-8b 2 (its 112 KB
    slice in h's place); None where none does."""
    fits = lambda s: _shared_bytes(max(hidden, ffn // s), tk, stages) <= SHARED_LIMIT  # noqa: E731
    return product_splits(hidden // ROWS, ffn, tk, programs, fits)


def _swizzled():
    return plgpu.TilingTransform((8, TILE_COLS)), plgpu.SwizzleTransform(SWIZZLE)


def _activations(widths: tuple[int, ...], k_split: int, dtype, others=()):
    """The wgmma's activation operands, one shared buffer over their disjoint lifetimes: for each row operand (attn,
    h) the swizzled [8, W] operand and its physical [W/64, 8, 64] tiles, whose [:, 0, :] is row 0 (a 128-byte swizzle
    leaves each tile's row 0 in place: a register vector cannot be stored into a swizzled buffer's row directly,
    jax 0.10 and 0.11 find no layout for it, but it can go into the tiles' rows); then the SwiGLU product's K split
    as the [8, F/splits] operand of the down product."""
    members = []
    for width in widths:
        members += [plgpu.SMEM((COLS, width), dtype, transforms=_swizzled()),
                    plgpu.SMEM((width // TILE_COLS, COLS, TILE_COLS), dtype)]
    return plgpu.RefUnion(*members, plgpu.SMEM((COLS, k_split), dtype, transforms=_swizzled()), *others)


def _check_aliased(*refs):
    """The views of one _activations buffer start at the same byte (a RefUnion promises no layout of its members)."""
    offsets = {ref.transforms[0].offset for ref in refs}
    if len(offsets) != 1:
        raise NotImplementedError(f"layer_decode: this jax lays out a RefUnion's members at offsets {offsets}")


COUNTERS = 2  # the grid barriers': programs arrived (at every barrier, summed), programs left
ARRIVED, LEFT = range(COUNTERS)


def _signal(counters, index: int, value: int):
    """Adds value to counters[index] (int32 in HBM) from one thread, releasing this warpgroup's writes at GPU scope."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def signal(ctx, ref):
        mgpu.utils.warpgroup_barrier()
        mgpu.utils.SemaphoreRef(_counter_ptr(ref, index)).signal(value, memory_scope="gpu")
    signal(counters)


def _wait(counters, index: int, value: int, *, decrement: bool):
    """Waits until counters[index] reaches value (then subtracts it when decrement), acquiring at GPU scope."""
    @plgpu.inline_mgpu(arg_types=(plgpu.RefType(),))
    def wait(ctx, ref):
        mgpu.utils.SemaphoreRef(_counter_ptr(ref, index)).wait(value, decrement=decrement, memory_scope="gpu")
    wait(counters)


def _counter_ptr(ref, index: int):
    return mgpu.utils.getelementptr(mgpu.utils.memref_ptr(ref), [index], ir.IntegerType.get_signless(32))


def _token_column(acc):
    """Column 0 of a [64, 8] float32 product, as a [64] vector (the other columns are selected away)."""
    column = plgpu.broadcasted_iota(jnp.int32, acc.shape, 1, layout=plgpu.Layout.WGMMA)
    return jnp.sum(jnp.where(column == 0, acc, 0.0), axis=1)


class _Product(NamedTuple):
    """One product's tiles in the stream: tile t is row tile t % row_tiles of K split t // row_tiles (gate/up: row
    tile t, no split), `steps` pipeline steps of two [64, tk] blocks each; issue(t, step, slot) starts the step's
    copies."""
    tiles: int
    row_tiles: int
    steps: int
    issue: Callable[..., None]


def _run(tiles: int, p, programs: int):
    """Program p's contiguous run of `tiles` tiles -> (first, count)."""
    first = p * tiles // programs
    return first, (p + 1) * tiles // programs - first


def layer_decode(
    x: jax.Array,  # [1, H] bf16 or f16
    mlp_norm: jax.Array,  # [H]
    eps: float,
    w_gate: jax.Array,  # [F, H]
    w_up: jax.Array,  # [F, H]
    w_down: jax.Array,  # [H, F]
    *,
    x_parts: jax.Array | None = None,  # [S, 1, H] float32 partial sums pending on x
    attn: jax.Array | sa.Partials | None = None,  # [1, A]: the attention's output (or its splits), for the o product
    w_o: jax.Array | None = None,  # [H, A]
    next_norm: jax.Array | None = None,  # [H]: the next layer's attention norm
    next_qkv: tuple[jax.Array, ...] | None = None,  # its (W_q [Nq, H], W_k [Nk, H], W_v [Nv, H])
    next_attention: sa.Attention | None = None,  # and its attention on that Q/K/V (kernels/stream_attention.py)
    splits: Splits | None = None,  # None: product_splits' for each
    tk: int = 64,  # weight block width (K per block; a multiple of 64)
    stages: int | None = None,  # weight blocks in shared memory per SM (None: as many as fit, at most MAX_STAGES)
    in_flight: int | None = None,  # of which requested and not yet landed at most (None: tuning.stream_in_flight's)
    programs: int | None = None,  # default: one per SM
    counters: jax.Array | None = None,  # int32 [>= 2] zeros: the grid barriers' (None: fresh)
    profile_dir: str | None = None,  # where Mosaic GPU's profiler writes each launch's trace of the named regions
):
    """layer_decode_reference in one launch on a Hopper GPU (see `supported`) -> (parts, x_new, counters: zero again,
    for the next launch: passed from launch to launch, they need no memset in between); with next_attention, then its
    sa.Partials (the next launch's attn) and the updated k_cache and v_cache."""
    (batch, hidden), ffn = x.shape, w_gate.shape[0]
    programs = programs or default_programs()
    merging, attn_in = isinstance(attn, sa.Partials), attn
    if merging:  # the output projection's operand merged from the attention's splits
        attn = jax.ShapeDtypeStruct((1, 0 if w_o is None else w_o.shape[1]), x.dtype)
    with_attention = next_attention is not None
    if with_attention:
        att = next_attention
        if next_qkv is None or not sa.supported(att, programs):
            raise ValueError("layer_decode: the next attention needs the next Q/K/V, one token, head_dim 64 or 128, 2 "
                             f"to 8 query heads per KV head and a cache of at most {sa.MAX_WINDOW} rows a program; "
                             f"got {att.k_cache.shape} with {att.num_heads} heads")
        _, kv_heads, max_len, head_dim = att.k_cache.shape
    if batch != 1:
        raise ValueError(f"layer_decode takes one token, got x {x.shape}")
    if w_up.shape != (ffn, hidden) or w_gate.shape != (ffn, hidden) or w_down.shape != (hidden, ffn):
        raise ValueError(f"MLP weights {w_gate.shape}/{w_up.shape}/{w_down.shape} do not fit x {x.shape}")
    if (attn is None) != (w_o is None) or (attn is not None and w_o.shape != (hidden, attn.shape[1])):
        raise ValueError(f"layer_decode: the output projection needs attn [1, A] and w_o [H, A] with H {hidden}")
    if (next_norm is None) != (next_qkv is None) or (next_qkv is not None and any(
            w.ndim != 2 or w.shape[1] != hidden for w in next_qkv)):
        raise ValueError(f"layer_decode: the next Q/K/V needs next_norm and (W_q, W_k, W_v) [N, {hidden}]")
    with_o, with_qkv = attn is not None, next_qkv is not None
    attn_width = attn.shape[1] if with_o else hidden
    qkv_rows = [w.shape[0] for w in next_qkv] if with_qkv else []
    if any(width % ROWS for width in [hidden, ffn, attn_width, *qkv_rows]) or hidden % tk:
        raise ValueError(f"layer_decode: hidden {hidden}, intermediate {ffn}, attention {attn_width} and Q/K/V "
                         f"{qkv_rows} do not divide into {ROWS}-row tiles and {tk}-wide blocks")
    merged = attn_in.out.shape[:2] if merging else None  # (the attention's splits, KV heads)
    if splits is None:
        splits = Splits(o=o_splits(hidden, attn_width, tk, programs, merged) if with_o else 1,
                        down=down_splits(hidden, ffn, tk, stages or 2, programs),  # then as many stages as fit
                        qkv=product_splits(sum(qkv_rows) // ROWS, hidden, tk, programs) if with_qkv else 1)
    for name, k, s in (("o", attn_width, splits.o), ("down", ffn, splits.down), ("qkv", hidden, splits.qkv)):
        if not s or k % (s * 2 * tk):
            raise ValueError(f"layer_decode: the {name} product's K {k} does not divide into {s} splits of "
                             f"{2 * tk}-wide steps")
    if merging and not _spans_heads(attn_width, splits.o, merged[1]):
        raise ValueError(f"layer_decode: merging the attention, the output projection's {splits.o} K splits must "
                         f"each span whole KV heads of {attn_width // merged[1]} columns")
    k_split = ffn // splits.down
    operand_cols = max(hidden, attn_width, k_split)
    window = sa.window(max_len, kv_heads, programs)[1] if with_attention else 0  # cache rows a program reads
    attention_bytes = sa.shared_bytes(head_dim, window) if with_attention else 0
    shared = functools.partial(_shared_bytes, operand_cols, tk, attention_bytes=attention_bytes)
    if stages is None:
        stages = max([s for s in range(2, MAX_STAGES + 1) if shared(s) <= SHARED_LIMIT], default=2)
    in_flight = min(in_flight or tuning.stream_in_flight(hidden, ffn) or stages, stages)
    if shared(stages) > SHARED_LIMIT:
        raise ValueError(f"layer_decode: hidden {hidden}, intermediate {ffn}, {splits.down} down splits and {stages} "
                         f"stages of {tk} need more than {SHARED_LIMIT} bytes of shared memory (more splits or "
                         f"fewer stages)")
    n_parts = 0 if x_parts is None else x_parts.shape[0]
    dtype = x.dtype
    row_tiles = hidden // ROWS
    qkv_bounds = [sum(qkv_rows[:i]) // ROWS for i in range(4)]  # row tiles where W_q, W_k, W_v start (and end)

    widths = (attn_width, hidden) if with_o and attn_width != hidden else (hidden,)

    def body(*refs):
        it = iter(refs)
        x_gmem = next(it)  # [1, H]
        parts_gmem = next(it) if n_parts else None  # [S, 1, H] float32
        attn_gmem = (next(it), next(it)) if merging else next(it) if with_o else None  # Partials or [1, A]
        wo_gmem = next(it) if with_o else None
        nw_gmem, wg_gmem, wu_gmem, wd_gmem = next(it), next(it), next(it), next(it)
        next_nw_gmem, wqkv_gmem = (next(it), (next(it), next(it), next(it))) if with_qkv else (None, None)
        attention_in = (next(it), next(it)) if with_attention else ()  # R, pos
        counters = next(it)
        caches = (next(it), next(it)) if with_attention else ()  # [kvh * max_len, d] each
        out_gmem, xnew_gmem, mid_gmem = next(it), next(it), next(it)  # mid: row 0 the SwiGLU product
        o_gmem = next(it) if with_o else None  # [splits.o, 1, H] float32: the output projection's partial sums
        down_gmem = next(it) if with_qkv else out_gmem  # [splits.down, 1, H] float32
        partials = (next(it), next(it)) if with_attention else ()  # the next attention's (sa.Partials)
        union, w_smem, row_smem, out_smem, full, free, act_bar, *attention_bars = it
        views, mid_smem, attention_smem = union[:2 * len(widths)], union[2 * len(widths)], union[2 * len(widths) + 1:]
        _check_aliased(*views, mid_smem, *attention_smem[:2])
        (a_smem, a_rows), (h_smem, h_rows) = views[:2], views[-2:]  # attn's operand and h's (the same if A == H)

        def copy_blocks(ref, rows, k0, slot, second=None):  # a step: [64, tk] blocks of ref (and of `second`)
            rows = pl.ds(pl.multiple_of(rows * ROWS, ROWS), ROWS)
            for half in range(2):
                src = ref if second is None or half == 0 else second
                cols = pl.ds(pl.multiple_of(k0 + (half * tk if second is None else 0), tk), tk)
                plgpu.copy_gmem_to_smem(src.at[rows, cols], w_smem.at[slot, half], full.at[slot])

        def split_issue(ref, k_split):
            def issue(t, step, slot):
                copy_blocks(ref, lax.rem(t, row_tiles), t // row_tiles * k_split + step * 2 * tk, slot)
            return issue

        def qkv_issue(t, step, slot):
            r, k0 = lax.rem(t, qkv_bounds[3]), t // qkv_bounds[3] * (hidden // splits.qkv) + step * 2 * tk
            for ref, lo, hi in zip(wqkv_gmem, qkv_bounds, qkv_bounds[1:]):
                pl.when(jnp.logical_and(r >= lo, r < hi))(lambda ref=ref, lo=lo: copy_blocks(ref, r - lo, k0, slot))

        products = {"gate_up": _Product(ffn // ROWS, ffn // ROWS, hidden // tk,
                                        lambda t, step, slot: copy_blocks(wg_gmem, t, step * tk, slot, wu_gmem)),
                    "down": _Product(row_tiles * splits.down, row_tiles, k_split // (2 * tk),
                                     split_issue(wd_gmem, k_split))}
        if with_o:
            products = {"o": _Product(row_tiles * splits.o, row_tiles, attn_width // (splits.o * 2 * tk),
                                      split_issue(wo_gmem, attn_width // splits.o)), **products}
        if with_qkv:
            products["qkv"] = _Product(qkv_bounds[3] * splits.qkv, qkv_bounds[3], hidden // (splits.qkv * 2 * tk),
                                       qkv_issue)
        p = lax.axis_index("sm")
        runs = {name: _run(product.tiles, p, programs) for name, product in products.items()}
        step0, total = {}, 0  # this program's first pipeline step of each product
        for name, product in products.items():
            step0[name] = total
            total = total + runs[name][1] * product.steps

        @pl.when(lax.axis_index("wg") == 1)  # the memory warpgroup: every weight block of every product, in order
        def _memory():
            for name, product in products.items():
                first, count = runs[name]

                def issue(j):
                    i = step0[name] + j
                    slot = lax.rem(i, stages)

                    @pl.when(i >= stages)
                    def _():
                        plgpu.barrier_wait(free.at[slot])

                    if in_flight < stages:  # and for the copies of the step in_flight steps back to land
                        @pl.when(i >= in_flight)
                        def _():
                            plgpu.barrier_wait(full.at[lax.rem(i - in_flight, stages)])

                    product.issue(first + j // product.steps, lax.rem(j, product.steps), slot)

                with jax.named_scope(f"issue_{name}"):  # a profiled region (see profile_dir)
                    pl.loop(0, count * product.steps)(issue)

        @pl.when(lax.axis_index("wg") == 0)  # the compute warpgroup
        def _compute():
            def send(value, staging, dst):  # a vector through shared memory to HBM (TMA)
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                staging[...] = value
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(staging, dst)

            def receive(src, dst):  # HBM -> shared memory (TMA), after this program's own stores
                plgpu.wait_smem_to_gmem(0)
                plgpu.copy_gmem_to_smem(src, dst, act_bar)
                plgpu.barrier_wait(act_bar)

            def step_slot(name, b, ks):  # the buffer of step ks of tile b
                return lax.rem(step0[name] + b * products[name].steps + ks, stages)

            def consume(name, b, ks, products_of_step):  # step ks of tile b: [(acc, operand) for each block]
                """Starts the step's products and releases the step before's buffer once its products are done (the
                last step's, `finish`): a step's products run while the next step's blocks are awaited."""
                slot = step_slot(name, b, ks)
                plgpu.barrier_wait(full.at[slot])
                for half, (acc, operand) in enumerate(products_of_step):
                    plgpu.wgmma(acc, w_smem.at[slot, half], operand.transpose((1, 0)))
                plgpu.wgmma_wait(len(products_of_step))

                @pl.when(ks > 0)
                def _():
                    plgpu.barrier_arrive(free.at[step_slot(name, b, ks - 1)])

            def finish(name, b):  # after tile b's last step: its products done, its last buffer released
                plgpu.wgmma_wait(0)
                plgpu.barrier_arrive(free.at[step_slot(name, b, products[name].steps - 1)])

            def split_product(name, operand, out, on_split=None):  # tiles of 64 rows x one K split -> partial sums
                """operand(split, k0): the activation's [8, tk] block at k0 of the split (a view of shared memory);
                on_split(split): run before a tile of a K split other than the last tile's."""
                (first, count), product = runs[name], products[name]

                def tile(b):
                    t = first + b
                    split, r = t // product.row_tiles, lax.rem(t, product.row_tiles)
                    if on_split:
                        pl.when(jnp.logical_or(b == 0, r == 0))(lambda: on_split(split))

                    def accumulate(acc):
                        @pl.loop(0, product.steps)
                        def _step(ks):
                            consume(name, b, ks, [(acc, operand(split, pl.multiple_of((2 * ks + half) * tk, tk)))
                                                  for half in range(2)])

                        finish(name, b)
                        rows = pl.ds(pl.multiple_of(r * ROWS, ROWS), ROWS)
                        send(_token_column(acc[...]), out_smem, out.at[split, 0, rows])

                    pl.run_scoped(accumulate, plgpu.ACC((ROWS, COLS), f32))

                with jax.named_scope(name):
                    pl.loop(0, count)(tile)

            def whole(ref, k_split):  # an operand that holds every K split: split `split`'s block at k0
                return lambda split, k0: ref.at[:, pl.ds(pl.multiple_of(split * k_split + k0, tk), tk)]

            barriers = 0

            def grid_barrier():  # every program's stores of the product before it visible to every program
                nonlocal barriers
                barriers += 1
                with jax.named_scope(f"barrier_{barriers}"):
                    plgpu.wait_smem_to_gmem(0)
                    _signal(counters, ARRIVED, 1)
                    _wait(counters, ARRIVED, barriers * programs, decrement=False)

            def write_row(rows_view, vector):  # a [W] vector into row 0 of an operand, through its tiles
                rows_view[:, 0, :] = vector.reshape(rows_view.shape[0], TILE_COLS)
                plgpu.commit_smem()

            @jax.named_scope("stream")
            def stream(x_in, parts_refs):  # x + its partial sums, rounded to x's dtype
                xs = x_in.astype(f32)
                for ref in parts_refs:
                    for s in range(ref.shape[0]):
                        xs = xs + ref[s, 0]
                return xs.astype(dtype)

            @jax.named_scope("norm")
            def normed(xs, weight):  # rms_norm_reference, in registers
                x32 = xs.astype(f32)
                rinv = lax.rsqrt(jnp.sum(x32 * x32) / hidden + eps)
                return (weight[...].astype(f32) * (x32 * rinv).astype(dtype).astype(f32)).astype(dtype)

            x_in = x_gmem[0]  # [H], loaded while the output projection runs
            o_split = attn_width // splits.o
            if merging:
                @jax.named_scope("merge")
                def merge_split(split):  # the attention's output for this K split of the output projection
                    kv_cols = attn_width // merged[1]  # the output projection's columns a KV head has
                    heads = o_split // kv_cols  # KV heads a split spans
                    a_rows[pl.ds(split * (o_split // TILE_COLS), o_split // TILE_COLS), 0, :] = sa.merge(
                        *attn_gmem, split * heads, heads, kv_cols // attn_in.out.shape[3], dtype)
                    plgpu.commit_smem()

                split_product("o", whole(a_smem, o_split), o_gmem, on_split=merge_split)
                grid_barrier()
            elif with_o:
                write_row(a_rows, attn_gmem[0])
                split_product("o", whole(a_smem, o_split), o_gmem)
                grid_barrier()
            x1 = stream(x_in, ([parts_gmem] if n_parts else []) + ([o_gmem] if with_o else []))
            write_row(h_rows, normed(x1, nw_gmem))

            first, count = runs["gate_up"]

            def gate_up_tile(b):
                def accumulate(acc_g, acc_u):
                    @pl.loop(0, products["gate_up"].steps)
                    def _step(ks):
                        hb = h_smem.at[:, pl.ds(pl.multiple_of(ks * tk, tk), tk)]
                        consume("gate_up", b, ks, [(acc_g, hb), (acc_u, hb)])

                    finish("gate_up", b)
                    g, u = acc_g[...], acc_u[...]
                    mid = _token_column(g / (1.0 + jnp.exp(-g)) * u).astype(dtype)  # [64]
                    send(mid, row_smem, mid_gmem.at[0, pl.ds(pl.multiple_of((first + b) * ROWS, ROWS), ROWS)])

                pl.run_scoped(accumulate, plgpu.ACC((ROWS, COLS), f32), plgpu.ACC((ROWS, COLS), f32))

            with jax.named_scope("gate_up"):
                pl.loop(0, count)(gate_up_tile)

            grid_barrier()  # every SwiGLU column written before any down tile reads it
            split_product("down", lambda split, k0: mid_smem.at[:, pl.ds(k0, tk)], down_gmem,
                          on_split=lambda split: receive(
                              mid_gmem.at[:, pl.ds(pl.multiple_of(split * k_split, tk), k_split)], mid_smem))
            x_new = x1
            if with_qkv:
                grid_barrier()
                x_new = stream(x1, [down_gmem])
                write_row(h_rows, normed(x_new, next_nw_gmem))
                split_product("qkv", whole(h_smem, hidden // splits.qkv), out_gmem)
            if with_attention:  # the Q/K/V sums complete after the barrier: the next layer's attention
                with jax.named_scope("attention"):
                    sums = out_gmem.reshape(splits.qkv, sum(qkv_rows) // head_dim, head_dim)
                    sa.attend(p, (sums, *attention_in, *caches, *partials), attention_smem, attention_bars,
                              grid_barrier, num_heads=att.num_heads, kv_heads=kv_heads, max_len=max_len, d=head_dim,
                              n_parts=splits.qkv, scale=att.scale, programs=programs, dtype=dtype)

            @pl.when(p == 0)
            def _():
                xnew_gmem[0] = x_new

            _signal(counters, LEFT, 1)

            @pl.when(p == 0)  # after every program has passed every barrier, both counters back to zero
            def _():
                _wait(counters, LEFT, programs, decrement=True)
                _signal(counters, ARRIVED, -barriers * programs)
            plgpu.wait_smem_to_gmem(0)

    # the attention's buffers share the activations' (dead by then); the first two of them alias (see sa.scratch)
    attention_smem = sa.scratch(head_dim, window, dtype) if with_attention else ()
    scratch = (_activations(widths, k_split, dtype, attention_smem),
               plgpu.SMEM((stages, 2, ROWS, tk), dtype, transforms=_swizzled()),  # the weight stream
               plgpu.SMEM((ROWS,), dtype),  # a SwiGLU tile on its way to HBM
               plgpu.SMEM((ROWS,), f32),  # an output tile on its way to HBM
               plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # a stage's blocks arrived
               plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # a stage's blocks were used
               plgpu.Barrier(num_arrivals=1),  # an activation arrived
               *((plgpu.Barrier(num_arrivals=1), plgpu.Barrier(num_arrivals=2))
                 if with_attention else ()))  # the attention's R and K/V windows arrived
    out_parts = (splits.qkv, 1, sum(qkv_rows)) if with_qkv else (splits.down, 1, hidden)
    out_type = (jax.ShapeDtypeStruct(out_parts, f32), jax.ShapeDtypeStruct((1, hidden), dtype),
                jax.ShapeDtypeStruct((COLS, ffn), dtype))
    out_type += ((jax.ShapeDtypeStruct((splits.o, 1, hidden), f32),) if with_o else ())
    out_type += ((jax.ShapeDtypeStruct((splits.down, 1, hidden), f32),) if with_qkv else ())
    out_type += sa.workspace_types(att, programs) if with_attention else ()
    # pl.kernel, not plgpu.kernel: it takes the counters as a Ref, aliased in and out of the launch.
    call = pl.kernel(
        lambda *refs: pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg"),
        out_type=out_type,
        mesh=plgpu.Mesh(grid=(programs,), grid_names=("sm",), num_threads=2, thread_name="wg"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup,
                                             profile_space=PROFILED_REGIONS if profile_dir else 0,
                                             profile_dir=profile_dir or ""),
        name="layer_decode",
    )
    counters = zero_counters(COUNTERS) if counters is None else counters
    check_counters(counters, COUNTERS, "layer_decode")
    counters = jax.new_ref(counters)
    attention_args, caches = [], []
    if with_attention:
        attention_args = [sa.rope_matrix(att.cos, att.sin), jnp.reshape(att.pos, (1,)).astype(jnp.int32)]
        caches = [jax.new_ref(c.reshape(-1, head_dim)) for c in (att.k_cache, att.v_cache)]
    attn_args = list(attn_in) if merging else [attn] if with_o else []
    args = [x, *([x_parts.astype(f32)] if n_parts else []), *attn_args, *([w_o] if with_o else []), mlp_norm, w_gate,
            w_up, w_down, *([next_norm, *next_qkv] if with_qkv else []), *attention_args, counters, *caches]
    parts, x_new, *rest = call(*args)
    if with_attention:
        shape = att.k_cache.shape
        return (parts, x_new, counters[...], sa.Partials(*rest[-2:]), caches[0][...].reshape(shape),
                caches[1][...].reshape(shape))
    return parts, x_new, counters[...]
