"""The MoE routing kernel (kernels/moe_routing.py) against its reference `route_reference(sum_parts(parts), ...)`:
interpreted on the CPU, lowered for a GPU from the CPU (which catches the operations Pallas' Triton lowering lacks),
compiled on a GPU (`gpu` marker, V3's and V2's shapes).

Expert ids must be exactly equal, in order. Weights agree to 2e-6 relative: the two compute the same float32
operations on bit-identical logits (both add the partial sums in order s = 0, 1, ...) and differ only in the order
of two sums, the softmax's denominator and the renormalisation's, and on a GPU in the exp / sigmoid implementation
(a few ulps). A sum of up to 256 positive float32 terms is within about log2(256) = 8 half-ulps (5e-7) of the exact
sum whatever the tree, so two orders differ by up to 1e-6, and the division adds a rounding (1.3e-6 was seen over
160 experts). Ids are exact even so: a common denominator keeps the softmax scores' order (it can only make two
values one ulp apart equal, which random inputs make vanishingly rare), noaux_tc's choice values are elementwise and
identical, and the ties test uses integer-valued logits, whose sums, exps and sigmoids are identical on both sides.
On a GPU the exp and sigmoid differ by ulps, so the GPU test draws well-separated logits.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.kernels import moe_routing as mr
from tilert_jax.kernels.common import sum_parts
from tilert_jax.models import moe

V2_LITE = mr.RoutingRule(top_k=6, method="greedy")  # 64 experts
V2 = mr.RoutingRule(top_k=6, method="group_limited_greedy", n_group=8, topk_group=3, routed_scaling_factor=16.0)
V3 = mr.RoutingRule(top_k=8, method="noaux_tc", n_group=8, topk_group=4, norm_topk_prob=True,
                    routed_scaling_factor=2.5)  # 256 experts
V3_PLAIN = mr.RoutingRule(top_k=4, method="noaux_tc", n_group=4, topk_group=2)  # no renormalisation, no bias

# (rule, experts, with bias)
CASES = {"v2_lite": (V2_LITE, 64, False), "v2": (V2, 160, False), "v3": (V3, 256, True),
         "v3_plain": (V3_PLAIN, 48, False)}


def _rng():
    seed = np.random.SeedSequence().entropy
    return np.random.default_rng(seed), seed


def _check(parts, bias, rule, seed, interpret=True):
    weights, index = jax.jit(lambda p, b: mr.route(p, b, rule, interpret=interpret))(parts, bias)
    ref_weights, ref_index = mr.route_reference(sum_parts(parts), bias, rule)
    assert weights.dtype == jnp.float32 and index.dtype == jnp.int32
    np.testing.assert_array_equal(index, ref_index, err_msg=f"seed {seed}")
    np.testing.assert_allclose(weights, ref_weights, rtol=2e-6, atol=0, err_msg=f"seed {seed}")


@pytest.mark.parametrize("num_parts, rows", [(1, 1), (3, 1), (3, 3)])  # (3, 1): decode with a split router
@pytest.mark.parametrize("case", list(CASES))
def test_kernel_matches_reference(case, num_parts, rows):
    rule, e, with_bias = CASES[case]
    rng, seed = _rng()
    parts = jnp.asarray(rng.normal(size=(num_parts, rows, e)), jnp.float32)
    bias = jnp.asarray(rng.normal(size=(e,)) * 0.1, jnp.float32) if with_bias else None
    _check(parts, bias, rule, seed)


@pytest.mark.parametrize("case", list(CASES))
def test_ties_resolve_to_the_lower_id(case):
    """Integer-valued logits (7 distinct values over 48 to 256 experts) and a bias of a few distinct values: many
    experts, and whole groups, tie, and each tie goes to the lower expert or group id, as jax.lax.top_k's."""
    rule, e, with_bias = CASES[case]
    rng, seed = _rng()
    parts = jnp.asarray(rng.integers(-1, 2, size=(3, 4, e)), jnp.float32)
    bias = jnp.asarray(rng.integers(0, 2, size=(e,)) * 0.5, jnp.float32) if with_bias else None
    _check(parts, bias, rule, seed)


@pytest.mark.parametrize("rule", [
    mr.RoutingRule(top_k=6, method="noaux_tc", n_group=4, topk_group=1),  # 4 experts kept: two -inf choices taken
    mr.RoutingRule(top_k=6, method="group_limited_greedy", n_group=4, topk_group=1),  # two zero scores taken
])
def test_top_k_beyond_the_kept_groups(rule):
    """More experts asked for than the kept groups hold: the rest come from the other groups, lowest ids first (their
    masked values, -inf or 0, tie), and none twice."""
    rng, seed = _rng()
    _check(jnp.asarray(rng.normal(size=(2, 3, 16)), jnp.float32), None, rule, seed)


