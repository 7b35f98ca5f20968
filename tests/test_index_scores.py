"""The lightning indexer's decode kernel (kernels/index_scores.py, interpret mode on the CPU) against its reference.

Both compute in float32 from the same inputs (bf16 products are exact in float32); only the order of the sums
differs, so finite scores agree to 1e-5 relative, and every position past pos is -inf in both."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels.index_scores import index_scores, index_scores_reference


def _inputs(seed, batch, heads, di, length, dtype):
    keys = jax.random.split(jax.random.key(seed), 3)
    q = jax.random.normal(keys[0], (batch, heads, di)).astype(dtype)
    k = jax.random.normal(keys[1], (batch, length, di)).astype(dtype)
    w = jax.random.normal(keys[2], (batch, heads)) * heads ** -0.5
    return q, k, w


def _check(out, ref):
    out, ref = np.asarray(out), np.asarray(ref)
    np.testing.assert_array_equal(np.isneginf(out), np.isneginf(ref))
    finite = np.isfinite(ref)
    np.testing.assert_allclose(out[finite], ref[finite], rtol=1e-5, atol=1e-5 * np.abs(ref[finite]).max())


@pytest.mark.parametrize("heads,di,length,bs,pos,dtype", [
    (8, 16, 64, 16, 37, jnp.float32),  # fewer heads than the dot's 16 rows; blocks past pos read nothing
    (4, 32, 48, 64, 0, jnp.float32),  # the first position alone; bs halved to divide the length
    (32, 64, 128, 32, 127, jnp.bfloat16),  # the last position, bf16 queries and keys
])
def test_index_scores_match_reference(heads, di, length, bs, pos, dtype):
    q, k, w = _inputs(heads + pos, 2, heads, di, length, dtype)
    pos = jnp.int32(pos)
    _check(index_scores(q, k, w, pos, bs=bs, interpret=True), index_scores_reference(q, k, w, pos))


def test_index_scores_rejects_bad_shapes():
    q, k, w = _inputs(0, 1, 4, 16, 64, jnp.float32)
    with pytest.raises(ValueError, match="do not form"):
        index_scores(q, k[..., :8], w, jnp.int32(3))
    with pytest.raises(ValueError, match="multiple of 16"):
        index_scores(q, k[:, :40], w, jnp.int32(3))


@pytest.mark.gpu
def test_gpu_index_scores_real_shapes():
    """Compiled at DeepSeek-V3.2's indexer shape (64 heads of 128), bf16, 4096 cached tokens, pos 3000."""
    q, k, w = _inputs(1, 1, 64, 128, 4096, jnp.bfloat16)
    pos = jnp.int32(3000)
    _check(jax.jit(index_scores)(q, k, w, pos), index_scores_reference(q, k, w, pos))
