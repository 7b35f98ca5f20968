"""Device time of a MoE layer's routing at decode, the ways it can run beside the shared experts' gate/up (bf16,
one token row, random weights):

- "two launches": the router in the grouped kernel (split sums) then the routing kernel, the shared gate/up apart;
- "beside": the router and the shared gate/up in one launch, the routing in its own launch after;
- "epilogue": the same launch with the routing as its epilogue (moe.route_beside_shared), at the default K splits
  and at (router, shared gate/up) splits given per product (uneven K ranges where a split does not divide the tiles);
- "epilogue, routed after": that launch, then the routed experts' gate/up in its own launch (the chosen experts'
  ids from the routing);
- "routed waiting": one launch for all three, the routed programs waiting for the routing's ids
  (moe.route_beside_shared(..., routed=)), at the default splits and at (router, shared, routed) splits.

    python scripts/gpu/probe_router_launch.py --preset deepseek-v2-lite [--copies 4] [--out FILE]

`--copies` distinct layers' weights are used in turn (more bytes than L2 holds, as in a decode step). Prints one
JSON line per way with its kernels' busy time per layer.
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

from tilert_jax.bench import bench_config
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import moe_routing
from tilert_jax.kernels.common import zero_counters
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import SINGLE, Linear, stacked
from tilert_jax.profiling import emit, trace_gpu_kernels


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--copies", type=int, default=4)
    parser.add_argument("--out")
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    config = bench_config(args.preset)
    hidden, e = config.hidden_size, config.n_routed_experts
    fe = config.moe_intermediate_size
    f = fe * config.n_shared_experts
    rule = moe.routing_rule(config)
    keys = iter(jax.random.split(jax.random.key(0), 5 * args.copies + 1))

    def normal(shape, scale=0.02):
        return (jax.random.normal(next(keys), shape) * scale).astype(jnp.bfloat16)

    layers = [(normal((hidden, e)), Linear(w=normal((hidden, f))), Linear(w=normal((hidden, f))),
               Linear(w=normal((e, hidden, fe))), Linear(w=normal((e, hidden, fe)))) for _ in range(args.copies)]
    bias = jnp.zeros((e,), jnp.float32) if rule.method == "noaux_tc" else None
    x = normal((1, hidden), 1.0)
    jax.block_until_ready(layers)

    def two_launches(x_, layer):
        router, gate, up = layer[:3]
        weights, index = moe.route(moe.router_partials(x_, router, "pallas"), bias, rule, "pallas")
        return weights, index, gm.grouped_matvecs([gm.Product(x=x_[None], ids=SINGLE, **stacked(gate, up))])[0]

    def launch(x_, layer, cfg, with_epilogue):
        router, gate, up = layer[:3]
        products = [gm.Product(x=x_[None], w=router[None], ids=SINGLE, out_dtype=jnp.float32),
                    gm.Product(x=x_[None], ids=SINGLE, **stacked(gate, up))]
        counters = zero_counters(4096)
        if with_epilogue:
            epilogue = moe_routing.routing_epilogue(0, bias, rule, 1, e)
            return gm.grouped_matvecs(products, config=cfg, finish=False, counters=counters, epilogue=epilogue)
        (parts, mid), counters = gm.grouped_matvecs(products, config=cfg, finish=False, counters=counters)
        return moe.route(parts.reshape(-1, 1, e), bias, rule, "pallas"), mid, counters

    def routed_after(x_, layer):
        weights, index, mid, _, _ = moe.route_beside_shared(x_, layer[0], bias, rule, layer[1:3], None,
                                                            zero_counters(4096))
        routed = gm.Product(x=x_[:, None, :], ids=index.reshape(-1), **stacked(*layer[3:]))
        return weights, mid, gm.grouped_matvecs([routed])[0]

    def routed_waiting(x_, layer, cfg):
        router, gate, up, rgate, rup = layer
        products = [gm.Product(x=x_[None], w=router[None], ids=SINGLE, out_dtype=jnp.float32),
                    gm.Product(x=x_[None], ids=SINGLE, **stacked(gate, up)),
                    gm.Product(x=x_[:, None, :], ids=gm.EpilogueIds(1, rule.top_k), **stacked(rgate, rup))]
        return gm.grouped_matvecs(products, config=cfg, finish=False, counters=zero_counters(4096),
                                  epilogue=moe_routing.routing_epilogue(0, bias, rule, 1, e))

    def measure(name, fn, **fields):
        run = jax.jit(lambda x_, ls: [fn(x_, layer) for layer in ls])
        row = {"preset": args.preset, "way": name, **fields}
        try:
            jax.block_until_ready(run(x, layers))
            summary = trace_gpu_kernels(lambda: [jax.block_until_ready(run(x, layers)) for _ in range(5)],
                                        5 * args.copies)
            row.update(us=round(summary["busy_us_per_step"], 2),
                       kernels=[(k["name"], round(k["us_per_step"], 2)) for k in summary["kernels"][:4]])
        except Exception as err:  # a split that does not compile
            row["error"] = str(err)[:200]
        emit(row, sink)

    measure("two launches", two_launches)
    measure("beside", lambda x_, layer: launch(x_, layer, None, False))
    measure("epilogue", lambda x_, layer: launch(x_, layer, None, True), splits="default")
    for bk, splits in ((128, (2, 2)), (128, (8, 3)), (64, (8, 3))):
        cfg = gm.GroupedConfig(bk=bk, splits=splits)
        measure("epilogue", lambda x_, layer, cfg=cfg: launch(x_, layer, cfg, True), bk=bk, splits=splits)
    measure("epilogue, routed after", routed_after)
    measure("routed waiting", lambda x_, layer: routed_waiting(x_, layer, None), splits="default")
    for bk, splits in ((128, (2, 2, 1)), (128, (8, 1, 1)), (128, (8, 2, 1)), (128, (8, 3, 1)), (128, (8, 3, 2)),
                       (64, (8, 3, 1))):
        cfg = gm.GroupedConfig(bk=bk, splits=splits)
        measure("routed waiting", lambda x_, layer, cfg=cfg: routed_waiting(x_, layer, cfg), bk=bk, splits=splits)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
