"""A batch-1 decode layer's weight products several ways, per layer on random bf16 weights.

--products mlp (the MLP alone): XLA's products, the decode step's Triton kernels (the gate/up kernel with the norm and
the pending partial sums in its prologue, then the K-split down kernel), and kernels/layer_decode.py's weight stream
(both products' weights as one TMA stream per SM across a grid barrier, Mosaic GPU).
--products layer (the output projection, the MLP and the next layer's Q/K/V): the output projection and the Q/K/V
projection as Triton kernels around the MLP's weight stream (three launches), and all of it as one weight stream.
--products o+mlp, mlp+qkv: the weight stream with one of the two.
--products attention+layer: the layer's stream ending with the next layer's attention (kernels/stream_attention.py:
a cache of prompt 1024 + 128 at position 1100), the next launch merging its splits, against the Triton decode
attention launched between the layers' streams.

    python scripts/gpu/probe_weight_stream.py [--presets P,...] [--products mlp|o+mlp|mlp+qkv|layer|attention+layer]
        [--stages S] [--in-flight N] [--tk 64] [--splits S] [--programs P] [--triton 1] [--profile-dir DIR]

Prints one JSON line per (preset, way): the kernels' busy time per layer over `--copies` layers of distinct weights
in one program (command buffers off, so the gaps between launches are not in it), the bytes' rate, and each way's
largest error against the jnp reference relative to its largest value. Session 26 measured the stream alone (the
gate/up and down phases without the norm prologue) with this script at commit 41ef420 (docs/PERF.md).
"""

from __future__ import annotations

import collections
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.kernels import ops, tuning
from tilert_jax.kernels import stream_attention as sa
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
        stream = functools.partial(layer_decode, tk=args.tk, stages=args.stages, in_flight=args.in_flight,
                                   programs=args.programs)
        splits = Splits(down=args.splits) if args.splits else None
        with_attention = args.products == "attention+layer"
        with_o = args.products in ("layer", "o+mlp", "attention+layer")
        with_qkv = args.products in ("layer", "mlp+qkv", "attention+layer")
        kvh = c.num_kv_heads
        if with_attention:  # the next layer's: a cache at position 1100, its Q/K/V sums (the Triton kernel's input)
            angle = 1100 * 10000.0 ** (-jnp.arange(0, d, 2) / d)
            cos, sin = (jnp.tile(fn(angle), 2).astype(jnp.bfloat16) for fn in (jnp.cos, jnp.sin))
            qkv_parts = normal((8, 1, nq + 2 * nk), 1.0).astype(f32)
            for w in layers:
                w["caches"] = (normal((1, kvh, 1152, d), 1.0), normal((1, kvh, 1152, d), 1.0))

        def attention(w):
            return sa.Attention(*w["caches"], jnp.int32(1100), cos, sin, c.num_heads, d ** -0.5)

        def stream_kwargs(w):  # the products the stream takes besides the MLP's
            return ({"attn": attn, "w_o": w["w_o"]} if with_o else {"x_parts": x_parts}) | (
                {"next_norm": nw, "next_qkv": w["next_qkv"]} if with_qkv else {})

        def xla(w, counters):
            return ops.mlp_block(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], x_parts=x_parts,
                                 counters=counters, implementation="xla")

        def triton(w, counters):
            mid, x_new = ops.swiglu_matvec(x, nw, 1e-5, w["w_gate"], w["w_up"], x_parts=x_parts,
                                           config=cfg["gate_up"], implementation="pallas")
            return ops.matvec(mid, w["w_down"], config=cfg["down"], implementation="pallas"), x_new, counters

        def weight_stream(w, counters, **options):  # the grid barriers' counters passed on, as in the step
            if with_attention:  # the previous launch's attention splits merged, the next layer's attention taken
                counters, partials = counters or (None, None)
                kwargs = stream_kwargs(w) | ({"attn": partials} if partials is not None else {})
                parts, x_new, counters, partials, *_ = stream(
                    x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], **kwargs, next_attention=attention(w),
                    splits=splits, counters=counters, **options)
                return parts, x_new, (counters, partials)
            return stream(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], **stream_kwargs(w), splits=splits,
                          counters=counters, **options)

        def attention_then_stream(w, counters):  # the Triton decode attention, then the layer's stream
            out, *_ = ops.decode_attention(qkv_parts.reshape(8, 1, -1, d), *w["caches"], jnp.int32(1100), cos, sin,
                                           num_heads=c.num_heads, num_kv_heads=kvh, scale=d ** -0.5,
                                           config=tuning.attention_config(1, kvh, 1152, d), implementation="pallas")
            return stream(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], attn=out.reshape(1, nq), w_o=w["w_o"],
                          next_norm=nw, next_qkv=w["next_qkv"], counters=counters)

        def layer_ops(w, counters):  # the output projection and the Q/K/V projection as Triton kernels
            o = ops.matvec(attn, w["w_o"], config=cfg["o"], implementation="pallas")
            down, x1, counters = stream(x, nw, 1e-5, w["w_gate"], w["w_up"], w["w_down"], x_parts=o,
                                        counters=counters)
            qkv, x2 = ops.norm_matvec(x1, nw, 1e-5, w["next_qkv"], x_parts=down, config=cfg["qkv"],
                                      implementation="pallas")
            return qkv if qkv.ndim == 3 else qkv[None], x2, counters  # partial sums where the config splits K

        def layer_by_layer(layers_, fn):
            outs, counters = [], None
            for w in layers_:
                parts, x_new, counters = fn(w, counters)
                outs.append((parts, x_new))
            return outs

        w0 = layers[0]
        expected = jnp.sum(layer_decode_reference(x, nw, 1e-5, w0["w_gate"], w0["w_up"], w0["w_down"],
                                                  **stream_kwargs(w0))[0], axis=0)
        baselines = {"layer": [("layer_ops", layer_ops)], "mlp": [("xla", xla), ("decode_triton", triton)],
                     "attention+layer": [("attention_then_stream", attention_then_stream)]}
        ways = (baselines.get(args.products, []) if args.triton else []) + [(args.products + "_stream",
                                                                             weight_stream)]
        weight_bytes = 2 * (3 * f * h + with_o * h * nq + with_qkv * (nq + 2 * nk) * h)
        for way, fn in ways:
            row = {"preset": name, "way": way, "o_split": o_split, "splits": args.splits or down_splits(h, f),
                   "tk": args.tk, "stages": args.stages, "in_flight": args.in_flight, "programs": args.programs}
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
        if args.profile_dir:  # one more run of the stream, its launches traced by Mosaic GPU's profiler
            Path(args.profile_dir).mkdir(parents=True, exist_ok=True)
            traced = functools.partial(weight_stream, profile_dir=args.profile_dir)
            jax.block_until_ready(jax.jit(functools.partial(layer_by_layer, fn=traced))(layers))
            for region in _regions(args.profile_dir):
                emit({"preset": name, "way": args.products + "_stream", **region}, sink)
    return 0


