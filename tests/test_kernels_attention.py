"""Decode attention (q/k norm, bias, rope, cache write, split-sequence attention) against its jnp reference:
interpreted on the CPU, compiled on a GPU (`gpu` marker).

Tolerances (||out - ref|| / ||ref|| against the reference on float32 copies of the same inputs):
- bf16 output: 1e-2. The kernel rounds q, k (after norm and rope) and the probabilities to bf16 as the bf16 model
  does, and the output once more; a bf16 rounding is 2^-9 relative, a few in sequence stay far under 1e-2.
- the cache: rows other than pos are untouched (exactly equal); the new row holds the roped k (bf16: 1e-2).
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import ops
from tilert_jax.kernels import stream_attention as sa
from tilert_jax.kernels.decode_attention import decode_attention, decode_attention_reference

BF16, F32 = jnp.bfloat16, jnp.float32


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def make(batch, n, kvh, d, max_len, parts=0, seed=None):
    keys = jax.random.split(jax.random.key(np.random.randint(1 << 30) if seed is None else seed), 5)
    shape = (batch, n + 2 * kvh, d) if not parts else (parts, batch, n + 2 * kvh, d)
    qkv = jax.random.normal(keys[0], shape, F32)
    qkv = qkv if parts else qkv.astype(BF16)
    kc = jax.random.normal(keys[1], (batch, kvh, max_len, d), F32).astype(BF16)
    vc = jax.random.normal(keys[2], (batch, kvh, max_len, d), F32).astype(BF16)
    ang = jax.random.uniform(keys[3], (d // 2,), F32, 0, 6.0)
    ang = jnp.concatenate([ang, ang])
    return qkv, kc, vc, jnp.cos(ang).astype(BF16), jnp.sin(ang).astype(BF16), keys[4]


def check(batch, n, kvh, d, max_len, pos, splits, block, parts=0, window=None, qk_norm=False, bias=False,
          again=False, partials=False, interpret=None):
    qkv, kc, vc, cos, sin, key = make(batch, n, kvh, d, max_len, parts)
    kw = dict(num_heads=n, num_kv_heads=kvh, scale=d ** -0.5, eps=1e-6, sliding_window=window)
    k1, k2, k3 = jax.random.split(key, 3)
    if qk_norm:
        kw["qk_norm"] = (1 + 0.1 * jax.random.normal(k1, (d,), F32).astype(BF16),
                         1 + 0.1 * jax.random.normal(k2, (d,), F32).astype(BF16))
    if bias:
        kw["bias"] = tuple((0.1 * jax.random.normal(kk, (h, d), F32)).astype(BF16)
                           for kk, h in zip(jax.random.split(k3, 3), (n, kvh, kvh)))
    run = functools.partial(decode_attention, qkv, kc, vc, jnp.int32(pos), cos, sin, splits=splits, block=block,
                            partials=partials, interpret=interpret, **kw)
    out, k_new, v_new, after = run()
    if partials:  # the splits, as the layer launch merges them
        assert isinstance(out, sa.Partials) and out.out.shape[:2] == (splits, kvh)
        out = sa.merge_reference(out, n // kvh, BF16).reshape(batch, n, d)
    if again:  # a second launch on the counters the first left (as the next layer's launch takes them)
        assert np.array_equal(run(arrivals=after)[0], out)
    up = lambda t: jax.tree.map(lambda a: a.astype(F32), t)  # noqa: E731
    kw32 = {k: (up(v) if k in ("qk_norm", "bias") and v is not None else v) for k, v in kw.items()}
    ref, rk, rv = decode_attention_reference(qkv.astype(F32), *up((kc, vc)), jnp.int32(pos), *up((cos, sin)), **kw32)
    assert out.shape == (batch, n, d) and out.dtype == BF16
    assert rel(out, ref) < 1e-2
    if splits > 1 and not partials:  # every split arrived, and the last set its counter back to zero
        np.testing.assert_array_equal(after, 0)
    others = np.arange(max_len) != pos
    np.testing.assert_array_equal(np.asarray(k_new)[:, :, others], np.asarray(kc)[:, :, others])
    np.testing.assert_array_equal(np.asarray(v_new)[:, :, others], np.asarray(vc)[:, :, others])
    assert rel(k_new[:, :, pos], rk[:, :, pos]) < 1e-2
    assert rel(v_new[:, :, pos], rv[:, :, pos]) < 1e-2


@pytest.mark.parametrize("case", [
    dict(batch=1, n=8, kvh=2, d=64, max_len=128, pos=77, splits=1, block=16),
    dict(batch=2, n=8, kvh=2, d=32, max_len=128, pos=100, splits=3, block=16, qk_norm=True),
    dict(batch=1, n=6, kvh=2, d=32, max_len=64, pos=0, splits=2, block=16, bias=True),  # 3 query heads per group
    dict(batch=1, n=4, kvh=4, d=32, max_len=128, pos=90, splits=4, block=16, window=24, parts=2),
    dict(batch=2, n=4, kvh=2, d=32, max_len=64, pos=40, splits=4, block=16, again=True),  # reused counters
    dict(batch=1, n=12, kvh=4, d=32, max_len=64, pos=40, splits=8, block=16),  # splits 3 to 6 hold no work
    dict(batch=1, n=12, kvh=4, d=32, max_len=64, pos=40, splits=8, block=16, partials=True),  # and left unmerged
    dict(batch=1, n=16, kvh=2, d=32, max_len=128, pos=90, splits=1, block=16, partials=True, parts=2, qk_norm=True),
    dict(batch=1, n=4, kvh=4, d=32, max_len=128, pos=90, splits=4, block=16, window=24, partials=True),
])
def test_decode_attention(case):
    check(**case)


def test_decode_attention_checks_shapes():
    qkv, kc, vc, cos, sin, _ = make(1, 8, 2, 48, 64)
    with pytest.raises(ValueError, match="powers of 2"):
        decode_attention(qkv, kc, vc, jnp.int32(3), cos, sin, num_heads=8, num_kv_heads=2, scale=1.0)
    qkv, kc, vc, cos, sin, _ = make(1, 8, 2, 32, 64)
    with pytest.raises(ValueError, match="qkv must end"):
        decode_attention(qkv[:, 1:], kc, vc, jnp.int32(3), cos, sin, num_heads=8, num_kv_heads=2, scale=1.0)


def test_decode_attention_partials_need_one_sequence():
    qkv, kc, vc, cos, sin, _ = make(2, 8, 2, 32, 64)
    with pytest.raises(ValueError, match="one sequence"):
        decode_attention(qkv, kc, vc, jnp.int32(3), cos, sin, num_heads=8, num_kv_heads=2, scale=1.0, partials=True)


def test_ops_decode_attention_xla_partials_merge_to_reference():
    """The XLA path's partials (one split) merge back to its output exactly."""
    qkv, kc, vc, cos, sin, _ = make(1, 6, 2, 32, 32, seed=1)
    kw = dict(num_heads=6, num_kv_heads=2, scale=0.2)
    out = ops.decode_attention(qkv, kc, vc, jnp.int32(5), cos, sin, **kw)[0]
    split = ops.decode_attention(qkv, kc, vc, jnp.int32(5), cos, sin, **kw, partials=True)[0]
    np.testing.assert_array_equal(sa.merge_reference(split, 3, BF16).reshape(out.shape), out)


