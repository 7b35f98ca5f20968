"""Measuring on the GPU: kernel time from a jax.profiler trace (what scripts/gpu/profile_decode.py, tune_mla.py and
tune_kernels.py read) and the median wall time of a call (the microbenchmark scripts).

The Perfetto trace jax.profiler writes holds one complete ("X") event per kernel on each GPU stream; summing them by
name gives device time per kernel, free of host dispatch (which a wall-clock timer of a short jitted call mostly
measures).
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Callable

import jax
import jax.numpy as jnp

from tilert_jax.config import preset


def gpu_kernel_events(trace: dict, gpu: int | None = None) -> list[dict]:
    """The complete ("X") events on GPU stream threads of a Chrome/Perfetto JSON trace (of GPU `gpu` only, when
    given: on a mesh every device runs the same step)."""
    process = {e["pid"]: e["args"]["name"] for e in trace["traceEvents"]
               if e.get("ph") == "M" and e.get("name") == "process_name"}
    thread = {(e["pid"], e["tid"]): e["args"]["name"] for e in trace["traceEvents"]
              if e.get("ph") == "M" and e.get("name") == "thread_name"}
    device = re.compile(r"/device:GPU" + ("" if gpu is None else rf":{gpu}\b"))
    gpu_pids = {pid for pid, name in process.items() if device.search(name)}
    events = [e for e in trace["traceEvents"] if e.get("ph") == "X" and e["pid"] in gpu_pids
              and thread.get((e["pid"], e["tid"]), "").lower().startswith("stream")]
    if not events:
        seen = sorted({f"{process[pid]} / {name}" for (pid, _), name in thread.items() if pid in process})
        raise RuntimeError(f"no GPU stream events in the trace (processes / threads seen: {seen})")
    return events


def median_seconds(fn: Callable[..., Any], *args, reps: int = 7, warm_s: float = 0.0) -> float:
    """Median wall seconds of `fn(*args)` (blocked until ready) over `reps` calls, after one call and `warm_s`
    seconds of repeated calls (GPU clocks up)."""
    jax.block_until_ready(fn(*args))
    start = time.perf_counter()
    while time.perf_counter() - start < warm_s:
        jax.block_until_ready(fn(*args))
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        jax.block_until_ready(fn(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def emit(row: dict, sink=None) -> None:
    """One JSON line on stdout (flushed: a sweep's lines arrive as it runs), and in `sink` when given."""
    line = json.dumps(row)
    print(line, flush=True)
    if sink:
        sink.write(line + "\n")


def probe_parser(doc: str, copies: int) -> argparse.ArgumentParser:
    """The arguments every probe script takes: `--copies` distinct weights used in turn (more bytes than L2 holds, as
    in a decode step) and `--out`, a file the JSON lines are appended to."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--copies", type=int, default=copies)
    parser.add_argument("--out")
    return parser


def preset_probe(doc: str, argv=None, copies: int = 4, presets: str = "llama-3.2-1b,llama-3.1-8b",
                 tokens: int = 1024, extra_arguments: Callable[[argparse.ArgumentParser], None] | None = None):
    """A probe's start: its arguments (probe_parser's, `--presets`: comma-separated preset names, `--tokens`: a
    prompt's length, and whatever `extra_arguments(parser)` adds), the file its JSON lines go to (or None), a
    random_bf16() and the (name, config) of each preset."""
    parser = probe_parser(doc, copies)
    parser.add_argument("--presets", default=presets)
    parser.add_argument("--tokens", type=int, default=tokens)
    if extra_arguments:
        extra_arguments(parser)
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    return args, sink, random_bf16(), [(name, preset(name)) for name in args.presets.split(",")]


def random_bf16(seed: int = 0) -> Callable[..., jax.Array]:
    """normal(shape, scale=0.02) -> a fresh bf16 array of normal samples times scale, each call its own key."""
    key = jax.random.key(seed)

    def normal(shape, scale=0.02):
        nonlocal key
        key, sub = jax.random.split(key)
        return (jax.random.normal(sub, shape) * scale).astype(jnp.bfloat16)

    return normal


def hlo_ops(hlo_text: str) -> dict[str, str]:
    """Kernel name (an XLA fusion's instruction name, dots as underscores) -> the JAX op it came from (op_name)."""
    ops = {}
    for m in re.finditer(r"^\s*(?:ROOT )?%?([\w.\-]+) = [^\n]*?metadata=\{[^}]*?op_name=\"([^\"]*)\"", hlo_text, re.M):
        ops[re.sub(r"[.\-]", "_", m.group(1))] = m.group(2)
    return ops


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


def trace_gpu_kernels(run: Callable[[], Any], steps: int, top: int = 30, out: str | Path | None = None,
                      gpu: int | None = None) -> dict:
    """Runs `run()` (which should block until its work is done) under jax.profiler and summarizes the GPU kernels
    per step (`steps`: how many steps `run` performs; `gpu`: one device's kernels only)."""
    out = Path(out or tempfile.mkdtemp(prefix="tilert_profile_"))
    with jax.profiler.trace(str(out), create_perfetto_trace=True):
        run()
    trace_file = max(out.rglob("perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    with gzip.open(trace_file, "rt") as f:
        trace = json.load(f)
    return {**summarize(gpu_kernel_events(trace, gpu), steps, top), "trace": str(trace_file)}


def _traced(step: Callable[[], Any], steps: int, calls: int, top: int) -> dict:
    """`step()` (one jitted call doing `steps` steps) run once, then `calls` times under the profiler: the summary of
    its GPU kernels per step (the trace in a temporary directory, removed after)."""
    jax.block_until_ready(step())
    with tempfile.TemporaryDirectory(prefix="tilert_kernels_") as out:
        return trace_gpu_kernels(lambda: [jax.block_until_ready(step()) for _ in range(calls)], calls * steps, top,
                                 out)


def kernel_seconds(step: Callable[[], Any], calls: int = 5) -> float:
    """Device seconds per call of `step()` (one jitted call, returning its outputs): the time some GPU kernel was
    running over `calls` traced calls after a warm-up one. A short call's wall time is mostly the host's dispatch."""
    return _traced(step, 1, calls, 1)["busy_us_per_step"] * 1e-6


def kernel_time(step: Callable[[], Any], steps: int, calls: int = 5) -> dict:
    """A probe's measurement of one variant: `step()` (one jitted call doing `steps` steps, e.g. one per layer copy)
    -> {"us": kernel busy time per step, "span_us": first start to last end per step (with the gaps between
    kernels), "kernels": the top four (name, us per step)}, or {"error": the first 200
    characters} for a variant that does not compile or run."""
    try:
        summary = _traced(step, steps, calls, 4)
    except Exception as err:  # a variant that does not compile is a result, not a failure
        return {"error": str(err)[:200]}
    return {"us": round(summary["busy_us_per_step"], 2), "span_us": round(summary["span_us_per_step"], 2),
            "kernels": [(k["name"], round(k["us_per_step"], 2)) for k in summary["kernels"]]}
