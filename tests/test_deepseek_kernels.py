"""The DeepSeek building blocks against their references on fresh random inputs: FP8 block dequantization and the
blocked / grouped FP8 matmuls, the two routed-expert paths, the routers' selection rules."""

import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import fp8_matmul, moe_routing
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import Linear


def test_quantize_roundtrip_and_partial_blocks():
    w = jax.random.normal(jax.random.key(0), (70, 45)) * 0.3  # [in, out]; blocks (out 16, in 32) leave partials
    q, scale = fp8_matmul.quantize(w, (16, 32))
    assert q.dtype == jnp.float8_e4m3fn and scale.shape == (3, 3)
    deq = fp8_matmul.dequantize(q, scale, (16, 32), jnp.float32)
    assert float(jnp.abs(deq - w).max()) <= float(jnp.abs(w).max()) * 2 ** -3  # e4m3: 3 mantissa bits
    expected = q.astype(jnp.float32) * np.repeat(np.repeat(np.asarray(scale), 32, 0)[:70], 16, 1)[:, :45]
    np.testing.assert_array_equal(np.asarray(deq), expected)


def test_blocked_matmul_matches_dequantize_first():
    w = jax.random.normal(jax.random.key(1), (100, 48))
    q, scale = fp8_matmul.quantize(w, (16, 32))
    x = jax.random.normal(jax.random.key(2), (5, 100))
    ref = fp8_matmul.fp8_matmul_reference(x, q, scale, (16, 32))
    np.testing.assert_allclose(fp8_matmul.matmul_blocked(x, q, scale, (16, 32)), ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_ragged_matmul_matches_per_row(fp8):
    groups, n_in, n_out = 4, 40, 24
    w = jax.random.normal(jax.random.key(3), (groups, n_in, n_out))
    scale, block = None, None
    if fp8:
        block = (16, 16)
        w, scale = fp8_matmul.quantize(w, block)
    sizes = jnp.array([3, 0, 5, 2], jnp.int32)
    row_group = jnp.repeat(jnp.arange(groups), sizes, total_repeat_length=10)
    x = jax.random.normal(jax.random.key(4), (10, n_in))
    out = fp8_matmul.ragged_matmul(x, w, sizes, scale, block, row_group)
    dense = w.astype(jnp.float32) if scale is None else fp8_matmul.dequantize(w, scale, block, jnp.float32)
    ref = jnp.einsum("mi,mio->mo", x, dense[row_group])
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("fp8", [False, True])
def test_gathered_and_sorted_experts_agree(fp8):
    e, h, f, n, k = 8, 32, 16, 12, 3
    keys = jax.random.split(jax.random.key(5), 6)
    block = (16, 16) if fp8 else None
    quantize = jax.jit(fp8_matmul.quantize, static_argnums=1)

    def stack(key, shape):
        w = jax.random.normal(key, shape) * 0.2
        if not fp8:
            return Linear(w=w)
        q, s = quantize(w, block)
        return Linear(w=q, scale=s)

    gate, up, down = stack(keys[0], (e, h, f)), stack(keys[1], (e, h, f)), stack(keys[2], (e, f, h))
    x = jax.random.normal(keys[3], (n, h))
    weights, index = jax.lax.top_k(jax.nn.softmax(jax.random.normal(keys[4], (n, e))), k)
    a = jax.jit(moe.experts_gathered, static_argnums=6)(x, index, weights, gate, up, down, block)
    b = jax.jit(moe.experts_sorted, static_argnums=6)(x, index, weights, gate, up, down, block)
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)
    # the reference: every token through its k experts one by one
    deq = lambda lin: lin.w if lin.scale is None else fp8_matmul.dequantize(lin.w, lin.scale, block, jnp.float32)  # noqa: E731
    g, u, d = (np.asarray(deq(lin), np.float64) for lin in (gate, up, down))
    xs, idx = np.asarray(x, np.float64), np.asarray(index)
    gx, ux = np.einsum("th,tkhf->tkf", xs, g[idx]), np.einsum("th,tkhf->tkf", xs, u[idx])
    y = np.einsum("tkf,tkfh->tkh", gx / (1 + np.exp(-gx)) * ux, d[idx])
    ref = np.einsum("tkh,tk->th", y, np.asarray(weights, np.float64))
    np.testing.assert_allclose(a, ref, rtol=1e-4, atol=1e-5)


