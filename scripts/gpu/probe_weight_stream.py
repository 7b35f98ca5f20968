"""A decode MLP's weights as one continuous stream of blocks per SM (Mosaic GPU): what a whole-layer persistent
kernel would rest on, measured before it is built.

Each program (one per SM) owns a list of weight blocks across both phases of the MLP: its gate/up row tiles, then
its down (row tile, K split) tiles. Its memory warpgroup issues the TMA copies of that list into `stages` shared
buffers and never waits for anything but a free buffer, so the down weights are already in flight while the
gate/up phase ends and the grid barrier waits. The compute warpgroup multiplies each [64, tk] weight block by the
activation (wgmma: the weights as the 64-row operand, the activation as the 8-column one, batch padded to 8).

Variants, per preset, each timed over `--copies` layers of distinct weights in one program:
  gate_up   the first phase alone (silu(x @ Wg^T) * (x @ Wu^T), float32 [N, 8] out)
  down      the second alone (mid @ Wd^T as K-split float32 partial sums [S, N, 8])
  mlp       both in one launch with a grid barrier between them
and XLA's products at the same shapes (batch 1). The phase outputs are checked against jnp (the down phase reads a
given mid, not the first phase's output: this probe measures the stream, not the layout a layer kernel needs).
Then the decode step's MLP as it runs today against kernels/mlp_decode.py (`decode_mlp_ways`).

    python scripts/gpu/probe_weight_stream.py [--presets P,...] [--stages 6] [--tk 64] [--splits 4] [--programs N]
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu

from tilert_jax.kernels import ops, tuning
from tilert_jax.kernels.mlp_decode import mlp_decode, mlp_decode_reference
from tilert_jax.profiling import emit, kernel_time, preset_probe

ROWS = 64  # weight rows per block (the wgmma's M)
BATCH = 8  # the activation's padded batch (the wgmma's N)
f32 = jnp.float32


def _transforms(dtype):
    swizzle = 128
    return (plgpu.TilingTransform((8, swizzle // jnp.dtype(dtype).itemsize)), plgpu.SwizzleTransform(swizzle))


def _tiles_of(total: int, p, programs: int):
    """How many of `total` tiles program p takes when tile t goes to program t % programs."""
    return (total - p + programs - 1) // programs


def stream_mlp(x, w_gate, w_up, mid, w_down, *, phases=("gate_up", "down"), splits: int, tk: int = 64,
               stages: int = 6, programs: int | None = None):
    """x [8, H], w_gate/w_up [F, H], mid [8, F], w_down [H, F] (bf16) -> (silu(g) * u as float32 [F, 8],
    K-split partial sums of mid @ w_down^T as float32 [splits, H, 8]); a phase left out of `phases` leaves its
    output unwritten."""
    hidden, ffn = x.shape[1], mid.shape[1]
    programs = programs or jax.devices()[0].core_count
    dtype = x.dtype
    t1, s1 = ffn // ROWS, hidden // tk  # gate/up tiles, steps per tile
    k_split = ffn // splits
    t2, s2 = hidden // ROWS * splits, k_split // (2 * tk)  # down tiles, steps per tile (two blocks a step)
    assert ffn % ROWS == 0 and hidden % (ROWS * 1) == 0 and hidden % tk == 0 and k_split % (2 * tk) == 0
    run1, run2 = "gate_up" in phases, "down" in phases
    tr = _transforms(dtype)

    def body(x_gmem, wg_gmem, wu_gmem, mid_gmem, wd_gmem, out1, out2, x_smem, mid_smem, w_smem, out_smem, full,
             free, act_bar):
        p = lax.axis_index("sm")
        wg = lax.axis_index("wg")
        n1 = _tiles_of(t1, p, programs) if run1 else 0
        n2 = _tiles_of(t2, p, programs) if run2 else 0
        steps1 = n1 * s1

        @pl.when(wg == 1)  # the memory warpgroup: every block of both phases, in order
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
                    t = p + j // s2 * programs
                    rows = pl.ds(pl.multiple_of(t // splits * ROWS, ROWS), ROWS)
                    k0 = pl.multiple_of(lax.rem(t, splits) * k_split + lax.rem(j, s2) * 2 * tk, tk)
                    plgpu.copy_gmem_to_smem(wd_gmem.at[rows, pl.ds(k0, tk)], w_smem.at[slot, 0], full.at[slot])
                    plgpu.copy_gmem_to_smem(wd_gmem.at[rows, pl.ds(k0 + tk, tk)], w_smem.at[slot, 1],
                                            full.at[slot])

        @pl.when(wg == 0)  # the compute warpgroup
        def _compute():
            def store(value, dst):  # a [64, 8] float32 tile through shared memory to HBM
                plgpu.wait_smem_to_gmem(0, wait_read_only=True)
                out_smem[...] = value
                plgpu.commit_smem()
                plgpu.copy_smem_to_gmem(out_smem, dst)

            if run1:
                plgpu.copy_gmem_to_smem(x_gmem, x_smem, act_bar)
                plgpu.barrier_wait(act_bar)

                @pl.loop(0, n1)
                def _gate_up_tile(a):
                    def accumulate(acc_g, acc_u):
                        @pl.loop(0, s1)
                        def _step(ks):
                            slot = lax.rem(a * s1 + ks, stages)
                            plgpu.barrier_wait(full.at[slot])
                            xb = plgpu.transpose_ref(x_smem.at[:, pl.ds(pl.multiple_of(ks * tk, tk), tk)], (1, 0))
                            plgpu.wgmma(acc_g, w_smem.at[slot, 0], xb)
                            plgpu.wgmma(acc_u, w_smem.at[slot, 1], xb)
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(free.at[slot])

                        g, u = acc_g[...], acc_u[...]
                        rows = pl.ds(pl.multiple_of((p + a * programs) * ROWS, ROWS), ROWS)
                        store(g / (1.0 + jnp.exp(-g)) * u, out1.at[rows])

                    pl.run_scoped(accumulate, plgpu.ACC((ROWS, BATCH), f32), plgpu.ACC((ROWS, BATCH), f32))

            if run1 and run2:  # every program's gate/up tiles written before any down tile starts
                plgpu.wait_smem_to_gmem(0)
                sem = pl.get_global(plgpu.SemaphoreType.REGULAR(()))
                plgpu.semaphore_signal(sem, 1, memory_scope="gpu")
                plgpu.semaphore_wait(sem, programs, decrement=False, memory_scope="gpu")
                done = pl.get_global(plgpu.SemaphoreType.REGULAR(()))
                plgpu.semaphore_signal(done, 1, memory_scope="gpu")

                @pl.when(p == 0)  # the last to leave sets both back to zero for the next launch
                def _():
                    plgpu.semaphore_wait(done, programs, memory_scope="gpu")
                    plgpu.semaphore_signal(sem, -programs, memory_scope="gpu")

            if run2:
                @pl.loop(0, n2)
                def _down_tile(b):
                    t = p + b * programs
                    split = lax.rem(t, splits)
                    plgpu.copy_gmem_to_smem(mid_gmem.at[:, pl.ds(pl.multiple_of(split * k_split, tk), k_split)],
                                            mid_smem, act_bar)
                    plgpu.barrier_wait(act_bar)

                    def accumulate(acc):
                        @pl.loop(0, s2)
                        def _step(ks):
                            slot = lax.rem(steps1 + b * s2 + ks, stages)
                            plgpu.barrier_wait(full.at[slot])
                            for half in range(2):
                                k0 = pl.multiple_of((2 * ks + half) * tk, tk)
                                plgpu.wgmma(acc, w_smem.at[slot, half],
                                            plgpu.transpose_ref(mid_smem.at[:, pl.ds(k0, tk)], (1, 0)))
                            plgpu.wgmma_wait(0)
                            plgpu.barrier_arrive(free.at[slot])

                        rows = pl.ds(pl.multiple_of(t // splits * ROWS, ROWS), ROWS)
                        store(acc[...], out2.at[split, rows])

                    pl.run_scoped(accumulate, plgpu.ACC((ROWS, BATCH), f32))
            plgpu.wait_smem_to_gmem(0)

    call = plgpu.kernel(
        body,
        out_type=(jax.ShapeDtypeStruct((ffn, BATCH), f32), jax.ShapeDtypeStruct((splits, hidden, BATCH), f32)),
        scratch_types=(plgpu.SMEM((BATCH, hidden), dtype, transforms=tr),
                       plgpu.SMEM((BATCH, k_split), dtype, transforms=tr),
                       plgpu.SMEM((stages, 2, ROWS, tk), dtype, transforms=tr),
                       plgpu.SMEM((ROWS, BATCH), f32),
                       plgpu.Barrier(num_arrivals=2, num_barriers=stages),
                       plgpu.Barrier(num_arrivals=1, num_barriers=stages),
                       plgpu.Barrier(num_arrivals=1)),
        grid=(programs,),
        grid_names=("sm",),
        num_threads=2,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return call(x, w_gate, w_up, mid, w_down)


def reference(x, w_gate, w_up, mid, w_down, splits):
    g = jnp.dot(w_gate, x.T, preferred_element_type=f32)
    u = jnp.dot(w_up, x.T, preferred_element_type=f32)
    k = mid.shape[1] // splits
    parts = jnp.stack([jnp.dot(w_down[:, i * k:(i + 1) * k], mid[:, i * k:(i + 1) * k].T, preferred_element_type=f32)
                       for i in range(splits)])
    return jax.nn.silu(g) * u, parts


def main(argv=None) -> int:
    args, sink, normal, presets = preset_probe(__doc__, argv, extra_arguments=_stream_arguments)
    for name, c in presets:
        h, f = c.hidden_size, c.intermediate_size
        x = jnp.zeros((BATCH, h), jnp.bfloat16).at[0].set(normal((h,), 1.0))
        mid = jnp.zeros((BATCH, f), jnp.bfloat16).at[0].set(normal((f,), 1.0))
        layers = [(normal((f, h)), normal((f, h)), normal((h, f))) for _ in range(args.copies)]
        gate_up_bytes, down_bytes = 2 * 2 * f * h, 2 * f * h

        def program(fn):
            compiled = jax.jit(lambda x_, m_, layers_: [fn(x_, wg, wu, m_, wd) for wg, wu, wd in layers_]).lower(
                x, mid, layers).compile({"xla_gpu_enable_command_buffer": ""})
            return lambda: compiled(x, mid, layers)

        def xla_gate_up(x_, wg, wu, m_, wd):
            return jax.nn.silu(x_[:1] @ wg.T) * (x_[:1] @ wu.T)

        def xla_down(x_, wg, wu, m_, wd):
            return m_[:1] @ wd.T

        for way, fn, nbytes in (("xla_gate_up", xla_gate_up, gate_up_bytes), ("xla_down", xla_down, down_bytes),
                                ("xla_mlp", lambda *a: xla_down(a[0], a[1], a[2], xla_gate_up(*a), a[4]),
                                 gate_up_bytes + down_bytes)):
            row = kernel_time(program(fn), args.copies)
            emit({"preset": name, "way": way, **row, "gbps": round(nbytes / row["us"] / 1e3) if "us" in row else None},
                 sink)
        splits = args.splits
        expected = reference(x, *layers[0][:2], mid, layers[0][2], splits)
        for phases, nbytes in ((("gate_up",), gate_up_bytes), (("down",), down_bytes),
                               (("gate_up", "down"), gate_up_bytes + down_bytes)):
            row = {"preset": name, "way": "+".join(phases), "splits": splits, "tk": args.tk, "stages": args.stages,
                   "programs": args.programs}
            fn = functools.partial(stream_mlp, phases=phases, splits=splits, tk=args.tk, stages=args.stages,
                                   programs=args.programs)
            try:
                step = program(fn)
                got = step()[0]
            except Exception as err:  # a variant that does not compile is a result
                emit({**row, "error": str(err)[:400]}, sink)
                continue
            errs = {}
            for phase, g, e in zip(("gate_up", "down"), got, expected):
                if phase in phases:
                    errs[phase + "_rel_err"] = float(jnp.max(jnp.abs(g - e)) / jnp.max(jnp.abs(e)))
            timed = kernel_time(step, args.copies)
            emit({**row, **errs, **timed, "gbps": round(nbytes / timed["us"] / 1e3) if "us" in timed else None},
                 sink)
        decode_mlp_ways(name, c, normal, args, sink)
    return 0


def decode_mlp_ways(name, c, normal, args, sink):
    """The decode step's MLP as it runs today (the Triton gate/up kernel with the norm and the pending partial sums in
    its prologue, then the K-split down kernel) against kernels/mlp_decode.py, both from x and the output
    projection's pending partial sums to the down product's partial sums."""
    h, f = c.hidden_size, c.intermediate_size
    o_split = tuning.matvec_config("o", 1, h, (h,)).split
    x, nw = normal((1, h), 1.0), (1 + normal((h,), 0.1).astype(f32)).astype(jnp.bfloat16)
    x_parts = normal((o_split, 1, h), 1.0).astype(f32)
    layers = [(normal((f, h)), normal((f, h)), normal((h, f))) for _ in range(args.copies)]
    cfg_gate_up = tuning.matvec_config("gate_up", 1, h, (f, f))
    cfg_down = tuning.matvec_config("down", 1, f, (h,))

    def triton(wg, wu, wd):
        mid, x_new = ops.swiglu_matvec(x, nw, 1e-5, wg, wu, x_parts=x_parts, config=cfg_gate_up,
                                       implementation="pallas")
        return ops.matvec(mid, wd, config=cfg_down, implementation="pallas"), x_new

    def fused(wg, wu, wd):
        return mlp_decode(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts, splits=args.splits, tk=args.tk,
                          stages=args.stages)

    expected = mlp_decode_reference(x, nw, 1e-5, *layers[0], x_parts=x_parts)[0][0]
    for way, fn in (("decode_triton", triton), ("mlp_decode", fused))[0 if args.triton else 1:]:
        row = {"preset": name, "way": way, "o_split": o_split, "splits": args.splits, "tk": args.tk,
               "stages": args.stages}
        try:
            compiled = jax.jit(lambda layers_: [fn(*w) for w in layers_]).lower(layers).compile(
                {"xla_gpu_enable_command_buffer": ""})
            got = jnp.sum(compiled(layers)[0][0], axis=0)
        except Exception as err:  # a variant that does not compile is a result
            emit({**row, "error": str(err)[:400]}, sink)
            continue
        row["rel_err"] = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
        timed = kernel_time(lambda: compiled(layers), args.copies)
        emit({**row, **timed, "gbps": round(3 * 2 * f * h / timed["us"] / 1e3) if "us" in timed else None}, sink)


def _stream_arguments(parser):
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--tk", type=int, default=64)
    parser.add_argument("--splits", type=int, default=4, help="the down product's K splits")
    parser.add_argument("--programs", type=int, help="default: one per SM")
    parser.add_argument("--triton", type=int, default=1, help="0: leave out the Triton decode MLP")


if __name__ == "__main__":
    raise SystemExit(main())
