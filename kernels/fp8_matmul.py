"""Matmuls against FP8 (float8_e4m3fn) weights with block scales, as DeepSeek publishes them.

A Hugging Face FP8 checkpoint stores a Linear weight as e4m3 [out, in] plus `weight_scale_inv`, float32
[ceil(out / block_out), ceil(in / block_in)]: the dequantized weight is `w * scale_inv` block by block. This engine
stores both transposed ([in, out] and [ceil(in / block_in), ceil(out / block_out)]), optionally with leading batch
(expert) axes.

`dequantize` is the plain-jnp reference; the XLA path dequantizes first (into float32, then the activation dtype, as
DeepSeek's own `weight_dequant` does) and multiplies. The blocked form `matmul_blocked` applies each scale to a
partial product instead, so a stack of experts never has to exist dequantized all at once.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

FP8_DTYPE = jnp.float8_e4m3fn


def expand_scale(scale: jnp.ndarray,  # [..., in_blocks, out_blocks] float32
                 shape: tuple[int, int],  # (in, out) of the weight
                 block: tuple[int, int],  # (block_out, block_in): Hugging Face's `weight_block_size` order
                 ) -> jnp.ndarray:  # [..., in, out] float32
    block_out, block_in = block
    n_in, n_out = shape
    s = jnp.repeat(scale, block_in, axis=-2)[..., :n_in, :]
    return jnp.repeat(s, block_out, axis=-1)[..., :n_out]


def dequantize(w: jnp.ndarray,  # [..., in, out] float8_e4m3fn
               scale: jnp.ndarray,  # [..., ceil(in / block_in), ceil(out / block_out)] float32
               block: tuple[int, int],  # (block_out, block_in)
               dtype) -> jnp.ndarray:  # [..., in, out] dtype
    """The reference: every weight times its block's scale, in float32, then cast to `dtype`."""
    s = expand_scale(scale, w.shape[-2:], block)
    return (w.astype(jnp.float32) * s).astype(dtype)


def fp8_matmul_reference(x: jnp.ndarray,  # [..., in]
                         w: jnp.ndarray,  # [in, out] float8_e4m3fn
                         scale: jnp.ndarray,  # [ceil(in / block_in), ceil(out / block_out)] float32
                         block: tuple[int, int]) -> jnp.ndarray:  # [..., out] x.dtype
    return jnp.matmul(x, dequantize(w, scale, block, x.dtype))


def quantize(w: jnp.ndarray,  # [..., in, out] float
             block: tuple[int, int]) -> tuple[jnp.ndarray, jnp.ndarray]:
    """Block-wise e4m3 quantization (amax / 448 per block): the inverse of `dequantize`, for tests and benches."""
    block_out, block_in = block
    n_in, n_out = w.shape[-2:]
    pad_in, pad_out = -n_in % block_in, -n_out % block_out
    wp = jnp.pad(w.astype(jnp.float32), [(0, 0)] * (w.ndim - 2) + [(0, pad_in), (0, pad_out)])
    lead = wp.shape[:-2]
    blocks = wp.reshape(*lead, wp.shape[-2] // block_in, block_in, wp.shape[-1] // block_out, block_out)
    amax = jnp.max(jnp.abs(blocks), axis=(-3, -1))  # [..., in_blocks, out_blocks]
    scale = jnp.where(amax > 0, amax / 448.0, 1.0).astype(jnp.float32)
    q = (w.astype(jnp.float32) / expand_scale(scale, (n_in, n_out), block)).astype(FP8_DTYPE)
    return q, scale


def matmul_blocked(x: jnp.ndarray,  # [M, in]
                   w: jnp.ndarray,  # [in, out] float8_e4m3fn
                   scale: jnp.ndarray,  # [in_blocks, out_blocks] float32
                   block: tuple[int, int]) -> jnp.ndarray:  # [M, out] float32
    """sum over input blocks b of scale[b] * (x_b @ w_b): the same product without a dequantized weight copy."""
    block_out, block_in = block
    n_in, n_out = w.shape
    in_blocks = scale.shape[0]
    pad = in_blocks * block_in - n_in
    xp = jnp.pad(x, ((0, 0), (0, pad))).reshape(x.shape[0], in_blocks, block_in)
    wp = jnp.pad(w, ((0, pad), (0, 0))).reshape(in_blocks, block_in, n_out)
    partial = jnp.einsum("mbi,bio->mbo", xp, wp.astype(x.dtype), preferred_element_type=jnp.float32)
    s = jnp.repeat(scale, block_out, axis=-1)[:, :n_out]  # [in_blocks, out]
    return jnp.einsum("mbo,bo->mo", partial, s)


def ragged_matmul(x: jnp.ndarray,  # [M, in] rows sorted by group
                  w: jnp.ndarray,  # [G, in, out] (float8_e4m3fn when scale is given)
                  group_sizes: jnp.ndarray,  # [G] int32, summing to M
                  scale: jnp.ndarray | None = None,  # [G, in_blocks, out_blocks] float32
                  block: tuple[int, int] | None = None,
                  row_group: jnp.ndarray | None = None,  # [M] int32: the group of each row (needed with scale)
                  ) -> jnp.ndarray:  # [M, out] float32
    """A grouped matmul: rows of group g times w[g]. With FP8 weights, one ragged matmul per input block, each
    scaled per (row's group, output block), so only one input block of the stack is ever dequantized."""
    if scale is None:
        return jax.lax.ragged_dot(x, w.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
    block_out, block_in = block
    _, n_in, n_out = w.shape
    in_blocks = scale.shape[1]

    def one_block(b, acc):
        start = b * block_in
        size = min(block_in, n_in)  # static; the last block is clamped by dynamic_slice and masked below
        xb = jax.lax.dynamic_slice_in_dim(x, jnp.minimum(start, n_in - size), size, axis=1)
        wb = jax.lax.dynamic_slice_in_dim(w, jnp.minimum(start, n_in - size), size, axis=1)
        # rows of the clamped window that belong to an earlier block are zeroed in x
        offset = jnp.minimum(start, n_in - size)
        cols = offset + jnp.arange(size)
        xb = jnp.where((cols >= start)[None, :], xb, 0).astype(x.dtype)
        part = jax.lax.ragged_dot(xb, wb.astype(x.dtype), group_sizes, preferred_element_type=jnp.float32)
        s = jnp.repeat(scale[:, b, :], block_out, axis=-1)[:, :n_out]  # [G, out]
        return acc + part * s[row_group]

    return jax.lax.fori_loop(0, in_blocks, one_block, jnp.zeros((x.shape[0], n_out), jnp.float32))