def test_noaux_tc_bias_chooses_but_does_not_weigh():
    logits = jnp.array([[2.0, 1.0, 0.0, -1.0, 0.5, 0.4, 0.3, 0.2]])
    bias = jnp.array([0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0, 5.0])  # pushes expert 7 (and its group) in
    weights, index = moe_routing.route_sigmoid(logits, bias, top_k=2, n_group=4, topk_group=2, norm_topk_prob=False,
                                       routed_scaling_factor=1.0)
    assert sorted(index[0].tolist()) == [0, 7]  # groups {0, 1} and {6, 7} win; 7 by its bias, 0 by its score
    chosen = dict(zip(index[0].tolist(), weights[0].tolist()))
    np.testing.assert_allclose(chosen[7], jax.nn.sigmoid(0.2), rtol=1e-6)  # weighed without the bias


def test_group_limited_greedy_masks_other_groups():
    logits = jnp.array([[3.0, 2.9, 0.0, 0.0, 2.8, 0.0, 0.0, 0.0]])
    weights, index = moe_routing.route_softmax(logits, 2, "group_limited_greedy", 4, 1, 1.0)
    assert sorted(index[0].tolist()) == [0, 1]
    weights, index = moe_routing.route_softmax(logits, 3, "greedy", None, None, 2.0)
    assert sorted(index[0].tolist()) == [0, 1, 4]
    np.testing.assert_allclose(weights[0], 2.0 * jax.lax.top_k(jax.nn.softmax(logits[0]), 3)[0], rtol=1e-6)


@pytest.mark.parametrize("shape, k", [((3, 64), 6), ((2, 8, 32), 2), ((1, 256), 8), ((5, 8), 8), ((1100, 64), 6)])
def test_ranked_top_k_is_lax_top_k(shape, k):
    """Values and indices exactly as jax.lax.top_k's, ties (few distinct values) and -inf included; the last shape
    is past moe_routing.RANKED_TOP_K_ELEMENTS and takes the sort."""
    rng = np.random.default_rng()
    x = rng.integers(-4, 5, size=shape).astype(np.float32) + rng.choice([0.0, 0.5], size=shape)
    x[rng.random(shape) < 0.1] = -np.inf
    values, index = moe_routing.ranked_top_k(jnp.asarray(x), k)
    ref_values, ref_index = jax.lax.top_k(jnp.asarray(x), k)
    assert index.dtype == jnp.int32
    np.testing.assert_array_equal(index, ref_index)
    np.testing.assert_array_equal(values, ref_values)


