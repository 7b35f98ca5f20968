"""What the dense decode's input prologue costs: the Q/K/V and gate/up launches at their tuned tiles
(kernels/tuning.json) with the residual stream's pending partial sums and the RMSNorm formed in every program (as
the decode runs them), with the norm only, and as plain products of an already-normed input; and what their
producers (o, down) would cost unsplit, leaving no partial sums (bf16, one token row, random weights).

    python scripts/gpu/probe_prologue.py [--presets llama-3.1-8b,llama-3.2-1b] [--out FILE]

Prints one JSON line per (preset, op, way or configuration) with the kernels' busy time per op.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp

from tilert_jax.config import preset
from tilert_jax.kernels import tuning
from tilert_jax.kernels.matvec import fused_matvec
from tilert_jax.profiling import emit, kernel_time, probe_parser, random_bf16

EPS = 1e-5
L2_BYTES = 60 << 20


def _copies(weight_bytes: int) -> int:
    """Weight copies used in turn: at least 4, and three times what L2 holds."""
    return max(4, math.ceil(3 * L2_BYTES / weight_bytes))


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=0)
    parser.add_argument("--presets", default="llama-3.1-8b,llama-3.2-1b")
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    normal = random_bf16()
    for name in args.presets.split(","):
        c = preset(name)
        h, d, f = c.hidden_size, c.head_dim, c.intermediate_size
        ops = {  # op: (weights' N, the producer whose partial sums arrive: its op and weights' shape)
            "qkv": ((c.num_heads * d, c.num_kv_heads * d, c.num_kv_heads * d), ("down", f)),
            "gate_up": ((f, f), ("o", c.num_heads * d)),
        }
        for op, (ns, (producer, producer_k)) in ops.items():
            cfg = tuning.matvec_config(op, 1, h, ns)
            split_in = tuning.matvec_config(producer, 1, producer_k, (h,)).split
            wbytes = 2 * h * sum(ns)
            copies = args.copies or _copies(wbytes)
            layers = [tuple(normal((n, h)) for n in ns) for _ in range(copies)]
            x, nw = normal((1, h), 1.0), 1 + normal((h,), 0.1)
            parts = normal((split_in, 1, h), 0.5).astype(jnp.float32) if split_in > 1 else None
            swiglu = op == "gate_up"
            ways = {
                "parts+norm": lambda ws: fused_matvec(x, ws, x_parts=parts, norm_weight=nw, eps=EPS, swiglu=swiglu,
                                                      config=cfg),
                "norm": lambda ws: fused_matvec(x, ws, norm_weight=nw, eps=EPS, swiglu=swiglu, config=cfg),
                "plain": lambda ws: fused_matvec(x, ws, swiglu=swiglu, config=cfg),
            }
            jax.block_until_ready(layers)
            for way, fn in ways.items():
                run = jax.jit(lambda ls, fn=fn: [fn(ws) for ws in ls])
                emit({"preset": name, "op": op, "way": way, "config": cfg.key(), "parts_in": split_in,
                      "mb": round(wbytes / 2 ** 20, 1), **kernel_time(lambda: run(layers), copies)}, sink)
        for op, k in (("o", c.num_heads * d), ("down", f)):  # the producers: tuned split against split 1
            cfg = tuning.matvec_config(op, 1, k, (h,))
            copies = args.copies or _copies(2 * h * k)
            layers = [normal((h, k)) for _ in range(copies)]
            x, r = normal((1, k), 1.0), normal((1, h), 1.0)
            jax.block_until_ready(layers)
            cfgs = [cfg] + [dataclasses.replace(cfg, split=1, bn=bn, bk=bk, num_warps=w, mode=mode)
                            for bn in (16, 32, 64) for bk in (128, 256) for w in (4, 8) for mode in ("dot", "fma")]
            for c1 in cfgs:
                residual = r if c1.split == 1 else None
                run = jax.jit(lambda ls, c1=c1, residual=residual: [
                    fused_matvec(x, (w,), residual=residual, config=c1) for w in ls])
                emit({"preset": name, "op": op, "way": "tuned" if c1 is cfg else "split 1", "config": c1.key(),
                      **kernel_time(lambda: run(layers), copies)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
