"""DeepSeek mixture of experts: the routers (V2 softmax greedy / group-limited greedy, V3 sigmoid "noaux_tc"; with
impl="pallas" at decode one routing kernel adds the router's partial sums and picks the experts,
kernels/moe_routing.py) and the routed experts as a grouped matmul over the selected experts only.

Ways to run the selected experts, each reading only the experts some token chose:
- gather (decode, few token-expert pairs): the k selected experts' weights are gathered per token and multiplied;
  with impl="pallas" a grouped matvec kernel reads them in place instead (kernels/moe_grouped_matvec.py);
- tiled (prefill): the token-expert pairs are sorted by expert, padded to tiles of one expert each, and the tiles
  multiplied a chunk at a time against their experts' weights; with impl="pallas" the grouped kernel takes every
  tile as a group of rows and reads its expert's weights in place (no gathered copies);
- sorted (reference): the same sort, then one jax.lax.ragged_dot per projection.
None loops over experts.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from tilert_jax.kernels import fp8_matmul
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import moe_routing
from tilert_jax.kernels.common import sum_parts
from tilert_jax.kernels.moe_routing import RoutingRule, route_reference
from tilert_jax.models.deepseek_linear import SINGLE, Linear, grouped_tiles, linear, stacked, swiglu, weight


ROUTE_ROWS = 16  # decode: up to this many token rows the router and the routing run as Pallas kernels


def router_partials(x: jnp.ndarray,  # [N, hidden]
                    router: jnp.ndarray,  # [hidden, E]
                    impl: str = "xla") -> jnp.ndarray:  # [S, N, E] float32: the logits as S >= 1 partial sums
    """The router's logits in float32, as transformers computes them, left as the partial sums of a split launch.
    Products of two bf16 values are exact in float32, so at decode size the Pallas path multiplies the stored values
    in the grouped kernel with float32 accumulation (XLA makes this narrow product a slow multiply-reduce), and its
    K-split sums are added by the routing kernel (`route`); the XLA path is one sum, S = 1."""
    product = _router_product(x, router) if impl == "pallas" else None
    if product is not None:
        n, e = x.shape[0], router.shape[1]
        return gm.grouped_matvecs([product], finish=False)[0].reshape(-1, n, e)  # [S, 1, N, E] or [1, N, E]
    return jnp.matmul(x.astype(jnp.float32), router.astype(jnp.float32))[None]


def _router_product(x: jnp.ndarray, router: jnp.ndarray) -> gm.Product | None:
    """The router as a grouped-kernel product with float32 logits, or None where decode's kernel does not take it
    (more than ROUTE_ROWS rows, a router stored in another dtype than x, or shapes that do not tile)."""
    n, h = x.shape
    if n > ROUTE_ROWS or router.dtype != x.dtype or gm.tiles(h, router.shape[1], None) is None:
        return None
    return gm.Product(x=x[None], w=router[None], ids=SINGLE, out_dtype=jnp.float32)


def routing_rule(config) -> RoutingRule:
    """The routing rule of a DeepseekConfig: V2's softmax router with its topk_method, V3's sigmoid "noaux_tc"."""
    method = config.topk_method if config.router == "softmax" else "noaux_tc"
    return RoutingRule(top_k=config.num_experts_per_tok, method=method, n_group=config.n_group,
                       topk_group=config.topk_group, norm_topk_prob=config.norm_topk_prob,
                       routed_scaling_factor=config.routed_scaling_factor)


def route(parts: jnp.ndarray,  # [S, N, E] float32 router logits as partial sums (router_partials)
          bias: jnp.ndarray | None,  # [E] float32 e_score_correction_bias (noaux_tc) or None
          rule: RoutingRule, impl: str = "xla") -> tuple[jnp.ndarray, jnp.ndarray]:  # weights [N, k], ids [N, k]
    """The routing weights (float32) and expert ids (int32): with impl="pallas" at decode size one routing kernel
    (kernels/moe_routing.py), else the same math in XLA on the summed logits."""
    if impl == "pallas" and parts.shape[1] <= ROUTE_ROWS:
        return moe_routing.route(parts, bias, rule)
    return route_reference(sum_parts(parts), bias, rule)


def route_beside_shared(x: jnp.ndarray,  # [N, hidden]
                        router: jnp.ndarray,  # [hidden, E]
                        bias: jnp.ndarray | None,  # [E] float32 (noaux_tc) or None
                        rule: RoutingRule,
                        shared: tuple[Linear, Linear],  # the shared experts' gate and up: w [hidden, f]
                        block, counters: jnp.ndarray):  # [C] int32 arrival counters (zeros)
    """Decode with impl="pallas": the router and the shared experts' gate/up in one grouped launch, whose router
    program that finishes last routes the rows (kernels/moe_routing.py, `routing_epilogue`) while the shared
    experts' programs still stream: the two launches of `router_partials` and `route` cost nothing of their own.
    -> (weights [N, k] float32, ids [N, k] int32, the shared SwiGLU [1, N, f], the counters after the launch), or
    None where the router does not fit the launch (`route` then runs as before)."""
    n, e = x.shape[0], router.shape[1]
    router_product = _router_product(x, router)
    if router_product is None or not moe_routing.epilogue_fits(rule, e):
        return None
    products = [router_product, gm.Product(x=x[None], ids=SINGLE, **stacked(*shared))]
    (_, mid), (weights, index), counters = gm.grouped_matvecs(
        products, block=block, finish=False, counters=counters,
        epilogue=moe_routing.routing_epilogue(0, bias, rule, n, e))
    return weights, index, mid, counters


def experts_gathered(x: jnp.ndarray,  # [N, hidden]
                     index: jnp.ndarray,  # [N, k] int32
                     weights: jnp.ndarray,  # [N, k] float32
                     gate: Linear, up: Linear, down: Linear,  # stacks: w [E, in, out]
                     block) -> jnp.ndarray:  # [N, hidden] float32
    """Each token multiplies by its k experts' weights, gathered (and dequantized) for it: decode's path."""

    def take(lin: Linear) -> jnp.ndarray:  # [N, k, in, out]
        picked = Linear(w=lin.w[index], scale=None if lin.scale is None else lin.scale[index])
        return weight(picked, block, x.dtype)

    g = jnp.einsum("nh,nkhf->nkf", x, take(gate))
    u = jnp.einsum("nh,nkhf->nkf", x, take(up))
    y = jnp.einsum("nkf,nkfh->nkh", jax.nn.silu(g) * u, take(down))
    return jnp.einsum("nkh,nk->nh", y.astype(jnp.float32), weights)


def experts_sorted(x: jnp.ndarray,  # [N, hidden]
                   index: jnp.ndarray,  # [N, k] int32
                   weights: jnp.ndarray,  # [N, k] float32
                   gate: Linear, up: Linear, down: Linear,
                   block) -> jnp.ndarray:  # [N, hidden] float32
    """Token-expert pairs sorted by expert, then one grouped (ragged) matmul per projection: prefill's path."""
    n, k = index.shape
    num_experts = gate.w.shape[0]
    flat = index.reshape(-1)  # [N * k]
    order = jnp.argsort(flat, stable=True)
    expert_of_row = flat[order]
    token_of_row = order // k
    group_sizes = jnp.bincount(flat, length=num_experts).astype(jnp.int32)
    rows = x[token_of_row]  # [N * k, hidden]

    def grouped(inputs, lin: Linear):
        out = fp8_matmul.ragged_matmul(inputs, lin.w, group_sizes, lin.scale, block, expert_of_row)
        return out.astype(x.dtype)

    h = jax.nn.silu(grouped(rows, gate)) * grouped(rows, up)
    y = grouped(h, down).astype(jnp.float32) * weights.reshape(-1)[order][:, None]
    return jnp.zeros((n, x.shape[-1]), jnp.float32).at[token_of_row].add(y)


