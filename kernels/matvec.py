"""Weight-streaming matrix-vector product for decode: y[B, N] = x[B, K] @ W[N, K]^T, B <= 16, bf16 weights.

At batch 1 a decode step is a chain of these products, each reading its whole weight once: the kernel's only job is
to keep HBM busy. The grid is (column blocks, K splits); each program streams a [bn, bk] weight tile per loop step
(software-pipelined `num_stages` deep by the Triton compiler) and multiplies it with the matching slice of x.

Weights are stored as torch's Linear stores them, [out, in] (K contiguous): each tile row is a run of bk contiguous
elements. With [in, out] weights the same tiles read 64 to 128-byte row segments and streamed 20% slower at the
gate/up shapes (3.0 to 3.3 TB/s against 3.6 to 4.0; docs/PERF.md, session 7), so [out, in] is the only layout here.

`fused_matvec` below is the one kernel body behind several ops (each op has its own file with its reference):
  - this file's `matvec`: the plain product, optionally split over K into float32 partial sums;
  - norm_matvec.py: RMSNorm of x fused in front (and several weights side by side: Q, K and V in one launch);
  - swiglu_matvec.py: RMSNorm + gate/up + silu(gate) * up;
  - matvec_residual.py: the product plus a residual (the down and output projections).
The residual stream may arrive as x plus float32 partial sums of split-K products (`x_parts`): the kernel adds them
while it reads x and also writes the combined stream back (`x_new`), so a split-K producer needs no extra launch.

Lowering: Triton. Mosaic GPU works at warpgroup granularity (wgmma wants 64 rows) with TMA tiles; a matrix-vector
product has one to eight rows, and the Triton lowering lets one program stream its tiles through a cp.async
pipeline into a 16-row mma.sync (mode "dot") or plain multiply-adds (mode "fma", batch 1). A Mosaic GPU version
was not measured.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import (NT, ROWS, dot, interpret_default, is_pow2, load_rows, next_pow2,
                                       norm_chunk, rms_apply, rms_inverse, store_rows, stream_rows, triton_params)

f32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class MatvecConfig:
    bn: int = 64  # output columns per program (a power of 2 dividing each weight's N)
    bk: int = 128  # weight rows per loop step (a power of 2; K / split must be a multiple)
    split: int = 1  # K splits; > 1 writes float32 partial sums [split, B, N] that the consumer adds
    num_warps: int = 4
    num_stages: int = 4
    mode: str = "dot"  # "dot": rows padded to 16, tensor-core dot; "fma": B == 1, multiply-adds in registers
    evict_first: bool = True  # weights are read once: ask L2 to evict them first

    def key(self) -> str:
        return (f"bn{self.bn}_bk{self.bk}_s{self.split}_w{self.num_warps}_st{self.num_stages}_{self.mode}"
                f"{'_ef' if self.evict_first else ''}")


def matvec_reference(
    x: jax.Array,  # [B, K]
    w: jax.Array,  # [N, K]
    *,
    out_dtype=None,
) -> jax.Array:  # [B, N] in out_dtype (default x's dtype), accumulated in float32
    return jnp.matmul(x, w.T, preferred_element_type=f32).astype(out_dtype or x.dtype)


def combine_reference(x: jax.Array, x_parts: jax.Array | None) -> jax.Array:
    """The residual stream x [B, K] plus float32 partial sums [S, B, K], rounded to x's dtype."""
    if x_parts is None:
        return x
    return (x.astype(f32) + jnp.sum(x_parts, axis=0)).astype(x.dtype)


