"""The prefill's Q/K/V projection with rope and the cache write: the one-launch kernel (kernels/qkv_rope.py) at
the tilings in CONFIGS against XLA's path (three cuBLAS products, the ropes and the cache writes, compiled with the
prefill's options: no dot merger, no Triton gemm fusions), per layer on random bf16 weights, each variant checked
against the XLA result.

    python scripts/gpu/probe_qkv_rope.py [--presets llama-3.2-1b,llama-3.1-8b] [--tokens 1024] [--out FILE]

Prints one JSON line per (preset, way or tiling): the kernels' busy time and span (first start to last end, over
calls: it includes the host's time between them) per layer, over `--copies` layers of distinct weights in one
program.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.engine import sequence_compiler_options
from tilert_jax.kernels.qkv_rope import qkv_rope, qkv_rope_reference
from tilert_jax.models import dense
from tilert_jax.profiling import emit, kernel_time, preset_probe
from tilert_jax.rope import rope_tables

NEW_TOKENS = 128
CONFIGS = [dict(block_t=bt, block_k=bk, q_heads=q_heads, num_warps=warps, num_stages=stages)
           for bt, bk, q_heads, warps, stages in ((128, 64, 1, 8, 4), (128, 64, 2, 8, 4), (128, 64, 2, 4, 4),
                                                  (128, 64, 2, 8, 3), (64, 64, 2, 4, 4), (128, 64, 4, 8, 3))]


def main(argv=None) -> int:
    args, sink, normal, presets = preset_probe(__doc__, argv)
    for name, c in presets:
        h, n, kvh, d, t = c.hidden_size, c.num_heads, c.num_kv_heads, c.head_dim, args.tokens
        x = normal((1, t, h), 1.0)
        layers = [(normal((n, d, h)), normal((kvh, d, h)), normal((kvh, d, h))) for _ in range(args.copies)]
        norms = (normal((d,), 0.1) + 1, normal((d,), 0.1) + 1) if c.qk_norm else None
        cos, sin = (a[0] for a in rope_tables(c.rope, jnp.arange(t)[None], jnp.bfloat16))
        fresh = lambda: [tuple(jnp.zeros((1, kvh, t + NEW_TOKENS, d), jnp.bfloat16) for _ in range(2))  # noqa: E731
                         for _ in layers]

        def program(fn, options=None):  # (the inputs as arguments: as constants XLA would fold the products)
            def run(caches, x_, layers_, cos_, sin_):
                return [fn(x_, *w, cos_, sin_, kc, jnp.int32(0), qk_norm=norms, eps=c.rms_norm_eps)
                        for w, kc in zip(layers_, caches)]
            compiled = jax.jit(run, donate_argnums=0).lower(fresh(), x, layers, cos, sin).compile(options or {})
            return lambda caches: compiled(caches, x, layers, cos, sin)

        def timed(compiled):  # the caches each call leaves go to the next, as the prefill's are donated
            state = [fresh()]

            def step():
                out = compiled(state[0])
                state[0] = [o[3] for o in out]
                return out
            return kernel_time(step, args.copies)

        # the prefill's options, and command buffers off: the profiler sees a CUDA graph's kernels only as its copies
        reference = program(qkv_rope_reference, {**sequence_compiler_options(dense, "pallas"),
                                                 "xla_gpu_enable_command_buffer": ""})
        expected = reference(fresh())
        emit({"preset": name, "tokens": t, "way": "xla", **timed(reference)}, sink)
        for cfg in CONFIGS:
            if n % cfg["q_heads"] or cfg["q_heads"] * d > 256 or (c.qk_norm and cfg["q_heads"] > 1):
                continue
            row = {"preset": name, "tokens": t, "way": "kernel", **cfg}
            try:
                compiled = program(lambda *a, **kw: qkv_rope(*a, **kw, **cfg))
                got = compiled(fresh())
            except Exception as err:  # a tiling that does not compile is a result
                emit({**row, "error": str(err)[:200]}, sink)
                continue
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(jax.tree.leaves(got), jax.tree.leaves(expected)))
            emit({**row, "max_abs_err": round(err, 4), **timed(compiled)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
