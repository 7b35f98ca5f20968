"""A batch-1 decode MLP three ways, per layer on random bf16 weights: XLA's products, the decode step's Triton
kernels as they run today (the gate/up kernel with the norm and the pending partial sums in its prologue, then the
K-split down kernel), and kernels/mlp_decode.py (both products' weights as one TMA stream per SM across a grid
barrier, Mosaic GPU).

    python scripts/gpu/probe_weight_stream.py [--presets P,...] [--stages 5] [--tk 64] [--splits S] [--programs P]
        [--triton 1]

Prints one JSON line per (preset, way): the kernels' busy time per layer over `--copies` layers of distinct weights
in one program (command buffers off, so the gaps between launches are not in it), the bytes' rate, and each way's
largest error against the jnp reference relative to its largest value. Session 26 measured the stream alone (the
gate/up and down phases without the norm prologue) with this script at commit 41ef420 (docs/PERF.md).
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tilert_jax.kernels import ops, tuning
from tilert_jax.kernels.mlp_decode import down_splits, mlp_decode, mlp_decode_reference
from tilert_jax.profiling import emit, kernel_time, preset_probe

f32 = jnp.float32


def main(argv=None) -> int:
    args, sink, normal, presets = preset_probe(__doc__, argv, extra_arguments=_stream_arguments)
    for name, c in presets:
        h, f = c.hidden_size, c.intermediate_size
        o_split = tuning.matvec_config("o", 1, h, (h,)).split  # the partial sums pending on x, as in the step
        x, nw = normal((1, h), 1.0), (1 + normal((h,), 0.1).astype(f32)).astype(jnp.bfloat16)
        x_parts = normal((o_split, 1, h), 1.0).astype(f32)
        layers = [(normal((f, h)), normal((f, h)), normal((h, f))) for _ in range(args.copies)]
        cfg_gate_up = tuning.matvec_config("gate_up", 1, h, (f, f))
        cfg_down = tuning.matvec_config("down", 1, f, (h,))
        splits = args.splits or down_splits(h, f)

        def xla(wg, wu, wd, counters):
            return ops.mlp_block(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts, counters=counters, implementation="xla")

        def triton(wg, wu, wd, counters):
            mid, x_new = ops.swiglu_matvec(x, nw, 1e-5, wg, wu, x_parts=x_parts, config=cfg_gate_up,
                                           implementation="pallas")
            return ops.matvec(mid, wd, config=cfg_down, implementation="pallas"), x_new, counters

        def fused(wg, wu, wd, counters):  # the grid barrier's counters passed from layer to layer, as in the step
            return mlp_decode(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts, splits=splits, tk=args.tk,
                              stages=args.stages, programs=args.programs, counters=counters)

        def layer_by_layer(layers_, fn):
            outs, counters = [], None
            for w in layers_:
                parts, x_new, counters = fn(*w, counters)
                outs.append((parts, x_new))
            return outs

        expected = mlp_decode_reference(x, nw, 1e-5, *layers[0], x_parts=x_parts)[0][0]
        ways = (("xla", xla), ("decode_triton", triton)) if args.triton else ()
        for way, fn in ways + (("mlp_decode", fused),):
            row = {"preset": name, "way": way, "o_split": o_split, "splits": splits, "tk": args.tk,
                   "stages": args.stages, "programs": args.programs}
            try:
                compiled = jax.jit(functools.partial(layer_by_layer, fn=fn)).lower(layers).compile(
                    {"xla_gpu_enable_command_buffer": ""})
                got = jnp.sum(compiled(layers)[0][0], axis=0)
            except Exception as err:  # a variant that does not compile is a result
                emit({**row, "error": str(err)[:400]}, sink)
                continue
            row["rel_err"] = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
            timed = kernel_time(lambda: compiled(layers), args.copies)
            emit({**row, **timed, "gbps": round(3 * 2 * f * h / timed["us"] / 1e3) if "us" in timed else None},
                 sink)
    return 0


def _stream_arguments(parser):
    parser.add_argument("--stages", type=int, default=5)
    parser.add_argument("--tk", type=int, default=64)
    parser.add_argument("--splits", type=int, help="the down product's K splits (default: down_splits' choice)")
    parser.add_argument("--programs", type=int, help="the kernel's programs (default: one per SM)")
    parser.add_argument("--triton", type=int, default=1, help="0: only the Mosaic GPU kernel")


if __name__ == "__main__":
    raise SystemExit(main())
