"""Where a decode step's time goes: one profiled decode chunk, GPU kernels summed by name, per step.

    python scripts/gpu/profile_decode.py --preset deepseek-v2-lite --impl pallas [--layers 4] [--out DIR]
    python scripts/gpu/profile_decode.py --preset llama-3.2-1b --phase prefill   # the prompt's prefill instead
    python scripts/gpu/profile_decode.py --preset llama-3.1-8b --batch 8   # eight requests a step
    python scripts/gpu/profile_decode.py --preset deepseek-v3.2-exp --layers 4 --tp 8   # GPU 0 of a mesh
    python scripts/gpu/profile_decode.py --preset deepseek-v3.2-exp --layers 4 --slice-of 8   # its share, one GPU

Runs the engine's prefill and its decode chunk (random weights, as the bench), then traces `--chunks` more decode
chunks (or prefills, with --phase prefill) with jax.profiler and reads the Perfetto trace it writes: every event on a
GPU stream is a kernel (or a copy); they are summed by name and divided by the steps traced. The table shows per
step: the wall time, the time some kernel was running (busy), the gaps between kernels (launch and dependency
stalls), and the kernels by total time. The JSON summary goes to DIR/profile.json, the raw trace stays under DIR.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.bench import bench_config, random_model
from tilert_jax.engine import CACHE_BUCKET, PROMPT_BUCKET, Decoder, _round_up
from tilert_jax.profiling import hlo_ops, trace_gpu_kernels
from tilert_jax.sampling import SamplingParams


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True)
    parser.add_argument("--impl", default="pallas")
    parser.add_argument("--layers", type=int, default=0)
    parser.add_argument("--dense-layers", type=int, default=-1)
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--batch", type=int, default=1, help="requests decoded together")
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--chunks", type=int, default=2, help="decode chunks (or prefills) traced")
    parser.add_argument("--phase", choices=("decode", "prefill"), default="decode")
    parser.add_argument("--top", type=int, default=30)
    parser.add_argument("--tp", type=int, default=1)
    parser.add_argument("--ep", type=int, default=1)
    parser.add_argument("--slice-of", type=int, default=1, help="one device's share of a tp=N mesh (bench.tp_slice)")
    parser.add_argument("--out", help="directory for the trace and profile.json (default: a temporary one)")
    args = parser.parse_args(argv)

    config = bench_config(args.preset, args.layers, args.dense_layers, args.slice_of)
    dtype = jnp.bfloat16 if jax.devices()[0].platform == "gpu" else jnp.float32
    mesh, params = random_model(config, dtype, args.tp, args.ep)
    dec = Decoder(config, args.impl, mesh)
    sampling = SamplingParams()
    padded = _round_up(args.prompt_len, PROMPT_BUCKET)
    max_len = _round_up(args.prompt_len + (args.chunks + 2) * args.chunk, CACHE_BUCKET)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (args.batch, padded)), jnp.int32)
    key, last = jax.random.key(0), jnp.int32(args.prompt_len - 1)
    prefill, _ = dec.compiled("prefill", sampling, max_len, params, tokens, last, key)
    _, token, cache = prefill(params, tokens, last, key)
    pos = jnp.int32(args.prompt_len)
    decode, _ = dec.compiled("decode", sampling, args.chunk, params, cache, token, pos, key)
    _, cache, token, pos = decode(params, cache, token, pos, key)  # warm-up
    jax.block_until_ready(cache)

    out = Path(args.out or tempfile.mkdtemp(prefix="tilert_profile_"))
    state = {"cache": cache, "token": token, "pos": pos}

    def run():
        start = time.perf_counter()
        for _ in range(args.chunks):
            if args.phase == "prefill":
                _, state["token"], state["cache"] = prefill(params, tokens, last, key)
            else:
                _, state["cache"], state["token"], state["pos"] = decode(params, state["cache"], state["token"],
                                                                          state["pos"], key)
        jax.block_until_ready(state["cache"])
        state["wall"] = time.perf_counter() - start

    steps = args.chunks * (1 if args.phase == "prefill" else args.chunk)
    kernels = trace_gpu_kernels(run, steps, args.top, out, gpu=None if mesh is None else 0)
    summary = {"preset": args.preset, "impl": args.impl, "phase": args.phase, "num_layers": config.num_layers,
               "batch": args.batch, "tp": args.tp, "ep": args.ep, "slice_of": args.slice_of,
               "wall_us_per_step_traced": 1e6 * state["wall"] / steps, **kernels}
    hlo = "\n".join(p.as_text() for p in prefill.programs) if args.phase == "prefill" else decode.as_text()
    (out / f"{args.phase}_hlo.txt").write_text(hlo)
    ops = hlo_ops(hlo)
    for k in summary["kernels"]:
        k["op"] = ops.get(k["name"], "")
    (out / "profile.json").write_text(json.dumps(summary, indent=1))
    print(f"{args.preset} {args.phase} impl={args.impl} layers={config.num_layers} batch={args.batch} tp={args.tp} "
          f"ep={args.ep}: span {summary['span_us_per_step']:.1f} us/step, "
          f"busy {summary['busy_us_per_step']:.1f}, gaps {summary['gap_us_per_step']:.1f}, "
          f"{summary['kernels_per_step']:.0f} kernels/step (trace {summary['trace']})")
    for k in summary["kernels"]:
        print(f"  {k['us_per_step']:9.1f} us/step {k['calls_per_step']:6.1f} calls {k['us_per_call']:8.2f} us/call  "
              f"{k['name'][:40]:40s} {k['op'][-70:]}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