def test_padding_is_never_chosen():
    """20 experts in 5 groups of 4, padded to 8 x 4, the padding loaded as 0 (sigmoid 0.5, above every real score
    here): the k best are still real experts."""
    rule = mr.RoutingRule(top_k=8, method="noaux_tc", n_group=5, topk_group=5)
    parts = jnp.full((1, 2, 20), -5.0, jnp.float32)
    weights, index = mr.route(parts, None, rule, interpret=True)
    np.testing.assert_array_equal(index, np.tile(np.arange(8), (2, 1)))
    np.testing.assert_allclose(weights, jax.nn.sigmoid(-5.0) * np.ones((2, 8)), rtol=1e-6)


@pytest.mark.parametrize("parts, bias, rule", [
    (np.zeros((2, 64), np.float32), None, V2_LITE),  # not [S, N, E]
    (np.zeros((1, 2, 64), np.float16), None, V2_LITE),  # not float32
    (np.zeros((1, 2, 4), np.float32), None, V2_LITE),  # top_k > experts
    (np.zeros((1, 2, 64), np.float32), None, mr.RoutingRule(top_k=6, method="top_p")),
    (np.zeros((1, 2, 60), np.float32), None, mr.RoutingRule(top_k=6, method="noaux_tc", n_group=8, topk_group=4)),
    (np.zeros((1, 2, 64), np.float32), None, mr.RoutingRule(top_k=6, method="noaux_tc", n_group=8, topk_group=9)),
    (np.zeros((1, 2, 8), np.float32), None, mr.RoutingRule(top_k=2, method="noaux_tc", n_group=8, topk_group=4)),
    (np.zeros((1, 2, 256), np.float32), np.zeros((128,), np.float32), V3),
])
def test_bad_inputs_raise_one_line(parts, bias, rule):
    with pytest.raises(ValueError) as err:
        mr.route(jnp.asarray(parts), None if bias is None else jnp.asarray(bias), rule, interpret=True)
    assert "\n" not in str(err.value)


def test_lowers_for_a_gpu(monkeypatch):
    """The kernel lowers through Pallas' Triton lowering (from this CPU machine: TILERT_PALLAS_INTERPRET=0)."""
    monkeypatch.setenv("TILERT_PALLAS_INTERPRET", "0")
    for rule, e, with_bias in CASES.values():
        args = [jax.ShapeDtypeStruct((3, 2, e), jnp.float32),
                jax.ShapeDtypeStruct((e,), jnp.float32) if with_bias else None]
        lowered = jax.jit(lambda p, b, rule=rule: mr.route(p, b, rule)).trace(*args).lower(
            lowering_platforms=("cuda",))
        assert "moe_routing" in lowered.as_text()


