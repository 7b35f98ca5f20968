"""A prompt's gate and up products with the SwiGLU in their epilogue: silu(x @ w_gate.T) * (x @ w_up.T) in one
launch, the [tokens, intermediate] product written once (XLA's path writes gate and up, then reads both back for
the SwiGLU: 12 us a layer at llama-3.2-1b's 1024 tokens).

Mosaic GPU, not the Triton lowering: the products run at cuBLAS' rate only with Hopper's asynchronous machinery (TMA
copies into swizzled shared memory, wgmma, a memory warpgroup feeding two compute warpgroups), which Triton-lowered
Pallas does not reach (its Q/K/V tile pipeline ran at 410 to 585 TFLOP/s, cuBLAS at 770).

A persistent launch, one program per SM: each takes [tile_m, 2 * tile_n] output tiles in turn. Its memory
warpgroup streams x [tile_m, tile_k] and both weights' [2 * tile_n, tile_k] blocks through `stages` buffers; each
compute warpgroup owns tile_n of the tile's columns and keeps a gate and an up accumulator ([tile_m, tile_n]
float32 each, in registers), so the SwiGLU is formed from the float32 sums before the one bf16 rounding.

Tested on the GPU only (tests/test_swiglu_matmul.py, `gpu` marker), as the cuDNN attention is: jax's Mosaic GPU
interpreter (0.10) does not take a transposed wgmma operand, which x @ w.T with w stored [out, in] needs.
"""

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import mosaic_gpu as plgpu


def supported(x: jnp.ndarray) -> bool:
    """Whether the kernel runs here: a Hopper GPU (wgmma) and 16-bit floats."""
    device = jax.devices()[0]
    return (device.platform == "gpu" and getattr(device, "compute_capability", "").startswith("9.")
            and x.dtype in (jnp.bfloat16, jnp.float16))


def swiglu_matmul_reference(
    x: jnp.ndarray,  # [M, K]
    w_gate: jnp.ndarray,  # [N, K]
    w_up: jnp.ndarray,  # [N, K]
) -> jnp.ndarray:  # [M, N] in x's dtype
    """The products summed in float32, the SwiGLU formed from the float32 sums, rounded once."""
    gate = jnp.dot(x, w_gate.T, preferred_element_type=jnp.float32)
    up = jnp.dot(x, w_up.T, preferred_element_type=jnp.float32)
    return (jax.nn.silu(gate) * up).astype(x.dtype)


