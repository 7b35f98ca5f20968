"""The MLA decode kernels (kernels/mla_decode.py, interpret mode on the CPU) against their jnp reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import fp8_matmul, mla_decode


def _inputs(key, batch, heads, dtype, fp8, parts=1, length=48, dn=16, dr=16, dv=16, r=32):
    """q and kv_a outputs as `parts` float32 partial sums (1: finished, in dtype), the latent norm weight, a rope table
    in the cat(freqs, freqs) layout with a yarn-like scale, the kv_b weight and a cache of random entries."""
    keys = jax.random.split(key, 6)
    part_dtype = dtype if parts == 1 else jnp.float32
    q = jax.random.normal(keys[0], (parts, batch, heads, dn + dr)).astype(part_dtype)
    compressed = jax.random.normal(keys[1], (parts, batch, r + dr)).astype(part_dtype)
    kv_norm = (1.0 + 0.1 * jax.random.normal(keys[2], (r,))).astype(dtype)
    angles = jnp.tile(jax.random.uniform(keys[3], (dr // 2,), maxval=6.0), 2)
    cos, sin = jnp.cos(angles) * 1.1, jnp.sin(angles) * 1.1
    w = jax.random.normal(keys[4], (r, heads * (dn + dv))) * 0.2
    cache = jax.random.normal(keys[5], (batch, length, r + dr)).astype(dtype)
    block = (16, 16) if fp8 else None
    scale = None
    if fp8:
        w, scale = fp8_matmul.quantize(w, block)
    else:
        w = w.astype(dtype)
    return q, compressed, kv_norm, cos, sin, w, scale, block, cache


def _check_cache(new, ref, old, pos, tol):
    """The new entry at pos as the reference writes it, every other position as it was (in place)."""
    np.testing.assert_allclose(np.asarray(new[:, pos], np.float32), np.asarray(ref[:, pos], np.float32), rtol=tol,
                               atol=tol)
    keep = np.arange(old.shape[1]) != pos
    np.testing.assert_array_equal(np.asarray(new[:, keep], np.float32), np.asarray(old[:, keep], np.float32))


@pytest.mark.parametrize("heads,fp8,splits,pos,parts,interleaved,r_parts", [
    (4, False, None, 37, 1, True, 2), (32, False, 4, 47, 3, False, None), (4, True, 2, 0, 2, True, None),
    (32, True, None, 20, 1, False, 1)])
def test_mla_decode_matches_reference_float32(heads, fp8, splits, pos, parts, interleaved, r_parts):
    """float32: the kernels' other summation orders (per split, then merged; per slice of the latent rows, then
    added) agree to 1e-5. Fewer heads than a 16-row dot (masked rows) and two head blocks; FP8 weights with 16 x 16
    scale blocks; the first position alone, a middle one (positions past pos hold other values and must not count)
    and the last; projections finished or as 2 or 3 partial sums; both rope layouts; absorb_output whole or in two
    slices of the latent rows (its arrival counters left zero). The new cache entry (normed latent, roped key) is
    written in place."""
    args = _inputs(jax.random.key(heads + pos), 2, heads, jnp.float32, fp8, parts)
    pos = jnp.int32(pos)
    kw = dict(softmax_scale=0.3, interleaved=interleaved, eps=1e-6)
    counters = jnp.zeros((2 * heads,), jnp.int32)
    out, cache, counters = mla_decode.mla_decode(*args, pos, splits=splits, bs=16, r_parts=r_parts,
                                                 counters=counters, interpret=True, **kw)
    ref, ref_cache = mla_decode.mla_decode_reference(*args, pos, **kw)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    _check_cache(cache, ref_cache, args[-1], int(pos), 1e-5)
    np.testing.assert_array_equal(counters, 0)


def test_mla_decode_matches_reference_bf16():
    """bf16 activations and cache: the kernels round the unnormalised probabilities where the reference rounds the
    normalised ones; both within bf16's 2^-8 relative step, so 2e-2 of the output scale. The cache entry rounds the
    same float32 values once (one bf16 step)."""
    args = _inputs(jax.random.key(5), 1, 16, jnp.bfloat16, False, parts=2)
    kw = dict(softmax_scale=0.25, interleaved=True, eps=1e-6)
    out, cache, _ = mla_decode.mla_decode(*args, jnp.int32(40), bs=16, r_parts=2, interpret=True, **kw)
    ref, ref_cache = mla_decode.mla_decode_reference(*args, jnp.int32(40), **kw)
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-2 * float(jnp.max(jnp.abs(ref)))
    _check_cache(cache, ref_cache, args[-1], 40, 2e-2)


def test_mla_decode_rejects_bad_shapes():
    q, compressed, kv_norm, cos, sin, w, scale, block, cache = _inputs(jax.random.key(1), 1, 4, jnp.float32, False)
    kw = dict(softmax_scale=1.0, interleaved=True, eps=1e-6)
    with pytest.raises(ValueError, match="do not form"):
        mla_decode.mla_decode(q, compressed, kv_norm, cos, sin, w[:, :-1], None, None, cache, jnp.int32(3), **kw)
    with pytest.raises(ValueError, match="do not form"):
        mla_decode.mla_decode(q, compressed[..., 1:], kv_norm, cos, sin, w, None, None, cache, jnp.int32(3), **kw)
    with pytest.raises(ValueError, match="r_parts"):
        mla_decode.mla_decode(q, compressed, kv_norm, cos, sin, w, None, None, cache, jnp.int32(3), r_parts=3, **kw)
    with pytest.raises(ValueError, match="arrival counters"):
        mla_decode.mla_decode(q, compressed, kv_norm, cos, sin, w, None, None, cache, jnp.int32(3), r_parts=2,
                              counters=jnp.zeros((3,), jnp.int32), **kw)
    assert not mla_decode.supported(24, 16, 16, 16, 32, None)  # 24 heads: not whole blocks of 16


@pytest.mark.gpu
@pytest.mark.parametrize("heads,fp8", [(16, False), (128, True)])
def test_gpu_mla_decode_real_shapes(heads, fp8):
    """Compiled on the GPU at DeepSeek-V2-Lite (16 heads, bf16, q and kv_a as 8 partial sums) and V3 (128 heads, FP8
    128 x 128 blocks, q finished) shapes, bf16, 1200 cached tokens: the bf16 bound of the CPU test."""
    q, compressed, kv_norm, cos, sin, w, scale, block, cache = _inputs(
        jax.random.key(heads), 1, heads, jnp.bfloat16, False, parts=1 if fp8 else 8, length=1280, dn=128, dr=64,
        dv=128, r=512)
    if fp8:
        block = (128, 128)
        w, scale = fp8_matmul.quantize(w.astype(jnp.float32), block)
    pos = jnp.int32(1199)
    kw = dict(softmax_scale=0.1, interleaved=True, eps=1e-6)
    run = jax.jit(lambda q_, c_, w_, s_, cache_, p: mla_decode.mla_decode(q_, c_, kv_norm, cos, sin, w_, s_, block,
                                                                          cache_, p, **kw))
    out, new_cache, _ = run(q, compressed, w, scale, cache, pos)
    ref, ref_cache = mla_decode.mla_decode_reference(q, compressed, kv_norm, cos, sin, w, scale, block, cache, pos,
                                                     **kw)
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) <= 2e-2 * float(jnp.max(jnp.abs(ref)))
    _check_cache(new_cache, ref_cache, cache, 1199, 2e-2)
