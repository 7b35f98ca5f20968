"""Batch-1 tensor-parallel communication on this machine's GPUs: what one all-reduce of a hidden vector costs, and
how much of it a decode layer chain can hide by splitting each row-sharded projection into chunks whose reductions
overlap the next chunk's matmul.

    python scripts/gpu/collectives_bench.py --tp 4 [--hidden 4096 --mlp 14336 --layers 32] [--chunks 1,2,4]
        [--peer] [--trace] > lines.jsonl

One JSON object per line. Run it under different NCCL / XLA settings (environment) to compare them. `--peer` also
times the unchunked chain with every reduction done by peer_allreduce_probe.py's one-shot kernel (NVLink stores from
a jax-triton kernel; needs jax-triton installed).
"""

from __future__ import annotations

import argparse
import functools
import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tilert_jax.profiling import median_seconds, trace_gpu_kernels
from tilert_jax.sharding import make_mesh


def psum_latency(mesh, hidden: int, steps: int = 256) -> float:
    """Seconds per dependent all-reduce of a bf16 [1, hidden] vector (a loop of them inside one dispatch)."""
    def body(x):
        def step(_, x):
            return jax.lax.psum(x * 0.5, "tp")
        return jax.lax.fori_loop(0, steps, step, x)

    fn = jax.jit(jax.shard_map(body, mesh=mesh, in_specs=P(), out_specs=P(), check_vma=False))
    x = jax.device_put(jnp.ones((1, hidden), jnp.bfloat16), NamedSharding(mesh, P()))
    empty = jax.jit(jax.shard_map(lambda x: jax.lax.fori_loop(0, steps, lambda _, x: x * 0.5, x), mesh=mesh,
                                  in_specs=P(), out_specs=P(), check_vma=False))
    return (median_seconds(fn, x, reps=20) - median_seconds(empty, x, reps=20)) / steps


def layer_chain(mesh, hidden: int, mlp: int, layers: int, chunks: int, communicate: bool, peer=None,
                trace: bool = False):
    """A decode step's matmuls at batch 1: per layer an attention-sized pair and a SwiGLU MLP, each row-sharded
    projection reduced over tp — in `chunks` column chunks so chunk i's reduction can overlap chunk i+1's matmul, or
    (`peer`, a PeerAllReduce over "tp", one chunk) by the peer-store kernel, each call with the next epoch.
    -> (seconds per call, and with `trace` the top kernels of a traced call: (name, us per call, calls per chain))."""
    tp = mesh.shape["tp"]
    key = jax.random.key(0)
    shard_cols, shard_rows = NamedSharding(mesh, P(None, "tp")), NamedSharding(mesh, P("tp", None))

    def weight(shape, sharding):
        nonlocal key
        key, sub = jax.random.split(key)
        return jax.device_put(0.01 * jax.random.normal(sub, shape, jnp.bfloat16), sharding)

    params = []
    for _ in range(layers):
        params.append(dict(
            qkv=weight((hidden, hidden + hidden // 2), shard_cols),
            o=[weight((hidden, hidden // chunks), shard_rows) for _ in range(chunks)],
            gate_up=weight((hidden, 2 * mlp), shard_cols),
            down=[weight((mlp, hidden // chunks), shard_rows) for _ in range(chunks)],
        ))

    def reduce(x, ws, epoch):
        parts = [x @ w for w in ws]  # [1, hidden / chunks] partial sums
        if peer is not None:
            return peer(parts[0][0].astype(jnp.float32), epoch)[None].astype(x.dtype)
        if communicate:
            parts = [jax.lax.psum(p, "tp") for p in parts]
        return jnp.concatenate(parts, axis=-1)

    def step(params, x, epoch0):
        for i, p in enumerate(params):
            qkv = x @ p["qkv"]
            x = x + reduce(qkv[:, : hidden // tp], p["o"], epoch0[0] + 2 * i)
            gate, up = jnp.split(x @ p["gate_up"], 2, axis=-1)
            x = x + reduce(jax.nn.silu(gate) * up, p["down"], epoch0[0] + 2 * i + 1)
        return x

    specs = [dict(qkv=P(None, "tp"), o=[P("tp", None)] * chunks, gate_up=P(None, "tp"),
                  down=[P("tp", None)] * chunks) for _ in range(layers)]
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P(), P()), out_specs=P(), check_vma=False))
    x = jax.device_put(jnp.ones((1, hidden), jnp.bfloat16), NamedSharding(mesh, P()))
    epoch = [1]

    def call():  # every call takes the next 2 * layers epochs (the peer kernel's flags only grow)
        out = fn(params, x, jnp.array([epoch[0]], jnp.int32))
        epoch[0] += 2 * layers
        return out

    seconds = median_seconds(call, reps=20)
    if not trace:
        return seconds, None
    summary = trace_gpu_kernels(lambda: jax.block_until_ready(call()), 1, top=6)
    return seconds, [(k["name"][:40], round(k["us_per_call"], 2), k["calls_per_step"]) for k in summary["kernels"]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=jax.device_count())
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--label", default=os.environ.get("BENCH_LABEL", "default"))
    parser.add_argument("--peer", action="store_true")
    parser.add_argument("--trace", action="store_true", help="the unchunked chains' top kernels from a trace")
    parser.add_argument("--chunks", default="1,2,4")
    args = parser.parse_args()
    mesh = make_mesh(tp=args.tp)
    common = dict(label=args.label, tp=args.tp, device=jax.devices()[0].device_kind, jax=jax.__version__)
    print(json.dumps(common | dict(what="psum_latency_us", hidden=args.hidden,
                                   value=1e6 * psum_latency(mesh, args.hidden))), flush=True)
    for chunks in map(int, args.chunks.split(",")):
        for communicate in (True, False):
            seconds, kernels = layer_chain(mesh, args.hidden, args.mlp, args.layers, chunks, communicate,
                                           trace=args.trace and chunks == 1)
            print(json.dumps(common | dict(what="layer_chain_ms", chunks=chunks, communicate=communicate,
                                           layers=args.layers, value=1e3 * seconds, kernels=kernels)), flush=True)
    if args.peer:
        from peer_allreduce_probe import PeerAllReduce, ffi_launches  # (scripts/gpu is on sys.path)

        ffi_launches()
        peer = PeerAllReduce(mesh, "tp", args.hidden)
        for name, fenced in (("peer", False), ("peer fenced", True)):
            seconds, kernels = layer_chain(mesh, args.hidden, args.mlp, args.layers, 1, True,
                                           functools.partial(peer, fenced=fenced), trace=args.trace)
            print(json.dumps(common | dict(what="layer_chain_ms", chunks=1, communicate=name, layers=args.layers,
                                           value=1e3 * seconds, kernels=kernels)), flush=True)


if __name__ == "__main__":
    main()
