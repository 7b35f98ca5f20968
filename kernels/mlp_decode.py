"""A batch-1 decode MLP in one Mosaic GPU launch: the weights of both its products as one continuous TMA stream per
SM, the two phases separated by a grid barrier that the stream does not wait for.

    parts = silu(h @ W_gate^T) * (h @ W_up^T) @ W_down^T,   h = rms_norm(x + sum(x_parts))

Each program (one per SM) owns a list of weight blocks: its gate/up row tiles (64 rows of both, all of K), then its
down (64-row tile, K split) tiles. Its memory warpgroup issues the TMA copies of the whole list into `stages` shared
buffers and waits only for a free buffer, so the down weights are in flight while the gate/up phase drains and the
grid barrier waits. Its compute warpgroup multiplies each [64, tk] block by the activation with wgmma, the weights
as the 64-row operand and the activation as the 8-column one (row 0 the token, rows 1-7 whatever the buffer holds:
only column 0 of each product is kept, by a select, so what those rows hold never reaches a result).

Measured on the H200 (docs/PERF.md, sessions 26 and 27; scripts/gpu/probe_weight_stream.py): the stream alone reads
the gate/up weights at 3.7 to 3.8 TB/s (llama-3.2-1b) and 4.1 to 4.2 TB/s (llama-3.1-8b), faster than the Triton
kernel, and one launch of both phases takes what the phases take alone (the barrier is hidden). The whole kernel
takes 29.0 to 29.3 us a layer at llama-3.2-1b against 31.0 to 31.3 for the Triton kernels (0.878 to 0.884 ms a
token against 0.899, so it is that shape's default: tuning.ONE_LAUNCH_MLP), and 86.9 to 87.4 at llama-3.1-8b
against 88.2 to 89.0 (level end to end: its 224 gate/up tiles take two rounds of the SMs).

The normed input h goes straight into the swizzled wgmma operand's row 0 through an aliased view of its tiles
(`_activations`). The gate/up phase's SwiGLU product crosses between programs through HBM, as a row of an [8, F]
buffer (the kernel's scratch output) written and read by TMA, into the same shared buffer. The grid barrier counts
on an int32 array that the caller passes from launch to launch (`counters`: the kernel leaves it zero), so no
launch needs a memset. Tested on the GPU only (tests/test_mlp_decode.py): jax's Mosaic GPU interpreter (0.10) does
not take the transposed wgmma operand the activation is.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.mosaic import gpu as mgpu
from jax.experimental.pallas import mosaic_gpu as plgpu
from jaxlib.mlir import ir

from tilert_jax.kernels.common import check_counters, zero_counters
from tilert_jax.kernels.matvec import combine_reference
from tilert_jax.kernels.swiglu_matvec import swiglu_matvec_reference

ROWS = 64  # weight rows per block: the wgmma's M
COLS = 8  # the activation buffer's rows: the wgmma's N (row 0 is the token)
SWIZZLE = 128  # bytes: shared buffers as [8, 64] tiles of 128-byte rows (16-bit elements), swizzled
TILE_COLS = SWIZZLE // 2
f32 = jnp.float32


def supported(x: jax.Array) -> bool:
    """Whether the kernel runs here: a Hopper GPU (wgmma), 16-bit floats, one token."""
    device = jax.devices()[0]
    return (device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")
            and x.dtype in (jnp.bfloat16, jnp.float16) and x.shape[0] == 1)


def mlp_decode_reference(x, norm_weight, eps, w_gate, w_up, w_down, *, x_parts=None, splits: int = 1):
    """-> (float32 [splits, 1, H]: the MLP's output as K-split partial sums, x_new [1, H]: the combined stream)."""
    xs = combine_reference(x, x_parts)
    mid = swiglu_matvec_reference(xs, norm_weight, eps, w_gate, w_up)  # [1, F]
    k = mid.shape[1] // splits
    parts = jnp.stack([jnp.matmul(mid[:, i * k:(i + 1) * k], w_down[:, i * k:(i + 1) * k].T,
                                  preferred_element_type=f32) for i in range(splits)])
    return parts, xs


def _shared_bytes(hidden: int, ffn: int, splits: int, tk: int, stages: int) -> int:
    """Shared memory the kernel asks for (bf16): h or the SwiGLU product's K split (one buffer, see _activations),
    the weight stream, the staging of a SwiGLU tile and of an output tile."""
    return 2 * (COLS * max(hidden, ffn // splits) + stages * 2 * ROWS * tk + ROWS) + 4 * ROWS


SHARED_LIMIT = 200 * 1024  # of the H200's 227 KB a block may take, leaving room for the barriers


def _tiling_problem(hidden: int, ffn: int, splits: int, tk: int, stages: int) -> str | None:
    """Why the kernel cannot take these shapes with this tiling, or None when it can."""
    if hidden % ROWS or hidden % tk or ffn % ROWS or ffn % (splits * 2 * tk):
        return (f"mlp_decode: hidden {hidden} and intermediate {ffn} do not divide into {ROWS}-row tiles, "
                f"{tk}-wide blocks and {splits} K splits")
    if _shared_bytes(hidden, ffn, splits, tk, stages) > SHARED_LIMIT:
        return (f"mlp_decode: hidden {hidden}, intermediate {ffn}, {splits} splits and {stages} stages of {tk} need "
                f"more than {SHARED_LIMIT} bytes of shared memory (more splits or fewer stages)")
    return None


DOWN_TILES = 128  # down tiles (64 rows x one K split) enough to give nearly every SM of an H200 (132) one


def down_splits(hidden: int, ffn: int, tk: int = 64, stages: int = 5) -> int | None:
    """The fewest K splits of the down product that make DOWN_TILES tiles and fit shared memory: llama-3.2-1b 4,
    llama-3.1-8b 2 (each split is a partial sum the next layer's input prologue adds); None where none does."""
    return next((splits for splits in (1, 2, 4, 8, 16) if hidden // ROWS * splits >= DOWN_TILES
                 and _tiling_problem(hidden, ffn, splits, tk, stages) is None), None)


def _swizzled():
    return plgpu.TilingTransform((8, TILE_COLS)), plgpu.SwizzleTransform(SWIZZLE)


def _activations(hidden: int, k_split: int, dtype):
    """The wgmma's activation operands, one shared buffer over their disjoint lifetimes: h as the swizzled [8, H]
    operand of the gate/up phase and as its physical [H/64, 8, 64] tiles, whose [:, 0, :] is row 0 (a 128-byte
    swizzle leaves each tile's row 0 in place: a register vector cannot be stored into a swizzled buffer's row
    directly, jax 0.10 and 0.11 find no layout for it, but it can go into the tiles' rows); then the SwiGLU
    product's K split as the [8, F/splits] operand of the down phase."""
    return plgpu.RefUnion(plgpu.SMEM((COLS, hidden), dtype, transforms=_swizzled()),
                          plgpu.SMEM((hidden // TILE_COLS, COLS, TILE_COLS), dtype),
                          plgpu.SMEM((COLS, k_split), dtype, transforms=_swizzled()))


def _check_aliased(*refs):
    """The views of one _activations buffer start at the same byte (a RefUnion promises no layout of its members)."""
    offsets = {ref.transforms[0].offset for ref in refs}
    if len(offsets) != 1:
        raise NotImplementedError(f"mlp_decode: this jax lays out a RefUnion's members at offsets {offsets}")


COUNTERS = 2  # the grid barrier's: programs arrived, programs left
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


def mlp_decode(
    x: jax.Array,  # [1, H] bf16 or f16
    norm_weight: jax.Array,  # [H]
    eps: float,
    w_gate: jax.Array,  # [F, H]
    w_up: jax.Array,  # [F, H]
    w_down: jax.Array,  # [H, F]
    *,
    x_parts: jax.Array | None = None,  # [S, 1, H] float32 partial sums pending on x
    splits: int | None = None,  # the down product's K splits (its output's partial sums; None: down_splits')
    tk: int = 64,  # weight block width (K per block; a multiple of 64)
    stages: int = 5,  # weight blocks in flight per SM (two [64, tk] blocks each)
    programs: int | None = None,  # default: one per SM
    counters: jax.Array | None = None,  # int32 [>= 2] zeros: the grid barrier's (None: fresh)
):
    """mlp_decode_reference in one launch on a Hopper GPU (see `supported`) -> (parts, x_new, counters: zero again,
    for the next layer's launch: passed from launch to launch, they need no memset in between)."""
    (batch, hidden), ffn = x.shape, w_gate.shape[0]
    if batch != 1:
        raise ValueError(f"mlp_decode takes one token, got x {x.shape}")
    if w_up.shape != (ffn, hidden) or w_gate.shape != (ffn, hidden) or w_down.shape != (hidden, ffn):
        raise ValueError(f"MLP weights {w_gate.shape}/{w_up.shape}/{w_down.shape} do not fit x {x.shape}")
    splits = splits or down_splits(hidden, ffn, tk, stages)
    if splits is None:
        raise ValueError(f"mlp_decode: no K split of the down product fits hidden {hidden}, intermediate {ffn}")
    problem = _tiling_problem(hidden, ffn, splits, tk, stages)
    if problem:
        raise ValueError(problem)
    k_split = ffn // splits
    n_parts = 0 if x_parts is None else x_parts.shape[0]
    programs = programs or jax.devices()[0].core_count
    dtype = x.dtype
    t1, s1 = ffn // ROWS, hidden // tk  # gate/up tiles, blocks per tile (a gate and an up block per step)
    row_tiles = hidden // ROWS
    t2, s2 = row_tiles * splits, k_split // (2 * tk)  # down tiles (split-major), steps per tile (two blocks a step)

    def body(*refs):
        it = iter(refs)
        x_gmem = next(it)  # [1, H]
        parts_gmem = next(it) if n_parts else None  # [S, 1, H] float32
        nw_gmem, wg_gmem, wu_gmem, wd_gmem, counters = next(it), next(it), next(it), next(it), next(it)
        out_gmem, xnew_gmem, mid_gmem = next(it), next(it), next(it)
        (h_smem, h_rows, mid_smem), w_smem, row_smem, out_smem, full, free, act_bar = it
        _check_aliased(h_smem, h_rows, mid_smem)

        p = lax.axis_index("sm")
        wg = lax.axis_index("wg")
        n1 = (t1 - p + programs - 1) // programs  # this program's gate/up tiles: t = p, p + programs, ...
        first2 = p * t2 // programs  # and its down tiles: a contiguous run, so mostly of one K split
        n2 = (p + 1) * t2 // programs - first2
        steps1 = n1 * s1

        @pl.when(wg == 1)  # the memory warpgroup: every weight block of both phases, in order
        def _memory():
            @pl.loop(0, steps1 + n2 * s2)
            def _issue(i):
                slot = lax.rem(i, stages)

                @pl.when(i >= stages)
                def _():
                    plgpu.barrier_wait(free.at[slot])

                @pl.when(i < steps1)
                def _():
                    rows = pl.ds(pl.multiple_of((p + i // s1 * programs) * ROWS, ROWS), ROWS)
                    cols = pl.ds(pl.multiple_of(lax.rem(i, s1) * tk, tk), tk)
                    plgpu.copy_gmem_to_smem(wg_gmem.at[rows, cols], w_smem.at[slot, 0], full.at[slot])
                    plgpu.copy_gmem_to_smem(wu_gmem.at[rows, cols], w_smem.at[slot, 1], full.at[slot])

                @pl.when(i >= steps1)
                def _():
                    j = i - steps1
                    t = first2 + j // s2
                    rows = pl.ds(pl.multiple_of(lax.rem(t, row_tiles) * ROWS, ROWS), ROWS)
                    k0 = pl.multiple_of(t // row_tiles * k_split + lax.rem(j, s2) * 2 * tk, tk)
                    for half in range(2):
                        plgpu.copy_gmem_to_smem(wd_gmem.at[rows, pl.ds(k0 + half * tk, tk)], w_smem.at[slot, half],
                                                full.at[slot])

        @pl.when(wg == 0)  # the compute warpgroup
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

            # The prologue: the combined stream and its RMSNorm, formed by every program.
            xs = x_gmem[0].astype(f32)  # [H]
            for s in range(n_parts):
                xs = xs + parts_gmem[s, 0]
            xs = xs.astype(dtype)
            x32 = xs.astype(f32)
            rinv = lax.rsqrt(jnp.sum(x32 * x32) / hidden + eps)
            h = (nw_gmem[...].astype(f32) * (x32 * rinv).astype(dtype).astype(f32)).astype(dtype)
            h_rows[:, 0, :] = h.reshape(hidden // TILE_COLS, TILE_COLS)  # row 0 of h_smem's tiles (see _aliased)
            plgpu.commit_smem()

            @pl.when(p == 0)
            def _():
                xnew_gmem[0] = xs

            @pl.loop(0, n1)
            def _gate_up_tile(a):
                def accumulate(acc_g, acc_u):
                    @pl.loop(0, s1)
                    def _step(ks):
                        slot = lax.rem(a * s1 + ks, stages)
                        plgpu.barrier_wait(full.at[slot])
                        hb = h_smem.at[:, pl.ds(pl.multiple_of(ks * tk, tk), tk)].transpose((1, 0))
                        plgpu.wgmma(acc_g, w_smem.at[slot, 0], hb)
                        plgpu.wgmma(acc_u, w_smem.at[slot, 1], hb)
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(free.at[slot])

                    g, u = acc_g[...], acc_u[...]
                    mid = _token_column(g / (1.0 + jnp.exp(-g)) * u).astype(dtype)  # [64]
                    rows = pl.ds(pl.multiple_of((p + a * programs) * ROWS, ROWS), ROWS)
                    send(mid, row_smem, mid_gmem.at[0, rows])

                pl.run_scoped(accumulate, plgpu.ACC((ROWS, COLS), f32), plgpu.ACC((ROWS, COLS), f32))

            # The grid barrier: every program's SwiGLU columns written before any down tile reads them.
            plgpu.wait_smem_to_gmem(0)
            _signal(counters, ARRIVED, 1)
            _wait(counters, ARRIVED, programs, decrement=False)
            _signal(counters, LEFT, 1)

            @pl.when(p == 0)  # after every program has passed the barrier, both counters back to zero
            def _():
                _wait(counters, LEFT, programs, decrement=True)
                _signal(counters, ARRIVED, -programs)

            @pl.loop(0, n2)
            def _down_tile(b):
                t = first2 + b
                split = t // row_tiles

                @pl.when(jnp.logical_or(b == 0, lax.rem(t, row_tiles) == 0))  # a new K split
                def _():
                    receive(mid_gmem.at[:, pl.ds(pl.multiple_of(split * k_split, tk), k_split)], mid_smem)

                def accumulate(acc):
                    @pl.loop(0, s2)
                    def _step(ks):
                        slot = lax.rem(steps1 + b * s2 + ks, stages)
                        plgpu.barrier_wait(full.at[slot])
                        for half in range(2):
                            k0 = pl.multiple_of((2 * ks + half) * tk, tk)
                            plgpu.wgmma(acc, w_smem.at[slot, half],
                                        mid_smem.at[:, pl.ds(k0, tk)].transpose((1, 0)))
                        plgpu.wgmma_wait(0)
                        plgpu.barrier_arrive(free.at[slot])

                    rows = pl.ds(pl.multiple_of(lax.rem(t, row_tiles) * ROWS, ROWS), ROWS)
                    send(_token_column(acc[...]), out_smem, out_gmem.at[split, 0, rows])

                pl.run_scoped(accumulate, plgpu.ACC((ROWS, COLS), f32))
            plgpu.wait_smem_to_gmem(0)

    scratch = (_activations(hidden, k_split, dtype),
               plgpu.SMEM((stages, 2, ROWS, tk), dtype, transforms=_swizzled()),  # the weight stream
               plgpu.SMEM((ROWS,), dtype),  # a SwiGLU tile on its way to HBM
               plgpu.SMEM((ROWS,), f32),  # an output tile on its way to HBM
               plgpu.Barrier(num_arrivals=2, num_barriers=stages),  # a stage's blocks arrived
               plgpu.Barrier(num_arrivals=1, num_barriers=stages),  # a stage's blocks were used
               plgpu.Barrier(num_arrivals=1))  # an activation arrived
    # pl.kernel, not plgpu.kernel: it takes the counters as a Ref, aliased in and out of the launch.
    call = pl.kernel(
        lambda *refs: pl.run_scoped(functools.partial(body, *refs), *scratch, collective_axes="wg"),
        out_type=(jax.ShapeDtypeStruct((splits, 1, hidden), f32),  # the MLP's output, K-split partial sums
                  jax.ShapeDtypeStruct((1, hidden), dtype),  # x_new
                  jax.ShapeDtypeStruct((COLS, ffn), dtype)),  # row 0: the SwiGLU product (scratch)
        mesh=plgpu.Mesh(grid=(programs,), grid_names=("sm",), num_threads=2, thread_name="wg"),
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
        name="mlp_decode",
    )
    counters = zero_counters(COUNTERS) if counters is None else counters
    check_counters(counters, COUNTERS, "mlp_decode")
    counters = jax.new_ref(counters)
    parts, x_new, _ = call(x, *([x_parts.astype(f32)] if n_parts else []), norm_weight, w_gate, w_up, w_down,
                           counters)
    return parts, x_new, counters[...]
