"""The phased MLP kernel (kernels/mlp_block.py) against the MLP as the fused decode otherwise runs it, at a preset's
shapes: a chain of `--layers` MLPs (each its own weights, each output feeding the next input) per jitted call, timed
as back-to-back calls (so launch gaps count, host dispatch overlaps), per MLP.

    python scripts/gpu/tune_mlp_block.py --preset llama-3.2-1b [--layers 16]

Variants: "xla" (norm, gate/up, SwiGLU and down as XLA compiles them), "split" (the fused decode's default when the
block is off: XLA's gate/up, the Pallas down projection), and the block with several tile configs and program
counts. JSON lines on stdout, the fastest block variant last (kernels/tuning.json takes it as its "mlp_gate_up"
and "mlp_down" entries).
"""

import argparse
import itertools
import json
import time

import jax
import jax.numpy as jnp

from tilert_jax.config import preset
from tilert_jax.kernels import tuning
from tilert_jax.kernels.matvec import MatvecConfig, combine_reference, fused_matvec
from tilert_jax.kernels.mlp_block import mlp_block, mlp_block_reference
from tilert_jax.kernels.swiglu_matvec import swiglu_matvec_reference

BF16, F32 = jnp.bfloat16, jnp.float32


def per_mlp_seconds(fn, args, layers, reps=30):
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    while time.perf_counter() - start < 0.2:
        jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(reps)])
    return (time.perf_counter() - start) / reps / layers


def chain(mlp):
    """x [1, H] through `layers` MLPs: the next input is x + the MLP's output (so each waits for the last)."""
    @jax.jit
    def run(x, weights):
        parts = None
        for nw, wg, wu, wd in weights:
            out, x = mlp(x, parts, nw, wg, wu, wd)
            parts = out
        return x, parts
    return run


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, default=16)
    parser.add_argument("--budget-s", type=float, default=150)
    args = parser.parse_args()
    c = preset(args.preset)
    h, f = c.hidden_size, c.intermediate_size
    keys = jax.random.split(jax.random.key(0), 4 * args.layers + 1)
    rnd = lambda k, shape, s=0.02: (s * jax.random.normal(k, shape, F32)).astype(BF16)  # noqa: E731
    weights = [(1 + rnd(keys[4 * i], (h,), 0.1), rnd(keys[4 * i + 1], (f, h)), rnd(keys[4 * i + 2], (f, h)),
                rnd(keys[4 * i + 3], (h, f))) for i in range(args.layers)]
    x = rnd(keys[-1], (1, h), 1.0)
    eps = c.rms_norm_eps
    down_std = tuning.matvec_config("down", 1, f, (h,))

    def xla(x, parts, nw, wg, wu, wd):
        return mlp_block_reference(x, nw, eps, wg, wu, wd, x_parts=parts)

    def split(x, parts, nw, wg, wu, wd):
        xs = combine_reference(x, parts)
        mid = swiglu_matvec_reference(xs, nw, eps, wg, wu)
        cfg = down_std if down_std.split > 1 else MatvecConfig(bn=down_std.bn, bk=down_std.bk, split=2)
        return fused_matvec(mid, (wd,), config=cfg), xs

    def block(gate_up, down, programs):
        return lambda x, parts, nw, wg, wu, wd: mlp_block(x, nw, eps, wg, wu, wd, x_parts=parts, gate_up=gate_up,
                                                          down=down, programs=programs)

    variants = [("xla", xla), ("split", split)]
    gu = [MatvecConfig(bn=bn, bk=bk, num_stages=st, num_warps=w) for bn, bk, st, w in
          ((32, 256, 3, 4), (32, 128, 4, 4), (64, 128, 4, 4), (64, 128, 4, 8), (16, 256, 4, 4))]
    dn = [MatvecConfig(bn=bn, bk=bk, split=s, num_stages=4) for bn, bk, s in
          ((32, 256, 2), (64, 128, 2), (32, 128, 4), (64, 128, 8), (32, 256, 4))]
    for g, d, p in itertools.product(gu, dn, (128, 112, 132)):
        if f % g.bn == 0 and h % d.bn == 0 and f % (d.split * d.bk) == 0 and h % g.bk == 0:
            variants.append((f"block gu={g.key()} down={d.key()} P={p}", block(g, d, p)))
    deadline = time.time() + args.budget_s
    best = None
    for name, mlp in variants:
        if time.time() > deadline:
            break
        try:
            t = per_mlp_seconds(chain(mlp), (x, weights), args.layers)
        except Exception as e:  # noqa: BLE001
            print(json.dumps({"preset": args.preset, "variant": name, "error": repr(e)[:300]}), flush=True)
            continue
        mb = 2 * (3 * h * f) / 1e6
        print(json.dumps({"preset": args.preset, "variant": name, "us": 1e6 * t, "gbps": mb * 1e3 / (1e6 * t)}),
              flush=True)
        if name.startswith("block") and (best is None or t < best[0]):
            best = (t, name)
    print(json.dumps({"preset": args.preset, "best": best}), flush=True)


if __name__ == "__main__":
    main()
