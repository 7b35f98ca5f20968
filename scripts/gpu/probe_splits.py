"""Device time of a DeepSeek decode step's plain grouped launches at their default K split and at other splits: q
beside kv_a, o_proj, and the routed experts' down beside the shared experts' down (bf16, one token row, random
weights, partial sums left to the consumer as the fused decode leaves them).

    python scripts/gpu/probe_splits.py --preset deepseek-v2-lite [--copies 4] [--out FILE]

`--copies` distinct layers' weights are used in turn (more bytes than L2 holds, as in a decode step). Prints one
JSON line per launch and split with its kernels' busy time per layer.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.bench import bench_config
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.models.deepseek_linear import SINGLE
from tilert_jax.profiling import emit, kernel_time, probe_parser, random_bf16

SPLITS = {"q_kv_a": [2, 4, 8], "o": [4, 8, 16], "down": []}  # (down: K = 1408 is 11 tiles, no split divides it)


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=4)
    parser.add_argument("--preset", default="deepseek-v2-lite")
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    c = bench_config(args.preset)
    hidden, fe, k = c.hidden_size, c.moe_intermediate_size, c.num_experts_per_tok
    q_out = c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
    kv_out = c.kv_lora_rank + c.qk_rope_head_dim
    o_in = c.num_heads * c.v_head_dim
    normal = random_bf16()

    x = normal((1, hidden), 1.0)
    ids = jnp.arange(k, dtype=jnp.int32) * 7 % c.n_routed_experts
    shared_f = fe * c.n_shared_experts
    weights = {  # name -> (the weights of one layer's launch, the launch's products from them)
        "q_kv_a": (lambda: (normal((1, hidden, q_out)), normal((1, hidden, kv_out))),
                   lambda ws: [gm.Product(x=x[None], w=ws[0], ids=SINGLE), gm.Product(x=x[None], w=ws[1], ids=SINGLE)]),
        "o": (lambda: (normal((1, 1, o_in), 1.0), normal((1, o_in, hidden))),
              lambda ws: [gm.Product(x=ws[0], w=ws[1], ids=SINGLE)]),
        "down": (lambda: (normal((k, 1, fe), 1.0), normal((c.n_routed_experts, fe, hidden)),
                          normal((1, 1, shared_f), 1.0), normal((1, shared_f, hidden))),
                 lambda ws: [gm.Product(x=ws[0], w=ws[1], ids=ids, group_weights=jnp.full((k,), 0.1, jnp.float32)),
                             gm.Product(x=ws[2], w=ws[3], ids=SINGLE, out_dtype=jnp.float32)]),
    }
    for name, (make, products) in weights.items():
        layers = [make() for _ in range(args.copies)]
        jax.block_until_ready(layers)
        for split in [None, *SPLITS[name]]:
            cfg = None if split is None else gm.GroupedConfig(split=split)
            run = jax.jit(lambda ls, cfg=cfg, products=products: [
                gm.grouped_matvecs(products(ws), config=cfg, finish=False) for ws in ls])
            emit({"preset": args.preset, "launch": name, "split": split or "default",
                  **kernel_time(lambda: run(layers), args.copies)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
