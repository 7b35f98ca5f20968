"""Device time of a MoE layer's routing at decode, the ways it can run beside the shared experts' gate/up (bf16,
one token row, random weights):

- "two launches": the router in the grouped kernel (split sums) then the routing kernel, the shared gate/up apart;
- "beside": the router and the shared gate/up in one launch, the routing in its own launch after;
- "epilogue": the same launch with the routing as its epilogue (moe.route_beside_shared), at K splits 1 to 8.

    python scripts/gpu/probe_router_launch.py --preset deepseek-v2-lite [--copies 8] [--out FILE]

`--copies` distinct shared weights are used in turn (more bytes than L2 holds, as in a decode step). Prints one JSON
line per way with its kernels' busy time per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.bench import bench_config
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import moe_routing
from tilert_jax.kernels.common import zero_counters
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import SINGLE, Linear, stacked
from tilert_jax.profiling import emit, kernel_time, probe_parser, random_bf16


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=8)
    parser.add_argument("--preset", default="deepseek-v2-lite")
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    config = bench_config(args.preset)
    hidden, e = config.hidden_size, config.n_routed_experts
    f = config.moe_intermediate_size * config.n_shared_experts
    rule = moe.routing_rule(config)
    normal = random_bf16()

    layers = [(normal((hidden, e)), Linear(w=normal((hidden, f))), Linear(w=normal((hidden, f))))
              for _ in range(args.copies)]
    bias = jnp.zeros((e,), jnp.float32) if rule.method == "noaux_tc" else None
    x = normal((1, hidden), 1.0)
    jax.block_until_ready(layers)

    def two_launches(x_, layer):
        router, gate, up = layer
        weights, index = moe.route(moe.router_partials(x_, router, "pallas"), bias, rule, "pallas")
        return weights, index, gm.grouped_matvecs([gm.Product(x=x_[None], ids=SINGLE, **stacked(gate, up))])[0]

    def launch(x_, layer, split, with_epilogue):
        router, gate, up = layer
        products = [gm.Product(x=x_[None], w=router[None], ids=SINGLE, out_dtype=jnp.float32),
                    gm.Product(x=x_[None], ids=SINGLE, **stacked(gate, up))]
        cfg = None if split is None else gm.GroupedConfig(split=split)
        counters = zero_counters(4096)
        if with_epilogue:
            epilogue = moe_routing.routing_epilogue(0, bias, rule, 1, e)
            return gm.grouped_matvecs(products, config=cfg, finish=False, counters=counters, epilogue=epilogue)
        (parts, mid), counters = gm.grouped_matvecs(products, config=cfg, finish=False, counters=counters)
        return moe.route(parts.reshape(-1, 1, e), bias, rule, "pallas"), mid, counters

    def measure(name, fn, **fields):
        run = jax.jit(lambda x_, ls: [fn(x_, layer) for layer in ls])
        emit({"preset": args.preset, "way": name, **fields, **kernel_time(lambda: run(x, layers), args.copies)},
             sink)

    measure("two launches", two_launches)
    measure("beside", lambda x_, layer: launch(x_, layer, None, False))
    for split in (None, 1, 2, 4, 8):
        measure("epilogue", lambda x_, layer, split=split: launch(x_, layer, split, True), split=split or "default")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
