"""What the Pallas kernels share: where they run (compiled on a GPU, interpreted elsewhere) and the Triton-lowering
compiler parameters.

Every kernel here but two is written for Pallas' Triton lowering (selected by passing `triton.CompilerParams`); the
reason is recorded beside each kernel. On a machine without a GPU the same kernel body runs in Pallas interpret mode,
which is how the CPU tests check it against its jnp reference. The exceptions, swiglu_matmul.py and layer_decode.py,
are Mosaic GPU kernels tested on the GPU (their docstrings say why).
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl  # noqa: F401  (re-exported for the kernel files)
from jax.experimental.pallas import triton as plt

ROWS = 16  # tensor-core dots need at least 16 rows: a batch of B <= 16 rows is padded to 16 by masked loads


def interpret_default() -> bool:
    """Pallas interpret mode unless the default backend is a GPU ($TILERT_PALLAS_INTERPRET=0/1 overrides: 0 lets a
    CPU machine lower the kernels for a GPU, e.g. to check them with jit(...).trace(...).lower(lowering_platforms))."""
    forced = os.environ.get("TILERT_PALLAS_INTERPRET")
    if forced:
        return forced not in ("0", "false", "False")
    return jax.default_backend() != "gpu"


def triton_params(num_warps: int, num_stages: int):
    return plt.CompilerParams(num_warps=num_warps, num_stages=num_stages)


def next_pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def is_pow2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


def row_mask(rows: int, cols: int, valid: int):
    """bool[rows, cols]: True on the first `valid` rows."""
    return jax.lax.broadcasted_iota(jnp.int32, (rows, cols), 0) < valid


def load_rows(ref, valid: int, **kwargs):
    """Loads a [rows, cols] window whose rows past `valid` lie outside the array (masked to 0).

    `ref` is a ref view (ref.at[...]) of static shape [rows, cols]."""
    rows, cols = ref.shape[-2:]
    if rows <= valid:
        return plt.load(ref, **kwargs)
    return plt.load(ref, mask=row_mask(rows, cols, valid), other=0, **kwargs)


def store_rows(ref, value, valid: int):
    rows, cols = value.shape[-2:]
    if rows <= valid:
        plt.store(ref, value)
    else:
        plt.store(ref, value, mask=row_mask(rows, cols, valid))


def dot(a, b, dims, interpret: bool):
    """lax.dot_general with a float32 result. Interpreted on the CPU, bf16 operands are widened first (exactly:
    a bf16 product is exact in float32), since the CPU runtime has no bf16 x bf16 -> f32 dot in every path."""
    if interpret or a.dtype == jnp.float32 or b.dtype == jnp.float32:  # float32 models: IEEE, not tf32
        a, b = a.astype(jnp.float32), b.astype(jnp.float32)
        return jax.lax.dot_general(a, b, dims, precision=jax.lax.Precision.HIGHEST,
                                   preferred_element_type=jnp.float32)
    return jax.lax.dot_general(a, b, dims, preferred_element_type=jnp.float32)


def sum_parts(parts: jax.Array) -> jax.Array:
    """float32 [...]: partial sums [S, ...] (a split-K product's outputs) added in order s = 0, 1, ..., as the kernels
    that read them add them."""
    total = parts[0].astype(jnp.float32)
    for s in range(1, parts.shape[0]):
        total = total + parts[s].astype(jnp.float32)
    return total


def load_sum(ref, *index, **kwargs):
    """Inside a kernel: float32 ref[s, *index] summed over the partial sums s in order (a split-K product's outputs,
    as `sum_parts` adds them); kwargs go to each load (a mask)."""
    total = plt.load(ref.at[(jnp.int32(0), *index)], **kwargs).astype(jnp.float32)
    for s in range(1, ref.shape[0]):
        total = total + plt.load(ref.at[(jnp.int32(s), *index)], **kwargs).astype(jnp.float32)
    return total


def stream_rows(x_ref, part_refs, row0, rows: int, valid: int, k0, size: int, dtype):
    """float32 [rows, size]: rows row0.. of the residual stream x [N, K] plus the float32 partial sums still pending
    on it (each part ref [S, N, K], any float dtype), rounded to `dtype` as the residual add rounds; rows past
    `valid` read as 0."""
    xm = load_rows(x_ref.at[pl.ds(row0, rows), pl.ds(k0, size)], valid).astype(jnp.float32)
    for ref in part_refs:
        for s in range(ref.shape[0]):
            xm = xm + load_rows(ref.at[jnp.int32(s), pl.ds(row0, rows), pl.ds(k0, size)], valid).astype(jnp.float32)
    return xm.astype(dtype).astype(jnp.float32) if part_refs else xm


def norm_chunk(k: int, rows: int) -> int:
    """Columns per step of a prologue pass over a whole row (wider for one row: fewer, larger loads)."""
    chunk = 1024 if rows == 1 else 256
    while chunk > 1 and k % chunk:
        chunk //= 2
    return chunk


def rms_inverse(load, k_dim: int, chunk: int, eps: float):
    """1 / sqrt(mean(x^2) + eps) [rows, 1] over whole rows, read `chunk` columns at a time by load(k0, size) (float32
    [rows, size]). The chunks' squares are added elementwise and reduced across the threads once: each reduction is
    a shared-memory round trip and a barrier. Unrolled: a loop here would be software-pipelined too, multiplying its
    shared-memory buffers by num_stages."""
    squares = None  # [rows, chunk]
    for i in range(k_dim // chunk):
        xm = load(i * chunk, chunk)
        squares = xm * xm if squares is None else squares + xm * xm
    return 1.0 / jnp.sqrt(jnp.sum(squares, axis=1, keepdims=True) / k_dim + eps)


def rms_apply(xm, rinv, norm_weight, dtype):
    """RMSNorm of float32 rows xm [rows, size] with their rinv [rows, 1] and weight slice [size], rounded as
    rms_norm_reference rounds (the normed rows to dtype, then the product with the weight); float32 result."""
    return (xm * rinv).astype(dtype).astype(jnp.float32) * norm_weight.astype(jnp.float32)[None, :]


def zero_counters(n: int) -> jax.Array:
    """int32 [n] zeros: arrival counters for kernels that finish a split reduction in the launch (`arrive_last`).
    Each such kernel takes them zero and leaves them zero, so one array serves a whole step's launches in turn
    (passed from each launch's outputs to the next, aliased: no memset between launches)."""
    return jnp.zeros((n,), jnp.int32)


def check_counters(counters: jax.Array, needed: int, name: str) -> None:
    if counters.ndim != 1 or counters.dtype != jnp.int32 or counters.shape[0] < needed:
        raise ValueError(f"{name} needs int32 arrival counters [>= {needed}], got {counters.dtype} {counters.shape}")


def arrive_last(counter_ref, index, arrivals: int, interpret: bool):
    """Inside a kernel: counts this program's arrival on counter_ref[index] (int32) and returns whether it is the
    last of the `arrivals` programs that count there in this launch (the "last block" of a split reduction: it
    reads what the others stored and finishes). The stores each program made before arriving are visible to the
    last (a CTA barrier, then one acquire-release atomic at GPU scope); the last sets the counter back to 0, so the
    next launch finds its counters zero."""
    index = jnp.asarray(index, jnp.int32)  # (a static counter too)
    if not interpret:  # (interpreted programs run one after another)
        plt.debug_barrier()
    last = plt.atomic_add(counter_ref, index, jnp.int32(1)) == arrivals - 1

    @pl.when(last)
    def _():
        plt.atomic_add(counter_ref, index, jnp.int32(-arrivals))  # (interpret mode has no atomic exchange)

    return last


NN = (((1,), (0,)), ((), ()))  # [M, K] x [K, N]
NT = (((1,), (1,)), ((), ()))  # [M, K] x [N, K]


NEG = -1e30  # finite "minus infinity": a masked score never makes exp(NEG - NEG) = 1 since each block has a valid key


def online_softmax_step(m, l, acc, s, valid, values, dtype, interpret: bool):
    """One block of split-sequence (flash) attention: scores s [rows, block] (masked to NEG where valid [block, 1] is
    False), values [block, d] -> the running max m [rows, 1], sum l [rows, 1] and unnormalised accumulator acc
    [rows, d] after the block; the probabilities are rounded to `dtype` for the tensor-core product."""
    s = jnp.where(jnp.transpose(valid), s, NEG)
    m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
    alpha = jnp.exp(m - m_new)
    pr = jnp.exp(s - m_new)
    l = l * alpha + jnp.sum(pr, axis=1, keepdims=True)
    acc = acc * alpha + dot(pr.astype(dtype), values, NN, interpret)
    return m_new, l, acc