def _kernel(x_gmem, gate_gmem, up_gmem, out_gmem, *, tile_m: int, tile_n: int, tile_k: int, stages: int):
    m, k = x_gmem.shape
    n = gate_gmem.shape[0]
    cta_tile_n = 2 * tile_n
    itemsize = jnp.dtype(x_gmem.dtype).itemsize
    swizzle = plgpu.find_swizzle(tile_k * itemsize * 8)
    transforms = (plgpu.TilingTransform((8, swizzle // itemsize)), plgpu.SwizzleTransform(swizzle))
    out_swizzle = plgpu.find_swizzle(tile_n * itemsize * 8)
    out_transforms = (plgpu.TilingTransform((8, out_swizzle // itemsize)), plgpu.SwizzleTransform(out_swizzle))
    m_tiles, n_tiles = m // tile_m, n // cta_tile_n

    def pipeline(body, compute_context):
        weight_spec = plgpu.BlockSpec((cta_tile_n, tile_k), lambda s: (0, s), transforms=transforms,
                                      memory_space=plgpu.SMEM)
        x_spec = plgpu.BlockSpec((tile_m, tile_k), lambda s: (0, s), transforms=transforms, memory_space=plgpu.SMEM)
        return plgpu.emit_pipeline_warp_specialized(
            body, grid=(k // tile_k,), memory_registers=40, in_specs=[x_spec, weight_spec, weight_spec],
            wg_axis="wg", num_compute_wgs=2, max_concurrent_steps=stages, compute_context=compute_context)

    def unused(*_, **__):
        return None

    @functools.partial(
        pl.run_scoped,
        allocations=pipeline(unused, unused).get_allocations(x_gmem, gate_gmem, up_gmem),
        out_smem=plgpu.SMEM((2, tile_m, tile_n), out_gmem.dtype, transforms=out_transforms),
        collective_axes="wg",
    )
    def _scope(allocations, out_smem):
        wg = lax.axis_index("wg")
        wg_columns = pl.ds(wg * tile_n, tile_n)

        @plgpu.nd_loop((m_tiles * n_tiles,), collective_axes="sm")
        def _tile(info: plgpu.NDLoopInfo):
            (tile,) = info.index
            rows = pl.ds((tile % m_tiles) * tile_m, tile_m)  # the M tiles of one N tile run side by side: the
            columns = pl.ds((tile // m_tiles) * cta_tile_n, cta_tile_n)  # weight blocks are read once from HBM

            def compute_context(run_pipeline):
                @functools.partial(pl.run_scoped, gate_acc=plgpu.ACC((tile_m, tile_n), jnp.float32),
                                   up_acc=plgpu.ACC((tile_m, tile_n), jnp.float32))
                def _accumulate(gate_acc, up_acc):
                    run_pipeline((gate_acc, up_acc))
                    gate, up = gate_acc[...], up_acc[...]
                    product = gate / (1.0 + jnp.exp(-gate)) * up
                    plgpu.wait_smem_to_gmem(0, wait_read_only=True)  # the previous tile's store has read out_smem
                    out_smem[wg] = product.astype(out_smem.dtype)
                    plgpu.commit_smem()
                    plgpu.copy_smem_to_gmem(out_smem.at[wg], out_gmem.at[rows, columns].at[:, wg_columns])

            def step(_, x_smem, gate_smem, up_smem, accs):
                gate_acc, up_acc = accs
                plgpu.wgmma(gate_acc, x_smem, gate_smem.at[wg_columns].transpose((1, 0)))
                plgpu.wgmma(up_acc, x_smem, up_smem.at[wg_columns].transpose((1, 0)))
                plgpu.wgmma_wait(0)
                return accs

            pipeline(step, compute_context)(x_gmem.at[rows], gate_gmem.at[columns], up_gmem.at[columns],
                                            allocations=allocations)

    plgpu.wait_smem_to_gmem(0, wait_read_only=True)


def swiglu_matmul(
    x: jnp.ndarray,  # [M, K] bf16 or f16
    w_gate: jnp.ndarray,  # [N, K]
    w_up: jnp.ndarray,  # [N, K]
    *,
    tile_m: int = 128,  # tokens per output tile
    tile_n: int = 64,  # output columns per compute warpgroup (the tile is 2 * tile_n wide)
    tile_k: int = 64,  # the contraction per pipeline step
    stages: int = 3,  # pipeline steps in flight (shared memory: stages * (tile_m + 4 * tile_n) * tile_k * 2 bytes)
) -> jnp.ndarray:  # [M, N]
    """swiglu_matmul_reference in one Mosaic GPU launch (a Hopper GPU, see `supported`). M must divide by tile_m,
    N by 2 * tile_n and K by tile_k (tuning.swiglu_matmul_config picks a tiling that does)."""
    (m, k), (n, k_gate) = x.shape, w_gate.shape
    if w_up.shape != w_gate.shape or k_gate != k:
        raise ValueError(f"swiglu_matmul: x {x.shape}, w_gate {w_gate.shape} and w_up {w_up.shape} do not match")
    if m % tile_m or n % (2 * tile_n) or k % tile_k:
        raise ValueError(f"swiglu_matmul: [{m}, {k}] x [{n}, {k}]^T does not divide into tiles of {tile_m} rows, "
                         f"{2 * tile_n} columns and {tile_k} of the contraction")
    call = plgpu.kernel(
        functools.partial(_kernel, tile_m=tile_m, tile_n=tile_n, tile_k=tile_k, stages=stages),
        out_type=jax.ShapeDtypeStruct((m, n), x.dtype),
        grid=(jax.devices()[0].core_count,),
        grid_names=("sm",),
        num_threads=3,
        thread_name="wg",
        compiler_params=plgpu.CompilerParams(lowering_semantics=plgpu.LoweringSemantics.Warpgroup),
    )
    return call(x, w_gate, w_up)
