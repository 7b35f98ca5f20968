"""The prefill's gate/up products with the SwiGLU in their epilogue: the Mosaic GPU kernel (kernels/swiglu_matmul.py)
at the tilings in CONFIGS against XLA's path (two cuBLAS products and the SwiGLU product, compiled with the prefill's
options), per layer on random bf16 weights, each variant checked against the XLA result.

    python scripts/gpu/probe_swiglu_matmul.py [--presets llama-3.2-1b,llama-3.1-8b] [--tokens 1024] [--out FILE]

Prints one JSON line per (preset, way or tiling): the kernels' busy time and span per layer, over `--copies` layers
of distinct weights in one program, and the TFLOP/s of the busy time.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.engine import sequence_compiler_options
from tilert_jax.kernels.swiglu_matmul import swiglu_matmul
from tilert_jax.models import dense
from tilert_jax.profiling import emit, kernel_time, preset_probe

CONFIGS = [dict(tile_m=tm, tile_n=tn, tile_k=tk, stages=s)
           for tm, tn, tk, s in ((128, 64, 64, 3), (128, 64, 64, 4), (128, 64, 128, 2), (64, 64, 64, 4),
                                 (128, 128, 64, 2), (64, 128, 64, 3))]


def xla_swiglu(x, w_gate, w_up):  # as the dense MLP's XLA path: two products rounded to bf16, then the SwiGLU
    return jax.nn.silu(x @ w_gate.T) * (x @ w_up.T)


def main(argv=None) -> int:
    args, sink, normal, presets = preset_probe(__doc__, argv)
    for name, c in presets:
        h, f, t = c.hidden_size, c.intermediate_size, args.tokens
        x = normal((t, h), 1.0)
        layers = [(normal((f, h)), normal((f, h))) for _ in range(args.copies)]
        flops = 2 * 2 * t * h * f

        def program(fn, options=None):  # (the inputs as arguments: as constants XLA would fold the products)
            compiled = jax.jit(lambda x_, layers_: [fn(x_, *w) for w in layers_]).lower(x, layers).compile(
                options or {})
            return lambda: compiled(x, layers)

        def timed(step):
            row = kernel_time(step, args.copies)
            return {**row, "tflops": round(flops / row["us"] / 1e6, 1)} if "us" in row else row

        # the prefill's options, and command buffers off: the profiler sees a CUDA graph's kernels only as its copies
        reference = program(xla_swiglu, {**sequence_compiler_options(dense, "pallas"),
                                         "xla_gpu_enable_command_buffer": ""})
        expected = reference()
        emit({"preset": name, "tokens": t, "way": "xla", **timed(reference)}, sink)
        for cfg in CONFIGS:
            row = {"preset": name, "tokens": t, "way": "kernel", **cfg}
            try:
                compiled = program(lambda *a: swiglu_matmul(*a, **cfg))
                got = compiled()
            except Exception as err:  # a tiling that does not compile is a result
                emit({**row, "error": str(err)[:300]}, sink)
                continue
            err = max(float(jnp.max(jnp.abs(a.astype(jnp.float32) - b.astype(jnp.float32))))
                      for a, b in zip(got, expected))
            scale = max(float(jnp.max(jnp.abs(b.astype(jnp.float32)))) for b in expected)
            emit({**row, "max_abs_err": round(err, 4), "max_abs": round(scale, 2), **timed(compiled)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
