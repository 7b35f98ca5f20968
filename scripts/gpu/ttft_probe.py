"""Where time to first token goes beside the GPU's work: host dispatch, the GPU's own time per prefill
(back-to-back calls) and the host-to-host latency, for the engine's prefill as it compiles and with XLA's options
changed: with its Triton gemm fusions (the engine's options before session 22), with its dot merger, without command
buffers (kernels launched one by one as the host reaches them).

    python scripts/gpu/ttft_probe.py --preset llama-3.2-1b [--impl pallas] [--prompt-len 1024] [--layers N]
        [--timeline] [--split K[/G],...] [--only engine,...] [--programs]

The engine runs the prefill as a chain of programs (engine.PREFILL_FIRST_LAYERS); --split K,... also times it with
its first program running K layers (each later one PREFILL_GROWTH times as many; 0: one program; K/G: G times).
--programs prints each program of the engine's chain: the time its call takes to return (the host's work for it)
and its GPU time alone (calls back to back).

--timeline then traces one engine prefill alone (called, then waited on) and prints its host events by name and the
GPU's first and last kernel relative to the call (the profiler slows the host about twofold).
"""

import argparse
import collections
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
from tilert_jax.engine import (CACHE_BUCKET, PREFILL_GROWTH, PROMPT_BUCKET, SEQUENCE_COMPILER_OPTIONS, Decoder,
                               _round_up, sequence_compiler_options)
from tilert_jax.models import family
from tilert_jax.params import init_params, layer_run
from tilert_jax.profiling import gpu_kernel_events
from tilert_jax.sampling import SamplingParams


def probe(name, fn, args, reps=10):
    """Prints the median dispatch time (until the call returns), until its first output is on the host (the bench's
    TTFT), the median host-to-host time (until every output is ready) and the time per call of `reps` calls
    enqueued back to back (the GPU's own pace)."""
    jax.block_until_ready(fn(*args))
    dispatch, first, total = [], [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn(*args)
        returned = time.perf_counter()
        np.asarray(out[0])
        first.append(time.perf_counter() - start)
        jax.block_until_ready(out)
        dispatch.append(returned - start)
        total.append(time.perf_counter() - start)
        del out
    start = time.perf_counter()
    jax.block_until_ready([fn(*args) for _ in range(reps)])
    pipelined = (time.perf_counter() - start) / reps
    print(f"{name:34s} dispatch {1e3 * statistics.median(dispatch):7.3f} ms  first output on the host "
          f"{1e3 * statistics.median(first):7.3f} ms  host-to-host {1e3 * statistics.median(total):7.3f} ms  "
          f"back-to-back {1e3 * pipelined:7.3f} ms/call", flush=True)


def program_times(runs, compiled, inputs, reps=10):
    """Per program of the chain `compiled` (engine.Decoder.compile_prefill) over `runs` of layers: the median time
    its call takes to return and its time per call, `reps` calls back to back."""
    params, tokens, last_index, key = inputs
    args, x = [], tokens
    for program, run in zip(compiled.programs, runs):
        args.append((layer_run(params, run), x) + ((last_index, key) if program is compiled.programs[-1] else ()))
        x = jax.block_until_ready(program(*args[-1]))[0]
    for i, (program, arg) in enumerate(zip(compiled.programs, args)):
        returns = []
        for _ in range(reps):
            start = time.perf_counter()
            out = program(*arg)
            returns.append(time.perf_counter() - start)
            jax.block_until_ready(out)
            del out
        start = time.perf_counter()
        jax.block_until_ready([program(*arg) for _ in range(reps)])
        pipelined = (time.perf_counter() - start) / reps
        print(f"  program {i} (layers {runs[i].start}:{runs[i].stop or ''}): returns after "
              f"{1e3 * statistics.median(returns):.3f} ms, back to back {1e3 * pipelined:.3f} ms/call", flush=True)


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


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--impl", default="pallas")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=0, help="the first N layers (DeepSeek presets: --layers 4)")
    parser.add_argument("--timeline", action="store_true", help="then trace one prefill alone (see above)")
    parser.add_argument("--split", default="", help="comma-separated K[/G]: the first program's layers (0: one "
                        "program), each later one G times as many")
    parser.add_argument("--programs", action="store_true", help="each program of the engine's chain (see above)")
    parser.add_argument("--only", default="", help="comma-separated words: only the variants whose name has one")
    args = parser.parse_args(argv)
    config = bench_config(args.preset, args.layers, -1)
    params = init_params(family(config).param_specs(config), jax.random.key(0), jnp.bfloat16)
    padded = _round_up(args.prompt_len, PROMPT_BUCKET)
    max_len = _round_up(args.prompt_len + 128, CACHE_BUCKET)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (1, padded)), jnp.int32)
    key, last = jax.random.key(0), jnp.int32(args.prompt_len - 1)
    inputs = (params, tokens, last, key)
    dec = Decoder(config, args.impl)
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
        if args.only and not any(word in name for word in args.only.split(",")):
            continue
        compiled = dec.compile_prefill(SamplingParams(), max_len, *inputs, compiler_options=options)
        probe(name, compiled, inputs)
        if args.programs and options is engine:
            program_times(dec.prefill_runs, compiled, inputs)
        if args.timeline and options is engine:
            timeline(compiled, inputs)
    for split, growth in (map(int, (v + f"/{PREFILL_GROWTH}").split("/")[:2]) for v in args.split.split(",") if v):
        compiled = Decoder(config, args.impl, prefill_split=split, prefill_growth=growth).compile_prefill(
            SamplingParams(), max_len, *inputs)
        probe(f"prefill, first program {split}/{growth}" if split else "prefill, one program", compiled, inputs)
    probe("trivial program, same arguments", jax.jit(lambda p, t, l, k: (p.embed[0, 0] + t[0, 0],)), inputs)
    probe("trivial program, one array", jax.jit(lambda t: (t[0, 0] + 1,)), (tokens,))
    return 0


if __name__ == "__main__":
    sys.exit(main())