def _regions(directory: str) -> list[dict]:
    """The named regions of the traces Mosaic GPU's profiler wrote (a JSON file a launch): for each region (its
    outermost instance in each warpgroup: a loop's body repeats its region in every step), over every (launch,
    program, warpgroup) that ran it, the median and largest of its duration and of its end, from the warpgroup's
    first event, in thousands of SM clock cycles (about 0.5 us each at the H200's 1.98 GHz)."""
    spans = collections.defaultdict(list)  # region -> [(duration, end)]
    for path in sorted(Path(directory).glob("*-trace.json")):
        by_thread = collections.defaultdict(list)
        for event in json.loads(path.read_text())["traceEvents"]:
            by_thread[event["tid"]].append(event)
        for events in by_thread.values():
            begun, t0 = collections.defaultdict(list), events[0]["ts"]
            for event in events:
                if event["ph"] == "B":
                    begun[event["name"]].append(event["ts"])
                    continue
                start = begun[event["name"]].pop()
                if not begun[event["name"]]:
                    spans[event["name"]].append((event["ts"] - start, event["ts"] - t0))
    return [{"region": name, "n": len(values),
             **{f"{what}_{stat}": round(float(fn([v[i] for v in values])), 2)
                for i, what in enumerate(("kcycles", "end")) for stat, fn in (("p50", np.median), ("max", np.max))}}
            for name, values in spans.items()]


def _stream_arguments(parser):
    parser.add_argument("--products", choices=("mlp", "o+mlp", "mlp+qkv", "layer", "attention+layer"), default="layer")
    parser.add_argument("--stages", type=int, help="weight blocks in flight (default: layer_decode's choice)")
    parser.add_argument("--in-flight", type=int, help="weight blocks requested at once (default: the tuned cap)")
    parser.add_argument("--tk", type=int, default=64)
    parser.add_argument("--splits", type=int, help="the down product's K splits (default: down_splits' choice)")
    parser.add_argument("--programs", type=int, help="the kernel's programs (default: one per SM)")
    parser.add_argument("--triton", type=int, default=1, help="0: only the Mosaic GPU kernel")
    parser.add_argument("--profile-dir", help="also trace the stream's named regions (Mosaic GPU's profiler) here; "
                        "its callback needs JAX_PLATFORMS to list cpu")


if __name__ == "__main__":
    raise SystemExit(main())
