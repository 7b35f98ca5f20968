"""Sweeps the MLA decode kernels' launch parameters (kernels/mla_decode.py) at real DeepSeek shapes.

    python scripts/gpu/tune_mla.py [--shapes deepseek-v2-lite] [--splits 16,32] [--bs 64] [--bd 16,32,64] \
        [--r-parts 1,2,4] [--out FILE]

One jitted call runs the kernels over `layers` distinct weights and caches (more bytes than L2 holds, as in a decode
step); the device time of the three kernels is read from a profiler trace of 5 such calls (a wall-clock timer of
this short call measures mostly the host's launches) and given per layer. Each configuration is first checked
against the reference (bf16 bound of tests/test_mla_decode.py). Prints one JSON line per (shape, configuration).
"""

from __future__ import annotations

import argparse
import itertools

import jax
import jax.numpy as jnp

from tilert_jax.kernels import fp8_matmul, mla_decode
from tilert_jax.profiling import emit, trace_gpu_kernels

SHAPES = {  # name: (heads, FP8 block or None)
    "deepseek-v2-lite": (16, None),
    "deepseek-v3": (128, (128, 128)),
}


def make_layers(heads, block, layers, length, key):
    dn, dr, dv, r = 128, 64, 128, 512
    out = []
    for i in range(layers):
        k = jax.random.split(jax.random.fold_in(key, i), 4)
        w = jax.random.normal(k[0], (r, heads * (dn + dv))) * 0.05
        w, scale = (w.astype(jnp.bfloat16), None) if block is None else fp8_matmul.quantize(w, block)
        cache = jax.random.normal(k[1], (1, length, r + dr)).astype(jnp.bfloat16)
        out.append((w, scale, cache))
    q = jax.random.normal(key, (1, 1, heads, dn + dr)).astype(jnp.bfloat16)  # the query projection, finished
    compressed = jax.random.normal(jax.random.fold_in(key, 99), (1, 1, r + dr)).astype(jnp.bfloat16)
    angles = jnp.tile(jnp.linspace(0.0, 6.0, dr // 2), 2)
    latent_in = (q, compressed, jnp.ones((r,), jnp.bfloat16), jnp.cos(angles), jnp.sin(angles))
    return latent_in, out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--length", type=int, default=1280)
    parser.add_argument("--pos", type=int, default=1100)
    parser.add_argument("--layers", type=int, default=27)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated names of SHAPES")
    parser.add_argument("--splits", default="8,16,32,64")
    parser.add_argument("--bs", default="16,32,64")
    parser.add_argument("--bd", default="64", help="absorb_output columns per program")
    parser.add_argument("--r-parts", default="0", help="absorb_output's slices of the latent rows (0: default)")
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    grid = [tuple(int(v) for v in getattr(args, name).split(",")) for name in ("splits", "bs", "bd", "r_parts")]
    pos = jnp.int32(args.pos)
    sink = open(args.out, "a") if args.out else None
    for name in args.shapes.split(","):
        heads, block = SHAPES[name]
        latent_in, layers = make_layers(heads, block, args.layers, args.length, jax.random.key(0))
        w0, s0, c0 = layers[0]
        kw = dict(softmax_scale=0.1, interleaved=True, eps=1e-6)
        ref = mla_decode.mla_decode_reference(*latent_in, w0, s0, block, c0, pos, **kw)[0].astype(jnp.float32)
        for splits, bs, bd, r_parts in itertools.product(*grid):
            def run(latent_in, layers, splits=splits, bs=bs, bd=bd, r_parts=r_parts or None):
                return [mla_decode.mla_decode(*latent_in, w, s, block, c, pos, **kw, splits=splits, bs=bs, bd=bd,
                                              r_parts=r_parts) for w, s, c in layers]
            try:
                fn = jax.jit(run)
                out = fn(latent_in, layers)
                err = float(jnp.max(jnp.abs(out[0][0].astype(jnp.float32) - ref)) / jnp.max(jnp.abs(ref)))
                summary = trace_gpu_kernels(lambda: [jax.block_until_ready(fn(latent_in, layers))
                                                     for _ in range(5)], 5 * args.layers)
                per_kernel = {k["name"]: k["us_per_step"] for k in summary["kernels"] if k["name"].startswith("mla_")}
                row = {"shape": name, "splits": splits, "bs": bs, "bd": bd, "r_parts": r_parts,
                       "us_per_layer": sum(per_kernel.values()), **per_kernel, "rel_err": err, "ok": err <= 2e-2}
            except Exception as e:  # a configuration that does not compile (shared memory, registers)
                row = {"shape": name, "splits": splits, "bs": bs, "bd": bd, "r_parts": r_parts, "error": str(e)[:200]}
            emit(row, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