def experts_tiled(x: jnp.ndarray,  # [N, hidden]
                  index: jnp.ndarray,  # [N, k] int32
                  weights: jnp.ndarray,  # [N, k] float32
                  gate: Linear, up: Linear, down: Linear,
                  block, tile: int | None = None, chunk: int = 8, impl: str = "xla") -> jnp.ndarray:  # [N, hidden] f32
    """Prefill's path: token-expert pairs sorted by expert and padded to whole tiles of `tile` rows, each tile owned
    by one expert; tiles are multiplied `chunk` at a time against their experts' (gathered, dequantized) weights.

    Every used expert's weights are read about once per tile it owns (one tile per expert at typical loads), the
    dequantized copies live `chunk` tiles at a time, and no expert is visited that no token chose. (XLA's GPU
    lowering of jax.lax.ragged_dot materializes the product against every expert, hence not `experts_sorted`.)
    impl="pallas": the grouped kernel runs every tile as one group of rows, reading its expert's tiles of weight in
    place (the gathered copies were most of a DeepSeek-V2-Lite prefill: 31 of its 80 ms, docs/PERF.md session 17);
    the tiles past the last used one read nothing."""
    n, k = index.shape
    num_experts, hidden, _ = gate.w.shape
    pairs = n * k
    if tile is None:
        tile = int(min(64, max(8, 1 << max(0, (pairs // num_experts - 1).bit_length()))))
    n_tiles = -(-pairs // tile) + min(num_experts, pairs)  # static bound on sum_e ceil(count_e / tile)
    n_tiles = -(-n_tiles // chunk) * chunk
    flat = index.reshape(-1)
    order = jnp.argsort(flat, stable=True)
    expert_sorted = flat[order]
    counts = jnp.bincount(flat, length=num_experts)
    padded = -(-counts // tile) * tile
    padded_end = jnp.cumsum(padded)
    dest = (padded_end - padded)[expert_sorted] + jnp.arange(pairs) - (jnp.cumsum(counts) - counts)[expert_sorted]
    slots = n_tiles * tile
    row_token = jnp.full((slots,), n, jnp.int32).at[dest].set((order // k).astype(jnp.int32))  # n: an empty row
    row_weight = jnp.zeros((slots,), jnp.float32).at[dest].set(weights.reshape(-1)[order])
    tile_expert = jnp.minimum(jnp.searchsorted(padded_end, jnp.arange(n_tiles) * tile, side="right"),
                              num_experts - 1).astype(jnp.int32)
    rows = jnp.concatenate([x, jnp.zeros((1, hidden), x.dtype)])[row_token].reshape(n_tiles, tile, hidden)
    if impl == "pallas" and tile <= gm.GROUP_ROWS and grouped_tiles(gate, block) and grouped_tiles(down, block):
        used = jnp.arange(n_tiles) * tile < padded_end[-1]
        ys = _tiles_grouped(rows, jnp.where(used, tile_expert, -1), gate, up, down, block)
    else:
        ys = jax.lax.map(functools.partial(_tiles_chunk, gate, up, down, block),
                         (rows.reshape(-1, chunk, tile, hidden), tile_expert.reshape(-1, chunk)))
    ys = ys.reshape(slots, hidden).astype(jnp.float32) * row_weight[:, None]
    return jnp.zeros((n + 1, hidden), jnp.float32).at[row_token].add(ys)[:n]


def _tiles_chunk(gate: Linear, up: Linear, down: Linear, block, args) -> jnp.ndarray:
    """A chunk of tiles xs [chunk, tile, hidden] against their experts ids [chunk] (gathered, dequantized)."""
    xs, ids = args

    def take(lin: Linear) -> jnp.ndarray:  # [chunk, in, out] in xs' dtype
        return weight(Linear(w=lin.w[ids], scale=None if lin.scale is None else lin.scale[ids]), block, xs.dtype)

    h = jax.nn.silu(jnp.einsum("cth,chf->ctf", xs, take(gate))) * jnp.einsum("cth,chf->ctf", xs, take(up))
    return jnp.einsum("ctf,cfh->cth", h, take(down))


def _tiles_grouped(rows: jnp.ndarray,  # [T, tile, hidden]
                   ids: jnp.ndarray,  # [T] int32: each tile's expert (negative: an empty tile, zeros)
                   gate: Linear, up: Linear, down: Linear, block) -> jnp.ndarray:  # [T, tile, hidden]
    """Every tile one group of the grouped kernel: gate/up with the SwiGLU epilogue, then down."""
    (mid,) = gm.grouped_matvecs([gm.Product(x=rows, ids=ids, **stacked(gate, up))], block=block)
    (y,) = gm.grouped_matvecs([gm.Product(x=mid, ids=ids, **stacked(down))], block=block)
    return y


def experts_pallas(x: jnp.ndarray,  # [N, hidden]
                   index: jnp.ndarray,  # [N, k] int32
                   weights: jnp.ndarray,  # [N, k] float32
                   routed: tuple[Linear, Linear, Linear],  # gate, up, down stacks: w [E, in, out]
                   shared: tuple[Linear, Linear, Linear] | None,  # the shared experts' gate, up, down: w [in, out]
                   block) -> tuple[jnp.ndarray, jnp.ndarray | None] | None:
    """Decode's path with impl="pallas": each token-expert pair is one group of the grouped matvec kernel, which
    reads its expert's weights in place, the shared expert beside them in the same launches (gate and up with the
    SwiGLU epilogue in one, then down). Returns (routed [N, hidden] float32, shared [N, hidden] in x's dtype or
    None), or None when the shapes do not tile."""
    n, k = index.shape
    gate, up, down = routed
    h = gate.w.shape[1]
    if not all(grouped_tiles(lin, block) for lin in (gate, down, *(() if shared is None else shared))):
        return None
    if shared is not None and any(lin.b is not None for lin in shared):
        return None
    ids = jnp.where(weights != 0, index, -1).reshape(n * k)  # a pair of another expert shard (ep) reads nothing
    y, shared_y = expert_launches(x, ids, routed, shared, block)  # [N * k, 1, hidden], [1, N, hidden]
    routed_out = jnp.einsum("nkh,nk->nh", y.reshape(n, k, h).astype(jnp.float32), weights)
    return routed_out, (None if shared_y is None else shared_y[0])


def expert_launches(x: jnp.ndarray,  # [N, hidden]
                    ids: jnp.ndarray,  # [N * k] int32: pair i is token i // k (negative: skipped, zeros)
                    routed: tuple[Linear, Linear, Linear],
                    shared: tuple[Linear, Linear, Linear] | None,
                    block, *, group_weights: jnp.ndarray | None = None, shared_dtype=None, finish: bool = True,
                    shared_mid: jnp.ndarray | None = None):
    """The grouped kernel's two launches for a MoE block: gate/up with the SwiGLU epilogue (each pair reading its
    token's row in place), then down; the shared expert beside the routed pairs in both, or in down only when its
    SwiGLU `shared_mid` [1, N, f] is given (`route_beside_shared`). group_weights [N * k] weighs each pair's down
    output in the kernel (float32); finish=False leaves K-split sums to the caller.
    Returns (routed [N * k, 1, hidden] or its sums [S, N * k, 1, hidden], shared [1, N, hidden] (or its sums) in
    shared_dtype, default x's dtype, or None)."""
    gate, up, down = routed
    first = [gm.Product(x=x[:, None, :], ids=ids, **stacked(gate, up))]
    if shared is not None and shared_mid is None:
        first.append(gm.Product(x=x[None], ids=SINGLE, **stacked(shared[0], shared[1])))
    mid = gm.grouped_matvecs(first, block=block)  # [N * k, 1, f] (and the shared [1, N, f_shared])
    second = [gm.Product(x=mid[0], ids=ids, group_weights=group_weights, **stacked(down))]
    if shared is not None:
        second.append(gm.Product(x=mid[1] if shared_mid is None else shared_mid, ids=SINGLE, out_dtype=shared_dtype,
                                 **stacked(shared[2])))
    ys = gm.grouped_matvecs(second, block=block, finish=finish)
    return ys[0], (ys[1] if shared is not None else None)


def experts(x, index, weights, routed: tuple[Linear, Linear, Linear], shared: tuple[Linear, Linear, Linear] | None,
            block, impl: str = "xla") -> tuple[jnp.ndarray, jnp.ndarray | None]:
    """The routed experts' weighted sum [N, hidden] float32 and the shared experts' output [N, hidden] in x's dtype
    (None without shared experts). The routed path is picked by the (static) number of token-expert pairs: gathering
    reads N * k expert matrices, the sorted grouped matmul reads each of the E experts once."""
    n, k = index.shape
    gate, up, down = routed
    if impl == "pallas" and n * k <= min(64, gate.w.shape[0]):
        out = experts_pallas(x, index, weights, routed, shared, block)
        if out is not None:
            return out
    if n * k <= gate.w.shape[0]:
        out = experts_gathered(x, index, weights, gate, up, down, block)
    else:
        out = experts_tiled(x, index, weights, gate, up, down, block, impl=impl)
    return out, None if shared is None else shared_expert(x, shared, block, impl)


def shared_expert(x, shared: tuple[Linear, Linear, Linear], block, impl: str = "xla") -> jnp.ndarray:
    """The shared experts' output [N, hidden] in x's dtype: down(silu(gate(x)) * up(x)), in launches of its own."""
    return linear(swiglu(x, shared[0], shared[1], block, impl), shared[2], block, impl)


def local_experts(index: jnp.ndarray,  # [N, k] int32 global expert ids
                  weights: jnp.ndarray,  # [N, k] float32
                  num_local: int, shard: jnp.ndarray) -> tuple[jnp.ndarray, jnp.ndarray]:
    """The pairs in terms of the experts shard `shard` holds (ids shard * num_local ...): a pair routed elsewhere
    keeps a valid local id and a zero weight, so it adds nothing (and the grouped kernel skips it)."""
    local = index - shard * num_local
    mine = (local >= 0) & (local < num_local)
    return jnp.where(mine, local, 0).astype(jnp.int32), jnp.where(mine, weights, 0.0)
