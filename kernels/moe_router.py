"""DeepSeek-V2's softmax top-k router at decode in one launch: the residual stream's pending partial sums added, the
RMSNorm, the router product, the softmax and the top-k choice.

XLA runs these as five to seven kernels of a microsecond or more each (the add and the norm's reduction, its
multiply, the router product, softmax, a sort for top-k, a slice); here one program per token streams the router
weight [K, E] (256 KB for V2-Lite) and keeps everything else in registers. It also writes the combined stream and
its norm, which the experts' launch reads. For narrow routers only (`supported`): DeepSeek-V3's [7168, 256] router
and its group-limited sigmoid routing keep the XLA path.

Lowering: Triton. One program per token row, multiply-adds in registers over [bk, E] weight tiles (a
matrix-vector product of one row; no tensor-core dot), the top-k as k rounds of max and lowest-index-of-max.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import (interpret_default, is_pow2, next_pow2, norm_chunk, rms_apply, rms_inverse,
                                       stream_rows, triton_params)
from tilert_jax.kernels.moe_grouped_matvec import Stream, stream_reference

f32 = jnp.float32
MAX_ROUTER_BYTES = 1 << 20  # one program streams the whole router: past this it would cost more than XLA's kernels


def supported(hidden: int, experts: int, top_k: int, dtype) -> bool:
    return (is_pow2(experts) and top_k <= experts and hidden % min(128, next_pow2(hidden)) == 0
            and hidden * experts * jnp.dtype(dtype).itemsize <= MAX_ROUTER_BYTES)


def route_softmax_reference(
    stream: Stream,  # x [N, K] with its pending parts and the RMSNorm weight
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


def _kernel(x_ref, *refs, n_parts, k_dim, experts, top_k, k_pad, scaling, eps, bk, dtype):
    part_refs, (nw_ref, r_ref, xo_ref, h_ref, wo_ref, io_ref) = refs[:n_parts], refs[n_parts:]
    t = pl.program_id(0)

    def load(k0, size):  # float32 [1, size]: token t's row of the combined stream
        return stream_rows(x_ref, part_refs, t, 1, 1, k0, size, dtype)

    rinv = rms_inverse(load, k_dim, norm_chunk(k_dim, 1), eps)  # [1, 1]

    def body(i, logits):
        k0 = pl.multiple_of(i * bk, bk)
        xm = load(k0, bk)
        if n_parts:
            plt.store(xo_ref.at[pl.ds(t, 1), pl.ds(k0, bk)], xm.astype(dtype))
        h = rms_apply(xm, rinv, nw_ref[pl.ds(k0, bk)], dtype).astype(dtype)  # [1, bk]
        plt.store(h_ref.at[pl.ds(t, 1), pl.ds(k0, bk)], h)
        w = plt.load(r_ref.at[pl.ds(k0, bk), pl.ds(0, experts)], eviction_policy="evict_first")  # [bk, E]
        return logits + jnp.sum(w.astype(f32) * jnp.transpose(h.astype(f32)), axis=0, keepdims=True)

    logits = lax.fori_loop(0, k_dim // bk, body, jnp.zeros((1, experts), f32))  # [1, E]
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
    mask = slot < top_k
    plt.store(wo_ref.at[pl.ds(t, 1), pl.ds(0, k_pad)], weights, mask=mask)
    plt.store(io_ref.at[pl.ds(t, 1), pl.ds(0, k_pad)], ids, mask=mask)


def route_softmax(
    stream: Stream,
    router: jax.Array,  # [K, E]
    top_k: int,
    scaling: float,
    *,
    bk: int = 128,
    num_warps: int = 4,
    num_stages: int = 4,
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """See `route_softmax_reference`; the combined stream is stream.x itself when there are no parts."""
    n, k_dim = stream.x.shape
    experts = router.shape[1]
    if stream.norm is None:
        raise ValueError("the router reads the normed stream: give the stream its norm weight")
    if router.shape[0] != k_dim or not supported(k_dim, experts, top_k, router.dtype):
        raise ValueError(f"router {router.shape} with top_k={top_k} does not fit the router kernel for hidden "
                         f"{k_dim} (see moe_router.supported)")
    bk = min(bk, k_dim)
    dtype = stream.x.dtype
    interpret = interpret_default() if interpret is None else interpret
    kernel = functools.partial(_kernel, n_parts=len(stream.parts), k_dim=k_dim, experts=experts, top_k=top_k,
                               k_pad=next_pow2(top_k), scaling=float(scaling), eps=float(stream.eps), bk=bk,
                               dtype=dtype)
    xs, h, weights, ids = pl.pallas_call(
        kernel,
        out_shape=[jax.ShapeDtypeStruct((n, k_dim), dtype), jax.ShapeDtypeStruct((n, k_dim), dtype),
                   jax.ShapeDtypeStruct((n, top_k), f32), jax.ShapeDtypeStruct((n, top_k), jnp.int32)],
        grid=(n,),
        compiler_params=triton_params(num_warps, num_stages),
        interpret=interpret,
        name="moe_router",
    )(stream.x, *stream.parts, stream.norm, router)
    return (xs if stream.parts else stream.x), h, weights, ids
