"""A projection plus the residual stream in one launch: y = residual + x @ W^T (the down and output projections).

The residual is added in the epilogue, so the updated stream is written once. Where the output is too narrow to
fill the GPU, the caller uses matvec.py's K split instead and lets the next fused kernel add the partial sums.
Lowering: Triton, the kernel body is `fused_matvec` in matvec.py.
"""

from __future__ import annotations

import jax

from tilert_jax.kernels.matvec import MatvecConfig, fused_matvec


def matvec_residual_reference(
    x: jax.Array,  # [B, K]
    w: jax.Array,  # [N, K]
    residual: jax.Array,  # [B, N]
) -> jax.Array:  # [B, N]
    return residual + x @ w.T


def matvec_residual(
    x: jax.Array,  # [B, K]
    w: jax.Array,  # [N, K]
    residual: jax.Array,  # [B, N]
    *,
    config: MatvecConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:
    if config is not None and config.split > 1:
        raise ValueError("matvec_residual needs split == 1")
    return fused_matvec(x, (w,), residual=residual, config=config, interpret=interpret)
