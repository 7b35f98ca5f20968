"""Where a decode step's time goes: one profiled decode chunk, GPU kernels summed by name, per step.

    python scripts/gpu/profile_decode.py --preset deepseek-v2-lite --impl pallas [--layers 4] [--out DIR]

Runs the engine's prefill and its decode chunk (random weights, as the bench), then traces `--chunks` more decode
chunks with jax.profiler and reads the Perfetto trace it writes: every event on a GPU stream is a kernel (or a
copy); they are summed by name and divided by the decode steps traced. The table shows per step: the wall time, the
time some kernel was running (busy), the gaps between kernels (launch and dependency stalls), and the kernels by total
time. The JSON summary goes to DIR/profile.json, the raw trace stays under DIR.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.bench import bench_config
from tilert_jax.engine import CACHE_BUCKET, PROMPT_BUCKET, Decoder, _round_up
from tilert_jax.models import family
from tilert_jax.params import init_params
from tilert_jax.sampling import SamplingParams


def gpu_kernel_events(trace: dict) -> list[dict]:
    """The complete ("X") events on GPU stream threads of a Chrome/Perfetto JSON trace."""
    process = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    gpu_pids = {pid for pid, name in process.items() if "/device:GPU" in name}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["pid"] in gpu_pids
              and thread.get((e["pid"], e["tid"]), "").lower().startswith("stream")]
    if not events:
        seen = sorted({f"{process[pid]} / {name}" for (pid, _), name in thread.items() if pid in process})
        raise SystemExit(f"no GPU stream events in the trace (processes / threads seen: {seen})")
    return events


def hlo_sources(hlo_text: str) -> dict[str, str]:
    """Kernel name (an XLA fusion's instruction name, dots as underscores) -> its op_name and source line."""
    sources = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{([^}]*)\}", hlo_text, re.M):
        meta = dict(re.findall(r'(\w+)="?([^" ]*)"?', m.group(2)))
        where = f"{Path(meta.get('source_file', '?')).name}:{meta.get('source_line', '?')}"
        sources[re.sub(r"[.\-]", "_", m.group(1))] = f"{meta.get('op_name', '?')[-60:]} @ {where}"
    return sources


def summarize(events: list[dict], steps: int, top: int) -> dict:
    """Per decode step: busy (union of kernel intervals), span (first start to last end), and kernels by name."""
    spans = sorted((float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in events)
    busy, end = 0.0, -1.0
    for start, stop in spans:
        if stop > end:
            busy += stop - max(start, end)
            end = stop
    by_name: dict[str, list[float]] = collections.defaultdict(list)
    for e in events:
        by_name[e["name"]].append(float(e["dur"]))
    rows = sorted(((sum(d), len(d), name) for name, d in by_name.items()), reverse=True)
    span = spans[-1][1] - spans[0][0]
    return {
        "steps": steps, "span_us_per_step": span / steps, "busy_us_per_step": busy / steps,
        "gap_us_per_step": (span - busy) / steps, "kernels_per_step": len(events) / steps,
        "kernels": [{"name": name, "us_per_step": total / steps, "calls_per_step": count / steps,
                     "us_per_call": total / count} for total, count, name in rows[:top]],
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--impl", default="pallas")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--dense-layers", type=int, default=-1)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=2, help="decode chunks traced")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--out", help="directory for the trace and profile.json (default: a temporary one)")
    args = parser.parse_args(argv)

    config = bench_config(args.preset, args.layers, args.dense_layers)
    dtype = jnp.bfloat16 if jax.devices()[0].platform == "gpu" else jnp.float32
    params = init_params(family(config).param_specs(config), jax.random.key(0), dtype)
    dec = Decoder(config, args.impl)
    sampling = SamplingParams()
    padded = _round_up(args.prompt_len, PROMPT_BUCKET)
    max_len = _round_up(args.prompt_len + (args.chunks + 2) * args.chunk, CACHE_BUCKET)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (1, padded)), jnp.int32)
    key, last = jax.random.key(0), jnp.int32(args.prompt_len - 1)
    prefill, _ = dec.compiled("prefill", sampling, max_len, params, tokens, last, key)
    token, cache = prefill(params, tokens, last, key)
    pos = jnp.int32(args.prompt_len)
    decode, _ = dec.compiled("decode", sampling, args.chunk, params, cache, token, pos, key)
    _, cache, token, pos = decode(params, cache, token, pos, key)  # warm-up
    jax.block_until_ready(cache)

    out = Path(args.out or tempfile.mkdtemp(prefix="tilert_profile_"))
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        start = time.perf_counter()
        for _ in range(args.chunks):
            _, cache, token, pos = decode(params, cache, token, pos, key)
        jax.block_until_ready(cache)
        wall = time.perf_counter() - start
    trace_file = max(out.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file, "rt") as f:
        trace = json.load(f)
    steps = args.chunks * args.chunk
    summary = {"preset": args.preset, "impl": args.impl, "num_layers": config.num_layers,
               "wall_us_per_step_traced": 1e6 * wall / steps,
               **summarize(gpu_kernel_events(trace), steps, args.top)}
    hlo = decode.as_text()
    (out / "decode_hlo.txt").write_text(hlo)
    sources = hlo_sources(hlo)
    for k in summary["kernels"]:
        k["source"] = sources.get(k["name"], "")
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.preset} impl={args.impl} layers={config.num_layers}: span {summary['span_us_per_step']:.1f} us/step, "
          f"busy {summary['busy_us_per_step']:.1f}, gaps {summary['gap_us_per_step']:.1f}, "
          f"{summary['kernels_per_step']:.0f} kernels/step (trace {trace_file})")
    for k in summary["kernels"]:
        print(f"  {k['us_per_step']:9.1f} us/step {k['calls_per_step']:6.1f} calls {k['us_per_call']:8.2f} us/call  "
              f"{k['name'][:40]:40s} {k['source']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
