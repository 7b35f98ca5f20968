"""Device time of every grouped-kernel launch of one DeepSeek decode step (models/deepseek_decode.py, impl="pallas")
over the grouped kernel's launch parameters (`moe_grouped_matvec.GroupedConfig`), at a preset's shapes or at one
device's share of a tp mesh (`--slice-of`, bench.tp_slice).

    python scripts/gpu/probe_decode_launches.py --preset deepseek-v3.2-exp --slice-of 8 [--launch 0,3] [--out F]

The launches are recorded from the step itself: the step is traced abstractly with `grouped_matvecs` wrapped, and
each distinct launch (its products' shapes and dtypes, its block, whether it finishes its split sums) is rebuilt
from fresh random inputs: FP8 weights of random finite bits, positive scales, the routed pairs on spread experts.
An epilogue (the router's routing) is left out; the counters stay. `--copies` distinct weights are used in turn (more
bytes than L2 holds, as in a decode step). Prints one JSON line per launch and configuration with the launch's
tuning key (kernels/tuning.py `grouped_key`: a winner goes into kernels/tuning.json under it), busy time and bytes;
"default" is what the launch runs now (its table entry, else `default_config`'s choice).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp

from tilert_jax.bench import bench_config
from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels.common import zero_counters
from tilert_jax.kernels.tuning import grouped_key
from tilert_jax.models import deepseek_decode, family
from tilert_jax.params import init_params
from tilert_jax.profiling import emit, kernel_time, probe_parser

FIELDS = ("fma", "bn", "bk", "num_warps", "num_stages", "split")
GRID = [dict(zip(FIELDS, c)) for c in itertools.product((True,), (64, 128), (32, 64), (4, 8), (4,), (4, 8))]
GRID += [dict(zip(FIELDS, c)) for c in itertools.product((True,), (64, 128), (128,), (8,), (4,), (4, 8))]
GRID += [dict(zip(FIELDS, c)) for c in itertools.product((False,), (64, 128), (128,), (4,), (4,), (4, 8))]


def recorded_launches(config) -> list[tuple[list[dict], dict]]:
    """The distinct grouped launches of one decode step: (per product its fields as ShapeDtypeStructs or values,
    the call's keyword arguments as given, counters and epilogue as booleans)."""
    fam = family(config)
    params = jax.eval_shape(lambda: init_params(fam.param_specs(config), jax.random.key(0), jnp.bfloat16))
    cache = jax.eval_shape(lambda: fam.init_cache(config, 1, 1280, jnp.bfloat16))
    seen, launches = set(), []
    real = gm.grouped_matvecs

    def record(products, **kw):
        fields = [{f.name: _abstract(getattr(p, f.name)) for f in dataclasses.fields(p)} for p in products]
        call = {**kw, "counters": kw.get("counters") is not None, "epilogue": kw.get("epilogue") is not None}
        key = repr((fields, sorted(call.items())))
        if key not in seen:
            seen.add(key)
            launches.append((fields, call))
        return real(products, **kw)

    gm.grouped_matvecs = record
    try:
        tokens = jax.ShapeDtypeStruct((1,), jnp.int32)
        jax.eval_shape(lambda p, t, c: deepseek_decode.decode_step(config, p, t, c, jnp.int32(1024)), params,
                       tokens, cache)
    finally:
        gm.grouped_matvecs = real
    return launches


def _abstract(value):
    return jax.ShapeDtypeStruct(value.shape, value.dtype) if isinstance(value, jax.Array | jax.ShapeDtypeStruct) \
        else value


def _fresh(fields: dict, key) -> dict:
    """Random arrays of the recorded shapes (a Product's array fields): ids spread over the stack's experts."""
    out = {}
    for name, value in fields.items():
        key, sub = jax.random.split(key)
        if not isinstance(value, jax.ShapeDtypeStruct):
            continue
        if name == "ids":
            experts = fields["w"].shape[0]
            out[name] = jnp.arange(value.shape[0], dtype=jnp.int32) * 37 % experts
        elif value.dtype == jnp.float8_e4m3fn:  # finite: the top exponent bit cleared
            bits = jax.random.bits(sub, value.shape, jnp.uint8) & jnp.uint8(0xB7)
            out[name] = jax.lax.bitcast_convert_type(bits, jnp.float8_e4m3fn)
        elif name.startswith("scale") or name == "group_weights":
            out[name] = jax.random.uniform(sub, value.shape, jnp.float32, 0.5, 1.0) * 1e-2
        else:
            out[name] = (jax.random.normal(sub, value.shape) * 0.02).astype(value.dtype)
    return out


def _bytes(fields: list[dict]) -> int:
    """The weight bytes a launch reads: its groups' experts (one each) of every weight and scale."""
    total = 0
    for f in fields:
        groups = f["ids"].shape[0] if isinstance(f["ids"], jax.ShapeDtypeStruct) else 1
        for name in ("w", "w2", "scale", "scale2"):
            if isinstance(f.get(name), jax.ShapeDtypeStruct):
                total += groups * f[name].size // f[name].shape[0] * f[name].dtype.itemsize
    return total


def _launch_shapes(fields: list[dict]) -> tuple[list[tuple[int, int, int, bool]], list[bool], int]:
    """A recorded launch's products as `launch_config` takes them: (groups, K, N, fp8) each, SwiGLU each, the rows."""
    return ([(f["ids"].shape[0], *f["w"].shape[1:], f["scale"] is not None) for f in fields],
            [f["w2"] is not None for f in fields], max(f["x"].shape[1] for f in fields))


def _effective(fields: list[dict], block, cfg: gm.GroupedConfig | None) -> tuple:
    """What a configuration (None: the launch's own, `launch_config`) makes of a launch: each product's (bk, bn,
    K split), the warps, stages and fma."""
    shapes, swiglus, batch = _launch_shapes(fields)
    cfg, exact = gm.launch_config(shapes, swiglus, batch, block, cfg)
    tiles = [gm.tiles(k, n, block if fp8 else None, cfg) for _, k, n, fp8 in shapes]
    return (tuple((bk, bn, gm.product_split(k, bk, cfg, exact)) for (_, k, _, _), (bk, bn) in zip(shapes, tiles)),
            cfg.num_warps, cfg.num_stages, cfg.fma)


def main(argv=None) -> int:
    parser = probe_parser(__doc__, copies=8)
    parser.add_argument("--preset", default="deepseek-v3.2-exp")
    parser.add_argument("--slice-of", type=int, default=1)
    parser.add_argument("--launch", help="comma-separated launch numbers (default: all)")
    args = parser.parse_args(argv)
    sink = open(args.out, "a") if args.out else None
    config = bench_config(args.preset, 2, 1, args.slice_of)  # one dense layer and one MoE layer: every launch kind
    launches = recorded_launches(config)
    chosen = range(len(launches)) if not args.launch else map(int, args.launch.split(","))
    for i in chosen:
        fields, call = launches[i]
        kw = {k: v for k, v in call.items() if k not in ("counters", "epilogue", "config")}
        copies = [[_fresh(f, jax.random.key(100 * c + j)) for j, f in enumerate(fields)] for c in range(args.copies)]
        jax.block_until_ready(copies)
        shapes, swiglus, batch = _launch_shapes(fields)
        key = grouped_key(batch, [(*shape, swiglu) for shape, swiglu in zip(shapes, swiglus)])
        measured = set()
        for grid_fields in [None, *GRID]:
            cfg = None if grid_fields is None else gm.GroupedConfig(**grid_fields)
            effective = _effective(fields, kw.get("block"), cfg)
            if cfg is not None and effective in measured:
                continue  # the same tiles and splits as a configuration measured already
            measured.add(effective)

            def launch(arrays, cfg=cfg):  # arrays: per product its array fields; the others as recorded
                products = [gm.Product(**{**f, **a}) for f, a in zip(fields, arrays)]
                counters = zero_counters(deepseek_decode.ARRIVAL_COUNTERS) if call["counters"] else None
                return gm.grouped_matvecs(products, config=cfg, counters=counters, **kw)

            run = jax.jit(lambda cs, launch=launch: [launch(arrays) for arrays in cs])
            emit({"preset": args.preset, "slice_of": args.slice_of, "launch": i, "key": key,
                  "finish": call.get("finish", True), "counters": call["counters"], "epilogue_left_out":
                  call["epilogue"], "mb": round(_bytes(fields) / 1e6, 2), **(grid_fields or {"config": "default"}),
                  **kernel_time(lambda: run(copies), args.copies)}, sink)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
