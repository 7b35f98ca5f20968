"""Device time of a DeepSeek MoE layer's three decode launches (bf16, one token row, random weights) over the
grouped kernel's launch parameters (bn, num_warps, num_stages, K split; `moe_grouped_matvec.GroupedConfig`):

- "shared": the shared experts' gate/up alone (the bytes of the router launch without the router);
- "router": the router beside the shared experts' gate/up, the routing as its epilogue (moe.route_beside_shared);
- "gate_up": the routed experts' gate/up (k groups reading the token's one row);
- "down": the routed experts' down, weighed, beside the shared experts' down.

    python scripts/gpu/probe_moe_configs.py --preset deepseek-v2-lite [--launch router,down] [--copies 8] [--out F]

`--copies` distinct layers' weights are used in turn (more bytes than L2 holds, as in a decode step). Prints one
JSON line per launch and configuration ("default": `default_config`'s choice) with its kernels' busy time per layer.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from tilert_jax.bench import bench_config
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import moe_routing
from tilert_jax.kernels.common import zero_counters
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import SINGLE
from tilert_jax.profiling import emit, kernel_time, probe_parser, random_bf16

FIELDS = ("bn", "num_warps", "num_stages", "split")
GRID = {  # launch: GroupedConfig fields of the configurations measured besides the default
    "shared": [dict(zip(FIELDS, c)) for c in itertools.product((32, 64), (4, 8), (2, 3, 4), (1, 2, 4))],
    "router": [dict(zip(FIELDS, c)) for c in itertools.product((32, 64), (4, 8), (2, 3, 4), (1, 2, 4))],
    "gate_up": [dict(zip(FIELDS, c)) for c in itertools.product((32, 64), (4, 8), (3, 4), (1, 2))],
    "down": [dict(zip(FIELDS, c)) for c in itertools.product((32, 64, 128), (4, 8), (3, 4), (1,))],
}


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=8)
    parser.add_argument("--preset", default="deepseek-v2-lite")
    parser.add_argument("--launch", default=",".join(GRID))
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    c = bench_config(args.preset)
    hidden, fe, k, e = c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok, c.n_routed_experts
    fs = fe * c.n_shared_experts
    rule = moe.routing_rule(c)
    bias = jnp.zeros((e,), jnp.float32) if rule.method == "noaux_tc" else None
    normal = random_bf16()
    x = normal((1, 1, hidden), 1.0)
    ids = jnp.arange(k, dtype=jnp.int32) * 7 % e

    def shared(ws):
        return [gm.Product(x=x, w=ws[0], w2=ws[1], ids=SINGLE)]

    def router(ws):
        return [gm.Product(x=x, w=ws[2], ids=SINGLE, out_dtype=jnp.float32), *shared(ws)]

    launches = {  # name -> (one layer's weights, the launch's products from them, its epilogue)
        "shared": (lambda: (normal((1, hidden, fs)), normal((1, hidden, fs))), shared, None),
        "router": (lambda: (normal((1, hidden, fs)), normal((1, hidden, fs)), normal((1, hidden, e))), router,
                   moe_routing.routing_epilogue(0, bias, rule, 1, e)),
        "gate_up": (lambda: (normal((e, hidden, fe)), normal((e, hidden, fe))),
                    lambda ws: [gm.Product(x=x, w=ws[0], w2=ws[1], ids=ids)], None),
        "down": (lambda: (normal((k, 1, fe), 1.0), normal((e, fe, hidden)), normal((1, 1, fs), 1.0),
                          normal((1, fs, hidden))),
                 lambda ws: [gm.Product(x=ws[0], w=ws[1], ids=ids, group_weights=jnp.full((k,), 0.1, jnp.float32)),
                             gm.Product(x=ws[2], w=ws[3], ids=SINGLE, out_dtype=jnp.float32)], None),
    }
    for name in args.launch.split(","):
        make, products, epilogue = launches[name]
        layers = [make() for _ in range(args.copies)]
        jax.block_until_ready(layers)
        for fields in [None, *GRID[name]]:
            config = None if fields is None else gm.GroupedConfig(**fields)

            def launch(ws, config=config, products=products, epilogue=epilogue):
                counters = zero_counters(4096) if epilogue is not None else None
                return gm.grouped_matvecs(products(ws), config=config, finish=False, counters=counters,
                                          epilogue=epilogue)

            run = jax.jit(lambda ls, launch=launch: [launch(ws) for ws in ls])
            emit({"preset": args.preset, "launch": name, **(fields or {"config": "default"}),
                  **kernel_time(lambda: run(layers), args.copies)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
