"""Device time of one bf16 decode product at a given shape, three ways: the grouped kernel over an [in, out] weight
(kernels/moe_grouped_matvec.py, DeepSeek's layout) at several tilings, the matvec kernel over the same weight stored
[out, in] (kernels/matvec.py, the dense models' layout), and XLA's dot on each layout.

    python scripts/gpu/probe_products.py --k 2048 --n 10944 [--swiglu] [--copies 4] [--out FILE]

`--swiglu` multiplies by two weights (gate and up, the SwiGLU epilogue). `--copies` distinct weights are used in
turn (more bytes than L2 holds, as in a decode step). Prints one JSON line per way and tiling, with the weight bytes
read per microsecond of kernel time.
"""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp

from tilert_jax.kernels import matvec as mv
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import swiglu_matvec as sw
from tilert_jax.profiling import emit, kernel_time, probe_parser


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=4)
    parser.add_argument("--k", type=int, required=True)
    parser.add_argument("--n", type=int, required=True)
    parser.add_argument("--swiglu", action="store_true")
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    k_dim, n_dim, mats = args.k, args.n, 2 if args.swiglu else 1
    keys = jax.random.split(jax.random.key(0), args.copies * mats + 1)
    w = [(jax.random.normal(keys[i], (k_dim, n_dim)) * 0.02).astype(jnp.bfloat16) for i in range(args.copies * mats)]
    pairs = [tuple(w[c * mats:(c + 1) * mats]) for c in range(args.copies)]  # [K, N] each
    pairs_t = [tuple(a.T for a in p) for p in pairs]  # [N, K] each
    x = (jax.random.normal(keys[-1], (1, k_dim)) * 0.1).astype(jnp.bfloat16)
    jax.block_until_ready((pairs, pairs_t))
    read = mats * k_dim * n_dim * 2

    def measure(name, fn, ws, **fields):
        run = jax.jit(lambda x_, ws_: [fn(x_, p) for p in ws_])
        row = {"k": k_dim, "n": n_dim, "swiglu": args.swiglu, "way": name, **fields}
        row.update(kernel_time(lambda: run(x, ws), args.copies))
        if "us" in row:
            row["tbps"] = round(read / row["us"] / 1e6, 3)
        emit(row, sink)

    def xla(x_, p, transposed):
        ys = [x_ @ (a.T if transposed else a) for a in p]
        return jax.nn.silu(ys[0]) * ys[1] if args.swiglu else ys[0]

    measure("xla [in, out]", lambda x_, p: xla(x_, p, False), pairs)
    measure("xla [out, in]", lambda x_, p: xla(x_, p, True), pairs_t)
    for bn, split, stages in itertools.product((32, 64, 128), (1, 2, 3, 4, 9), (3, 4)):
        cfg = gm.GroupedConfig(bn=bn, bk=128, split=split, num_warps=4, num_stages=stages)
        picked = gm.tiles(k_dim, n_dim, None, cfg)
        if picked is None or k_dim % (split * picked[0]):
            continue

        def grouped(x_, p, cfg=cfg):
            prod = gm.Product(x=x_[None], w=p[0][None], ids=jnp.zeros((1,), jnp.int32),
                              w2=p[1][None] if args.swiglu else None)
            return gm.grouped_matvecs([prod], config=cfg)[0]

        measure("grouped [in, out]", grouped, pairs, bn=bn, split=split, num_stages=stages)
    norm = jnp.ones((k_dim,), jnp.bfloat16)
    for bn, bk, split, mode in itertools.product((16, 32), (128, 256), (1, 2), ("dot", "fma")):
        cfg = mv.MatvecConfig(bn=bn, bk=bk, split=split, num_warps=4, num_stages=3, mode=mode)
        if k_dim % (split * bk) or n_dim % bn or (args.swiglu and split > 1):
            continue
        if args.swiglu:
            fn = lambda x_, p, cfg=cfg: sw.swiglu_matvec(x_, norm, 1e-6, p[0], p[1], config=cfg)  # noqa: E731
        else:
            fn = lambda x_, p, cfg=cfg: mv.matvec(x_, p[0], config=cfg)  # noqa: E731
        measure("matvec [out, in]", fn, pairs_t, bn=bn, bk=bk, split=split, mode=mode)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