@pytest.mark.parametrize("fma", [False, True])
@pytest.mark.parametrize("split", [1, 3])
@pytest.mark.parametrize("kind", ["bf16", "fp8", "fp8_swiglu", "fp8_packed", "fp8_swiglu_packed"])
def test_grouped_matvec_kernel_matches_reference(kind, split, fma):
    """The Pallas kernel (interpret mode on the CPU) against its jnp reference, in float32 so the two orders of
    rounding agree closely: groups pick experts out of order and twice (and one group none: zeros, as a pair routed
    to another device's experts), partial scale blocks included, the K dimension whole or split three ways into
    partial sums, and FP8 read directly or as uint16 pairs (the way stacks of 2**31 elements or more are read);
    two rows a group through the tensor-core dot, or one row through multiply-adds (`fma`)."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    keys = jax.random.split(jax.random.key(7), 4)
    e, k, n = 5, 96, 64 if "packed" in kind else 48
    w = jax.random.normal(keys[0], (e, k, n)) * 0.2
    w2 = jax.random.normal(keys[1], (e, k, n)) * 0.2
    x = jax.random.normal(keys[2], (4, 1 if fma else 2, k))
    ids = jnp.array([3, -1, 0, 3], jnp.int32)
    args = dict(w=w)
    if kind != "bf16":
        block = (32, 32)
        q, s = fp8_matmul.quantize(w, block)
        args = dict(w=q, scale=s, block=block)
        if "swiglu" in kind:
            q2, s2 = fp8_matmul.quantize(w2, block)
            args.update(w2=q2, scale2=s2)
    config = gm.GroupedConfig(bn=16 if "packed" not in kind else 32, bk=32, split=split, fma=fma)
    out = gm.grouped_matvec(x, ids=ids, interpret=True, config=config, packed="packed" in kind, **args)
    ref = gm.grouped_matvec_reference(x, ids=ids, **args)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert not np.any(np.asarray(out[1]))


@pytest.mark.parametrize("split", [None, 2])
def test_grouped_matvecs_one_launch_many_products(split):
    """Products of different groups, K, N and kinds in one launch (the routed experts' gate/up beside the shared
    expert's, with a plain product of another K) each equal their reference; split None: the launch's default."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    keys = iter(jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 12))
    block = (32, 32)

    def fp8(shape):
        return fp8_matmul.quantize(jax.random.normal(next(keys), shape) * 0.2, block)

    (g, gs), (u, us), (sg, sgs), (su, sus), (d, ds) = fp8((5, 64, 96)), fp8((5, 64, 96)), fp8((1, 64, 192)), fp8(
        (1, 64, 192)), fp8((2, 128, 64))
    products = [
        gm.Product(x=jax.random.normal(next(keys), (3, 1, 64)), w=g, ids=jnp.array([4, 1, 4], jnp.int32), scale=gs,
                   w2=u, scale2=us),
        gm.Product(x=jax.random.normal(next(keys), (1, 2, 64)), w=sg, ids=jnp.zeros((1,), jnp.int32), scale=sgs,
                   w2=su, scale2=sus),
        gm.Product(x=jax.random.normal(next(keys), (2, 1, 128)), w=d, ids=jnp.array([1, 0], jnp.int32), scale=ds,
                   out_dtype=jnp.float32),
    ]
    config = None if split is None else gm.GroupedConfig(bn=32, bk=32, split=split)
    outs = gm.grouped_matvecs(products, block=block, config=config, interpret=True)
    for p, out in zip(products, outs):
        ref = gm.grouped_matvec_reference(p.x, p.w, p.ids, scale=p.scale, block=block, w2=p.w2, scale2=p.scale2)
        assert out.shape == ref.shape and out.dtype == (p.out_dtype or p.x.dtype)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_grouped_matvecs_moe_block_as_fused_decode_runs_it(dtype):
    """A MoE block's launches as fused decode runs them: gate/up (two tokens' rows, each serving its token's k routed
    groups, beside the shared expert); then down, each routed group weighed by its routing weight, the split sums left
    unfinished. Every product equals its reference: float32 within 1e-5; bfloat16 (rounded at different points)
    within 2e-2 of the output scale. Fresh random inputs each run."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    keys = iter(jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 12))
    dt = jnp.dtype(dtype)
    block = (32, 32)
    n, h, f, k = 2, 128, 64, 3

    def rnd(shape, scale=1.0):
        return jax.random.normal(next(keys), shape) * scale

    def fp8(shape):
        return fp8_matmul.quantize(rnd(shape, 0.2), block)

    def close(got, ref):
        ref = ref.astype(jnp.float32)
        tol = dict(rtol=1e-5, atol=1e-5) if dtype == "float32" else dict(rtol=2e-2, atol=2e-2 * float(
            jnp.abs(ref).max()))
        np.testing.assert_allclose(np.asarray(got, np.float32), ref, **tol)

    (g, gs), (u, us), (d, ds) = fp8((5, h, f)), fp8((5, h, f)), fp8((5, f, h))
    sg, su, sd = (rnd(shape, 0.2).astype(dt) for shape in ((1, h, 2 * f), (1, h, 2 * f), (1, 2 * f, h)))
    x = rnd((n, h)).astype(dt)
    ids = jnp.array([4, 1, 4, 0, 2, 3], jnp.int32)  # token t's experts: ids[t * k:(t + 1) * k]
    one = jnp.zeros((1,), jnp.int32)
    first = [gm.Product(x=x[:, None, :], w=g, ids=ids, scale=gs, w2=u, scale2=us),  # group i reads row i // k
             gm.Product(x=x[None], w=sg, ids=one, w2=su)]
    config = gm.GroupedConfig(bn=32, bk=32, split=2)
    mid = gm.grouped_matvecs(first, block=block, config=config, interpret=True)
    for p, y in zip(first, mid):
        close(y, gm.product_reference(p, block))
    weights = jax.random.uniform(next(keys), (n * k,))
    second = [gm.Product(x=mid[0], w=d, ids=ids, scale=ds, group_weights=weights),
              gm.Product(x=mid[1], w=sd, ids=one, out_dtype=jnp.float32)]
    for p, y in zip(second, gm.grouped_matvecs(second, block=block, config=config, finish=False, interpret=True)):
        ref = gm.product_reference(p, block)
        assert y.dtype == jnp.float32 and y.shape == (2, *ref.shape)
        close(y.sum(0), ref)


def _finish_case(kind, keys):
    """(products, block, config, counters needed) of one launch for the in-launch finish tests: every product's K
    split four ways (a config's split is taken as given), float32 x unless named, groups picking experts out of
    order, twice, and one group none; "_fma": the one-row products by multiply-adds."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    block, config = (32, 32), gm.GroupedConfig(bn=32, bk=32, split=4, fma=kind.endswith("_fma"))
    ids = jnp.array([3, -1, 0, 3], jnp.int32)

    def rnd(shape, scale=1.0):
        return jax.random.normal(next(keys), shape) * scale

    def fp8(shape):
        return dict(zip(("w", "scale"), fp8_matmul.quantize(rnd(shape, 0.2), block)))

    def up(shape):  # w2 (and scale2) of an FP8 SwiGLU
        q, s = fp8_matmul.quantize(rnd(shape, 0.2), block)
        return dict(w2=q, scale2=s)

    x, stack = rnd((4, 2, 128)), (5, 128, 64)
    products = {
        "plain": [gm.Product(x=x, w=rnd(stack, 0.2), ids=ids)],
        "swiglu": [gm.Product(x=x, w=rnd(stack, 0.2), ids=ids, w2=rnd(stack, 0.2))],
        "weighted": [gm.Product(x=x, w=rnd(stack, 0.2), ids=ids, group_weights=jax.random.uniform(next(keys), (4,)))],
        "fp8": [gm.Product(x=x, ids=ids, **fp8(stack))],
        "fp8_swiglu_bf16": [gm.Product(x=x.astype(jnp.bfloat16), ids=ids, **fp8(stack), **up(stack))],
        "fp8_swiglu_packed": [gm.Product(x=x, ids=ids, **fp8(stack), **up(stack))],
        "many": [gm.Product(x=x[:2, :1], ids=ids, **fp8(stack), **up(stack)),  # group g reads row g // 2
                 gm.Product(x=x[:1], w=rnd((1, 128, 96), 0.2), ids=jnp.zeros((1,), jnp.int32),
                            w2=rnd((1, 128, 96), 0.2)),
                 gm.Product(x=rnd((2, 1, 256)), w=rnd((2, 256, 32), 0.2), ids=jnp.array([1, -1], jnp.int32),
                            out_dtype=jnp.float32)],
    }[kind.removesuffix("_fma")]
    needed = sum(p.ids.shape[0] * p.w.shape[2] // config.bn for p in products)  # G * N / bn each
    return products, block, config, needed


@pytest.mark.parametrize("kind", ["plain", "swiglu", "weighted", "fp8", "fp8_swiglu_bf16", "fp8_swiglu_packed",
                                  "many", "many_fma"])
def test_grouped_matvecs_finish_in_launch(kind):
    """With arrival counters a split launch finishes its products itself (the last program of each output tile adds
    the four partial sums in order, as XLA's sum does, then the SwiGLU or group weight applies as before): the
    results equal the XLA-finished ones (float32: within 1e-6, a few float32 roundings should XLA add in another
    order; bf16 within one bf16 rounding step, 2**-7, which such a float32 difference can flip) and the reference
    (1e-5; bf16: 2e-2 of the output scale, as above), and the counters come back zero, so a second launch (jitted,
    fresh inputs) reuses them. Fresh random inputs each run."""
    from tilert_jax.kernels import moe_grouped_matvec as gm
    from tilert_jax.kernels.common import zero_counters

    seed = int(np.random.default_rng().integers(1 << 30))
    counters = zero_counters(_finish_case(kind, iter(jax.random.split(jax.random.key(seed), 40)))[3])
    for launch in range(2):
        products, block, config, _ = _finish_case(kind, iter(jax.random.split(jax.random.key(seed + launch), 40)))
        args = dict(block=block, config=config, packed="packed" in kind, interpret=True)
        xla = gm.grouped_matvecs(products, **args)
        outs, counters = jax.jit(lambda c: gm.grouped_matvecs(products, counters=c, **args))(counters)
        np.testing.assert_array_equal(counters, 0)
        bf16 = kind.endswith("bf16")
        for p, got, want in zip(products, outs, xla):
            ref = gm.product_reference(p, block).astype(jnp.float32)
            assert got.shape == ref.shape and got.dtype == want.dtype
            got, want = np.asarray(got, np.float32), np.asarray(want, np.float32)
            np.testing.assert_allclose(got, want, rtol=2 ** -7 if bf16 else 1e-6, atol=1e-6)
            np.testing.assert_allclose(got, ref, rtol=2e-2 if bf16 else 1e-5,
                                       atol=2e-2 * float(jnp.abs(ref).max()) if bf16 else 1e-5)
            assert not np.any(got[p.ids < 0])  # a group without an expert: zeros


def test_grouped_matvecs_counters_too_short_raise():
    from tilert_jax.kernels import moe_grouped_matvec as gm
    from tilert_jax.kernels.common import zero_counters

    products, block, config, needed = _finish_case("many", iter(jax.random.split(jax.random.key(0), 40)))
    for counters in (zero_counters(needed - 1), jnp.zeros((needed,), jnp.float32)):
        with pytest.raises(ValueError, match=f">= {needed}") as err:
            gm.grouped_matvecs(products, block=block, config=config, counters=counters, interpret=True)
        assert "\n" not in str(err.value)


@pytest.mark.parametrize("fma", [False, True])
def test_grouped_matvecs_finish_in_launch_lowers_for_a_gpu(monkeypatch, fma):
    """The in-launch finish (two FP8 SwiGLUs read as uint16 pairs, bf16 rows, split, with counters; one-row groups
    by dot or by multiply-adds) lowers through Pallas' Triton lowering (from this CPU machine:
    TILERT_PALLAS_INTERPRET=0)."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    monkeypatch.setenv("TILERT_PALLAS_INTERPRET", "0")
    block, config = (128, 128), gm.GroupedConfig(bn=128, bk=128, split=4, fma=fma)

    def launch(x, w, s, w2, s2, counters):
        products = [gm.Product(x=x, w=w, ids=jnp.array([3, 0], jnp.int32), scale=s, w2=w2, scale2=s2),
                    gm.Product(x=x[:1], w=w[:1], ids=jnp.zeros((1,), jnp.int32), scale=s[:1], w2=w2[:1],
                               scale2=s2[:1])]
        return gm.grouped_matvecs(products, block=block, config=config, packed=True, counters=counters)

    args = [jax.ShapeDtypeStruct(shape, dtype) for shape, dtype in (
        ((2, 1, 1024), jnp.bfloat16), ((4, 1024, 512), jnp.float8_e4m3fn), ((4, 8, 4), jnp.float32),
        ((4, 1024, 512), jnp.float8_e4m3fn), ((4, 8, 4), jnp.float32), ((64,), jnp.int32))]
    text = jax.jit(launch).trace(*args).lower(lowering_platforms=("cuda",)).as_text()
    assert "moe_grouped_matvec" in text and "output_operand_alias" in text  # the counters, updated in place


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_stream_norm_kernel_matches_reference(dtype):
    """The stream kernel (interpret mode) against its reference on fresh random inputs: the combined stream bit for
    bit (the same adds in the same order) and its norm within one rounding step (the RMS sum's order); parts of
    another shape are refused by name."""
    from tilert_jax.kernels import stream_norm as sn

    keys = iter(jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4))
    dt = jnp.dtype(dtype)
    n, h = 3, 2048
    stream = sn.Stream(x=jax.random.normal(next(keys), (n, h)).astype(dt),
                       parts=(jax.random.normal(next(keys), (3, n, h)), jax.random.normal(next(keys), (1, n, h))),
                       norm=(1 + 0.1 * jax.random.normal(next(keys), (h,))).astype(dt), eps=1e-6)
    got, ref = sn.stream_norm(stream, interpret=True), sn.stream_reference(stream)
    np.testing.assert_array_equal(np.asarray(got[0], np.float32), np.asarray(ref[0], np.float32))
    rtol = 1e-6 if dtype == "float32" else 2 ** -7  # at most one rounding step of the norm apart
    np.testing.assert_allclose(np.asarray(got[1], np.float32), np.asarray(ref[1], np.float32), rtol=rtol, atol=0)
    with pytest.raises(ValueError, match="do not match the stream"):
        sn.stream_norm(sn.Stream(stream.x, (stream.parts[0][:, :2],), stream.norm, 1e-6), interpret=True)


@pytest.mark.parametrize("packed", [False, True])
def test_grouped_matvec_float16_dot_is_the_bf16_dot(packed):
    """bf16 activations against FP8 weights are multiplied in float16 after dividing each row of the x tile by a
    power of 2: exact for values within 2**13 of the row's largest, so the result equals the bf16 dot's bit for bit
    when x spans magnitudes 2**-4 to 2**9 times 200 (bf16 values far outside float16's range included); fresh random
    inputs each run."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    keys = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 4)
    block = (32, 32)
    w, s = fp8_matmul.quantize(jax.random.normal(keys[0], (4, 64, 64)) * 0.2, block)
    magnitude = jnp.exp2(jax.random.randint(keys[1], (3, 2, 64), -4, 8).astype(jnp.float32))
    sign = jnp.where(jax.random.bernoulli(keys[2], 0.5, (3, 2, 64)), 1.0, -1.0)
    x = (sign * magnitude * jax.random.uniform(keys[3], (3, 2, 64), minval=1.0, maxval=2.0) * 200).astype(
        jnp.bfloat16)
    ids = jnp.array([2, 0, 3], jnp.int32)
    args = dict(scale=s, block=block, w2=w, scale2=s, interpret=True, packed=packed)
    fast = gm.grouped_matvec(x, w, ids, config=gm.GroupedConfig(bn=32, bk=32, f16=True), **args)
    plain = gm.grouped_matvec(x, w, ids, config=gm.GroupedConfig(bn=32, bk=32, f16=False), **args)
    np.testing.assert_array_equal(np.asarray(fast, np.float32), np.asarray(plain, np.float32))
    ref = gm.grouped_matvec_reference(x, w, ids, scale=s, block=block, w2=w, scale2=s).astype(jnp.float32)
    np.testing.assert_allclose(np.asarray(fast, np.float32), ref, rtol=2e-2, atol=2e-2 * float(jnp.abs(ref).max()))


@pytest.mark.parametrize("fp8,n,tile", [(False, 20, 4), (True, 20, 4), (True, 200, None)])
def test_tiled_experts_match_ragged(fp8, n, tile):
    """Prefill's tiled grouped matmul against the ragged_dot formulation, with unused experts and a tile size that
    leaves padding (4 rows, and the 64 that 400 pairs over 8 experts pick), through XLA's gathered weights and
    through the grouped kernel (interpreted; the tiles past the last used one read nothing). float32: the same
    products summed in another order."""
    e, h, f, k = 8, 32, 16, 2
    keys = jax.random.split(jax.random.key(9), 5)
    block = (16, 16) if fp8 else None

    def stack(key, shape):
        w = jax.random.normal(key, shape) * 0.2
        if not fp8:
            return Linear(w=w)
        q, s = fp8_matmul.quantize(w, block)
        return Linear(w=q, scale=s)

    gate, up, down = stack(keys[0], (e, h, f)), stack(keys[1], (e, h, f)), stack(keys[2], (e, f, h))
    x = jax.random.normal(keys[3], (n, h))
    logits = jax.random.normal(keys[4], (n, e)).at[:, 5].add(-100.0)  # expert 5 never chosen
    weights, index = jax.lax.top_k(jax.nn.softmax(logits), k)
    ref = jax.jit(moe.experts_sorted, static_argnums=6)(x, index, weights, gate, up, down, block)
    for impl in ("xla", "pallas"):
        tiled = jax.jit(moe.experts_tiled, static_argnums=(6, 7, 8, 9))(x, index, weights, gate, up, down, block,
                                                                        tile, 2, impl)
        np.testing.assert_allclose(tiled, ref, rtol=1e-5, atol=1e-5)


def test_pallas_linear_paths():
    """deepseek_linear.linear, .swiglu and .linears with impl="pallas" at decode size run the grouped kernel (bf16
    and FP8, K split into partial sums by the default configuration, a bias added after, several products in one
    launch) and equal the XLA path; shapes that do not tile fall back to XLA."""
    from tilert_jax.kernels import moe_grouped_matvec
    from tilert_jax.models.deepseek_linear import linear, linears, swiglu

    assert moe_grouped_matvec.default_config([(1, 1024, 128, True)], (128, 128)).split > 1
    # DeepSeek-V2-Lite's q beside kv_a: split 8 would be 456 programs, past the 396 resident at once; o_proj: 256
    q_kv_a, o = [(1, 2048, 3072, False), (1, 2048, 576, False)], [(1, 2048, 2048, False)]
    assert [moe_grouped_matvec.default_config(shapes, None).split for shapes in (q_kv_a, o)] == [4, 8]
    keys = jax.random.split(jax.random.key(10), 3)
    x = jax.random.normal(keys[0], (1, 1, 1024))
    w = jax.random.normal(keys[1], (1024, 128)) * 0.1
    w2 = jax.random.normal(keys[2], (1024, 128)) * 0.1
    (q, s), (q2, s2) = fp8_matmul.quantize(w, (128, 128)), fp8_matmul.quantize(w2, (128, 128))
    bias = jax.random.normal(keys[2], (128,))
    for lin, block in ((Linear(w=w), None), (Linear(w=q, scale=s), (128, 128)), (Linear(w=w[:, :40]), None),
                       (Linear(w=w, b=bias), None)):
        np.testing.assert_allclose(linear(x, lin, block, "pallas"), linear(x, lin, block, "xla"), rtol=1e-5,
                                   atol=1e-5)
    for gate, up, block in ((Linear(w=w), Linear(w=w2), None), (Linear(w=q, scale=s), Linear(w=q2, scale=s2),
                                                                (128, 128))):
        np.testing.assert_allclose(swiglu(x, gate, up, block, "pallas"), swiglu(x, gate, up, block, "xla"),
                                   rtol=1e-5, atol=1e-5)
    products = [(Linear(w=q, scale=s),), (Linear(w=w[:, :64], b=bias[:64]),), (Linear(w=q, scale=s),
                                                                                Linear(w=q2, scale=s2))]
    for fused, plain in zip(linears(x, products, (128, 128), "pallas"), linears(x, products, (128, 128), "xla")):
        np.testing.assert_allclose(fused, plain, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
def test_gpu_grouped_matvec_reads_experts_past_2_pow_31():
    """A DeepSeek-V3-wide FP8 stack of 147 experts (2.16e9 one-byte elements): experts 146 and up start past 2**31
    elements, where 32-bit offsets would wrap. The kernel reads it as uint16 pairs and matches the reference (bf16
    rows, float32 accumulation in both: 1e-2 of the output scale)."""
    from tilert_jax.kernels import moe_grouped_matvec as gm

    e, k, n, block = 147, 7168, 2048, (128, 128)
    bits = jax.random.bits(jax.random.key(0), (e, k, n), jnp.uint8) & 0x37  # |w| < 1, never a NaN pattern
    w = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)
    scale = jnp.full((e, k // 128, n // 128), 0.01, jnp.float32)
    x = jax.random.normal(jax.random.key(1), (3, 1, k)).astype(jnp.bfloat16)
    ids = jnp.array([146, 0, 145], jnp.int32)
    out = jax.jit(lambda x, w, s: gm.grouped_matvec(x, w, ids, scale=s, block=block))(x, w, scale)
    ref = gm.grouped_matvec_reference(x, w, ids, scale=scale, block=block)
    out, ref = out.astype(jnp.float32), ref.astype(jnp.float32)
    assert float(jnp.max(jnp.abs(out - ref))) <= 1e-2 * float(jnp.max(jnp.abs(ref)))


def test_grouped_launch_takes_its_tuned_configuration(tmp_path, monkeypatch):
    """A launch whose key is in the tuning table (kernels/tuning.py "grouped:..." entries; here a file named by
    TILERT_TUNING) runs that configuration, its split exactly as recorded (fma rows, a split of 4 the default rule
    would not choose: 8), and still equals the reference (float32, 1e-5); an entry that does not tile the launch is
    ignored."""
    from tilert_jax.kernels import moe_grouped_matvec as gm
    from tilert_jax.kernels import tuning

    keys = jax.random.split(jax.random.key(int(np.random.default_rng().integers(1 << 30))), 3)
    block = (32, 32)
    w, s = fp8_matmul.quantize(jax.random.normal(keys[0], (3, 128, 64)) * 0.2, block)
    x = jax.random.normal(keys[1], (2, 1, 128))
    ids = jnp.array([2, 0], jnp.int32)
    shapes, swiglus = [(2, 128, 64, True)], [False]
    key = tuning.grouped_key(1, [(2, 128, 64, True, False)])
    assert key == "grouped:B1:2x128x64f"
    table = tmp_path / "tuning.json"
    monkeypatch.setenv("TILERT_TUNING", str(table))
    ref = gm.grouped_matvec_reference(x, w, ids, scale=s, block=block)
    tuned = gm.GroupedConfig(bn=32, bk=16, split=8, fma=True)
    for entry, expected, splits in ((dataclasses.asdict(tuned), tuned, 8),
                                    (dict(bn=32, bk=32, split=3), None, 2)):  # 128 is not 3 x 32: ignored
        table.write_text(json.dumps({key: entry}))
        tuning._table.cache_clear()
        assert gm.tuned_config(shapes, swiglus, 1, block) == expected
        (parts,) = gm.grouped_matvecs([gm.Product(x=x, w=w, ids=ids, scale=s)], block=block, finish=False,
                                      interpret=True)
        assert parts.shape == (splits, 2, 1, 64)  # the recorded split, or the default rule's
        np.testing.assert_allclose(parts.sum(0), ref, rtol=1e-5, atol=1e-5)
    tuning._table.cache_clear()
