"""The MLA decode kernels (kernels/mla_decode.py, interpret mode on the CPU) against their jnp reference: the output
and the cache with the new token's entry (normed latent, roped key) written at pos."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import fp8_matmul, mla_decode


def _inputs(key, batch, heads, dtype, fp8, rope_dtype=None, length=48, dn=16, dr=16, dv=16, r=32, pos=0):
    """Random q [B, H, dn + dr], kv_a output [B, r + dr], latent norm weight, rope tables at pos (cat(freqs, freqs)
    layout, in rope_dtype: float32 as V2 rotates, the activation dtype as V3), kv_b weight and a filled cache."""
    keys = jax.random.split(key, 5)
    q = jax.random.normal(keys[0], (batch, heads, dn + dr)).astype(dtype)
    compressed = (3 * jax.random.normal(keys[1], (batch, r + dr))).astype(dtype)
    latent_norm = (1 + 0.2 * jax.random.normal(keys[2], (r,))).astype(dtype)
    angles = pos * 10000.0 ** (-jnp.arange(dr // 2) / (dr // 2))
    rope = tuple(jnp.concatenate([f(angles)] * 2).astype(rope_dtype or dtype) for f in (jnp.cos, jnp.sin))
    w = jax.random.normal(keys[3], (r, heads * (dn + dv))) * 0.2
    cache = jax.random.normal(keys[4], (batch, length, r + dr)).astype(dtype)
    block = (16, 16) if fp8 else None
    scale = None
    if fp8:
        w, scale = fp8_matmul.quantize(w, block)
    else:
        w = w.astype(dtype)
    return q, compressed, latent_norm, rope, w, scale, block, cache


def _both(args, pos, interleaved, **kw):
    pos = jnp.int32(pos)
    out, cache = mla_decode.mla_decode(*args, pos, softmax_scale=0.3, eps=1e-6, interleaved=interleaved,
                                       interpret=True, **kw)
    ref, ref_cache = mla_decode.mla_decode_reference(*args, pos, softmax_scale=0.3, eps=1e-6, interleaved=interleaved)
    return out, cache, ref, ref_cache


@pytest.mark.parametrize("heads,fp8,splits,pos,interleaved", [
    (4, False, None, 37, True), (32, False, 4, 47, False), (4, True, 2, 0, True), (32, True, None, 20, True)])
def test_mla_decode_matches_reference_float32(heads, fp8, splits, pos, interleaved):
    """float32: the kernels' other summation orders (per split, then merged) agree to 1e-5. Fewer heads than a
    16-row dot (masked rows) and two head blocks; FP8 weights with 16 x 16 scale blocks; the first position alone,
    a middle one (positions past pos hold other values and must not count) and the last; DeepSeek's interleaved
    rope pairs and rotate-half."""
    args = _inputs(jax.random.key(heads + pos), 2, heads, jnp.float32, fp8, pos=pos)
    out, cache, ref, ref_cache = _both(args, pos, interleaved, splits=splits, bs=16)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(cache, ref_cache, rtol=1e-5, atol=1e-5)  # the entry at pos, the rest untouched
    assert not np.array_equal(cache[:, pos], args[-1][:, pos])


@pytest.mark.parametrize("rope_dtype", [jnp.float32, jnp.bfloat16])  # V2's float32 rotation, V3's bf16
def test_mla_decode_matches_reference_bf16(rope_dtype):
    """bf16 activations and cache: the kernels round the unnormalised probabilities where the reference rounds the
    normalised ones; both within bf16's 2^-8 relative step, so 2e-2 of the output scale. The cache entry is the
    reference's up to one bf16 rounding step (the norm's sum in another order)."""
    args = _inputs(jax.random.key(5), 1, 16, jnp.bfloat16, False, rope_dtype, pos=40)
    out, cache, ref, ref_cache = (t.astype(jnp.float32) for t in _both(args, 40, True, bs=16))
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-2 * float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(cache, ref_cache, rtol=2 ** -7, atol=1e-6)


def test_mla_decode_rejects_bad_shapes():
    q, compressed, latent_norm, rope, w, scale, block, cache = _inputs(jax.random.key(1), 1, 4, jnp.float32, False)
    with pytest.raises(ValueError, match="do not form"):
        mla_decode.mla_decode(q, compressed, latent_norm, rope, w[:, :-1], None, None, cache, jnp.int32(3),
                              softmax_scale=1.0, eps=1e-6, interleaved=True)
    with pytest.raises(ValueError, match="do not form"):
        mla_decode.mla_decode(q, compressed[:, 1:], latent_norm, rope, w, None, None, cache, jnp.int32(3),
                              softmax_scale=1.0, eps=1e-6, interleaved=True)
    assert not mla_decode.supported(24, 16, 16, 16, 32, None)  # 24 heads: not whole blocks of 16


@pytest.mark.gpu
@pytest.mark.parametrize("heads,fp8,rope_dtype", [(16, False, jnp.float32), (128, True, jnp.bfloat16)])
def test_gpu_mla_decode_real_shapes(heads, fp8, rope_dtype):
    """Compiled on the GPU at DeepSeek-V2-Lite (16 heads, bf16, float32 rope) and V3 (128 heads, FP8 128 x 128
    blocks, bf16 rope) shapes, bf16, 1200 cached tokens: the bf16 bounds of the CPU test."""
    q, compressed, latent_norm, rope, w, scale, block, cache = _inputs(
        jax.random.key(heads), 1, heads, jnp.bfloat16, False, rope_dtype, length=1280, dn=128, dr=64, dv=128, r=512,
        pos=1199)
    if fp8:
        block = (128, 128)
        w, scale = fp8_matmul.quantize(w.astype(jnp.float32), block)
    pos = jnp.int32(1199)
    run = jax.jit(lambda q_, c_, w_, s_, kv, p: mla_decode.mla_decode(
        q_, c_, latent_norm, rope, w_, s_, block, kv, p, softmax_scale=0.1, eps=1e-6, interleaved=True))
    ref, ref_cache = mla_decode.mla_decode_reference(q, compressed, latent_norm, rope, w, scale, block, cache, pos,
                                                     softmax_scale=0.1, eps=1e-6, interleaved=True)
    out, new_cache = run(q, compressed, w, scale, cache, pos)
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-2 * float(jnp.max(jnp.abs(ref)))
    np.testing.assert_allclose(new_cache.astype(jnp.float32), ref_cache.astype(jnp.float32), rtol=2 ** -7, atol=1e-6)
