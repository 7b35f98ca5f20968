"""A batch-1 decode layer's weight products in one Mosaic GPU launch (kernels/layer_decode.py): the kernel against
its jnp reference on a Hopper GPU (`gpu` marker: jax's Mosaic GPU interpreter does not take the kernel's transposed
wgmma operand), the reference against the model's formula, the split rule and the shape checks.

Tolerance (max |out - ref| / max |ref|): 1e-2 in bf16. Both sum in float32; the kernel adds the contraction in
64-wide blocks in another order, so its roundings of h, of the SwiGLU product and of the stream to bf16 (a relative
step of 2^-8) can land on the other side of the reference's.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import stream_attention as sa
from tilert_jax.kernels.layer_decode import (Splits, down_splits, layer_decode, layer_decode_reference,
                                             o_splits, product_splits, supported)
from tilert_jax.kernels.mlp_block import mlp_block_reference
from tilert_jax.kernels.rms_norm import rms_norm_reference
from tilert_jax.rope import apply_rope


def inputs(hidden, intermediate, parts, dtype, seed=0, attn_width=None, qkv_rows=None):
    """(x, mlp_norm, w_gate, w_up, w_down), and keyword arguments: x_parts, attn with w_o and next_norm with
    next_qkv where asked for."""
    keys = iter(jax.random.split(jax.random.key(seed), 12))

    def normal(shape, scale=1.0):
        return (jax.random.normal(next(keys), shape, jnp.float32) * scale).astype(dtype)

    norm = lambda: (1 + 0.1 * jax.random.normal(next(keys), (hidden,), jnp.float32)).astype(dtype)  # noqa: E731
    args = (normal((1, hidden)), norm(), normal((intermediate, hidden), hidden ** -0.5),
            normal((intermediate, hidden), hidden ** -0.5), normal((hidden, intermediate), intermediate ** -0.5))
    kwargs = {"x_parts": jax.random.normal(next(keys), (parts, 1, hidden), jnp.float32)} if parts else {}
    if attn_width:
        kwargs.update(attn=normal((1, attn_width)), w_o=normal((hidden, attn_width), attn_width ** -0.5))
    if qkv_rows:
        kwargs.update(next_norm=norm(), next_qkv=tuple(normal((rows, hidden), hidden ** -0.5) for rows in qkv_rows))
    return args, kwargs


@pytest.mark.parametrize("parts", [0, 3])
def test_mlp_reference_is_the_mlp_float32(parts):
    """float32: the K-split partial sums add up to the phased MLP's reference (itself checked against the model's
    formula in test_mlp_block.py), and the combined stream is the same (1e-5)."""
    args, kwargs = inputs(64, 256, parts, jnp.float32, seed=1)
    out, x_new = layer_decode_reference(*args[:2], 1e-5, *args[2:], **kwargs, splits=Splits(down=4))
    ref, ref_x = mlp_block_reference(*args[:2], 1e-5, *args[2:], **kwargs)
    assert out.shape == (4, 1, 64)
    np.testing.assert_allclose(jnp.sum(out, axis=0), ref[0], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_new, ref_x, rtol=1e-5, atol=1e-5)


def test_layer_reference_is_the_layer_float32():
    """float32 (1e-5): with the output projection and the next Q/K/V, the reference is x1 = x + parts + attn @ W_o^T,
    x2 = x1 + MLP(x1), then rms_norm(x2) @ [W_q; W_k; W_v]^T, its partial sums over K splits adding up to it."""
    (x, nw, wg, wu, wd), kwargs = inputs(64, 256, 2, jnp.float32, seed=2, attn_width=128, qkv_rows=(128, 64, 64))
    out, x_new = layer_decode_reference(x, nw, 1e-5, wg, wu, wd, **kwargs, splits=Splits(o=2, down=4, qkv=2))
    x1 = x + jnp.sum(kwargs["x_parts"], axis=0) + kwargs["attn"] @ kwargs["w_o"].T
    h = rms_norm_reference(x1, nw, 1e-5)
    x2 = x1 + (jax.nn.silu(h @ wg.T) * (h @ wu.T)) @ wd.T
    qkv = rms_norm_reference(x2, kwargs["next_norm"], 1e-5) @ jnp.concatenate(kwargs["next_qkv"]).T
    assert out.shape == (2, 1, 256)
    np.testing.assert_allclose(jnp.sum(out, axis=0), qkv, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(x_new, x2, rtol=1e-5, atol=1e-5)


def test_shapes_are_checked():
    (x, nw, wg, wu, wd), kwargs = inputs(128, 512, 0, jnp.bfloat16, attn_width=128, qkv_rows=(128, 64, 64))
    with pytest.raises(ValueError, match="one token"):
        layer_decode(jnp.concatenate([x, x]), nw, 1e-5, wg, wu, wd)
    with pytest.raises(ValueError, match="do not fit"):
        layer_decode(x, nw, 1e-5, wg, wu, wd[:, :256])
    with pytest.raises(ValueError, match="does not divide"):
        layer_decode(x, nw, 1e-5, wg, wu, wd, splits=Splits(down=3))
    with pytest.raises(ValueError, match="output projection needs"):
        layer_decode(x, nw, 1e-5, wg, wu, wd, attn=kwargs["attn"])
    with pytest.raises(ValueError, match="next Q/K/V needs"):
        layer_decode(x, nw, 1e-5, wg, wu, wd, next_norm=nw, next_qkv=(kwargs["w_o"].T[:, :64],))
    with pytest.raises(ValueError, match="64-row tiles"):
        layer_decode(x, nw, 1e-5, wg, wu, wd, next_norm=nw, next_qkv=(wg[:96],))


def test_attention_shapes_are_checked():
    """The next attention needs the next Q/K/V and a cache its windows cover; merged splits need output-projection
    K splits of whole KV heads."""
    (x, nw, wg, wu, wd), kwargs = inputs(128, 512, 0, jnp.bfloat16, attn_width=512, qkv_rows=(512, 128, 128))
    att = attention_inputs(8, 2, 64, 1024, 5)
    with pytest.raises(ValueError, match="next attention needs"):
        layer_decode(x, nw, 1e-5, wg, wu, wd, attn=kwargs["attn"], w_o=kwargs["w_o"], next_attention=att)
    with pytest.raises(ValueError, match="next attention needs"):  # 64 windows of 256 rows: more than one load each
        layer_decode(x, nw, 1e-5, wg, wu, wd, **kwargs, next_attention=attention_inputs(8, 2, 64, 16384, 5))
    splits, _ = sa.window(1024, 2, 132)
    partials = sa.Partials(*(jnp.zeros((splits, 2, 64, 64), jnp.float32),) * 2)
    with pytest.raises(ValueError, match="whole KV heads"):  # 4 splits of 128 columns; a KV head's are 256
        layer_decode(x, nw, 1e-5, wg, wu, wd, attn=partials, w_o=kwargs["w_o"], splits=Splits(o=4, down=2))


def test_splits_even_out_the_programs_and_fit_shared_memory():
    assert down_splits(2048, 8192) == 4  # llama-3.2-1b: 32 row tiles x 4
    assert down_splits(4096, 14336) == 2  # llama-3.1-8b: 64 row tiles x 2, the SwiGLU slice (112 KB) in h's place
    assert down_splits(4096, 14000) is None  # no split of 14000 in 128-wide steps: the Triton kernel runs
    assert product_splits(32, 2048) == 4  # llama-3.2-1b's output projection: 128 tiles of 64 KB
    assert product_splits(48, 2048) == 8  # and its Q/K/V: 384 tiles, at most 3 of 32 KB a program (4: 2 of 64 KB)
    assert product_splits(48, 2048, programs=48) == 1
    # merging the attention's 16 splits of 8 KV heads: llama-3.1-8b's output projection takes 4 splits (2, 4 and 8
    # give a program half a tile each; 4 reads the fewest merge and pending-sum bytes), llama-3.2-1b's stays at 4
    assert o_splits(4096, 4096) == 2 and o_splits(4096, 4096, merged=(16, 8)) == 4
    assert o_splits(2048, 2048) == 4 and o_splits(2048, 2048, merged=(16, 8)) == 4
    assert o_splits(2048, 2048, merged=(16, 1)) == 1  # one KV head: no split spans whole heads but one
    s = jax.ShapeDtypeStruct
    shapes = (s((1, 4096), jnp.bfloat16), s((4096,), jnp.bfloat16), s((14336, 4096), jnp.bfloat16),
              s((14336, 4096), jnp.bfloat16), s((4096, 14336), jnp.bfloat16))
    with pytest.raises(ValueError, match="shared memory"):  # the whole SwiGLU product, 224 KB
        jax.eval_shape(lambda x, nw, wg, wu, wd: layer_decode(x, nw, 1e-5, wg, wu, wd, splits=Splits(down=1)),
                       *shapes)


def test_not_supported_off_a_hopper_gpu():
    x = jnp.zeros((1, 64), jnp.bfloat16)
    assert supported(x) == (jax.default_backend() == "gpu" and
                            jax.devices()[0].compute_capability.startswith("9."))
    assert not supported(jnp.zeros((2, 64), jnp.bfloat16))


def _check_kernel(args, kwargs, splits, programs=None):
    run = jax.jit(lambda args, kwargs: layer_decode(*args[:2], 1e-5, *args[2:], **kwargs, splits=splits,
                                                    programs=programs))
    for _ in range(2):  # a second launch finds the grid barriers' counters back at zero
        out, x_new, counters = run(args, kwargs)
        np.testing.assert_array_equal(counters, np.zeros(2, np.int32))
    ref, ref_x = layer_decode_reference(*args[:2], 1e-5, *args[2:], **kwargs, splits=splits)
    got_x, expected_x = np.asarray(x_new, np.float32), np.asarray(ref_x, np.float32)
    if "next_qkv" in kwargs:  # x2 adds the down product's sums, rounded once more: within one bf16 step
        assert np.max(np.abs(got_x - expected_x)) <= 2 ** -7 * np.max(np.abs(expected_x))
    else:
        np.testing.assert_array_equal(got_x, expected_x)
    got, expected = np.asarray(out), np.asarray(ref)
    assert got.shape == expected.shape
    assert np.max(np.abs(got - expected)) <= 1e-2 * np.max(np.abs(expected))


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,intermediate,parts,splits,programs", [
    (256, 1024, 0, 2, None), (512, 2048, 2, 4, None),
    (512, 2048, 2, 4, 3),  # three programs: several tiles each, their down tiles' runs crossing K splits
    (2048, 8192, 8, 4, None), (4096, 14336, 2, 2, None)])  # llama-3.2-1b, llama-3.1-8b
def test_gpu_mlp_matches_reference(hidden, intermediate, parts, splits, programs):
    args, kwargs = inputs(hidden, intermediate, parts, jnp.bfloat16, seed=3)
    _check_kernel(args, kwargs, Splits(down=splits), programs)


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,intermediate,attn_width,qkv_rows,parts,splits,programs", [
    (2048, 8192, 2048, (2048, 512, 512), 0, None, None),  # llama-3.2-1b
    (4096, 14336, 4096, (4096, 1024, 1024), 0, None, None),  # llama-3.1-8b
    (512, 2048, 1024, (1024, 256, 256), 2, Splits(o=2, down=4, qkv=2), 3),  # attn wider than x, 3 programs
    (512, 2048, 512, None, 0, Splits(o=4, down=2), None)])  # the last layer's: no next Q/K/V
def test_gpu_layer_matches_reference(hidden, intermediate, attn_width, qkv_rows, parts, splits, programs):
    args, kwargs = inputs(hidden, intermediate, parts, jnp.bfloat16, seed=4, attn_width=attn_width,
                          qkv_rows=qkv_rows)
    if splits is None:  # the kernel's own choice, which the reference needs to know
        splits = Splits(o=product_splits(hidden // 64, attn_width, programs=jax.devices()[0].core_count),
                        down=down_splits(hidden, intermediate, programs=jax.devices()[0].core_count),
                        qkv=product_splits(sum(qkv_rows) // 64, hidden, programs=jax.devices()[0].core_count))
    _check_kernel(args, kwargs, splits, programs)


def attention_inputs(num_heads, kv_heads, head_dim, max_len, pos, seed=5, dtype=jnp.bfloat16):
    """An sa.Attention on random caches, with llama's rope tables at pos."""
    keys = iter(jax.random.split(jax.random.key(seed), 2))
    cache = lambda: jax.random.normal(next(keys), (1, kv_heads, max_len, head_dim), jnp.float32).astype(dtype)  # noqa
    angle = pos * 10000.0 ** (-jnp.arange(0, head_dim, 2) / head_dim)
    angle = jnp.concatenate([angle, angle])
    return sa.Attention(cache(), cache(), jnp.int32(pos), jnp.cos(angle).astype(dtype), jnp.sin(angle).astype(dtype),
                        num_heads, head_dim ** -0.5)


