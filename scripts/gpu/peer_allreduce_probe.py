"""Latency of a one-shot all-reduce of one hidden vector written by a Triton kernel straight into the peers' memory
(NVLink stores, no NCCL), against `lax.psum`, inside one jitted shard_map program on every GPU of the host.

    python3 -m pip install --no-deps jax_triton-0.3.1-py3-none-any.whl   # not in the GPU image: carry the wheel
    python3 scripts/gpu/peer_allreduce_probe.py [--hidden 4096] [--rounds 256] [--unroll] [--legacy-call] [--trace]

Each device owns a receive buffer [2, tp, hidden] float32 (two parities of one slot per source device) and tp flags
(one 128-byte line each). Call e (the epoch, from 1): every device stores its vector into slot `rank` of parity e % 2
on every device, then (a CTA barrier, a release store at system scope) sets flag `rank` to e on every device; then
it polls its own tp flags (acquire loads) until each reads e or more, and sums the tp slots in rank order, so every
device gets the same bits. A device reaches epoch e + 2, and writes the parity of e again, only after every device's
flag of e + 1, which each sets after it has read epoch e: two parities suffice. The buffers' addresses travel as data
(`unsafe_buffer_pointer`, uint32 pairs); XLA already enables peer access between the GPUs of one process
(scripts/gpu/peer_write_probe.py).

Prints one JSON line per way, microseconds per round of a loop of --rounds (wall clock over the whole call):
"no collective" (the loop alone), "psum", "peer", "peer fenced" (one system fence on each side of relaxed flag
atomics) and "empty launch" (the same custom call copying its input: the launch's own cost), then whether each peer
way's result equals psum's.
"""

from __future__ import annotations

import argparse
import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import triton
import triton.language as tl
from jax._src.interpreters import mlir  # custom_call: not in the public module
from jax.sharding import NamedSharding, PartitionSpec as P

from tilert_jax.profiling import trace_gpu_kernels

LINE_WORDS = 32  # int32 flags a 128-byte line
LINE = tl.constexpr(LINE_WORDS)


@triton.jit
def _address(table_ref, i):
    """The i-th address of a uint32-pair table as a uint64."""
    lo = tl.load(table_ref + 2 * i).to(tl.uint64)
    hi = tl.load(table_ref + 2 * i + 1).to(tl.uint64)
    return lo | (hi << 32)


@triton.jit
def _fence_sys(x):
    """A system-scope acq_rel fence; returns 0 (add it to what must follow the fence, to keep the order)."""
    return tl.inline_asm_elementwise("fence.acq_rel.sys;\n\tmov.u32 $0, 0;", "=r,r", [x], dtype=tl.int32,
                                     is_pure=False, pack=1)


@triton.jit
def _allreduce(x_ref, recv_table, flag_table, meta_ref, out_ref, tp: tl.constexpr, hidden: tl.constexpr,
               fenced: tl.constexpr):
    """fenced: one system fence before relaxed flag stores and one after relaxed polls, in place of a release (or
    acquire) in every flag atomic."""
    rank = tl.load(meta_ref)
    epoch = tl.load(meta_ref + 1)
    i = tl.arange(0, hidden)
    x = tl.load(x_ref + i)
    parity = epoch % 2
    for p in tl.static_range(tp):  # my vector into slot `rank` of parity e % 2 on every device
        recv = _address(recv_table, p).to(tl.int64).to(tl.pointer_type(tl.float32))
        tl.store(recv + (parity * tp + rank) * hidden + i, x)
    tl.debug_barrier()  # every thread's stores before the flags
    value = epoch
    if fenced:
        value = epoch + _fence_sys(epoch)
    for p in tl.static_range(tp):
        flags = _address(flag_table, p).to(tl.int64).to(tl.pointer_type(tl.int32))
        if fenced:
            tl.atomic_xchg(flags + rank * LINE, value, sem="relaxed", scope="sys")
        else:
            tl.atomic_xchg(flags + rank * LINE, value, sem="release", scope="sys")
    mine = _address(flag_table, rank).to(tl.int64).to(tl.pointer_type(tl.int32))
    seen = epoch
    for p in tl.static_range(tp):
        if fenced:
            flag = tl.atomic_add(mine + p * LINE, 0, sem="relaxed", scope="sys")
            while flag < epoch:
                flag = tl.atomic_add(mine + p * LINE, 0, sem="relaxed", scope="sys")
        else:
            flag = tl.atomic_add(mine + p * LINE, 0, sem="acquire", scope="sys")
            while flag < epoch:
                flag = tl.atomic_add(mine + p * LINE, 0, sem="acquire", scope="sys")
        seen = tl.minimum(seen, flag)
    offset = 0
    if fenced:
        offset = _fence_sys(seen)
    tl.debug_barrier()
    own = _address(recv_table, rank).to(tl.int64).to(tl.pointer_type(tl.float32))
    total = tl.zeros((hidden,), tl.float32)
    for p in tl.static_range(tp):  # in rank order: the same sum on every device
        total += tl.load(own + offset + (parity * tp + p) * hidden + i, volatile=True)
    tl.store(out_ref + i, total)


