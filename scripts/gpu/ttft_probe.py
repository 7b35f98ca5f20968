"""Where time to first token goes beside the GPU's work: host dispatch, the GPU's own time per prefill
(back-to-back calls) and the host-to-host latency, for the engine's prefill as it compiles and with XLA's options
changed: with its Triton gemm fusions (the engine's options before session 22), with its dot merger, without command
buffers (kernels launched one by one as the host reaches them).

    python scripts/gpu/ttft_probe.py --preset llama-3.2-1b [--impl pallas] [--prompt-len 1024] [--layers N]
        [--timeline] [--split K,...]

--split (dense presets) also times the prefill as two programs, the first K layers then the rest, so the second's
host work (arguments, command buffer) runs while the GPU runs the first.

--timeline then traces one engine prefill alone (called, then waited on) and prints its host events by name and the
GPU's first and last kernel relative to the call (the profiler slows the host about twofold).
"""

import argparse
import collections
import dataclasses
import gzip
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.bench import bench_config
from tilert_jax.engine import (CACHE_BUCKET, PROMPT_BUCKET, SEQUENCE_COMPILER_OPTIONS, Decoder, _round_up,
                               sequence_compiler_options)
from tilert_jax.models import family
from tilert_jax.params import init_params
from tilert_jax.profiling import gpu_kernel_events
from tilert_jax.sampling import SamplingParams, sample


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


def timeline(fn, args, top: int = 40) -> None:
    """One call of `fn(*args)` (its first output then read on the host) traced alone: the host events by total time
    and the GPU's first and last kernel, relative to the call."""
    for _ in range(3):
        np.asarray(fn(*args)[0])
    out = Path(tempfile.mkdtemp(prefix="ttft_timeline_"))
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        with jax.profiler.TraceAnnotation("prefill_call"):
            np.asarray(fn(*args)[0])
    with gzip.open(max(out.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime), "rt") as f:
        trace = json.load(f)
    call = [e for e in trace["traceEvents"] if e.get("name") == "prefill_call"][0]
    t0, t1 = float(call["ts"]), float(call["ts"]) + float(call["dur"])
    kernels = sorted(gpu_kernel_events(trace), key=lambda e: float(e["ts"]))
    first, last = kernels[0], kernels[-1]
    print(f"call {t1 - t0:.1f} us; first kernel at {float(first['ts']) - t0:.1f} us ({first['name'][:40]}), "
          f"last ends at {float(last['ts']) + float(last['dur']) - t0:.1f} us, {len(kernels)} kernels")
    gpu_pids = {e["pid"] for e in kernels}
    host = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["pid"] not in gpu_pids
            and t0 <= float(e["ts"]) <= t1 and e.get("name") != "prefill_call"]
    by_name = collections.defaultdict(list)
    for e in host:
        by_name[e["name"]].append(e)
    rows = sorted(by_name.items(), key=lambda kv: -sum(float(e["dur"]) for e in kv[1]))
    for name, events in rows[:top]:
        first = min(float(e["ts"]) for e in events) - t0
        total = sum(float(e["dur"]) for e in events)
        print(f"{total:9.1f} us  x{len(events):4d}  first at {first:8.1f} us  {name[:90]}")


def split_prefill(config, params, tokens, last, key, max_len: int, impl: str, k: int):
    """The dense prefill as two programs: embedding and layers [0, k), then layers [k, L), the LM head and sampling.
    Returns (a function of the engine prefill's arguments, that calls both; the first program's time)."""
    from tilert_jax import cache as kv
    from tilert_jax.models import dense

    options = sequence_compiler_options(dense, impl)
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)

    def layers_cache(n):
        return kv.KVCache.zeros(n, tokens.shape[0], config.num_kv_heads, max_len, config.head_dim, params.embed.dtype)

    def head(embed, layers, tokens):
        x = embed[tokens]
        return dense.decoder_layers(config, layers, x, positions, layers_cache(len(layers)), 0, impl, None)

    def tail(layers, final_norm, embed, x, last_index, key):
        x, cache = dense.decoder_layers(config, layers, x, positions, layers_cache(len(layers)), 0, impl, None)
        last = jax.lax.dynamic_index_in_dim(x, last_index, axis=1, keepdims=False)
        tail_params = dataclasses.replace(params, layers=(), final_norm=final_norm, embed=embed)
        logits = dense._fused_lm_head(config, tail_params, last, None, impl, None)
        return sample(logits, jax.random.fold_in(key, last_index), SamplingParams()), cache

    head_args = (params.embed, params.layers[:k], tokens)
    head_c = jax.jit(head, compiler_options=options).lower(*head_args).compile()
    x, _ = head_c(*head_args)
    tail_c = jax.jit(tail, compiler_options=options).lower(params.layers[k:], params.final_norm, params.embed, x,
                                                           last, key).compile()

    def both(params, tokens, last_index, key):
        x, head_cache = head_c(params.embed, params.layers[:k], tokens)
        token, tail_cache = tail_c(params.layers[k:], params.final_norm, params.embed, x, last_index, key)
        return token, head_cache, tail_cache

    return both, (head_c, head_args)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--impl", default="pallas")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=0, help="the first N layers (DeepSeek presets: --layers 4)")
    parser.add_argument("--timeline", action="store_true", help="then trace one prefill alone (see above)")
    parser.add_argument("--split", default="", help="comma-separated K: also the prefill as two programs")
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
        compiled = jax.jit(prefill, compiler_options=options).lower(*inputs).compile()
        probe(name, compiled, inputs)
        if args.timeline and options is engine:
            timeline(compiled, inputs)
    for k in (int(v) for v in args.split.split(",") if v):
        both, (head_c, head_args) = split_prefill(config, params, tokens, last, key, max_len, args.impl, k)
        probe(f"first {k} layers alone", head_c, head_args)
        probe(f"split after {k} layers", both, inputs)
        if args.timeline:
            timeline(both, inputs)
    probe("trivial program, same arguments", jax.jit(lambda p, t, l, k: p.embed[0, 0] + t[0, 0]), inputs)
    probe("trivial program, one array", jax.jit(lambda t: t[0, 0] + 1), (tokens,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