def test_ops_decode_attention_xla_is_reference():
    qkv, kc, vc, cos, sin, _ = make(1, 4, 2, 32, 32, seed=0)
    kw = dict(num_heads=4, num_kv_heads=2, scale=0.2)
    a = ops.decode_attention(qkv.astype(F32), kc.astype(F32), vc.astype(F32), jnp.int32(5), cos.astype(F32),
                             sin.astype(F32), **kw)
    b = decode_attention_reference(qkv.astype(F32), kc.astype(F32), vc.astype(F32), jnp.int32(5), cos.astype(F32),
                                   sin.astype(F32), **kw)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x, y)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(batch=1, n=32, kvh=8, d=128, max_len=1280, pos=1100, splits=1, block=64),
    dict(batch=1, n=32, kvh=8, d=64, max_len=1280, pos=1100, splits=8, block=64, parts=4),
    dict(batch=1, n=32, kvh=8, d=64, max_len=1280, pos=1100, splits=16, block=32, parts=8, again=True),
    dict(batch=1, n=32, kvh=8, d=128, max_len=1280, pos=1150, splits=32, block=32, parts=4),
    dict(batch=8, n=32, kvh=8, d=128, max_len=1280, pos=1030, splits=2, block=32, qk_norm=True),
    dict(batch=1, n=28, kvh=4, d=128, max_len=512, pos=300, splits=4, block=64, bias=True, window=100),
    dict(batch=1, n=32, kvh=8, d=64, max_len=1152, pos=1100, splits=16, block=64, parts=4, partials=True),
    dict(batch=1, n=32, kvh=8, d=128, max_len=1152, pos=1100, splits=16, block=32, parts=4, partials=True),
])
def test_gpu_decode_attention(case):
    check(**case, interpret=False)
