"""Sweeps the grouped matvec kernel (kernels/moe_grouped_matvec.py) on DeepSeek-V3's routed experts: the FP8 gate/up
pair ([256, 7168, 2048] stacks, SwiGLU epilogue) and down ([256, 2048, 7168]), eight experts per token.

    python scripts/gpu/tune_grouped.py [--out FILE]

These stacks hold 3.8e9 one-byte elements, so the kernel reads them as uint16 pairs (`packed`); with the experts
drawn from the first 128 (offsets below 2**31) the plain FP8 read is also correct, and the two are compared, each
with the dot in bf16 and in float16 (`GroupedConfig.f16`). Each configuration is checked against the reference, then
timed by device time from a profiler trace over `--layers` different expert choices per call (more bytes than L2
holds). Prints one JSON line per configuration.
"""

from __future__ import annotations

import argparse
import faulthandler
import sys
import time
import itertools

import jax
import jax.numpy as jnp

from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.profiling import emit, trace_gpu_kernels

BLOCK = (128, 128)
GRIDS = {  # case: (bn, num_warps, num_stages, split) configurations
    "gate_up": list(itertools.product((64, 128), (4, 8), (3, 4), (2, 4))),
    "down": list(itertools.product((128,), (4, 8), (3, 4), (1,))),
}


def random_fp8(key, shape):
    """Random finite e4m3 values of magnitude up to 2**-1 (bit patterns with the top exponent bit cleared)."""
    bits = jax.random.bits(key, shape, jnp.uint8) & jnp.uint8(0xB7)
    return jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--shape", type=int, nargs=3, default=(256, 7168, 2048), help="experts hidden inter")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    faulthandler.dump_traceback_later(120, repeat=True)  # a stack every 2 minutes if something hangs
    t0 = time.perf_counter()
    sink = open(args.out, "a") if args.out else None
    (experts, hidden, inter), topk = args.shape, 8
    keys = jax.random.split(jax.random.key(0), 6)
    gate, up = random_fp8(keys[0], (experts, hidden, inter)), random_fp8(keys[1], (experts, hidden, inter))
    down = random_fp8(keys[2], (experts, inter, hidden))
    s_gu = jax.random.uniform(keys[3], (experts, hidden // 128, inter // 128), minval=0.5, maxval=1.5)
    s_down = jax.random.uniform(keys[4], (experts, inter // 128, hidden // 128), minval=0.5, maxval=1.5)
    x = (jax.random.normal(keys[5], (args.layers, topk, 1, hidden)) * 0.1).astype(jnp.bfloat16)
    h = (jax.random.normal(keys[5], (args.layers, topk, 1, inter)) * 0.1).astype(jnp.bfloat16)
    low = jnp.stack([jax.random.choice(jax.random.fold_in(keys[0], i), experts // 2, (topk,), replace=False)
                     for i in range(args.layers)]).astype(jnp.int32)
    jax.block_until_ready((gate, up, down, x, h, low))
    print(f"[{time.perf_counter() - t0:.0f}s] data ready", file=sys.stderr, flush=True)
    weights = (gate, up, down, s_gu, s_down)  # jit arguments: closed over, they would become 11 GB of constants
    cases = {  # name: (fn(x_i, ids_i, weights, config, packed), input per layer)
        "gate_up": (lambda xi, ids, ws, cfg, packed: gm.grouped_matvec(
            xi, ws[0], ids, scale=ws[3], block=BLOCK, w2=ws[1], scale2=ws[3], config=cfg, packed=packed), x),
        "down": (lambda xi, ids, ws, cfg, packed: gm.grouped_matvec(
            xi, ws[2], ids, scale=ws[4], block=BLOCK, config=cfg, packed=packed), h),
    }
    for name, (fn, inputs) in cases.items():
        for packed, high, f16 in itertools.product((False, True), (False, True), (False, True)):
            if packed != high:  # the plain read of experts below 128, the packed read of experts past 2**31
                continue
            ids_all = low + experts // 2 if high else low  # high: experts past the 2**31-element boundary
            ref_args = (gate, ids_all[0], dict(scale=s_gu, block=BLOCK, w2=up, scale2=s_gu)) if name == "gate_up" \
                else (down, ids_all[0], dict(scale=s_down, block=BLOCK))
            ref = gm.grouped_matvec_reference(inputs[0], ref_args[0], ref_args[1], **ref_args[2]).astype(jnp.float32)
            for bn, warps, stages, split in GRIDS[name]:
                cfg = gm.GroupedConfig(bn=bn, bk=128, split=split, num_warps=warps, num_stages=stages, f16=f16)
                run = jax.jit(lambda xs, ids, ws, cfg=cfg, packed=packed: [fn(xs[i], ids[i], ws, cfg, packed)
                                                                            for i in range(args.layers)])
                row = {"case": name, "f16": f16, "packed": packed, "experts_past_2_31": high, "bn": bn,
                       "num_warps": warps, "num_stages": stages, "split": split}
                try:
                    out = run(inputs, ids_all, weights)
                    err = float(jnp.max(jnp.abs(out[0].astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                    summary = trace_gpu_kernels(lambda: [jax.block_until_ready(run(inputs, ids_all, weights))
                                                         for _ in range(5)], 5 * args.layers)
                    us = sum(k["us_per_step"] for k in summary["kernels"] if k["name"].startswith("moe_grouped"))
                    total = summary["busy_us_per_step"]
                    read = topk * (2 if name == "gate_up" else 1) * hidden * inter
                    row.update(kernel_us=us, all_kernels_us=total, kernel_tbps=read / us / 1e6, rel_err=err,
                               ok=err <= 2e-2)
                except Exception as e:  # a configuration that does not compile (registers, shared memory)
                    row["error"] = str(e)[:200]
                row["t_s"] = round(time.perf_counter() - t0)
                emit(row, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