@triton.jit
def _copy(x_ref, recv_table, flag_table, meta_ref, out_ref, tp: tl.constexpr, hidden: tl.constexpr,
          fenced: tl.constexpr):
    """The same launch doing no communication: the custom call's own cost in the loop."""
    i = tl.arange(0, hidden)
    tl.store(out_ref + i, tl.load(x_ref + i))


def ffi_launches():
    """jax-triton 0.3.1 lowers its kernels to the legacy `triton_kernel_call` custom call (api_version 2), which costs
    about 22 us a call in a loop here; Pallas' own Triton kernels use the typed `triton_kernel_call_ffi` target with
    the same compressed kernel proto (8.5 us a call in the same loop). Route jax-triton's lowering there."""
    legacy = jax.ffi.ffi_lowering

    def lowering(target, *, api_version=None, backend_config=None, operand_output_aliases=None, **kwargs):
        if target != "triton_kernel_call":
            return legacy(target, api_version=api_version, backend_config=backend_config,
                          operand_output_aliases=operand_output_aliases, **kwargs)

        def rule(ctx, *args):
            def ir_type(aval):
                return mlir.ir.RankedTensorType.get(aval.shape, mlir.dtype_to_ir_type(aval.dtype))

            def layouts(avals):
                return [tuple(range(a.ndim - 1, -1, -1)) for a in avals]

            return mlir.custom_call(
                "triton_kernel_call_ffi", result_types=[ir_type(a) for a in ctx.avals_out], operands=list(args),
                backend_config=dict(name=mlir.ir.StringAttr.get("peer_allreduce"),
                                    opaque=mlir.ir.StringAttr.get(backend_config)),
                api_version=4, operand_layouts=layouts(ctx.avals_in), result_layouts=layouts(ctx.avals_out),
                operand_output_aliases=operand_output_aliases).results

        return rule

    jax.ffi.ffi_lowering = lowering


def _pairs(addresses) -> np.ndarray:
    """uint32 [2 * n]: each address as (low, high) words."""
    a = np.asarray(addresses, np.uint64)
    return np.stack([a & np.uint64(0xFFFFFFFF), a >> np.uint64(32)], axis=1).astype(np.uint32).reshape(-1)


