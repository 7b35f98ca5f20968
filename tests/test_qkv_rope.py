"""The prefill's Q/K/V projection with bias, q/k norm, rope and the cache write (kernels/qkv_rope.py) against its jnp
reference: interpreted on the CPU, compiled on a GPU (`gpu` marker).

Tolerances (max |out - ref| / max |ref| against the reference on float32 copies of the same inputs):
- float32: 1e-5. The kernel adds the hidden dimension in another order (blocks of block_k) than XLA's dot; its
  rope adds the same two products; float32 rounding of a 64- to 4096-term sum stays near 1e-6.
- bf16: 1e-2. The kernel rounds the product, the norm and the rope's result to bf16 as the bf16 model does (the
  reference's rope rounds each product once more); a few bf16 roundings (2^-9 relative each) stay far under 1e-2.
- Cache rows outside pos..pos+T-1 are untouched: exactly equal.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import ops, tuning
from tilert_jax.kernels.qkv_rope import qkv_rope, qkv_rope_reference, rotate_half_matrix

BF16, F32 = jnp.bfloat16, jnp.float32


def make(batch, seq, hidden, n, kvh, d, max_len, dtype, qk_norm=False, bias=False, seed=None):
    seed = np.random.randint(1 << 30) if seed is None else seed
    ks = jax.random.split(jax.random.key(seed), 10)
    cast = lambda a: a.astype(dtype)  # noqa: E731
    x = cast(jax.random.normal(ks[0], (batch, seq, hidden), F32))
    weights = [cast(jax.random.normal(ks[i], (h, d, hidden), F32) * hidden ** -0.5)
               for i, h in ((1, n), (2, kvh), (3, kvh))]
    angle = jax.random.uniform(ks[4], (seq, d // 2), F32, 0, 6.0)
    angle = jnp.concatenate([angle, angle], axis=-1)
    caches = tuple(cast(jax.random.normal(ks[i], (batch, kvh, max_len, d), F32)) for i in (5, 6))
    kw = {}
    if qk_norm:
        kw["qk_norm"] = tuple(cast(1 + 0.1 * jax.random.normal(ks[7 + i], (d,), F32)) for i in range(2))
    if bias:
        kw["bias"] = tuple(cast(0.1 * jax.random.normal(k, (h, d), F32))
                           for k, h in zip(jax.random.split(ks[9], 3), (n, kvh, kvh)))
    return x, weights, cast(jnp.cos(angle)), cast(jnp.sin(angle)), caches, kw


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    assert np.all(np.isfinite(out)), "non-finite output"
    return float(np.max(np.abs(out - ref)) / np.max(np.abs(ref)))


def check(batch, seq, hidden, n, kvh, d, max_len, pos, dtype, with_cache=True, qk_norm=False, bias=False,
          interpret=None, **config):
    x, weights, cos, sin, caches, kw = make(batch, seq, hidden, n, kvh, d, max_len, dtype, qk_norm, bias)
    caches = caches if with_cache else None
    q, k, v, new_caches = qkv_rope(x, *weights, cos, sin, caches, jnp.int32(pos), eps=1e-6, interpret=interpret,
                                   **kw, **config)
    up = lambda t: jax.tree.map(lambda a: a.astype(F32), t)  # noqa: E731
    rq, rk, rv, ref_caches = qkv_rope_reference(*up((x, *weights, cos, sin, caches)), jnp.int32(pos), eps=1e-6,
                                                **up(kw))
    tol = 1e-5 if dtype == F32 else 1e-2
    for out, ref in ((q, rq), (k, rk), (v, rv)):
        assert out.shape == ref.shape and out.dtype == dtype
        assert rel(out, ref) < tol
    if not with_cache:
        assert new_caches is None
        return
    written = np.zeros(max_len, bool)
    written[pos:pos + seq] = True
    for new, old, ref in zip(new_caches, caches, ref_caches):
        np.testing.assert_array_equal(np.asarray(new)[:, :, ~written], np.asarray(old)[:, :, ~written])
        assert rel(new[:, :, written], ref[:, :, written]) < tol


@pytest.mark.parametrize("case", [
    dict(batch=1, seq=32, hidden=64, n=4, kvh=2, d=16, max_len=48, pos=0, dtype=F32),
    dict(batch=2, seq=40, hidden=64, n=4, kvh=2, d=32, max_len=64, pos=7, dtype=BF16),  # a partial token block
    dict(batch=1, seq=32, hidden=128, n=4, kvh=2, d=16, max_len=64, pos=3, dtype=F32, qk_norm=True, bias=True),
    dict(batch=1, seq=16, hidden=64, n=4, kvh=4, d=16, max_len=32, pos=0, dtype=BF16, qk_norm=True),
    dict(batch=2, seq=24, hidden=32, n=2, kvh=2, d=16, max_len=32, pos=0, dtype=F32, with_cache=False, bias=True),
])
@pytest.mark.parametrize("q_heads", [1, 2])
def test_qkv_rope(case, q_heads):
    if q_heads > 1 and case.get("qk_norm"):
        pytest.skip("q/k norm takes one query head a program")
    check(**case, block_t=16, block_k=16, q_heads=q_heads)


def test_rotate_half_matrix():
    y = jax.random.normal(jax.random.key(1), (3, 16), F32)
    halves = lambda a: jnp.concatenate([-a[:, 4:], a[:, :4]], axis=1)  # noqa: E731
    np.testing.assert_array_equal(y[:, :8] @ rotate_half_matrix(8, F32), halves(y[:, :8]))
    np.testing.assert_array_equal(y @ rotate_half_matrix(8, F32, 2),
                                  jnp.concatenate([halves(y[:, :8]), halves(y[:, 8:])], axis=1))


def test_qkv_rope_checks_shapes():
    x, weights, cos, sin, caches, _ = make(1, 16, 64, 4, 2, 16, 32, F32, seed=0)
    with pytest.raises(ValueError, match="must be powers of 2"):
        qkv_rope(x, *weights, cos, sin, caches, block_k=48)
    with pytest.raises(ValueError, match="cos/sin must be"):
        qkv_rope(x, *weights, cos[:8], sin[:8], caches)
    with pytest.raises(ValueError, match="q_heads .3. must divide"):
        qkv_rope(x, *weights, cos, sin, caches, q_heads=3)
    with pytest.raises(ValueError, match="do not fit"):
        qkv_rope(x, weights[0], weights[1][:1], weights[2], cos, sin, caches)


def test_ops_qkv_rope_xla_is_reference():
    x, weights, cos, sin, caches, kw = make(1, 16, 32, 2, 1, 16, 32, F32, qk_norm=True, seed=0)
    a = ops.qkv_rope(x, *weights, cos, sin, caches, jnp.int32(2), eps=1e-6, **kw)
    b = qkv_rope_reference(x, *weights, cos, sin, caches, jnp.int32(2), eps=1e-6, **kw)
    for u, w in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
        np.testing.assert_array_equal(u, w)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [
    dict(batch=1, seq=1024, hidden=2048, n=32, kvh=8, d=64, max_len=1152, pos=0, dtype=BF16),
    dict(batch=1, seq=1000, hidden=4096, n=32, kvh=8, d=128, max_len=1152, pos=100, dtype=BF16, qk_norm=True),
    dict(batch=2, seq=200, hidden=3584, n=28, kvh=4, d=128, max_len=512, pos=0, dtype=BF16, bias=True),
    dict(batch=1, seq=256, hidden=1024, n=8, kvh=2, d=64, max_len=512, pos=5, dtype=F32),
])
def test_gpu_qkv_rope(case):
    config = tuning.qkv_rope_config(min(case["hidden"], tuning.QKV_ROPE_MAX_HIDDEN), case["n"], case["kvh"],
                                    case["d"], case["seq"], case.get("qk_norm", False),
                                    jnp.dtype(case["dtype"]).itemsize)
    check(**case, interpret=False, **config)
