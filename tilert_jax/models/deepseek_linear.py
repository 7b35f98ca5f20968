"""The Linear layer of the DeepSeek family: a weight stored [in, out], bf16 / float32 or FP8 e4m3 with block scales.

FP8 weights stay FP8 in memory whatever dtype the model is loaded in (`load(..., dtype="float32")` included): the
scale leaf is float32, and every matmul dequantizes (XLA path: float32 dequantize, cast to the activation dtype,
multiply). Loading in float32 therefore computes exactly what transformers computes on the dequantized weights.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.kernels import fp8_matmul
from tilert_jax.params import ParamSpec

FP8 = "float8_e4m3fn"
SINGLE = np.zeros((1,), np.int32)  # the expert id of a plain Linear read as a stack of one (see `stacked`)


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
    """x: [..., in] -> [..., out] in x's dtype (see `linears`)."""
    return linears(x, [(lin,)], block, impl)[0]


def swiglu(x: jax.Array, gate: Linear, up: Linear, block: tuple[int, int] | None, impl: str = "xla") -> jax.Array:
    """silu(x @ gate) * (x @ up): [..., in] -> [..., intermediate] (see `linears`)."""
    return linears(x, [(gate, up)], block, impl)[0]


def linears(x: jax.Array, products: list[tuple[Linear, ...]], block: tuple[int, int] | None, impl: str = "xla"
            ) -> list[jax.Array]:
    """Products of one input x [..., in], each a Linear `(lin,)` -> [..., out] or a pair `(gate, up)` -> silu(x @ gate)
    * (x @ up), in x's dtype.

    impl="pallas" with at most 16 rows (decode) runs them all in one launch of the grouped matvec kernel, each weight
    a stack of one (kernels/moe_grouped_matvec.py: FP8 tiles dequantized in the kernel, the K dimension split when
    the launch is narrow). When some product does not fit the kernel (shapes that do not tile, a biased pair) all
    take the XLA path."""
    ys = _pallas_products(x, products, block) if impl == "pallas" else None
    if ys is None:
        return [_xla_product(x, p, block) for p in products]
    return [y if p[0].b is None else y + p[0].b.astype(y.dtype) for y, p in zip(ys, products)]  # single Linears


def _xla_product(x: jax.Array, product: tuple[Linear, ...], block) -> jax.Array:
    ys = [jnp.matmul(x, weight(lin, block, x.dtype)) for lin in product]
    ys = [y if lin.b is None else y + lin.b.astype(y.dtype) for y, lin in zip(ys, product)]
    return ys[0] if len(ys) == 1 else jax.nn.silu(ys[0]) * ys[1]


def _pallas_products(x: jax.Array, products: list[tuple[Linear, ...]], block) -> list[jax.Array] | None:
    """The products through one grouped-kernel launch; None when one of them does not fit it."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    rows = 1
    for d in x.shape[:-1]:
        rows *= d
    if rows > 16:
        return None
    kernel_products = []
    for product in products:
        first = product[0]
        k_dim, n_dim = first.w.shape[-2:]
        fp8 = first.scale is not None
        if (first.w.ndim != 2 or not grouped_tiles(first, block)
                or (len(product) > 1 and any(lin.b is not None for lin in product))):
            return None
        if fp8 and any(lin.scale.shape != (cdiv(k_dim, block[1]), cdiv(n_dim, block[0])) for lin in product):
            return None
        kernel_products.append(gm.Product(x=x.reshape(1, rows, k_dim), ids=SINGLE, **stacked(*product)))
    ys = gm.grouped_matvecs(kernel_products, block=block)
    return [y[0].reshape(*x.shape[:-1], y.shape[-1]) for y in ys]


def grouped_tiles(lin: Linear, block: tuple[int, int] | None) -> bool:
    """Whether the grouped kernel tiles this Linear or stack of them (kernels/moe_grouped_matvec.py, `tiles`): an FP8
    weight's tiles within its scale blocks."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    return gm.tiles(*lin.w.shape[-2:], block if lin.scale is not None else None) is not None


def stacked(*lins: Linear) -> dict:
    """The weight arguments of a grouped-kernel product (moe_grouped_matvec.Product): one Linear -> w, scale; a
    (gate, up) pair -> w, scale, w2, scale2. A plain Linear becomes a stack of one expert (ids = SINGLE); a stack of
    experts stays as it is."""
    args = {}
    for lin, suffix in zip(lins, ("", "2")):
        one = lin.w.ndim == 2
        args["w" + suffix] = lin.w[None] if one else lin.w
        args["scale" + suffix] = lin.scale[None] if one and lin.scale is not None else lin.scale
    return args


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
