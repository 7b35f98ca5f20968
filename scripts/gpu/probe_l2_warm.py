"""Whether a latency-bound launch can fill L2 with the next launch's weights while HBM idles, and what the next
launch gains: a "lead" launch whose program 0 spins (standing for a stream norm or an MLA step: a few us of serial
work) beside P programs that each load a slice of the next weight and drop it, then the grouped matvec over that
weight (DeepSeek-V2-Lite's q beside kv_a: [2048, 3648] bf16, 15 MB).

    python scripts/gpu/probe_l2_warm.py [--copies 8] [--out FILE]

Prints one JSON line per (warmed MB, eviction policy, warps) with both launches' busy time per layer.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.models.deepseek_linear import SINGLE
from tilert_jax.profiling import emit, kernel_time, probe_parser, random_bf16

ROW = 64  # the weight viewed as rows of 64 bf16 values (128 bytes)
TILE = 128  # rows per load: 16 KB
K, N = 2048, 3648
QUARTERS = 4  # the matvec's K split: each program p warms the start of quarter p % 4 (every program's first tiles)


def _lead_kernel(w_ref, sink_ref, *, spin, tiles, policy):
    pid = pl.program_id(0)

    @pl.when(pid == 0)
    def _():
        acc = lax.fori_loop(0, spin, lambda i, a: a * 1.0000001 + 1e-7, jnp.float32(1.0))
        plt.store(sink_ref.at[pl.ds(0, 1)], jnp.full((1,), acc))

    @pl.when(pid > 0)
    def _():
        q, b = (pid - 1) % QUARTERS, (pid - 1) // QUARTERS
        r0 = q * (K * N // ROW // QUARTERS) + b * tiles * TILE
        loads = [plt.load(w_ref.at[pl.ds(r0 + t * TILE, TILE), :], eviction_policy=policy) for t in range(tiles)]
        total = sum(jnp.sum(x.astype(jnp.float32)) for x in loads)
        plt.store(sink_ref.at[pl.ds(pid, 1)], jnp.full((1,), total), mask=jnp.full((1,), total != total))


def lead(w, *, spin, programs, tiles, policy, warps):
    """The lead launch: spin in program 0, programs x tiles x 16 KB of w (the start of each K quarter) loaded by
    the others."""
    rows = w.reshape(-1, ROW)
    return pl.pallas_call(
        functools.partial(_lead_kernel, spin=spin, tiles=tiles, policy=policy),
        out_shape=jax.ShapeDtypeStruct((programs + 1,), jnp.float32),
        grid=(programs + 1,), compiler_params=plt.CompilerParams(num_warps=warps, num_stages=1), name="lead",
    )(rows)


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=8)
    parser.add_argument("--spin", type=int, default=1000)
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    normal = random_bf16()
    x = normal((1, 1, K), 1.0)
    weights = [normal((1, K, N)) for _ in range(args.copies)]
    jax.block_until_ready(weights)
    variants = [(0, "", 4)] + [(mb, policy, warps) for mb in (2, 4, 8) for policy in ("", "evict_last")
                                for warps in (4,)] + [(8, "", 8), (14, "", 4)]
    for mb, policy, warps in variants:
        programs = 128
        tiles = max(1, mb * 1024 // (16 * programs))  # 16 KB a tile

        def layer(w, mb=mb, policy=policy, warps=warps, tiles=tiles):
            s = lead(w, spin=args.spin, programs=programs if mb else 0, tiles=tiles, policy=policy or None,
                     warps=warps)
            y = gm.grouped_matvecs([gm.Product(x=x, w=w, ids=SINGLE)], finish=False)[0]
            return s, y

        run = jax.jit(lambda ws, layer=layer: [layer(w) for w in ws])
        emit({"warm_mb": programs * tiles * 16 / 1024 if mb else 0, "policy": policy or "normal", "warps": warps,
              "spin": args.spin, **kernel_time(lambda: run(weights), args.copies)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