def _kernel(*refs, batch, k_dim, ns, cfg: MatvecConfig, rows, n_parts, norm, eps, swiglu, residual, out_dtype,
            in_dtype, interpret):
    it = iter(refs)
    x_ref = next(it)  # [B, K]
    xp_ref = next(it) if n_parts else None  # [S_in, B, K] float32
    nw_ref = next(it) if norm else None  # [K]
    w_refs = [next(it) for _ in ns]  # each [N_i, K]
    r_ref = next(it) if residual else None  # [B, N]
    o_ref = next(it)  # [B, N] (split == 1) or [split, B, N] float32
    xo_ref = next(it) if n_parts else None  # [B, K]: the combined stream x + sum(x_parts)
    j, s = pl.program_id(0), pl.program_id(1)
    matvec_tile(j, s, x_ref, xp_ref, nw_ref, w_refs, r_ref, o_ref, batch=batch, k_dim=k_dim, ns=ns, cfg=cfg,
                rows=rows, eps=eps, swiglu=swiglu, out_dtype=out_dtype, in_dtype=in_dtype, interpret=interpret)
    if n_parts:
        prow = input_rows(batch)
        chunk = norm_chunk(k_dim, prow)

        @pl.when((j == 0) & (s == 0))
        def _():
            for i in range(k_dim // chunk):
                xm = stream_rows(x_ref, (xp_ref,), 0, prow, batch, i * chunk, chunk, in_dtype).astype(in_dtype)
                store_rows(xo_ref.at[pl.ds(0, prow), pl.ds(i * chunk, chunk)], xm, batch)


def matvec_tile(j, s, x_ref, xp_ref, nw_ref, w_refs, r_ref, o_ref, *, batch, k_dim, ns, cfg: MatvecConfig, rows, eps,
                swiglu, out_dtype, in_dtype, interpret):
    """Output column block j (of every weight side by side; gate and up together with swiglu), K split s: the body of
    one program of `fused_matvec`, also run as a tile of a phased kernel (mlp_block.py). Refs as in `_kernel`; an
    absent one is None (xp_ref: no pending sums, nw_ref: no norm, r_ref: no residual); a 3-D o_ref takes float32
    partial sums (any split)."""
    bn, bk, splits = cfg.bn, cfg.bk, cfg.split
    norm, residual = nw_ref is not None, r_ref is not None
    evict = "evict_first" if cfg.evict_first else None
    prow = input_rows(batch)
    chunk = norm_chunk(k_dim, prow)
    part_refs = (xp_ref,) if xp_ref is not None else ()

    def load_x(k0, size):  # float32 [prow, size]: the (combined) input, rows >= B read as 0
        return stream_rows(x_ref, part_refs, 0, prow, batch, k0, size, in_dtype)

    def x_tile(k0, rinv):  # [rows, bk] in the input dtype (rinv [prow, 1]: the RMSNorm statistic, or None)
        xm = load_x(k0, bk)
        if norm:
            xm = rms_apply(xm, rinv, nw_ref[pl.ds(k0, bk)], in_dtype)
        xm = xm.astype(in_dtype)
        if cfg.mode == "dot" and prow < rows:
            xm = jnp.broadcast_to(xm, (rows, bk))  # every row the same: the dot's extra rows are never stored
        return xm

    def w_tile(w_ref, k0, n0):  # [bn, bk]
        return plt.load(w_ref.at[pl.ds(n0, bn), pl.ds(k0, bk)], eviction_policy=evict)

    def acc_init():  # "dot": [rows, bn]; "fma": [bn, bk], summed over K at the end
        return jnp.zeros((rows, bn) if cfg.mode == "dot" else (bn, bk), f32)

    def mac(acc, xt, wt):
        if cfg.mode == "dot":
            return acc + dot(xt, wt, NT, interpret)
        return acc + wt.astype(f32) * xt.astype(f32)  # [bn, bk] * [1, bk]

    def acc_final(acc):  # [rows, bn]
        return acc if cfg.mode == "dot" else jnp.sum(acc, axis=1).reshape(1, bn)

    k_per_split = k_dim // splits
    steps = k_per_split // bk

    def epilogue(accs, col0):
        if len(o_ref.shape) == 3:  # float32 partial sums [split, B, N]
            store_rows(o_ref.at[s, pl.ds(0, rows), pl.ds(col0, bn)], accs[0], batch)
            return
        if swiglu:
            g = accs[0].astype(in_dtype).astype(f32)
            u = accs[1].astype(in_dtype).astype(f32)
            y = (g / (1.0 + jnp.exp(-g))).astype(in_dtype).astype(f32) * u
        else:
            y = accs[0]
        if residual:
            r = load_rows(r_ref.at[pl.ds(0, rows), pl.ds(col0, bn)], batch).astype(f32)
            y = y.astype(in_dtype).astype(f32) + r
        store_rows(o_ref.at[pl.ds(0, rows), pl.ds(col0, bn)], y.astype(out_dtype), batch)

    def norm_inverse():
        return rms_inverse(load_x, k_dim, chunk, eps) if norm else None  # [prow, 1]

    def run(ws, n0, col0):
        if steps == 1:
            # Loop-free: the weight tiles are requested before the input is read (and normed), so their latency
            # overlaps the input's. In a loop Triton pipelines only the loads that feed the dot directly: an input
            # formed from the stream, its partial sums and the norm costs a round trip per step there.
            k0 = pl.multiple_of(s * k_per_split, bk)
            wts = [w_tile(w, k0, n0) for w in ws]
            xt = x_tile(k0, norm_inverse())
            epilogue([acc_final(mac(acc_init(), xt, wt)) for wt in wts], col0)
            return
        rinv = norm_inverse()

        def body(i, accs):
            k0 = pl.multiple_of(s * k_per_split + i * bk, bk)
            xt = x_tile(k0, rinv)
            return tuple(mac(a, xt, w_tile(w, k0, n0)) for a, w in zip(accs, ws))

        accs = lax.fori_loop(0, steps, body, tuple(acc_init() for _ in ws))
        epilogue([acc_final(a) for a in accs], col0)

    if swiglu or len(ns) == 1:
        col = pl.multiple_of(j * bn, bn)
        run(w_refs, col, col)
    else:
        start = 0
        for i, n in enumerate(ns):
            blocks = n // bn

            @pl.when((j >= start) & (j < start + blocks))
            def _(i=i, start=start):
                run([w_refs[i]], pl.multiple_of((j - start) * bn, bn), pl.multiple_of(j * bn, bn))

            start += blocks


def input_rows(batch: int) -> int:
    """Rows the input stream is read with: batch 1 reads one row (broadcast where a tile needs more), else the batch
    padded to the 16-row tensor-core dot."""
    return 1 if batch == 1 else max(ROWS, next_pow2(batch))


def tile_rows(cfg: MatvecConfig, batch: int) -> int:
    """Rows a tile computes: one in mode "fma" (batch 1), else the batch padded to the 16-row tensor-core dot."""
    return 1 if cfg.mode == "fma" else max(ROWS, next_pow2(batch))


def check_tiling(cfg: MatvecConfig, batch: int, k_dim: int, ns: tuple[int, ...]) -> None:
    """Raises ValueError unless `cfg` tiles [N_i, K] weights (each N_i in ns) for `batch` rows of input."""
    if cfg.mode == "fma" and batch != 1:
        raise ValueError("mode 'fma' needs batch 1")
    if batch > ROWS:
        raise ValueError(f"batch {batch} > {ROWS}: use the XLA path")
    if not (is_pow2(cfg.bn) and is_pow2(cfg.bk)):
        raise ValueError(f"bn and bk must be powers of 2, got {cfg}")
    if any(n % cfg.bn for n in ns):
        raise ValueError(f"every N in {ns} must be a multiple of bn={cfg.bn}")
    if k_dim % (cfg.split * cfg.bk):
        raise ValueError(f"K={k_dim} must be a multiple of split*bk={cfg.split}*{cfg.bk}")


def fused_matvec(
    x: jax.Array,  # [B, K]: the input (the residual stream when x_parts is given)
    weights: tuple[jax.Array, ...],  # each [N_i, K]; outputs side by side
    *,
    x_parts: jax.Array | None = None,  # [S_in, B, K] float32 partial sums added to x first
    norm_weight: jax.Array | None = None,  # [K]: RMSNorm of the (combined) input before the product
    eps: float = 1e-6,
    residual: jax.Array | None = None,  # [B, N] added to the product
    swiglu: bool = False,  # weights = (gate, up): silu(x @ gate.T) * (x @ up.T)
    out_dtype=None,
    config: MatvecConfig | None = None,
    interpret: bool | None = None,
):
    """Returns y ([B, N] in out_dtype, or [split, B, N] float32 partial sums when config.split > 1), and the
    combined stream x_new [B, K] as a second result when x_parts is given."""
    cfg = config or MatvecConfig()
    weights = tuple(weights)
    if x.ndim != 2:
        raise ValueError(f"x must be [B, K], got {x.shape}")
    batch, k_dim = x.shape
    ns = tuple(w.shape[0] for w in weights)
    for w in weights:
        if w.ndim != 2 or w.shape[1] != k_dim:
            raise ValueError(f"weight {w.shape} is not [N, K] for x {x.shape}")
    check_tiling(cfg, batch, k_dim, ns)
    rows = tile_rows(cfg, batch)
    if swiglu and (len(weights) != 2 or ns[0] != ns[1]):
        raise ValueError("swiglu needs two weights of one shape (gate, up)")
    if cfg.split > 1 and (swiglu or residual is not None):
        raise ValueError("a K split writes partial sums: no swiglu or residual epilogue")
    n_out = ns[0] if swiglu else sum(ns)
    if residual is not None and residual.shape != (batch, n_out):
        raise ValueError(f"residual must be {(batch, n_out)}, got {residual.shape}")
    if norm_weight is not None and norm_weight.shape != (k_dim,):
        raise ValueError(f"norm_weight must be [{k_dim}], got {norm_weight.shape}")
    n_parts = 0
    if x_parts is not None:
        if x_parts.ndim != 3 or x_parts.shape[1:] != (batch, k_dim):
            raise ValueError(f"x_parts must be [S, {batch}, {k_dim}], got {x_parts.shape}")
        n_parts = x_parts.shape[0]
        x_parts = x_parts.astype(f32)
    out_dtype = jnp.dtype(out_dtype or x.dtype)
    interpret = interpret_default() if interpret is None else interpret

    kernel = lambda *refs: _kernel(  # noqa: E731
        *refs, batch=batch, k_dim=k_dim, ns=ns, cfg=cfg, rows=rows, n_parts=n_parts,
        norm=norm_weight is not None, eps=float(eps), swiglu=swiglu, residual=residual is not None,
        out_dtype=out_dtype, in_dtype=x.dtype, interpret=interpret)
    if cfg.split > 1:
        out_shape = [jax.ShapeDtypeStruct((cfg.split, batch, n_out), f32)]
    else:
        out_shape = [jax.ShapeDtypeStruct((batch, n_out), out_dtype)]
    if n_parts:
        out_shape.append(jax.ShapeDtypeStruct((batch, k_dim), x.dtype))
    inputs = [x] + ([x_parts] if n_parts else []) + ([norm_weight] if norm_weight is not None else [])
    inputs += list(weights) + ([residual] if residual is not None else [])
    blocks = n_out // cfg.bn
    outs = pl.pallas_call(
        kernel,
        out_shape=out_shape,
        grid=(blocks, cfg.split),
        compiler_params=triton_params(cfg.num_warps, cfg.num_stages),
        interpret=interpret,
        name="matvec",
    )(*inputs)
    return (outs[0], outs[1]) if n_parts else outs[0]


def matvec(
    x: jax.Array,  # [B, K]
    w: jax.Array,  # [N, K]
    *,
    out_dtype=None,
    config: MatvecConfig | None = None,
    interpret: bool | None = None,
) -> jax.Array:  # [B, N], or [split, B, N] float32 partial sums when config.split > 1
    return fused_matvec(x, (w,), out_dtype=out_dtype, config=config, interpret=interpret)
