"""A dense decode MLP in one launch: parts = swiglu(rms_norm(x + x_parts)) @ W_down^T, as three phases of a persistent
kernel (grid_sync.py) instead of a chain of launches and XLA fusions.

  phase 0  each program forms the residual stream (x plus the pending partial sums), computes the row's RMS
           statistic and writes its slice of the combined stream x_new and of the normed input h;
  phase 1  the gate/up column tiles: mid = silu(h @ W_gate^T) * (h @ W_up^T) (matvec.py's tile, swiglu epilogue);
  phase 2  the down projection's tiles (column block x K split): float32 partial sums the next fused op adds.

Writing h once (phase 0) keeps the gate/up loop a plain product: formed per K step from the stream, its pending
sums and the norm, the input costs a round trip per step (the pipeliner prefetches only loads that feed the dot).
Each phase's tiles are dealt round-robin to the programs. Lowering: Triton (the tile bodies are matvec.py's).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from tilert_jax.kernels.common import interpret_default, norm_chunk, rms_apply, rms_inverse, store_rows, stream_rows
from tilert_jax.kernels.grid_sync import RESIDENT_PROGRAMS, phased_call
from tilert_jax.kernels.matvec import (MatvecConfig, check_tiling, combine_reference, input_rows, matvec_tile,
                                       tile_rows)
from tilert_jax.kernels.swiglu_matvec import swiglu_matvec_reference

f32 = jnp.float32


def mlp_block_reference(
    x: jax.Array,  # [B, H]: the residual stream
    norm_weight: jax.Array,  # [H]
    eps: float,
    w_gate: jax.Array,  # [F, H]
    w_up: jax.Array,  # [F, H]
    w_down: jax.Array,  # [H, F]
    *,
    x_parts: jax.Array | None = None,  # [S, B, H] float32 partial sums added to x first
):
    """-> (float32 [1, B, H]: the MLP's output, to add to the stream; x_new [B, H]: the combined stream)."""
    xs = combine_reference(x, x_parts)
    mid = swiglu_matvec_reference(xs, norm_weight, eps, w_gate, w_up)  # [B, F]
    return jnp.matmul(mid, w_down.T, preferred_element_type=f32)[None], xs


def _tiles(phase_tiles: int, programs: int, run) -> None:
    """Deals tiles 0..phase_tiles-1 round-robin to the programs: run(t) for each of this program's tiles."""
    pid = pl.program_id(0)
    for i in range(-(-phase_tiles // programs)):
        t = pid + i * programs
        if (i + 1) * programs <= phase_tiles:
            run(t)
        else:
            pl.when(t < phase_tiles)(lambda t=t: run(t))


def mlp_block(
    x: jax.Array,  # [B, H]
    norm_weight: jax.Array,  # [H]
    eps: float,
    w_gate: jax.Array,  # [F, H]
    w_up: jax.Array,  # [F, H]
    w_down: jax.Array,  # [H, F]
    *,
    x_parts: jax.Array | None = None,  # [S, B, H] float32
    gate_up: MatvecConfig | None = None,  # split must be 1
    down: MatvecConfig | None = None,
    programs: int = RESIDENT_PROGRAMS,
    interpret: bool | None = None,
):
    """-> (float32 partial sums [down.split, B, H], x_new [B, H]). See mlp_block_reference."""
    gate_up, down = gate_up or MatvecConfig(), down or MatvecConfig()
    batch, hidden = x.shape
    ffn = w_gate.shape[0]
    if w_gate.shape != (ffn, hidden) or w_up.shape != (ffn, hidden) or w_down.shape != (hidden, ffn):
        raise ValueError(f"MLP weights {w_gate.shape}/{w_up.shape}/{w_down.shape} do not fit x {x.shape}")
    if norm_weight.shape != (hidden,):
        raise ValueError(f"norm_weight must be [{hidden}], got {norm_weight.shape}")
    if gate_up.split != 1:
        raise ValueError(f"mlp_block needs an unsplit gate/up: {gate_up}")
    check_tiling(gate_up, batch, hidden, (ffn,))
    check_tiling(down, batch, ffn, (hidden,))
    if x_parts is not None and (x_parts.ndim != 3 or x_parts.shape[1:] != (batch, hidden)):
        raise ValueError(f"x_parts must be [S, {batch}, {hidden}], got {x_parts.shape}")
    dtype = x.dtype
    interpret = interpret_default() if interpret is None else interpret
    prow = input_rows(batch)  # rows phase 0 reads
    slice_k = max(16, 1 << (max(hidden // programs, 1).bit_length() - 1))  # phase 0: columns per slice written
    if hidden % slice_k:
        raise ValueError(f"hidden size {hidden} is not a multiple of {slice_k}")
    has_parts = x_parts is not None
    tile = dict(batch=batch, eps=float(eps), in_dtype=dtype, interpret=interpret)

    def body(phase, *refs):
        it = iter(refs)
        x_ref = next(it)
        xp_ref = next(it) if has_parts else None
        nw_ref, wg_ref, wu_ref, wd_ref = next(it), next(it), next(it), next(it)
        parts_ref, xo_ref, h_ref, mid_ref = next(it), next(it), next(it), next(it)
        if phase == 0:
            def load_x(k0, size):
                return stream_rows(x_ref, (xp_ref,) if has_parts else (), 0, prow, batch, k0, size, dtype)

            rinv = rms_inverse(load_x, hidden, norm_chunk(hidden, prow), eps)

            def write_slice(t):
                k0 = pl.multiple_of(t * slice_k, slice_k)
                xm = load_x(k0, slice_k)
                window = (pl.ds(0, prow), pl.ds(k0, slice_k))
                store_rows(xo_ref.at[window], xm.astype(dtype), batch)
                store_rows(h_ref.at[window], rms_apply(xm, rinv, nw_ref[pl.ds(k0, slice_k)], dtype).astype(dtype),
                           batch)

            _tiles(hidden // slice_k, programs, write_slice)
        elif phase == 1:
            _tiles(ffn // gate_up.bn, programs, lambda t: matvec_tile(
                t, 0, h_ref, None, None, [wg_ref, wu_ref], None, mid_ref, k_dim=hidden, ns=(ffn, ffn), cfg=gate_up,
                rows=tile_rows(gate_up, batch), swiglu=True, out_dtype=dtype, **tile))
        else:
            _tiles(hidden // down.bn * down.split, programs, lambda t: matvec_tile(
                t // down.split, t % down.split, mid_ref, None, None, [wd_ref], None, parts_ref, k_dim=ffn,
                ns=(hidden,), cfg=down, rows=tile_rows(down, batch), swiglu=False, out_dtype=f32, **tile))

    inputs = [x] + ([x_parts.astype(f32)] if has_parts else []) + [norm_weight, w_gate, w_up, w_down]
    out_shape = [jax.ShapeDtypeStruct((down.split, batch, hidden), f32),  # the MLP's output (partial sums)
                 jax.ShapeDtypeStruct((batch, hidden), dtype),  # x_new
                 jax.ShapeDtypeStruct((batch, hidden), dtype),  # h = rms_norm(x_new)
                 jax.ShapeDtypeStruct((batch, ffn), dtype)]  # mid = silu(h @ W_gate^T) * (h @ W_up^T)
    parts, x_new, _, _ = phased_call(body, 3, inputs, out_shape, programs=programs,
                                     num_warps=max(gate_up.num_warps, down.num_warps),
                                     num_stages=min(gate_up.num_stages, down.num_stages), name="mlp_block",
                                     interpret=interpret)
    return parts, x_new
