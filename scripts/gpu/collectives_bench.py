"""Batch-1 tensor-parallel communication on this machine's GPUs: what one all-reduce of a hidden vector costs, and
how much of it a decode layer chain can hide by splitting each row-sharded projection into chunks whose reductions
overlap the next chunk's matmul.

    python scripts/gpu/collectives_bench.py --tp 4 [--hidden 4096 --mlp 14336 --layers 32] > lines.jsonl

One JSON object per line. Run it under different NCCL / XLA settings (environment) to compare them.
"""

from __future__ import annotations

import argparse
import json
import os

import jax
import jax.numpy as jnp
from jax.sharding import NamedSharding, PartitionSpec as P

from tilert_jax.profiling import median_seconds
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


def layer_chain(mesh, hidden: int, mlp: int, layers: int, chunks: int, communicate: bool):
    """A decode step's matmuls at batch 1: per layer an attention-sized pair and a SwiGLU MLP, each row-sharded
    projection reduced over tp — in `chunks` column chunks so chunk i's reduction can overlap chunk i+1's matmul."""
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

    def reduce(x, ws):
        parts = [x @ w for w in ws]  # [1, hidden / chunks] partial sums
        if communicate:
            parts = [jax.lax.psum(p, "tp") for p in parts]
        return jnp.concatenate(parts, axis=-1)

    def step(params, x):
        for p in params:
            qkv = x @ p["qkv"]
            x = x + reduce(qkv[:, : hidden // tp], p["o"])
            gate, up = jnp.split(x @ p["gate_up"], 2, axis=-1)
            x = x + reduce(jax.nn.silu(gate) * up, p["down"])
        return x

    specs = [dict(qkv=P(None, "tp"), o=[P("tp", None)] * chunks, gate_up=P(None, "tp"),
                  down=[P("tp", None)] * chunks) for _ in range(layers)]
    fn = jax.jit(jax.shard_map(step, mesh=mesh, in_specs=(specs, P()), out_specs=P(), check_vma=False))
    x = jax.device_put(jnp.ones((1, hidden), jnp.bfloat16), NamedSharding(mesh, P()))
    return median_seconds(fn, params, x, reps=20)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--tp", type=int, default=jax.device_count())
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--mlp", type=int, default=14336)
    parser.add_argument("--layers", type=int, default=32)
    parser.add_argument("--label", default=os.environ.get("BENCH_LABEL", "default"))
    args = parser.parse_args()
    mesh = make_mesh(tp=args.tp)
    common = dict(label=args.label, tp=args.tp, device=jax.devices()[0].device_kind, jax=jax.__version__)
    print(json.dumps(common | dict(what="psum_latency_us", hidden=args.hidden,
                                   value=1e6 * psum_latency(mesh, args.hidden))), flush=True)
    for chunks in (1, 2, 4):
        for communicate in (True, False):
            seconds = layer_chain(mesh, args.hidden, args.mlp, args.layers, chunks, communicate)
            print(json.dumps(common | dict(what="layer_chain_ms", chunks=chunks, communicate=communicate,
                                           layers=args.layers, value=1e3 * seconds)), flush=True)


if __name__ == "__main__":
    main()