def test_moe_route_and_router_partials():
    """moe.route: the kernel at decode size with impl="pallas", the reference otherwise (same results); the
    router's partial sums (the grouped kernel's K split, interpreted) add up to the float32 logits."""
    rng, seed = _rng()
    x = jnp.asarray(rng.normal(size=(3, 2048)), jnp.bfloat16)
    router = jnp.asarray(rng.normal(size=(2048, 256)) * 0.02, jnp.bfloat16)
    parts = moe.router_partials(x, router, "pallas")
    assert parts.shape[0] > 1 and parts.shape[1:] == (3, 256) and parts.dtype == jnp.float32
    logits = jnp.matmul(x.astype(jnp.float32), router.astype(jnp.float32))
    np.testing.assert_allclose(sum_parts(parts), logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(moe.router_partials(x, router, "xla")[0], logits)
    bias = jnp.asarray(rng.normal(size=(256,)) * 0.1, jnp.float32)
    pallas, xla = moe.route(parts, bias, V3, "pallas"), moe.route(parts, bias, V3, "xla")
    np.testing.assert_array_equal(pallas[1], xla[1], err_msg=f"seed {seed}")
    np.testing.assert_allclose(pallas[0], xla[0], rtol=2e-6)
    prefill = jnp.asarray(rng.normal(size=(1, 17, 256)), jnp.float32)  # past ROUTE_ROWS: the reference
    assert moe.route(prefill, bias, V3, "pallas")[1].shape == (17, 8)


EPILOGUE_CASES = {"v2_lite": (V2_LITE, 64, False), "v3": (V3, 256, True),
                  "greedy_48": (mr.RoutingRule(top_k=4, method="greedy"), 48, False)}  # a row padded to 64


def _beside_shared_case(case, rows, rng):
    """(x [N, 128], router [128, E], bias, rule, shared gate and up Linears) in float32, x and the router integers
    and eighths: the logits are exact whatever the order of the sums, so ids agree exactly, ties included."""
    from tilert_jax.models.deepseek_linear import Linear
    rule, e, with_bias = EPILOGUE_CASES[case]
    x = jnp.asarray(rng.integers(-2, 3, size=(rows, 128)), jnp.float32)
    router = jnp.asarray(rng.integers(-4, 5, size=(128, e)) / 8, jnp.float32)
    bias = jnp.asarray(rng.integers(0, 3, size=(e,)) * 0.25, jnp.float32) if with_bias else None
    gate, up = (Linear(w=jnp.asarray(rng.normal(size=(128, 96)) * 0.1, jnp.float32)) for _ in range(2))
    return x, router, bias, rule, (gate, up)


@pytest.mark.parametrize("rows", [1, 3])
@pytest.mark.parametrize("case", list(EPILOGUE_CASES))
def test_routing_epilogue_routes_beside_the_shared_expert(case, rows):
    """moe.route_beside_shared: the router beside the shared experts' gate/up in one grouped launch, its last
    program routing every row (mr.routing_epilogue): route_reference's ids exactly and weights to 2e-6 (as above),
    the shared SwiGLU to 1e-5 (float32 sums of 128 products in another order), the counters back to zero."""
    _check_beside_shared(case, rows)


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("case", ["v2_lite", "v3"])
def test_gpu_routing_epilogue(case, rows):
    """Compiled: the routing in the launch's last router program sees every program's partial sums."""
    _check_beside_shared(case, rows)


def _check_beside_shared(case, rows):
    from tilert_jax.kernels.common import zero_counters
    rng, seed = _rng()
    x, router, bias, rule, shared = _beside_shared_case(case, rows, rng)
    weights, index, mid, counters = jax.jit(lambda *a: moe.route_beside_shared(
        a[0], a[1], a[2], rule, a[3], None, zero_counters(64)))(x, router, bias, shared)
    ref_weights, ref_index = mr.route_reference(x @ router, bias, rule)
    np.testing.assert_array_equal(index, ref_index, err_msg=f"seed {seed}")
    np.testing.assert_allclose(weights, ref_weights, rtol=2e-6, atol=0, err_msg=f"seed {seed}")
    gate, up = (jnp.matmul(x, lin.w, precision="highest") for lin in shared)
    np.testing.assert_allclose(mid[0], jax.nn.silu(gate) * up, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(counters, 0)


def test_routing_epilogue_refuses_what_it_cannot_read():
    """V2's 8 groups of 20 experts are no row-major block of powers of 2: a one-line error (moe.route_beside_shared
    returns None before, keeping the two launches)."""
    assert not mr.epilogue_fits(V2, 160) and mr.epilogue_fits(V3, 256) and mr.epilogue_fits(V2_LITE, 64)
    with pytest.raises(ValueError, match="do not form") as err:
        mr.routing_epilogue(0, None, V2, 1, 160)
    assert "\n" not in str(err.value)
    x = jnp.zeros((1, 128), jnp.bfloat16)
    from tilert_jax.kernels.common import zero_counters
    assert moe.route_beside_shared(x, jnp.zeros((128, 160), jnp.bfloat16), None, V2, (None, None), None,
                                   zero_counters(8)) is None


def test_routing_epilogue_lowers_for_a_gpu(monkeypatch):
    """The launch with the routing epilogue lowers through Pallas' Triton lowering (from this CPU machine)."""
    from tilert_jax.kernels.common import zero_counters
    monkeypatch.setenv("TILERT_PALLAS_INTERPRET", "0")
    rng, _ = _rng()
    for case in EPILOGUE_CASES:
        x, router, bias, rule, shared = _beside_shared_case(case, 2, rng)
        lowered = jax.jit(lambda *a, rule=rule: moe.route_beside_shared(
            a[0], a[1], a[2], rule, a[3], None, zero_counters(64))).trace(
            x.astype(jnp.bfloat16), router.astype(jnp.bfloat16), bias, shared).lower(lowering_platforms=("cuda",))
        assert "moe_grouped_matvec" in lowered.as_text()


@pytest.mark.gpu
@pytest.mark.parametrize("rows", [1, 16])
@pytest.mark.parametrize("case", ["v3", "v2"])
def test_gpu_kernel_matches_reference(case, rows):
    """Compiled, at the real shapes. Well-separated logits (a shuffled grid of spacing 0.05 plus noise below 0.01):
    the GPU's exp and sigmoid differ from XLA's by ulps, which must not flip a near tie."""
    rule, e, with_bias = CASES[case]
    rng, seed = _rng()
    grid = np.stack([rng.permutation(e) for _ in range(rows)]) * 0.05 - e * 0.025  # [N, E]
    parts = np.stack([grid + rng.uniform(-0.005, 0.005, size=grid.shape), rng.normal(size=grid.shape) * 1e-3])
    parts = jnp.asarray(np.stack([parts[0], parts[1], -parts[1]]), jnp.float32)  # S = 3, summing to ~ the grid
    bias = jnp.asarray(rng.integers(0, 3, size=(e,)) * 0.5, jnp.float32) if with_bias else None
    _check(parts, bias, rule, seed, interpret=False)
