"""Lowers a dense preset's fused decode step for an H200 on a machine without one: the Mosaic GPU and Triton kernels
go through their JAX lowering (Mosaic GPU's layout inference included), so a kernel change that cannot lower fails
here in seconds, before any device time is spent. Nothing is compiled to PTX or run.

    python scripts/lower_for_gpu.py --preset llama-3.2-1b --layers 3 --ops qkv,attention,o,gate_up,down,layer

--ops sets $TILERT_PALLAS_OPS for the trace (default: the models' own choice for an H200). The step is traced with
abstract parameters (no weights are made) while `jax.devices` reports a Hopper GPU of 132 multiprocessors.
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import os
import sys
import unittest.mock

import jax
import jax.numpy as jnp


class Hopper:
    """What the kernels ask of a device to pick their Hopper paths."""
    platform = "gpu"
    device_kind = "NVIDIA H200"
    compute_capability = "9.0"
    core_count = 132


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--preset", default="llama-3.2-1b")
    parser.add_argument("--layers", type=int, default=3)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--max-len", type=int, default=1280)
    parser.add_argument("--ops", help="the fused ops in Pallas ($TILERT_PALLAS_OPS)")
    args = parser.parse_args(argv)
    if args.ops:
        os.environ["TILERT_PALLAS_OPS"] = args.ops
    with unittest.mock.patch("jax.devices", lambda *_: [Hopper()]):
        from tilert_jax.config import preset
        from tilert_jax.models import dense
        from tilert_jax.params import abstract_params

        config = dataclasses.replace(preset(args.preset), num_layers=args.layers)
        if config.family != "dense":
            raise SystemExit(f"--preset {args.preset}: only dense presets are lowered here")
        params = abstract_params(dense.param_specs(config), jnp.bfloat16)
        cache = jax.eval_shape(lambda: dense.init_cache(config, args.batch, args.max_len, jnp.bfloat16))
        tokens, pos = jax.ShapeDtypeStruct((args.batch,), jnp.int32), jax.ShapeDtypeStruct((), jnp.int32)
        traced = jax.jit(lambda p, t, c, q: dense.decode_step(config, p, t, c, q, impl="pallas")).trace(
            params, tokens, cache, pos)
        kernels = collections.Counter(e.params["name"] for e in traced.jaxpr.eqns if "name" in e.params)
        lowered = traced.lower(lowering_platforms=("cuda",))
    print(f"{args.preset} ({args.layers} layers, batch {args.batch}): lowered for cuda, {len(lowered.as_text())} "
          f"characters of StableHLO; kernels " + ", ".join(f"{k} x{n}" for k, n in sorted(kernels.items())))
    return 0


if __name__ == "__main__":
    sys.exit(main())
