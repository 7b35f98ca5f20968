"""Where time to first token goes beside the GPU's work: host dispatch, the GPU's own time per prefill
(back-to-back calls) and the host-to-host latency, for the engine's prefill as it compiles and with XLA's options
changed: with its Triton gemm fusions (the engine's options before session 22), with its dot merger, without command
buffers (kernels launched one by one as the host reaches them).

    python scripts/gpu/ttft_probe.py --preset llama-3.2-1b [--impl pallas] [--prompt-len 1024] [--layers N]
"""

import argparse
import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.bench import bench_config
from tilert_jax.engine import (CACHE_BUCKET, PROMPT_BUCKET, SEQUENCE_COMPILER_OPTIONS, Decoder, _round_up,
                               sequence_compiler_options)
from tilert_jax.models import family
from tilert_jax.params import init_params
from tilert_jax.sampling import SamplingParams


def probe(name, fn, args, reps=10):
    """Prints the median dispatch time (until the call returns), the median host-to-host time (until its outputs
    are ready) and the time per call of `reps` calls enqueued back to back (the GPU's own pace)."""
    jax.block_until_ready(fn(*args))
    dispatch, total = [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn(*args)
        returned = time.perf_counter()
        jax.block_until_ready(out)
        dispatch.append(returned - start)
        total.append(time.perf_counter() - start)
        del out
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(reps)])
    pipelined = (time.perf_counter() - start) / reps
    print(f"{name:34s} dispatch {1e3 * statistics.median(dispatch):7.3f} ms  host-to-host "
          f"{1e3 * statistics.median(total):7.3f} ms  back-to-back {1e3 * pipelined:7.3f} ms/call", flush=True)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--impl", default="pallas")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=0, help="the first N layers (DeepSeek presets: --layers 4)")
    args = parser.parse_args(argv)
    config = bench_config(args.preset, args.layers, -1)
    params = init_params(family(config).param_specs(config), jax.random.key(0), jnp.bfloat16)
    dec = Decoder(config, args.impl)
    padded = _round_up(args.prompt_len, PROMPT_BUCKET)
    max_len = _round_up(args.prompt_len + 128, CACHE_BUCKET)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (1, padded)), jnp.int32)
    key, last = jax.random.key(0), jnp.int32(args.prompt_len - 1)
    inputs = (params, tokens, last, key)
    prefill = dec._prefill_fn(SamplingParams(), max_len).__wrapped__  # the engine's prefill, not yet jitted
    engine = sequence_compiler_options(dec.family, args.impl)
    variants = {
        "prefill (engine)": engine,
        "prefill, Triton gemm fusions": SEQUENCE_COMPILER_OPTIONS,
        "prefill, no Triton gemm": {**engine, "xla_gpu_enable_triton_gemm": False},
        "prefill, dot merger too": {k: v for k, v in engine.items() if k != "xla_disable_hlo_passes"},
        "prefill, command buffers off": {**engine, "xla_gpu_enable_command_buffer": ""},
    }
    seen = []
    for name, options in variants.items():
        if options in seen:
            continue  # the engine's own options already
        seen.append(options)
        probe(name, jax.jit(prefill, compiler_options=options).lower(*inputs).compile(), inputs)
    probe("trivial program, same arguments", jax.jit(lambda p, t, l, k: p.embed[0, 0] + t[0, 0]), inputs)
    probe("trivial program, one array", jax.jit(lambda t: t[0, 0] + 1), (tokens,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