class PeerAllReduce:
    """The buffers of the one-shot all-reduce over `mesh` axis `axis` (allocated once; their addresses are baked into
    the programs that call it, so keep this object alive as long as they run). Inside shard_map over that axis:
    `self(x, epoch)` -> the sum over the axis of x [hidden] float32; epoch is an int32 scalar that must grow by at
    least 1 from one call to the next (over every program that uses these buffers)."""

    def __init__(self, mesh, axis: str, hidden: int):
        self.axis, self.hidden, self.tp = axis, hidden, mesh.shape[axis]
        shard = NamedSharding(mesh, P(axis))
        tp = self.tp
        self.recv = jax.device_put(jnp.zeros((tp, 2, tp, hidden), jnp.float32), shard)  # each: [1, 2, tp, hidden]
        self.flags = jax.device_put(jnp.zeros((tp, tp * LINE_WORDS), jnp.int32), shard)
        jax.block_until_ready((self.recv, self.flags))
        order = list(mesh.devices.flat)

        def table(array):
            by_device = {s.device: s.data.unsafe_buffer_pointer() for s in array.addressable_shards}
            return jnp.asarray(_pairs([by_device[d] for d in order]))

        self.recv_table, self.flag_table = table(self.recv), table(self.flags)

    def __call__(self, x, epoch, kernel=_allreduce, fenced: bool = False):
        import jax_triton as jt

        meta = jnp.stack([jax.lax.axis_index(self.axis), epoch]).astype(jnp.int32)
        return jt.triton_call(x, self.recv_table, self.flag_table, meta, kernel=kernel,
                              out_shape=jax.ShapeDtypeStruct((self.hidden,), jnp.float32), grid=(1,), num_warps=4,
                              tp=self.tp, hidden=self.hidden, fenced=fenced)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--legacy-call", action="store_true", help="keep jax-triton's own custom call")
    parser.add_argument("--hidden", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=256)
    parser.add_argument("--unroll", action="store_true", help="the rounds unrolled in the program, no while loop")
    parser.add_argument("--trace", action="store_true", help="also each way's kernel time from a profiler trace")
    args = parser.parse_args(argv)
    if not args.legacy_call:
        ffi_launches()
    devices = jax.devices()
    tp, hidden = len(devices), args.hidden
    mesh = jax.make_mesh((tp,), ("x",), devices=devices)
    shard = NamedSharding(mesh, P("x"))
    peer = PeerAllReduce(mesh, "x", hidden)

    def loop(way, x, first_epoch):  # x [1, hidden]: this device's row
        def body(i, v):
            if way == "psum":
                y = jax.lax.psum(v, "x")
            elif way == "no collective":
                y = v * tp
            else:
                kernel = _copy if way == "empty launch" else _allreduce
                y = peer(v[0], first_epoch[0] + i, kernel, fenced=way == "peer fenced")[None]
            return y * (1.0 / tp)
        if args.unroll:
            for i in range(args.rounds):
                x = body(i, x)
            return x
        return jax.lax.fori_loop(0, args.rounds, body, x)

    x = jax.device_put(jax.random.normal(jax.random.key(0), (tp, hidden), jnp.float32), shard)
    epoch = [1]
    results = {}
    for way in ("no collective", "psum", "peer", "peer fenced", "empty launch"):
        run = jax.jit(jax.shard_map(functools.partial(loop, way), mesh=mesh, in_specs=(P("x"), P()),
                                    out_specs=P("x"), check_vma=False))

        def call():
            out = run(x, jnp.array([epoch[0]], jnp.int32))
            epoch[0] += args.rounds
            return out.block_until_ready()

        results[way] = np.asarray(call())  # compile and warm up
        times = []
        for _ in range(5):
            start = time.perf_counter()
            call()
            times.append((time.perf_counter() - start) / args.rounds)
        row = {"way": way, "tp": tp, "hidden": hidden, "rounds": args.rounds,
               "us_per_allreduce": round(1e6 * float(np.median(times)), 2)}
        if args.trace:  # device time per round from a profiler trace (every device's kernels, summed over devices)
            summary = trace_gpu_kernels(call, args.rounds * tp, top=4)
            row.update({k: round(summary[k], 2) for k in ("busy_us_per_step", "gap_us_per_step")},
                       kernels=[(k["name"][:40], round(k["us_per_call"], 2)) for k in summary["kernels"]])
        print(json.dumps(row), flush=True)
    for way in ("peer", "peer fenced"):
        print(json.dumps({"way": way, "equals_psum": bool(np.array_equal(results[way], results["psum"])),
                          "max_abs_diff": float(np.max(np.abs(results[way] - results["psum"])))}), flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
