"""The phased MLP kernel (kernels/mlp_block.py) and the grid barrier under it (kernels/grid_sync.py): interpreted on
the CPU against the jnp reference (each phase a launch of its own), compiled on a GPU (`gpu` marker: one launch with
grid barriers between the phases, at real model shapes).

Tolerances (||out - ref|| / ||ref||, the reference on the same inputs): float32 1e-5 (only the order of float32
additions differs); bf16 2e-2, as the chain of the separate kernels it replaces: the normed input and the SwiGLU
product are each rounded to bf16 as the reference rounds them, and a one-ulp difference in the product of gate and up
can move an output element by 2^-8 before the down projection sums 8192 to 14336 of them.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import grid_sync, tuning
from tilert_jax.kernels.matvec import MatvecConfig
from tilert_jax.kernels.mlp_block import mlp_block, mlp_block_reference

F32, BF16 = jnp.float32, jnp.bfloat16


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def make(batch, hidden, ffn, dtype, parts):
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30)), 6)  # fresh inputs each run
    rnd = lambda k, shape, scale: (scale * jax.random.normal(k, shape, F32)).astype(dtype)  # noqa: E731
    x = rnd(keys[0], (batch, hidden), 1.0)
    x_parts = (0.5 * jax.random.normal(keys[1], (parts, batch, hidden), F32)) if parts else None
    nw = 1 + rnd(keys[2], (hidden,), 0.1)
    return (x, nw, rnd(keys[3], (ffn, hidden), 0.05), rnd(keys[4], (ffn, hidden), 0.05),
            rnd(keys[5], (hidden, ffn), 0.05), x_parts)


@pytest.mark.parametrize("batch,parts,dtype,programs,mode", [
    (1, 2, F32, 8, "dot"), (3, 0, F32, 8, "dot"), (1, 0, BF16, 8, "dot"),
    (2, 3, BF16, 6, "dot"),  # 6 programs: tiles left over
    (1, 2, BF16, 8, "fma"),  # batch 1: multiply-adds in registers
])
def test_mlp_block_matches_reference(batch, parts, dtype, programs, mode):
    x, nw, wg, wu, wd, x_parts = make(batch, 128, 256, dtype, parts)
    out, x_new = mlp_block(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts, programs=programs,
                           gate_up=MatvecConfig(bn=16, bk=32, mode=mode),
                           down=MatvecConfig(bn=16, bk=64, split=2, mode=mode))
    ref, ref_x = mlp_block_reference(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts)
    tol = 1e-5 if dtype == F32 else 2e-2
    assert out.shape == (2, batch, 128)
    assert rel(out.sum(0), ref.sum(0)) < tol
    assert rel(x_new.astype(F32), ref_x.astype(F32)) < (1e-6 if dtype == F32 else 1e-2)


def test_mlp_block_rejects_bad_shapes():
    x, nw, wg, wu, wd, _ = make(1, 128, 256, F32, 0)
    with pytest.raises(ValueError, match="do not fit"):
        mlp_block(x, nw, 1e-5, wg, wu, wd[:64], programs=8)
    with pytest.raises(ValueError, match="unsplit gate/up"):
        mlp_block(x, nw, 1e-5, wg, wu, wd, gate_up=MatvecConfig(split=2), programs=8)


def test_phased_call_orders_phases_when_interpreted():
    data, bad = grid_sync.neighbour_exchange(4, 8)
    assert int(jnp.sum(bad)) == 0
    np.testing.assert_array_equal(data, np.arange(8)[None] * 1000 + np.arange(4)[:, None])


@pytest.mark.gpu
def test_gpu_grid_barrier_orders_memory():
    data, bad = jax.jit(lambda: grid_sync.neighbour_exchange(64, interpret=False))()
    assert int(jnp.sum(bad)) == 0
    np.testing.assert_array_equal(data, np.arange(128)[None] * 1000 + np.arange(64)[:, None])


@pytest.mark.gpu
@pytest.mark.parametrize("batch,hidden,ffn", [(1, 2048, 8192), (1, 4096, 14336), (4, 4096, 14336)])
def test_gpu_mlp_block_real_shapes(batch, hidden, ffn):
    x, nw, wg, wu, wd, x_parts = make(batch, hidden, ffn, BF16, 2)
    configs = tuning.mlp_block_configs(batch, hidden, ffn)
    out, x_new = jax.jit(lambda *a: mlp_block(a[0], a[1], 1e-5, *a[2:5], x_parts=a[5], gate_up=configs[0],
                                              down=configs[1], interpret=False))(x, nw, wg, wu, wd, x_parts)
    up = [a.astype(F32) for a in (x, nw, wg, wu, wd)]
    with jax.default_matmul_precision("highest"):
        ref, ref_x = mlp_block_reference(up[0], up[1], 1e-5, *up[2:], x_parts=x_parts)
    assert rel(out.sum(0), ref.sum(0)) < 2e-2
    assert rel(x_new.astype(F32), ref_x) < 1e-2
