"""The Linear layer of the DeepSeek family: a weight stored [in, out], bf16 / float32 or FP8 e4m3 with block scales.

FP8 weights stay FP8 in memory whatever dtype the model is loaded in (`load(..., dtype="float32")` included): the
scale leaf is float32, and every matmul dequantizes (XLA path: float32 dequantize, cast to the activation dtype,
multiply). Loading in float32 therefore computes exactly what transformers computes on the dequantized weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tilert_jax.kernels import fp8_matmul
from tilert_jax.params import ParamSpec

FP8 = "float8_e4m3fn"


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Linear:
    w: jax.Array  # [..., in, out]; float8_e4m3fn when `scale` is set
    scale: jax.Array | None = None  # [..., ceil(in / block_in), ceil(out / block_out)] float32 (weight_scale_inv.T)
    b: jax.Array | None = None  # [out]


def cdiv(a: int, b: int) -> int:
    return -(-a // b)


def linear_spec(in_dim: int, out_dim: int, in_axis: str | None, out_axis: str | None, *,
                fp8_block: tuple[int, int] | None = None, bias: bool = False,
                experts: int | None = None) -> Linear:
    """The ParamSpecs of one Linear (a stack of `experts` of them when given). fp8_block: (block_out, block_in)."""
    lead, lead_axes = ((experts,), ("experts",)) if experts else ((), ())
    if fp8_block is None:
        w = ParamSpec((*lead, in_dim, out_dim), (*lead_axes, in_axis, out_axis))
        scale = None
    else:
        block_out, block_in = fp8_block
        w = ParamSpec((*lead, in_dim, out_dim), (*lead_axes, in_axis, out_axis), dtype=FP8)
        # The scale blocks carry the weight's logical axes, so a tensor-parallel shard of a weight that holds whole
        # blocks gets exactly its blocks (models/deepseek.py checks the alignment under a mesh).
        scale = ParamSpec((*lead, cdiv(in_dim, block_in), cdiv(out_dim, block_out)), (*lead_axes, in_axis, out_axis),
                          init="ones", dtype="float32")
    b = ParamSpec((out_dim,), (out_axis,), init="zeros") if bias else None
    return Linear(w=w, scale=scale, b=b)


def weight(lin: Linear, block: tuple[int, int] | None, dtype) -> jax.Array:
    """The weight in `dtype` ([..., in, out]), dequantized when it is FP8."""
    if lin.scale is None:
        return lin.w.astype(dtype)
    expected = (cdiv(lin.w.shape[-2], block[1]), cdiv(lin.w.shape[-1], block[0]))
    if tuple(lin.scale.shape[-2:]) != expected:
        raise ValueError(f"FP8 scale blocks {tuple(lin.scale.shape[-2:])} do not match a weight of shape "
                         f"{tuple(lin.w.shape[-2:])} with blocks {block} (a shard must hold whole blocks)")
    return fp8_matmul.dequantize(lin.w, lin.scale, block, dtype)


def linear(x: jax.Array, lin: Linear, block: tuple[int, int] | None, impl: str = "xla") -> jax.Array:
    """x: [..., in] -> [..., out] in x's dtype.

    impl="pallas" with at most 16 rows (decode) streams the weight through a Pallas kernel: FP8 weights are
    dequantized tile by tile in the kernel (kernels/moe_grouped_matvec.py, one group), bf16 ones go through
    kernels/matvec.py. Shapes the kernels do not tile stay on the XLA path."""
    y = _pallas_linear(x, lin, block) if impl == "pallas" else None
    if y is None:
        y = jnp.matmul(x, weight(lin, block, x.dtype))
    return y if lin.b is None else y + lin.b.astype(y.dtype)


def _pallas_linear(x: jax.Array, lin: Linear, block) -> jax.Array | None:
    from tilert_jax.kernels import matvec, moe_grouped_matvec

    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    k_dim, n_dim = lin.w.shape[-2:]
    if lin.w.ndim != 2 or rows > 16:
        return None
    x2 = x.reshape(rows, k_dim)
    if lin.scale is not None:
        if moe_grouped_matvec.tiles(k_dim, n_dim, block) is None or lin.scale.shape != (
                cdiv(k_dim, block[1]), cdiv(n_dim, block[0])):
            return None
        y = moe_grouped_matvec.grouped_matvec(x2[None], lin.w[None], jnp.zeros((1,), jnp.int32),
                                              scale=lin.scale[None], block=block)[0]
    else:
        cfg = matvec.MatvecConfig()
        if n_dim % cfg.bn or k_dim % cfg.bk:
            return None
        y = matvec.matvec(x2, lin.w.astype(x.dtype), config=cfg)
    return y.reshape(*x.shape[:-1], n_dim)


def nbytes(lin: Linear, dtype) -> int:
    """Bytes of a Linear spec tree in `dtype` (FP8 weights and float32 scales at their own size)."""
    total = 0
    for spec in (lin.w, lin.scale, lin.b):
        if spec is not None:
            n = 1
            for d in spec.shape:
                n *= d
            total += n * spec.resolved_dtype(dtype).itemsize
    return total
