"""The prefill's causal self-attention at a preset's shape (bf16, one sequence): cuDNN's fused kernel (the engine's
path) against Pallas' Triton flash attention (jax.experimental.pallas.ops.gpu.attention.mha, its K and V repeated
per query head), at several tilings.

    python scripts/gpu/probe_prefill_attention.py [--presets llama-3.2-1b,llama-3.1-8b] [--tokens 1024] [--out FILE]
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
from jax.experimental.pallas.ops.gpu import attention as pallas_attention

from tilert_jax.profiling import emit, kernel_time, preset_probe


def main(argv=None) -> int:
    args, sink, normal, presets = preset_probe(__doc__, argv)
    for name, c in presets:
        n, kvh, d, t = c.num_heads, c.num_kv_heads, c.head_dim, args.tokens
        layers = [(normal((1, t, n, d), 1.0), normal((1, t, kvh, d), 1.0), normal((1, t, kvh, d), 1.0))
                  for _ in range(args.copies)]
        cudnn = jax.jit(lambda ls: [jax.nn.dot_product_attention(q, k, v, scale=d ** -0.5, is_causal=True,
                                                                  implementation="cudnn") for q, k, v in ls])
        expected = cudnn(layers)
        emit({"preset": name, "way": "cudnn", **kernel_time(lambda: cudnn(layers), args.copies)}, sink)
        for bq, bk, warps, stages in itertools.product((64, 128), (64, 128), (4, 8), (2, 3)):
            sizes = pallas_attention.BlockSizes(block_q=bq, block_k=bk, block_q_dkv=bq, block_kv_dkv=bk,
                                                block_q_dq=bq, block_kv_dq=bk)

            def flash(ls, sizes=sizes, warps=warps, stages=stages):
                return [pallas_attention.mha(q, jnp.repeat(k, n // kvh, axis=2), jnp.repeat(v, n // kvh, axis=2),
                                             None, sm_scale=d ** -0.5, causal=True, block_sizes=sizes,
                                             num_warps=warps, num_stages=stages) for q, k, v in ls]
            row = {"preset": name, "way": "pallas mha", "block_q": bq, "block_k": bk, "warps": warps,
                   "stages": stages}
            try:
                run = jax.jit(flash)
                got = run(layers)
            except Exception as err:
                emit({**row, "error": str(err)[:200]}, sink)
                continue
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(got, expected))
            emit({**row, "max_abs_err": round(err, 4), **kernel_time(lambda: run(layers), args.copies)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
