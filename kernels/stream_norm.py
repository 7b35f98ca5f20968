"""The residual stream between decode launches: its pending partial sums added and its RMSNorm, in one launch.

A split-K producer (o_proj, the experts' down projection) leaves float32 partial sums on the stream instead of
adding them itself (`Stream`), and the routed experts' outputs arrive weighed but not summed. XLA forms the next
block's input from them in two or three kernels (an add-reduce, the norm's multiply); here one program per token row
issues every load of its row at once (x and each partial sum, a few tens of KB from L2), then writes the combined
stream and its norm. No loop: Triton pipelines only loads that feed a dot, so a loop over the row here would pay a
memory round trip per step. A consumer launch that forms the norm in every program's prologue reads the pieces
once per program (hundreds of times) and loses more than the launch it saves: DeepSeek-V2-Lite's q beside kv_a so
(228 programs, x and 9 pending sums of 2048) took the step from 1.98 to 2.04 ms (docs/PERF.md, session 20).

Lowering: Triton, one program per row, the row held in registers (hidden sizes up to 16K) over up to 16 warps.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import (interpret_default, next_pow2, norm_chunk, rms_apply, rms_inverse,
                                       stream_rows, triton_params)
from tilert_jax.kernels.rms_norm import rms_norm_reference

f32 = jnp.float32
MAX_HIDDEN = 16384  # the row stays in registers: 4 warps hold 16K float32 values in 128 registers a thread


@dataclasses.dataclass(frozen=True)
class Stream:
    """The residual stream with the partial sums still pending on it, and the RMSNorm its next reader applies."""
    x: jax.Array  # [N, K]
    parts: tuple[jax.Array, ...]  # each [S_i, N, K], any float dtype, added in float32
    norm: jax.Array  # [K]
    eps: float


def stream_reference(stream: Stream) -> tuple[jax.Array, jax.Array]:
    """-> (x + the partial sums [N, K] rounded to x's dtype, its RMSNorm [N, K])."""
    total = stream.x.astype(f32)
    for part in stream.parts:  # in the kernel's order: one partial sum after another
        for i in range(part.shape[0]):
            total = total + part[i].astype(f32)
    xs = total.astype(stream.x.dtype)
    return xs, rms_norm_reference(xs, stream.norm, stream.eps)


def _kernel(x_ref, *refs, n_parts, k_dim, dtype, eps):
    part_refs, (nw_ref, xo_ref, h_ref) = refs[:n_parts], refs[n_parts:]
    t = pl.program_id(0)
    chunk = norm_chunk(k_dim, 1)
    pieces = [stream_rows(x_ref, part_refs, t, 1, 1, k0, chunk, dtype) for k0 in range(0, k_dim, chunk)]
    rinv = rms_inverse(lambda k0, size: pieces[k0 // chunk], k_dim, chunk, eps)  # [1, 1]: the pieces read once
    for k0, xm in zip(range(0, k_dim, chunk), pieces):
        plt.store(xo_ref.at[pl.ds(t, 1), pl.ds(k0, chunk)], xm.astype(dtype))
        plt.store(h_ref.at[pl.ds(t, 1), pl.ds(k0, chunk)],
                  rms_apply(xm, rinv, nw_ref[pl.ds(k0, chunk)], dtype).astype(dtype))


def default_warps(stream: Stream) -> int:
    """About 64 float32 values a thread over the row's pieces (x and every partial sum), 4 to 16 warps: with fewer
    threads each holds more loads in flight than its registers allow (DeepSeek-V2-Lite, 9 pieces of 2048: 3.9 us a
    launch at 4 warps; the decode step 2.255 -> 2.195 ms at 16, docs/PERF.md session 10)."""
    pieces = 1 + sum(a.shape[0] for a in stream.parts)
    return min(16, max(4, next_pow2(-(-pieces * stream.x.shape[1] // (64 * 32)))))


def stream_norm(stream: Stream, *, num_warps: int | None = None, interpret: bool | None = None
                ) -> tuple[jax.Array, jax.Array]:
    """-> (the combined stream [N, K], its RMSNorm [N, K]) (see `stream_reference`); num_warps: `default_warps`."""
    n, k_dim = stream.x.shape
    if any(a.ndim != 3 or a.shape[1:] != stream.x.shape for a in stream.parts):
        raise ValueError(f"stream parts {[a.shape for a in stream.parts]} do not match the stream {stream.x.shape}")
    if k_dim > MAX_HIDDEN or stream.norm.shape != (k_dim,):
        raise ValueError(f"a stream of hidden size {k_dim} (at most {MAX_HIDDEN}) needs a norm of [{k_dim}], got "
                         f"{stream.norm.shape}")
    dtype = stream.x.dtype
    return tuple(pl.pallas_call(
        functools.partial(_kernel, n_parts=len(stream.parts), k_dim=k_dim, dtype=dtype, eps=float(stream.eps)),
        out_shape=[jax.ShapeDtypeStruct((n, k_dim), dtype)] * 2,
        grid=(n,),
        compiler_params=triton_params(num_warps or default_warps(stream), 1),
        interpret=interpret_default() if interpret is None else interpret,
        name="stream_norm",
    )(stream.x, *stream.parts, stream.norm))
