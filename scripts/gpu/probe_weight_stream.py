"""A batch-1 decode layer's weight products several ways, per layer on random bf16 weights.

--products mlp (the MLP alone): XLA's products, the decode step's Triton kernels (the gate/up kernel with the norm and
the pending partial sums in its prologue, then the K-split down kernel), and kernels/layer_decode.py's weight stream
(both products' weights as one TMA stream per SM across a grid barrier, Mosaic GPU).
--products layer (the output projection, the MLP and the next layer's Q/K/V): the output projection and the Q/K/V
projection as Triton kernels around the MLP's weight stream (three launches), and all of it as one weight stream.

    python scripts/gpu/probe_weight_stream.py [--presets P,...] [--products mlp|layer] [--stages S] [--tk 64]
        [--splits S] [--programs P] [--triton 1]

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
from tilert_jax.kernels.layer_decode import Splits, down_splits, layer_decode, layer_decode_reference
from tilert_jax.profiling import emit, kernel_time, preset_probe

f32 = jnp.float32


def main(argv=None) -> int:
    args, sink, normal, presets = preset_probe(__doc__, argv, extra_arguments=_stream_arguments)
    for name, c in presets:
        h, f, d = c.hidden_size, c.intermediate_size, c.head_dim
        nq, nk = c.num_heads * d, c.num_kv_heads * d
        o_split = tuning.matvec_config("o", 1, nq, (h,)).split  # the partial sums pending on x, as in the step
        x, nw = normal((1, h), 1.0), (1 + normal((h,), 0.1).astype(f32)).astype(jnp.bfloat16)
        x_parts, attn = normal((o_split, 1, h), 1.0).astype(f32), normal((1, nq), 1.0)
        layers = [dict(w_gate=normal((f, h)), w_up=normal((f, h)), w_down=normal((h, f)), w_o=normal((h, nq)),
                       next_qkv=(normal((nq, h)), normal((nk, h)), normal((nk, h)))) for _ in range(args.copies)]
        cfg = {op: tuning.matvec_config(op, 1, k, ns) for op, k, ns in (
            ("gate_up", h, (f, f)), ("down", f, (h,)), ("o", nq, (h,)), ("qkv", h, (nq, nk, nk)))}
        stream = functools.partial(layer_decode, tk=args.tk, stages=args.stages, programs=args.programs)
        splits = Splits(down=args.splits) if args.splits else None
        layer = args.products == "layer"

        def xla(w, counters):
            return ops.mlp_block(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], x_parts=x_parts,
                                 counters=counters, implementation="xla")

        def triton(w, counters):
            mid, x_new = ops.swiglu_matvec(x, nw, 1e-5, w["w_gate"], w["w_up"], x_parts=x_parts,
                                           config=cfg["gate_up"], implementation="pallas")
            return ops.matvec(mid, w["w_down"], config=cfg["down"], implementation="pallas"), x_new, counters

        def mlp_stream(w, counters):  # the grid barrier's counters passed from layer to layer, as in the step
            return stream(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], x_parts=x_parts, splits=splits,
                          counters=counters)

        def layer_ops(w, counters):  # the output projection and the Q/K/V projection as Triton kernels
            o = ops.matvec(attn, w["w_o"], config=cfg["o"], implementation="pallas")
            down, x1, counters = stream(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], x_parts=o,
                                        counters=counters)
            qkv, x2 = ops.norm_matvec(x1, nw, 1e-5, w["next_qkv"], x_parts=down, config=cfg["qkv"],
                                      implementation="pallas")
            return qkv if qkv.ndim == 3 else qkv[None], x2, counters  # partial sums where the config splits K

        def layer_stream(w, counters):
            return stream(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], attn=attn, w_o=w["w_o"], next_norm=nw,
                          next_qkv=w["next_qkv"], splits=splits, counters=counters)

        def layer_by_layer(layers_, fn):
            outs, counters = [], None
            for w in layers_:
                parts, x_new, counters = fn(w, counters)
                outs.append((parts, x_new))
            return outs

        w0 = layers[0]
        extra = dict(attn=attn, w_o=w0["w_o"], next_norm=nw, next_qkv=w0["next_qkv"]) if layer else dict(
            x_parts=x_parts)
        expected = jnp.sum(layer_decode_reference(x, nw, 1e-5, w0["w_gate"], w0["w_up"], w0["w_down"], **extra)[0],
                           axis=0)
        baselines = [("layer_ops", layer_ops)] if layer else [("xla", xla), ("decode_triton", triton)]
        ways = (baselines if args.triton else []) + [("layer_stream", layer_stream) if layer else ("mlp_stream",
                                                                                                 mlp_stream)]
        weight_bytes = 2 * (3 * f * h + (h * nq + (nq + 2 * nk) * h if layer else 0))
        for way, fn in ways:
            row = {"preset": name, "way": way, "o_split": o_split, "splits": args.splits or down_splits(h, f),
                   "tk": args.tk, "stages": args.stages, "programs": args.programs}
            try:
                compiled = jax.jit(functools.partial(layer_by_layer, fn=fn)).lower(layers).compile(
                    {"xla_gpu_enable_command_buffer": ""})
                got = jnp.sum(compiled(layers)[0][0], axis=0)
            except Exception as err:  # a variant that does not compile is a result
                emit({**row, "error": str(err)[:400]}, sink)
                continue
            row["rel_err"] = float(jnp.max(jnp.abs(got - expected)) / jnp.max(jnp.abs(expected)))
            timed = kernel_time(lambda: compiled(layers), args.copies)
            emit({**row, **timed, "gbps": round(weight_bytes / timed["us"] / 1e3) if "us" in timed else None}, sink)
    return 0


def _stream_arguments(parser):
    parser.add_argument("--products", choices=("mlp", "layer"), default="layer")
    parser.add_argument("--stages", type=int, help="weight blocks in flight (default: layer_decode's choice)")
    parser.add_argument("--tk", type=int, default=64)
    parser.add_argument("--splits", type=int, help="the down product's K splits (default: down_splits' choice)")
    parser.add_argument("--programs", type=int, help="the kernel's programs (default: one per SM)")
    parser.add_argument("--triton", type=int, default=1, help="0: only the Mosaic GPU kernel")


if __name__ == "__main__":
    raise SystemExit(main())
