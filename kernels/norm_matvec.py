"""RMSNorm fused in front of a projection: y = rms_norm(x) @ [W_1 | W_2 | ...] in one launch.

Used for the Q, K and V projections (three weights side by side, one launch) and the LM head. Each program computes
the row's RMS statistic itself (x is a few KB, read from L2), then streams its weight tiles. Lowering: Triton, as the
plain product in matvec.py (the kernel body is `fused_matvec` there).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.kernels.matvec import MatvecConfig, combine_reference, fused_matvec, matvec_reference
from tilert_jax.kernels.rms_norm import rms_norm_reference


def norm_matvec_reference(
    x: jax.Array,  # [B, K]: the residual stream
    norm_weight: jax.Array,  # [K]
    eps: float,
    weights: tuple[jax.Array, ...],  # each [N_i, K]
    *,
    x_parts: jax.Array | None = None,  # [S, B, K] float32 partial sums added to x first
    out_dtype=None,
):
    """-> y [B, sum N_i] (and the combined stream x_new [B, K] when x_parts is given)."""
    xs = combine_reference(x, x_parts)
    h = rms_norm_reference(xs, norm_weight, eps)
    y = jnp.concatenate([matvec_reference(h, w, out_dtype=out_dtype) for w in weights], -1)
    return (y, xs) if x_parts is not None else y


def norm_matvec(
    x: jax.Array,  # [B, K]
    norm_weight: jax.Array,  # [K]
    eps: float,
    weights: tuple[jax.Array, ...],  # each [N_i, K]
    *,
    x_parts: jax.Array | None = None,  # [S, B, K] float32
    out_dtype=None,
    config: MatvecConfig | None = None,
    interpret: bool | None = None,
):
    """-> y [B, sum N_i] (or [split, B, sum N_i] float32 partial sums), plus x_new [B, K] when x_parts is given."""
    if norm_weight.ndim != 1:
        raise ValueError(f"norm_weight must be [K], got {norm_weight.shape}")
    return fused_matvec(x, tuple(weights), x_parts=x_parts, norm_weight=norm_weight, eps=eps, out_dtype=out_dtype,
                        config=config, interpret=interpret)