def test_rope_matrix_is_rope_float32():
    """x @ R^T is apply_rope(x) (1e-6 in float32)."""
    att = attention_inputs(4, 2, 64, 8, 37, dtype=jnp.float32)
    x = jax.random.normal(jax.random.key(1), (1, 1, 3, 64), jnp.float32)
    expected = apply_rope(x, att.cos[None, None], att.sin[None, None])
    np.testing.assert_allclose(x @ sa.rope_matrix(att.cos, att.sin).T, expected, rtol=1e-6, atol=1e-6)


def test_merge_reference_is_attention_float32():
    """Splits of the cache as attend leaves them (each normalised, with its base-2 log-sum-exp, query head j in row 8 j,
    the others garbage, an empty split at -inf) merge to attention over the whole cache (1e-5)."""
    groups, kvh, d, length, splits = 4, 2, 64, 24, 4
    keys = jax.random.split(jax.random.key(2), 3)
    q = jax.random.normal(keys[0], (kvh, groups, d), jnp.float32)
    k, v = (jax.random.normal(key, (kvh, length, d), jnp.float32) for key in keys[1:])
    s = jnp.einsum("hgd,htd->hgt", q, k) / 8.0
    expected = jnp.einsum("hgt,htd->hgd", jax.nn.softmax(s, axis=-1), v).reshape(1, -1)
    bounds = [(0, 10), (10, 11), (11, 24), (24, 24)]
    out = jnp.full((splits, kvh, 64, d), jnp.nan, jnp.float32)
    lse = jnp.full((splits, kvh, 64, d), jnp.nan, jnp.float32)
    for a, (lo, hi) in enumerate(bounds):
        if hi > lo:
            part = s[:, :, lo:hi]
            o = jnp.einsum("hgt,htd->hgd", jax.nn.softmax(part, axis=-1), v[:, lo:hi])
            row_lse = jax.scipy.special.logsumexp(part, axis=-1)[..., None] * jnp.ones(d) / jnp.log(2.0)
        else:
            o, row_lse = jnp.zeros((kvh, groups, d)), jnp.full((kvh, groups, d), -jnp.inf)
        out = out.at[a, :, 0:8 * groups:8].set(o)
        lse = lse.at[a, :, 0:8 * groups:8].set(row_lse)
    got = sa.merge_reference(sa.Partials(out, lse), groups, jnp.float32)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def test_attention_window():
    """Splits of 64-row windows, as few as cover the cache with at most programs // kv_heads of them."""
    assert sa.window(1152, 8, 132) == (9, 128)
    assert sa.window(512, 8, 132) == (8, 64)
    assert sa.window(4096, 8, 132) == (16, 256)
    att = attention_inputs(32, 8, 64, 1152, 5)
    assert sa.supported(att, 132) and not sa.supported(attention_inputs(32, 8, 64, 4096, 5), 132)
    assert not sa.supported(attention_inputs(32, 32, 64, 1152, 5), 132)  # one query head per KV head


