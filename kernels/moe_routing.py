"""DeepSeek's MoE routing at decode in one launch: the router's float32 partial sums [S, N, E] -> each token row's
top-k experts and their weights.

    V2 ("greedy", "group_limited_greedy"): scores = softmax(logits); group-limited keeps the topk_group groups with
        the highest max score (the others' scores read as 0); weights = the k best scores * routed_scaling_factor.
    V3 ("noaux_tc"): scores = sigmoid(logits); choice = scores + bias; groups ranked by the sum of their two best
        choice values, the topk_group best kept (the others' choice values -inf); the k best choice values pick the
        experts, weighed by their unbiased scores (optionally renormalised: / (sum + 1e-20)), * routed_scaling_factor.

On a GPU the XLA path costs four small kernels a layer after the router (the softmax or sigmoid, the two reduce
fusions of `ranked_top_k`, a select for the weights: about 5.4 us per layer), and one more adding the router's
split-K partial sums; here one program per token row adds those partial sums itself (in order s = 0, 1, ..., as
`common.sum_parts`), so nothing runs between the router launch and this one, and ranks its experts in registers. The
row is read as a 2-D block [G, E / G] (G = n_group, 1 without groups) padded to powers of 2 by masked loads
(DeepSeek-V2's 160 experts are 8 groups of 20); a padded entry is never chosen. Group scores are row reductions of
the block; the top-k runs on the row flattened to 1-D, as k rounds of one argmax over order-preserving int32 keys of
the values (ties to the lower position, which orders as the expert id: jax.lax.top_k's ties), the chosen key then
set below every float's (so an expert is never chosen twice, even among -inf values). The weights are gathered after
the rounds, in one reduction. The plain-jnp routing below (`route_reference`, with `ranked_top_k` for its top-k) is
the XLA path and the kernel's reference.

Measured on an H200 with ncu (which adds about 2 us to any kernel: its 8-element XLA kernels read 2.0 us), single
samples that vary by up to 0.7 us between runs: DeepSeek-V3 (256 experts, S = 8, one row) 4.5 to 5.2 us, V2 (160
experts) 4.0 to 4.4 us, V2-Lite (64 experts) 2.9 to 3.0 us with 1 warp but 3.4 with 4; the XLA path for V3 is nine
kernels of 2.2 to 2.9 us each under ncu. Default: 4 warps from 256 (padded) entries a row, else 1 (`route`). In the
V2-Lite decode step's profile (no ncu) it takes 2.07 us a layer against the XLA path's 4.2 (docs/PERF.md, session 10).

Lowering: Triton, as the other decode kernels here: a few hundred elements per row, reductions within a warp or a
few, masked loads for block shapes that are not powers of 2. Pallas' Triton lowering has no sort, top_k or reduce_or
(jnp.any), and reduces an argmax along one axis only: hence the 1-D row and the rounds of argmax.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import interpret_default, load_sum, next_pow2, triton_params
from tilert_jax.kernels.moe_grouped_matvec import Epilogue

f32 = jnp.float32
METHODS = ("greedy", "group_limited_greedy", "noaux_tc")


# --- the reference (the XLA path) ---------------------------------------------------------------------------------

RANKED_TOP_K_ELEMENTS = 1 << 22  # the largest comparison tensor [..., E, E] `ranked_top_k` builds; a sort beyond it


def ranked_top_k(x: jnp.ndarray,  # [..., E]
                 k: int) -> tuple[jnp.ndarray, jnp.ndarray]:  # values [..., k], indices [..., k] int32
    """jax.lax.top_k's result (ties to the lower index), by ranking for the few rows of a decode step: an element's
    rank is the count of elements ahead of it (greater, or equal at a lower index), and slot r takes the element of
    rank r. On a GPU that is two small fusions, where a sort costs a sort kernel and two slice copies (4.7 us per
    DeepSeek-V2-Lite layer, docs/PERF.md session 9). Larger inputs (prefill) keep the sort. x must be free of NaN
    (a NaN compares false with everything, so two elements could share a rank)."""
    e = x.shape[-1]
    if x.size * e > RANKED_TOP_K_ELEMENTS:
        values, index = jax.lax.top_k(x, k)
        return values, index.astype(jnp.int32)
    i = jnp.arange(e, dtype=jnp.int32)
    xi, xj = x[..., :, None], x[..., None, :]  # [..., E, 1], [..., 1, E]
    ahead = (xj > xi) | ((xj == xi) & (i[None, :] < i[:, None]))  # [..., E, E]: element j ahead of element i
    rank = jnp.sum(ahead, axis=-1, dtype=jnp.int32)  # [..., E]
    slot = rank[..., None, :] == jnp.arange(k, dtype=jnp.int32)[:, None]  # [..., k, E]: one element per slot
    # Both as sums over the slot (one fusion; a gather would be another): exact, as every other term is zero.
    values = jnp.sum(jnp.where(slot, x[..., None, :], jnp.zeros((), x.dtype)), axis=-1)
    return values, jnp.sum(jnp.where(slot, i, 0), axis=-1)


def route_softmax(logits: jnp.ndarray,  # [N, E] float32 router logits
                  top_k: int, method: str, n_group: int | None, topk_group: int | None,
                  routed_scaling_factor: float) -> tuple[jnp.ndarray, jnp.ndarray]:  # weights [N, k], index [N, k]
    """DeepSeek V2: softmax scores; "greedy" top-k, or "group_limited_greedy" (top-k inside the topk_group groups with
    the highest max score). The weights are the softmax scores times routed_scaling_factor (no renormalisation, as
    transformers' DeepseekV2TopkRouter)."""
    scores = jax.nn.softmax(logits, axis=-1)
    if method == "group_limited_greedy":
        n, e = scores.shape
        group_scores = scores.reshape(n, n_group, e // n_group).max(axis=-1)  # [N, G]
        keep = _top_groups(group_scores, topk_group)  # [N, G]
        scores = jnp.where(jnp.repeat(keep, e // n_group, axis=-1), scores, 0.0)
    weights, index = ranked_top_k(scores, top_k)
    return weights * routed_scaling_factor, index


def route_sigmoid(logits: jnp.ndarray,  # [N, E] float32
                  bias: jnp.ndarray | None,  # [E] float32 e_score_correction_bias: used to choose, not to weigh
                  top_k: int, n_group: int, topk_group: int, norm_topk_prob: bool,
                  routed_scaling_factor: float) -> tuple[jnp.ndarray, jnp.ndarray]:
    """DeepSeek V3 "noaux_tc": sigmoid scores; groups ranked by the sum of their two best biased scores; top-k of the
    biased scores inside the topk_group best groups; weights are the unbiased scores, optionally renormalised."""
    scores = jax.nn.sigmoid(logits)
    choice = scores if bias is None else scores + bias.astype(jnp.float32)
    n, e = choice.shape
    per_group = choice.reshape(n, n_group, e // n_group)
    group_scores = ranked_top_k(per_group, 2)[0].sum(axis=-1)  # [N, G]
    keep = _top_groups(group_scores, topk_group)
    choice = jnp.where(jnp.repeat(keep, e // n_group, axis=-1), choice, -jnp.inf)
    index = ranked_top_k(choice, top_k)[1]
    weights = jnp.take_along_axis(scores, index, axis=-1)
    if norm_topk_prob:
        weights = weights / (weights.sum(axis=-1, keepdims=True) + 1e-20)
    return weights * routed_scaling_factor, index


def _top_groups(group_scores: jnp.ndarray, topk_group: int) -> jnp.ndarray:  # [N, G] bool
    idx = ranked_top_k(group_scores, topk_group)[1]
    return jnp.any(jax.nn.one_hot(idx, group_scores.shape[-1], dtype=jnp.int32) > 0, axis=-2)


@dataclasses.dataclass(frozen=True)
class RoutingRule:
    """How a DeepSeek MoE layer routes (from the DeepseekConfig fields of the same names; V3's sigmoid router is
    method "noaux_tc")."""
    top_k: int  # num_experts_per_tok
    method: str  # one of METHODS
    n_group: int | None = None  # groups of experts (group_limited_greedy and noaux_tc)
    topk_group: int | None = None  # groups kept
    norm_topk_prob: bool = False  # noaux_tc: renormalise the k weights
    routed_scaling_factor: float = 1.0

    @property
    def grouped(self) -> bool:
        return self.method != "greedy"

    def check(self, num_experts: int) -> None:
        """A one-line ValueError unless the rule routes among `num_experts` experts."""
        if self.method not in METHODS:
            raise ValueError(f"unknown routing method {self.method!r}: expected one of {METHODS}")
        if not 1 <= self.top_k <= num_experts:
            raise ValueError(f"top_k={self.top_k} must be between 1 and the {num_experts} experts")
        if self.grouped and not (self.n_group and self.topk_group and num_experts % self.n_group == 0
                                 and 1 <= self.topk_group <= self.n_group):
            raise ValueError(f"n_group={self.n_group} must divide the {num_experts} experts and topk_group="
                             f"{self.topk_group} lie in 1..n_group for {self.method}")
        if self.method == "noaux_tc" and num_experts // self.n_group < 2:
            raise ValueError(f"noaux_tc ranks groups by their two best experts: {num_experts} experts in "
                             f"{self.n_group} groups leave fewer than 2 per group")


def route_reference(logits: jnp.ndarray,  # [N, E] float32
                    bias: jnp.ndarray | None,  # [E] float32 (noaux_tc only) or None
                    rule: RoutingRule) -> tuple[jnp.ndarray, jnp.ndarray]:  # weights [N, k] float32, ids int32
    if rule.method == "noaux_tc":
        return route_sigmoid(logits, bias, rule.top_k, rule.n_group, rule.topk_group, rule.norm_topk_prob,
                             rule.routed_scaling_factor)
    return route_softmax(logits, rule.top_k, rule.method, rule.n_group, rule.topk_group, rule.routed_scaling_factor)


# --- the kernel ---------------------------------------------------------------------------------------------------

_MIN = jnp.iinfo(jnp.int32).min  # the key of an entry no longer available (padding, or already chosen)


def _keys(values):
    """float32 -> int32 keys of the same order (ties stay ties: -0.0 reads as +0.0), so that an argmax over keys can
    set an entry aside with _MIN, below every float's key, -inf's included."""
    bits = lax.bitcast_convert_type(jnp.where(values == 0.0, 0.0, values), jnp.int32)
    return jnp.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)


def _top_positions(keys, count: int, slots: int):
    """The positions of the `count` largest keys [M] in order, ties to the lower position (jax.lax.top_k's order),
    as an int32 [slots] vector (-1 past `count`), and the keys with those set aside (_MIN): one argmax a round (an
    argmax reduces the pairs (key, position), keeping the lower position on ties)."""
    pos = lax.broadcasted_iota(jnp.int32, keys.shape, 0)
    slot = lax.broadcasted_iota(jnp.int32, (slots,), 0)
    out = jnp.full((slots,), -1, jnp.int32)
    for r in range(count):
        best = jnp.argmax(keys).astype(jnp.int32)
        out = jnp.where(slot == r, best, out)
        keys = jnp.where(pos == best, _MIN, keys)
    return out, keys


def _kept_groups(group_scores, groups: int, topk_group: int):
    """group_scores [Gp] -> bool [Gp]: the topk_group best of the first `groups` (ties to the lower group)."""
    real = lax.broadcasted_iota(jnp.int32, group_scores.shape, 0) < groups
    _, left = _top_positions(jnp.where(real, _keys(group_scores), _MIN), topk_group, next_pow2(topk_group))
    return real & (left == _MIN)


def _best_two_sum(values, col):
    """values [Gp, Wp] (-inf on the padding) -> the best plus the second best value of each group [Gp], ties as
    ranked_top_k's (the best at its lowest column is set aside; a tie for best then counts twice)."""
    best = jnp.max(values, axis=1)  # [Gp]
    first = jnp.argmax(values, axis=1).astype(jnp.int32)  # [Gp]: lowest column holding the best
    second = jnp.max(jnp.where(col == first[:, None], -jnp.inf, values), axis=1)
    return best + second


def _route_block(logits, bias, rule: RoutingRule, groups: int, width: int):
    """One row's logits as a block [Gp, Wp] float32 (any value on the padding past `groups` x `width`) and the bias
    the same (or 0.0) -> its k experts' weights [kp] float32 and ids [kp] int32 (past k: 0 and -1)."""
    gp, wp = logits.shape
    kp, k = next_pow2(rule.top_k), rule.top_k
    m = gp * wp
    grp = lax.broadcasted_iota(jnp.int32, (gp, wp), 0)
    col = lax.broadcasted_iota(jnp.int32, (gp, wp), 1)
    valid = (grp < groups) & (col < width)  # [Gp, Wp]

    if rule.method == "noaux_tc":
        scores = lax.logistic(logits)
        choice = jnp.where(valid, scores + bias, -jnp.inf)
        keep = _kept_groups(_best_two_sum(choice, col), groups, rule.topk_group)  # [Gp]
        choice = jnp.where(keep[:, None], choice, -jnp.inf)
    else:  # jax.nn.softmax: exp(x - max) / sum, over the row (1-D: one reduction each)
        flat = jnp.where(valid, logits, -jnp.inf).reshape(m)
        unnormalised = jnp.exp(flat - jnp.max(flat))  # 0 on the padding
        scores = (unnormalised / jnp.sum(unnormalised)).reshape(gp, wp)
        if rule.method == "group_limited_greedy":
            group_max = jnp.max(jnp.where(valid, scores, -jnp.inf), axis=1)  # [Gp]
            scores = jnp.where(_kept_groups(group_max, groups, rule.topk_group)[:, None], scores, 0.0)
        choice = scores

    # The k best of the row, 1-D (flat position g * Wp + j orders as expert g * W + j), then each slot's weight (the
    # unbiased score; for softmax the choice itself) in one reduction: a single nonzero term per slot, so exact.
    picked, _ = _top_positions(jnp.where(valid, _keys(choice), _MIN).reshape(m), k, kp)  # [kp], -1 past k
    pos = lax.broadcasted_iota(jnp.int32, (kp, m), 1)
    weights = jnp.sum(jnp.where(pos == picked[:, None], scores.reshape(1, m), 0.0), axis=1)  # [kp], 0 past k
    index = picked // wp * width + picked % wp
    if rule.method == "noaux_tc" and rule.norm_topk_prob:
        weights = weights / (jnp.sum(weights) + 1e-20)
    return weights * rule.routed_scaling_factor, index


def _store_row(w_ref, i_ref, row, weights, index, k: int):
    """The row's k weights and ids into w_ref, i_ref [N, k] (the slots past k dropped)."""
    kp = weights.shape[0]
    mask = None if kp == k else lax.broadcasted_iota(jnp.int32, (kp,), 0) < k
    plt.store(w_ref.at[row, pl.ds(0, kp)], weights, mask=mask)
    plt.store(i_ref.at[row, pl.ds(0, kp)], index, mask=mask)


def _kernel(*refs, rule: RoutingRule, groups: int, width: int, has_bias: bool):
    x_ref = refs[0]  # [S, N, G, W] float32
    bias_ref = refs[1] if has_bias else None  # [G, W] float32
    w_ref, i_ref = refs[-2:]  # [N, k] float32, [N, k] int32
    row = pl.program_id(0)
    gp, wp = next_pow2(groups), next_pow2(width)
    exact = gp == groups and wp == width
    grp = lax.broadcasted_iota(jnp.int32, (gp, wp), 0)
    col = lax.broadcasted_iota(jnp.int32, (gp, wp), 1)
    masked = {} if exact else dict(mask=(grp < groups) & (col < width), other=0.0)  # [G, W] read as [Gp, Wp]
    logits = load_sum(x_ref, row, pl.ds(0, gp), pl.ds(0, wp), **masked)  # [Gp, Wp] float32
    bias = plt.load(bias_ref.at[pl.ds(0, gp), pl.ds(0, wp)], **masked) if has_bias else 0.0
    _store_row(w_ref, i_ref, row, *_route_block(logits, bias, rule, groups, width), rule.top_k)


def _checked_bias(bias: jax.Array | None, rule: RoutingRule, experts: int) -> jax.Array | None:
    """The bias the rule uses (noaux_tc's; the softmax methods have none, as route_reference), after a one-line
    ValueError unless the rule routes among `experts` and the bias is one per expert."""
    rule.check(experts)
    if bias is not None and bias.shape != (experts,):
        raise ValueError(f"the bias must be [{experts}], one per expert, got {list(bias.shape)}")
    return bias if rule.method == "noaux_tc" else None


def _layout(rule: RoutingRule, experts: int) -> tuple[int, int]:
    """(groups, experts per group) of the row's block."""
    groups = rule.n_group if rule.grouped else 1
    return groups, experts // groups


def route(
    parts: jax.Array,  # [S, N, E] float32: the router's logits as S >= 1 partial sums
    bias: jax.Array | None,  # [E] e_score_correction_bias (noaux_tc: used to choose, not to weigh) or None
    rule: RoutingRule,
    *,
    num_warps: int | None = None,  # default: 4 from 256 (padded) entries a row, else 1 (measured: top of file)
    interpret: bool | None = None,
) -> tuple[jax.Array, jax.Array]:  # weights [N, k] float32, expert ids [N, k] int32
    """route_reference(sum_parts(parts), bias, rule) in one launch (see the top of this file). Any number of rows N
    is accepted (one program each, nothing depends on N); the model uses the kernel at decode, N <= 16, where the
    router's partial sums come from the grouped kernel (moe.route)."""
    if parts.ndim != 3 or parts.dtype != f32 or parts.shape[0] < 1:
        raise ValueError(f"router logits must be float32 partial sums [S, N, E], got {parts.dtype}{list(parts.shape)}")
    s, n, e = parts.shape
    bias = _checked_bias(bias, rule, e)
    interpret = interpret_default() if interpret is None else interpret
    groups, width = _layout(rule, e)
    if num_warps is None:
        num_warps = 4 if next_pow2(groups) * next_pow2(width) >= 256 else 1
    inputs = [parts.reshape(s, n, groups, width)] + ([] if bias is None else [bias.astype(f32).reshape(groups, width)])
    return pl.pallas_call(
        functools.partial(_kernel, rule=rule, groups=groups, width=width, has_bias=bias is not None),
        out_shape=(jax.ShapeDtypeStruct((n, rule.top_k), f32), jax.ShapeDtypeStruct((n, rule.top_k), jnp.int32)),
        grid=(n,),
        compiler_params=triton_params(num_warps, 1),
        interpret=interpret,
        name="moe_routing",
    )(*inputs)


# --- the routing as the router launch's epilogue -------------------------------------------------------------------

def epilogue_fits(rule: RoutingRule, experts: int) -> bool:
    """Whether `routing_epilogue` can read a row of E logits as its block: one group, or groups of a power of 2 (the
    row then is the block [G, W] row-major, G padded at the end; V2's 8 groups of 20 are not)."""
    groups, width = _layout(rule, experts)
    return groups == 1 or width == next_pow2(width)


def _epilogue_body(parts_ref, *refs, rule: RoutingRule, rows: int, experts: int):
    """Routes every row from the router's outputs, [S, 1, N, E] float32 partial sums or [1, N, E] logits, as
    `route` does (the partial sums added in order)."""
    bias_ref = refs[0] if len(refs) == 3 else None  # [1, E] float32
    w_ref, i_ref = refs[-2:]  # [N, k] float32, [N, k] int32
    groups, width = _layout(rule, experts)
    gp, wp = next_pow2(groups), next_pow2(width)
    m = gp * wp
    masked = {} if m == experts else dict(mask=lax.broadcasted_iota(jnp.int32, (1, m), 1) < experts, other=0.0)

    def one(row, carry):
        window = (jnp.int32(0), pl.ds(row, 1), pl.ds(0, m))  # group 0, the row, its logits: [1, Gp * Wp]
        logits = (load_sum(parts_ref, *window, **masked) if len(parts_ref.shape) == 4
                  else plt.load(parts_ref.at[window], **masked))
        bias = 0.0 if bias_ref is None else plt.load(bias_ref.at[pl.ds(0, 1), pl.ds(0, m)], **masked).reshape(gp, wp)
        _store_row(w_ref, i_ref, row, *_route_block(logits.reshape(gp, wp), bias, rule, groups, width), rule.top_k)
        return carry

    lax.fori_loop(0, rows, one, 0)


def routing_epilogue(product: int, bias: jax.Array | None, rule: RoutingRule, rows: int, experts: int):
    """The routing of `rows` token rows as the epilogue of the launch holding the router as product `product`
    (moe_grouped_matvec.Epilogue: the router's last program to finish routes while the launch's other products
    stream): its outputs are weights [N, k] float32 and expert ids [N, k] int32, as `route` gives. Needs
    `epilogue_fits`."""
    bias = _checked_bias(bias, rule, experts)
    if not epilogue_fits(rule, experts):
        raise ValueError(f"{experts} experts in {rule.n_group} groups do not form the routing epilogue's block")
    return Epilogue(product=product, body=functools.partial(_epilogue_body, rule=rule, rows=rows, experts=experts),
                    inputs=() if bias is None else (bias.astype(f32).reshape(1, experts),),
                    out_shapes=(jax.ShapeDtypeStruct((rows, rule.top_k), f32),
                                jax.ShapeDtypeStruct((rows, rule.top_k), jnp.int32)))
