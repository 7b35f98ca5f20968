"""The MLP's first half in one launch: h = silu(rms_norm(x) @ W_gate^T) * (rms_norm(x) @ W_up^T).

Each program streams matching tiles (the same output columns) of the gate and up weights, so silu(gate) * up is
formed in registers and only h [B, intermediate] is written. No K split here (silu needs the whole sum); the
intermediate size is wide enough to fill the GPU without one. Lowering: Triton, the kernel body is `fused_matvec` in
matvec.py.
"""

from __future__ import annotations

import jax

from tilert_jax.kernels.matvec import MatvecConfig, combine_reference, fused_matvec
from tilert_jax.kernels.rms_norm import rms_norm_reference


def swiglu_matvec_reference(
    x: jax.Array,  # [B, K]: the residual stream
    norm_weight: jax.Array | None,  # [K] (None: x is normed already)
    eps: float,
    w_gate: jax.Array,  # [F, K]
    w_up: jax.Array,  # [F, K]
    *,
    x_parts: jax.Array | None = None,  # [S, B, K] float32 partial sums added to x first
):
    """-> h [B, F] (and the combined stream x_new [B, K] when x_parts is given)."""
    xs = combine_reference(x, x_parts)
    h = xs if norm_weight is None else rms_norm_reference(xs, norm_weight, eps)
    y = jax.nn.silu(h @ w_gate.T) * (h @ w_up.T)
    return (y, xs) if x_parts is not None else y


def swiglu_matvec(
    x: jax.Array,  # [B, K]
    norm_weight: jax.Array | None,  # [K] (None: x is normed already)
    eps: float,
    w_gate: jax.Array,  # [F, K]
    w_up: jax.Array,  # [F, K]
    *,
    x_parts: jax.Array | None = None,  # [S, B, K] float32
    config: MatvecConfig | None = None,
    interpret: bool | None = None,
):
    if w_gate.shape != w_up.shape:
        raise ValueError(f"gate {w_gate.shape} and up {w_up.shape} differ")
    return fused_matvec(x, (w_gate, w_up), x_parts=x_parts, norm_weight=norm_weight, eps=eps, swiglu=True,
                        config=config, interpret=interpret)
