"""Prefill's routed experts on the GPU at DeepSeek-V2-Lite's and V3's shapes: the grouped kernel's tiles
(moe.experts_tiled, impl="pallas") against XLA's gathered weights, relative L2 error and device time of each.

    python scripts/gpu/check_tiled_experts.py [--tokens 1024]
"""

from __future__ import annotations

import argparse
import functools

import jax
import jax.numpy as jnp

from tilert_jax.bench import bench_config
from tilert_jax.kernels import fp8_matmul
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import Linear
from tilert_jax.profiling import emit, kernel_seconds


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tokens", type=int, default=1024)
    args = parser.parse_args(argv)
    for name in ("deepseek-v2-lite", "deepseek-v3"):
        c = bench_config(name)
        e, h, f, k, block = c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok, \
            c.fp8_block
        keys = jax.random.split(jax.random.key(0), 5)

        def stack(key, shape):
            w = (jax.random.normal(key, shape, jnp.float32) * 0.02).astype(jnp.bfloat16)
            return Linear(w=w) if block is None else Linear(*fp8_matmul.quantize(w, block))

        gate, up, down = stack(keys[0], (e, h, f)), stack(keys[1], (e, h, f)), stack(keys[2], (e, f, h))
        x = jax.random.normal(keys[3], (args.tokens, h), jnp.float32).astype(jnp.bfloat16)
        weights, index = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[4], (args.tokens, e))), k)
        out = {}
        for impl in ("xla", "pallas"):
            fn = jax.jit(functools.partial(moe.experts_tiled, block=block, impl=impl))
            out[impl] = fn(x, index, weights, gate, up, down)
            secs = kernel_seconds(lambda fn=fn: fn(x, index, weights, gate, up, down))
            emit({"preset": name, "impl": impl, "tokens": args.tokens, "device_ms": 1e3 * secs})
        err = float(jnp.linalg.norm(out["pallas"] - out["xla"]) / jnp.linalg.norm(out["xla"]))
        emit({"preset": name, "rel_err_pallas_vs_xla": err})
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
