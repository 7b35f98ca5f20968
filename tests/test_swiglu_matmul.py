"""The prefill's gate/up products with the SwiGLU in their epilogue (kernels/swiglu_matmul.py): the Mosaic GPU kernel
against its jnp reference on a Hopper GPU (`gpu` marker: jax's Mosaic GPU interpreter does not take the kernel's
transposed wgmma operand, see the kernel's docstring), its tiling rule and shape checks, and the op's fallback.

Tolerance (max |out - ref| / max |ref|): 1e-2 in bf16 and f16. Both sum in float32 and form the SwiGLU from the
float32 sums; the kernel adds the contraction in 64-wide steps in another order, and its one rounding to 16 bits
(a relative step of 2^-8 in bf16) can land on the other side of the reference's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import ops, tuning
from tilert_jax.kernels.swiglu_matmul import supported, swiglu_matmul, swiglu_matmul_reference


def inputs(rows, hidden, intermediate, dtype, seed=0):
    kx, kg, ku = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (rows, hidden), jnp.float32).astype(dtype)
    w_gate = (jax.random.normal(kg, (intermediate, hidden), jnp.float32) * hidden ** -0.5).astype(dtype)
    w_up = (jax.random.normal(ku, (intermediate, hidden), jnp.float32) * hidden ** -0.5).astype(dtype)
    return x, w_gate, w_up


def test_reference_is_the_mlp_formula_float32():
    """float32: the model's XLA formula and the reference are the same arithmetic, equal to rounding (1e-5)."""
    x, w_gate, w_up = inputs(16, 64, 128, jnp.float32, seed=1)
    expected = jax.nn.silu(x @ w_gate.T) * (x @ w_up.T)
    np.testing.assert_allclose(swiglu_matmul_reference(x, w_gate, w_up), expected, rtol=1e-5, atol=1e-5)


def test_tiling_rule():
    assert tuning.swiglu_matmul_config(1024, 2048, 8192) == dict(tile_m=128, tile_n=64, tile_k=64, stages=3)
    assert tuning.swiglu_matmul_config(1088, 2048, 8192) is None  # 64-row tiles lose to XLA's path
    assert tuning.swiglu_matmul_config(1024, 2048, 8256) is None  # columns in tiles of 128
    assert tuning.swiglu_matmul_config(1024, 2000, 8192) is None  # contraction in steps of 64


def test_shapes_are_checked():
    x, w_gate, w_up = inputs(128, 64, 128, jnp.bfloat16)
    with pytest.raises(ValueError, match="do not match"):
        swiglu_matmul(x, w_gate, w_up[:, :32])
    with pytest.raises(ValueError, match="does not divide"):
        swiglu_matmul(x[:96], w_gate, w_up)


def test_op_falls_back_where_the_kernel_does_not_run():
    """Where `supported` is false (no Hopper GPU, or float32) implementation="pallas" is the XLA formula itself."""
    x, w_gate, w_up = inputs(128, 64, 128, jnp.float32, seed=2)
    assert not supported(x)
    config = tuning.swiglu_matmul_config(128, 64, 128)
    got = ops.swiglu_matmul(x[None], w_gate, w_up, config=config, implementation="pallas")
    np.testing.assert_array_equal(got[0], jax.nn.silu(x @ w_gate.T) * (x @ w_up.T))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("rows,hidden,intermediate", [(128, 256, 128), (384, 1024, 768), (1024, 2048, 8192)])
def test_gpu_kernel_matches_reference(rows, hidden, intermediate, dtype):
    x, w_gate, w_up = inputs(rows, hidden, intermediate, dtype, seed=3)
    config = tuning.swiglu_matmul_config(rows, hidden, intermediate)
    got = np.asarray(jax.jit(lambda *a: swiglu_matmul(*a, **config))(x, w_gate, w_up), np.float32)
    expected = np.asarray(swiglu_matmul_reference(x, w_gate, w_up), np.float32)
    assert np.max(np.abs(got - expected)) <= 1e-2 * np.max(np.abs(expected))


@pytest.mark.gpu
def test_gpu_op_reshapes_a_batch_of_sequences():
    x, w_gate, w_up = inputs(256, 256, 256, jnp.bfloat16, seed=4)
    config = tuning.swiglu_matmul_config(256, 256, 256)
    got = ops.swiglu_matmul(x.reshape(2, 128, 256), w_gate, w_up, config=config, implementation="pallas")
    expected = swiglu_matmul_reference(x, w_gate, w_up).reshape(2, 128, 256)
    np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32), atol=2e-2, rtol=2e-2)


@pytest.mark.gpu
def test_gpu_dense_prefill_with_the_kernel_matches_xla():
    """A bf16 dense prefill of 128 tokens through impl="pallas" (the kernel in its layers but the last, whose MLP
    runs for the last token alone) against impl="xla": logits within 2e-2 relative (bf16 products through three
    layers, rounded at other points)."""
    import dataclasses

    from tilert_jax.config import preset
    from tilert_jax.models import dense
    from tilert_jax.params import init_params

    config = dataclasses.replace(preset("tiny"), num_layers=3, hidden_size=256, intermediate_size=512)
    params = init_params(dense.param_specs(config), jax.random.key(5), jnp.bfloat16, std=0.05)
    cache = dense.init_cache(config, 1, 256, jnp.bfloat16)
    prompt = jax.random.randint(jax.random.key(6), (1, 128), 0, config.vocab_size)
    prefill = {impl: jax.jit(lambda p, t, c, impl=impl: dense.prefill(config, p, t, c, 0, jnp.int32(127), impl=impl))
               for impl in ("xla", "pallas")}
    assert "mosaic_gpu" in prefill["pallas"].lower(params, prompt, cache).as_text()
    (logits_x, _), (logits_p, _) = (prefill[impl](params, prompt, cache) for impl in ("xla", "pallas"))
    logits_x, logits_p = np.asarray(logits_x, np.float64), np.asarray(logits_p, np.float64)
    assert np.linalg.norm(logits_p - logits_x) <= 2e-2 * np.linalg.norm(logits_x)
