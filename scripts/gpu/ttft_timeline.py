"""Where the host time of a prefill goes: one engine prefill traced alone (called, then waited on), its host
events by name and the GPU's first and last kernel relative to the call.

    python scripts/gpu/ttft_timeline.py --preset llama-3.2-1b [--impl pallas]
"""

import argparse
import collections
import gzip
import json
import sys
import tempfile
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.bench import bench_config
from tilert_jax.engine import CACHE_BUCKET, PROMPT_BUCKET, Decoder, _round_up
from tilert_jax.models import family
from tilert_jax.params import init_params
from tilert_jax.profiling import gpu_kernel_events
from tilert_jax.sampling import SamplingParams


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--impl", default="pallas")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--top", type=int, default=40)
    args = parser.parse_args(argv)
    config = bench_config(args.preset, 0, -1)
    params = init_params(family(config).param_specs(config), jax.random.key(0), jnp.bfloat16)
    dec = Decoder(config, args.impl)
    padded = _round_up(args.prompt_len, PROMPT_BUCKET)
    max_len = _round_up(args.prompt_len + 128, CACHE_BUCKET)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (1, padded)), jnp.int32)
    key, last = jax.random.key(0), jnp.int32(args.prompt_len - 1)
    prefill, _ = dec.compiled("prefill", SamplingParams(), max_len, params, tokens, last, key)
    for _ in range(3):
        token, cache = prefill(params, tokens, last, key)
        np.asarray(token)
        del cache
    out = Path(tempfile.mkdtemp(prefix="ttft_timeline_"))
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        with jax.profiler.TraceAnnotation("prefill_call"):
            token, cache = prefill(params, tokens, last, key)
            np.asarray(token)
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
    for name, events in rows[:args.top]:
        first = min(float(e["ts"]) for e in events) - t0
        total = sum(float(e["dur"]) for e in events)
        print(f"{total:9.1f} us  x{len(events):4d}  first at {first:8.1f} us  {name[:90]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
