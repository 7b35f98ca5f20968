"""The residual stream between decode launches: its pending partial sums added, its RMSNorm, and optionally
DeepSeek-V2's softmax top-k router, in one launch.

A split-K producer (o_proj, the experts' down projection) leaves float32 partial sums on the stream instead of
adding them itself (`Stream`). XLA forms the next block's input from them in two or three kernels (an add-reduce,
the norm's multiply) and routes in four more (the router product, softmax, a sort for top-k, a slice). Here one
program per token row reads the row's pieces once (a few tens of KB, from L2), writes the combined stream and its
norm, and when given a router streams the router weight [K, E] (256 KB for V2-Lite) and chooses the experts.
Reading the pieces once matters: a consumer launch that formed the norm in every program's prologue would read them
once per program (hundreds of times) and lose more than it saves.

Routing is for narrow routers only (`routing_supported`): DeepSeek-V3's [7168, 256] router and its group-limited
sigmoid routing keep the XLA path.

Lowering: Triton. One program per row; the router product as multiply-adds into a [bk, E] float32 accumulator
(reduced once at the end, not per tile), the top-k as k rounds of max and lowest-index-of-max.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import (interpret_default, is_pow2, next_pow2, norm_chunk, rms_apply, rms_inverse,
                                       stream_rows, triton_params)
from tilert_jax.kernels.rms_norm import rms_norm_reference

f32 = jnp.float32
MAX_ROUTER_BYTES = 1 << 20  # one program streams the whole router: past this it costs more than XLA's kernels


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


def routing_supported(hidden: int, experts: int, top_k: int, dtype) -> bool:
    return (is_pow2(experts) and top_k <= experts and hidden % min(128, next_pow2(hidden)) == 0
            and hidden * experts * jnp.dtype(dtype).itemsize <= MAX_ROUTER_BYTES)


def route_softmax_reference(
    stream: Stream,
    router: jax.Array,  # [K, E]
    top_k: int,
    scaling: float,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """-> (the combined stream [N, K], its RMSNorm h [N, K], weights [N, top_k] float32 (softmax scores of the
    chosen experts times `scaling`), expert ids [N, top_k] int32), as transformers' DeepseekV2 router computes
    them (float32 logits, greedy top-k)."""
    xs, h = stream_reference(stream)
    logits = jnp.matmul(h.astype(f32), router.astype(f32), precision=lax.Precision.HIGHEST)
    weights, ids = lax.top_k(jax.nn.softmax(logits, axis=-1), top_k)
    return xs, h, weights * scaling, ids.astype(jnp.int32)


def _kernel(x_ref, *refs, n_parts, k_dim, route, bk, dtype, eps):
    """route: (experts, top_k, k_pad, scaling) or None."""
    part_refs, refs = refs[:n_parts], refs[n_parts:]
    nw_ref, refs = refs[0], refs[1:]
    r_ref, refs = (refs[0], refs[1:]) if route else (None, refs)
    xo_ref, h_ref = refs[:2]
    t = pl.program_id(0)

    def load(k0, size):  # float32 [1, size]: row t of the combined stream
        return stream_rows(x_ref, part_refs, t, 1, 1, k0, size, dtype)

    rinv = rms_inverse(load, k_dim, norm_chunk(k_dim, 1), eps)  # [1, 1]
    experts = route[0] if route else 1

    def body(i, acc):  # acc: [bk, E] float32 products, summed over K once at the end
        k0 = pl.multiple_of(i * bk, bk)
        xm = load(k0, bk)
        plt.store(xo_ref.at[pl.ds(t, 1), pl.ds(k0, bk)], xm.astype(dtype))
        h = rms_apply(xm, rinv, nw_ref[pl.ds(k0, bk)], dtype).astype(dtype)  # [1, bk]
        plt.store(h_ref.at[pl.ds(t, 1), pl.ds(k0, bk)], h)
        if not route:
            return acc
        w = plt.load(r_ref.at[pl.ds(k0, bk), pl.ds(0, experts)], eviction_policy="evict_first")  # [bk, E]
        return acc + w.astype(f32) * jnp.transpose(h.astype(f32))

    acc = lax.fori_loop(0, k_dim // bk, body, jnp.zeros((bk, experts) if route else (1, 1), f32))
    if not route:
        return
    _, top_k, k_pad, scaling = route
    wo_ref, io_ref = refs[2:]
    logits = jnp.sum(acc, axis=0, keepdims=True)  # [1, E]
    p = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
    p = p / jnp.sum(p, axis=1, keepdims=True)
    expert = lax.broadcasted_iota(jnp.int32, (1, experts), 1)
    slot = lax.broadcasted_iota(jnp.int32, (1, k_pad), 1)
    weights, ids = jnp.zeros((1, k_pad), f32), jnp.zeros((1, k_pad), jnp.int32)
    for j in range(top_k):  # the largest remaining score, the lowest expert id among equals (as lax.top_k)
        best = jnp.max(p, axis=1, keepdims=True)
        pick = jnp.min(jnp.where(p == best, expert, experts), axis=1, keepdims=True)
        weights = jnp.where(slot == j, best * scaling, weights)
        ids = jnp.where(slot == j, pick, ids)
        p = jnp.where(expert == pick, -1.0, p)
    plt.store(wo_ref.at[pl.ds(t, 1), pl.ds(0, k_pad)], weights, mask=slot < top_k)
    plt.store(io_ref.at[pl.ds(t, 1), pl.ds(0, k_pad)], ids, mask=slot < top_k)


def _launch(stream: Stream, router, top_k, scaling, bk, num_warps, num_stages, interpret):
    n, k_dim = stream.x.shape
    if any(a.ndim != 3 or a.shape[1:] != stream.x.shape for a in stream.parts):
        raise ValueError(f"stream parts {[a.shape for a in stream.parts]} do not match the stream {stream.x.shape}")
    if k_dim % min(bk, k_dim):
        raise ValueError(f"hidden {k_dim} is not a multiple of bk={bk}")
    route = None
    if router is not None:
        experts = router.shape[1]
        if router.shape[0] != k_dim or not routing_supported(k_dim, experts, top_k, router.dtype):
            raise ValueError(f"router {router.shape} with top_k={top_k} does not fit the router kernel for hidden "
                             f"{k_dim} (see stream_norm.routing_supported)")
        route = (experts, top_k, next_pow2(top_k), float(scaling))
    dtype = stream.x.dtype
    out_shape = [jax.ShapeDtypeStruct((n, k_dim), dtype)] * 2
    if route:
        out_shape += [jax.ShapeDtypeStruct((n, top_k), f32), jax.ShapeDtypeStruct((n, top_k), jnp.int32)]
    return pl.pallas_call(
        functools.partial(_kernel, n_parts=len(stream.parts), k_dim=k_dim, route=route, bk=min(bk, k_dim),
                          dtype=dtype, eps=float(stream.eps)),
        out_shape=out_shape,
        grid=(n,),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret_default() if interpret is None else interpret,
        name="stream_norm",
    )(stream.x, *stream.parts, stream.norm, *([router] if route else []))


def stream_norm(stream: Stream, *, bk: int = 256, num_warps: int = 4, num_stages: int = 3,
                interpret: bool | None = None) -> tuple[jax.Array, jax.Array]:
    """-> (the combined stream [N, K], its RMSNorm [N, K]) (see `stream_reference`)."""
    return tuple(_launch(stream, None, 0, 1.0, bk, num_warps, num_stages, interpret))


def route_softmax(stream: Stream, router: jax.Array, top_k: int, scaling: float, *, bk: int = 128,
                  num_warps: int = 4, num_stages: int = 4, interpret: bool | None = None
                  ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """See `route_softmax_reference`."""
    return tuple(_launch(stream, router, top_k, scaling, bk, num_warps, num_stages, interpret))
