"""The MLA decode kernels (kernels/mla_decode.py, interpret mode on the CPU) against their jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import fp8_matmul, mla_decode


def _inputs(key, batch, heads, dtype, fp8, length=48, dn=16, dr=16, dv=16, r=32):
    keys = jax.random.split(key, 4)
    q_nope = jax.random.normal(keys[0], (batch, heads, dn)).astype(dtype)
    q_pe = jax.random.normal(keys[1], (batch, heads, dr)).astype(dtype)
    w = jax.random.normal(keys[2], (r, heads * (dn + dv))) * 0.2
    cache = jax.random.normal(keys[3], (batch, length, r + dr)).astype(dtype)
    block = (16, 16) if fp8 else None
    scale = None
    if fp8:
        w, scale = fp8_matmul.quantize(w, block)
    else:
        w = w.astype(dtype)
    return q_nope, q_pe, w, scale, block, cache


@pytest.mark.parametrize("heads,fp8,splits,pos", [(4, False, None, 37), (32, False, 4, 47), (4, True, 2, 0),
                                                  (32, True, None, 20)])
def test_mla_decode_matches_reference_float32(heads, fp8, splits, pos):
    """float32: the kernels' other summation orders (per split, then merged) agree to 1e-5. Fewer heads than a
    16-row dot (masked rows) and two head blocks; FP8 weights with 16 x 16 scale blocks; the first position alone,
    a middle one (positions past pos hold other values and must not count) and the last."""
    args = _inputs(jax.random.key(heads + pos), 2, heads, jnp.float32, fp8)
    pos = jnp.int32(pos)
    out = mla_decode.mla_decode(*args, pos, softmax_scale=0.3, splits=splits, bs=16, interpret=True)
    ref = mla_decode.mla_decode_reference(*args, pos, softmax_scale=0.3)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


def test_mla_decode_matches_reference_bf16():
    """bf16 activations and cache: the kernels round the unnormalised probabilities where the reference rounds the
    normalised ones; both within bf16's 2^-8 relative step, so 2e-2 of the output scale."""
    args = _inputs(jax.random.key(5), 1, 16, jnp.bfloat16, False)
    out = mla_decode.mla_decode(*args, jnp.int32(40), softmax_scale=0.25, bs=16, interpret=True).astype(jnp.float32)
    ref = mla_decode.mla_decode_reference(*args, jnp.int32(40), softmax_scale=0.25).astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-2 * float(jnp.max(jnp.abs(ref)))


def test_mla_decode_rejects_bad_shapes():
    q_nope, q_pe, w, scale, block, cache = _inputs(jax.random.key(1), 1, 4, jnp.float32, False)
    with pytest.raises(ValueError, match="do not form"):
        mla_decode.mla_decode(q_nope, q_pe, w[:, :-1], None, None, cache, jnp.int32(3), softmax_scale=1.0)
    assert not mla_decode.supported(24, 16, 16, 16, 32, None)  # 24 heads: not whole blocks of 16


@pytest.mark.gpu
@pytest.mark.parametrize("heads,fp8", [(16, False), (128, True)])
def test_gpu_mla_decode_real_shapes(heads, fp8):
    """Compiled on the GPU at DeepSeek-V2-Lite (16 heads, bf16) and V3 (128 heads, FP8 128 x 128 blocks) shapes,
    bf16, 1200 cached tokens: the bf16 bound of the CPU test."""
    q_nope, q_pe, w, scale, block, cache = _inputs(jax.random.key(heads), 1, heads, jnp.bfloat16, False,
                                                   length=1280, dn=128, dr=64, dv=128, r=512)
    if fp8:
        block = (128, 128)
        w, scale = fp8_matmul.quantize(w.astype(jnp.float32), block)
    pos = jnp.int32(1199)
    run = jax.jit(lambda q, qp, w_, s_, c, p: mla_decode.mla_decode(q, qp, w_, s_, block, c, p, softmax_scale=0.1))
    out = run(q_nope, q_pe, w, scale, cache, pos)
    ref = mla_decode.mla_decode_reference(q_nope, q_pe, w, scale, block, cache, pos, softmax_scale=0.1)
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-2 * float(jnp.max(jnp.abs(ref)))
