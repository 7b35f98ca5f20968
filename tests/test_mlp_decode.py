"""The batch-1 decode MLP in one Mosaic GPU launch (kernels/mlp_decode.py): the kernel against its jnp reference on
a Hopper GPU (`gpu` marker: jax's Mosaic GPU interpreter does not take the kernel's transposed wgmma operand), the
reference against the model's formula, and the shape checks.

Tolerance (max |out - ref| / max |ref|): 1e-2 in bf16. Both sum in float32; the kernel adds the contraction in
64-wide blocks in another order, so its roundings of h and of the SwiGLU product to bf16 (a relative step of 2^-8)
can land on the other side of the reference's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels.mlp_block import mlp_block_reference
from tilert_jax.kernels.mlp_decode import down_splits, mlp_decode, mlp_decode_reference, supported


def inputs(hidden, intermediate, parts, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 6)
    x = jax.random.normal(keys[0], (1, hidden), jnp.float32).astype(dtype)
    x_parts = jax.random.normal(keys[1], (parts, 1, hidden), jnp.float32) if parts else None
    norm_weight = (1 + 0.1 * jax.random.normal(keys[2], (hidden,), jnp.float32)).astype(dtype)
    w_gate, w_up = ((jax.random.normal(k, (intermediate, hidden), jnp.float32) * hidden ** -0.5).astype(dtype)
                    for k in keys[3:5])
    w_down = (jax.random.normal(keys[5], (hidden, intermediate), jnp.float32) * intermediate ** -0.5).astype(dtype)
    return x, x_parts, norm_weight, w_gate, w_up, w_down


@pytest.mark.parametrize("parts", [0, 3])
def test_reference_is_the_mlp_float32(parts):
    """float32: the K-split partial sums add up to the phased MLP's reference (itself checked against the model's
    formula in test_mlp_block.py), and the combined stream is the same (1e-5)."""
    x, x_parts, nw, wg, wu, wd = inputs(64, 256, parts, jnp.float32, seed=1)
    out, x_new = mlp_decode_reference(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts, splits=4)
    ref, ref_x = mlp_block_reference(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts)
    assert out.shape == (4, 1, 64)
    np.testing.assert_allclose(jnp.sum(out, axis=0), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_new, ref_x, rtol=1e-5, atol=1e-5)


def test_shapes_are_checked():
    x, _, nw, wg, wu, wd = inputs(128, 512, 0, jnp.bfloat16)
    with pytest.raises(ValueError, match="one token"):
        mlp_decode(jnp.concatenate([x, x]), nw, 1e-5, wg, wu, wd)
    with pytest.raises(ValueError, match="do not fit"):
        mlp_decode(x, nw, 1e-5, wg, wu, wd[:, :256])
    with pytest.raises(ValueError, match="do not divide"):
        mlp_decode(x, nw, 1e-5, wg, wu, wd, splits=3)


def test_down_splits_fill_the_sms_and_fit_shared_memory():
    assert down_splits(2048, 8192) == 4  # llama-3.2-1b: 32 row tiles x 4
    assert down_splits(4096, 14336) == 2  # llama-3.1-8b: 64 row tiles x 2, the SwiGLU slice (112 KB) in h's place
    assert down_splits(5120, 13824) == 2
    assert down_splits(4096, 14000) is None  # no split of 14000 in 128-wide steps: the Triton kernel runs
    assert down_splits(2000, 8192) is None
    s = jax.ShapeDtypeStruct
    shapes = (s((1, 4096), jnp.bfloat16), s((4096,), jnp.bfloat16), s((14336, 4096), jnp.bfloat16),
              s((14336, 4096), jnp.bfloat16), s((4096, 14336), jnp.bfloat16))
    with pytest.raises(ValueError, match="shared memory"):  # the whole SwiGLU product, 224 KB
        jax.eval_shape(lambda x, nw, wg, wu, wd: mlp_decode(x, nw, 1e-5, wg, wu, wd, splits=1), *shapes)


def test_not_supported_off_a_hopper_gpu():
    x = jnp.zeros((1, 64), jnp.bfloat16)
    assert supported(x) == (jax.default_backend() == "gpu" and
                            jax.devices()[0].compute_capability.startswith("9."))
    assert not supported(jnp.zeros((2, 64), jnp.bfloat16))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,intermediate,parts,splits,programs", [
    (256, 1024, 0, 2, None), (512, 2048, 2, 4, None),
    (512, 2048, 2, 4, 3),  # three programs: several tiles each, their down tiles' runs crossing K splits
    (2048, 8192, 8, 4, None), (4096, 14336, 2, 2, None)])  # llama-3.2-1b, llama-3.1-8b
def test_gpu_kernel_matches_reference(hidden, intermediate, parts, splits, programs):
    x, x_parts, nw, wg, wu, wd = inputs(hidden, intermediate, parts, jnp.bfloat16, seed=3)
    run = jax.jit(lambda *a: mlp_decode(*a[:2], 1e-5, *a[2:5], x_parts=a[5], splits=splits, programs=programs))
    for _ in range(2):  # a second launch finds the grid barrier's counters back at zero
        out, x_new, counters = run(x, nw, wg, wu, wd, x_parts)
        np.testing.assert_array_equal(counters, np.zeros(2, np.int32))
    ref, ref_x = mlp_decode_reference(x, nw, 1e-5, wg, wu, wd, x_parts=x_parts, splits=splits)
    np.testing.assert_array_equal(np.asarray(x_new, np.float32), np.asarray(ref_x, np.float32))
    got, expected = np.asarray(out), np.asarray(ref)
    assert np.max(np.abs(got - expected)) <= 1e-2 * np.max(np.abs(expected))