@pytest.mark.gpu
@pytest.mark.parametrize("hidden,intermediate,heads,kv_heads,head_dim,max_len,pos", [
    (2048, 8192, 32, 8, 64, 1152, 1100),  # llama-3.2-1b
    (2048, 8192, 32, 8, 64, 1152, 5),  # a short context: one window with work, the new token in it
    (4096, 14336, 32, 8, 128, 1152, 1100)])  # llama-3.1-8b
def test_gpu_layer_with_next_attention_matches_reference(hidden, intermediate, heads, kv_heads, head_dim, max_len,
                                                         pos):
    """Two launches in a row: the first ends with the next layer's attention (its splits merged as the reference's
    attention output, both caches with the new token's row), the second merges those splits in its output
    projection (its Q/K/V sums and x_new as the reference's on the merged attention): 1e-2 of the largest value."""
    args, kwargs = inputs(hidden, intermediate, 0, jnp.bfloat16, seed=6, attn_width=heads * head_dim,
                          qkv_rows=(heads * head_dim, kv_heads * head_dim, kv_heads * head_dim))
    att = attention_inputs(heads, kv_heads, head_dim, max_len, pos)
    programs = jax.devices()[0].core_count
    splits = Splits(o=product_splits(hidden // 64, heads * head_dim, programs=programs),
                    down=down_splits(hidden, intermediate, programs=programs),
                    qkv=product_splits((heads + 2 * kv_heads) * head_dim // 64, hidden, programs=programs))
    run = jax.jit(lambda args, kwargs, att: layer_decode(*args[:2], 1e-5, *args[2:], **kwargs, next_attention=att))
    out, x_new, counters, partials, k_cache, v_cache = run(args, kwargs, att)
    ref, ref_x, ref_attn, ref_k, ref_v = layer_decode_reference(*args[:2], 1e-5, *args[2:], **kwargs,
                                                                next_attention=att, splits=splits)
    merged = sa.merge_reference(partials, heads // kv_heads, jnp.bfloat16)
    second = jax.jit(lambda args, kwargs: layer_decode(*args[:2], 1e-5, *args[2:], **kwargs))
    kwargs["attn"] = partials
    out2, x2, counters2 = second(args, kwargs)
    ref2, ref2_x = layer_decode_reference(*args[:2], 1e-5, *args[2:], **kwargs, splits=splits)
    for counter in (counters, counters2):
        np.testing.assert_array_equal(counter, np.zeros(2, np.int32))
    for got, expected in ((out, ref), (x_new, ref_x), (merged, ref_attn), (k_cache, ref_k), (v_cache, ref_v),
                          (out2, ref2), (x2, ref2_x)):
        got, expected = np.asarray(got, np.float32), np.asarray(expected, np.float32)
        assert got.shape == expected.shape
        assert np.max(np.abs(got - expected)) <= 1e-2 * np.max(np.abs(expected))
