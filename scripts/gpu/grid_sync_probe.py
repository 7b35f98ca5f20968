"""What a grid barrier costs against a kernel boundary, and whether it orders memory (kernels/grid_sync.py).

    python scripts/gpu/grid_sync_probe.py [--programs 128] [--phases 1,64,256]

The check is grid_sync.neighbour_exchange: each phase, every program writes one value and then reads the value a
neighbour wrote in the previous phase; a wrong value counts as a failure. Timed as one phased launch (barriers
between phases) and as the same phases launched separately inside one jitted function (kernel boundaries between
them); per-phase cost = the slope over phase counts of the median time per call of back-to-back calls. JSON lines on
stdout.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp

from tilert_jax.kernels.grid_sync import neighbour_exchange


def per_call_seconds(fn, reps=50):
    jax.block_until_ready(fn())
    jax.block_until_ready([fn() for _ in range(5)])
    start = time.perf_counter()
    jax.block_until_ready([fn() for _ in range(reps)])
    return (time.perf_counter() - start) / reps


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--programs", type=int, default=128)
    parser.add_argument("--phases", default="1,64,256")
    args = parser.parse_args()
    counts = [int(p) for p in args.phases.split(",")]
    for kind, one_launch in (("barrier", True), ("launch", False)):
        times = {}
        for phases in counts:
            fn = jax.jit(lambda phases=phases: neighbour_exchange(phases, args.programs, one_launch=one_launch,
                                                                  interpret=False))
            _, bad = fn()
            failures = int(jnp.sum(bad))
            times[phases] = per_call_seconds(fn)
            print(json.dumps({"probe": "grid_sync", "kind": kind, "programs": args.programs, "phases": phases,
                              "us_per_call": 1e6 * times[phases], "failures": failures}), flush=True)
        lo, hi = min(counts), max(counts)
        print(json.dumps({"probe": "grid_sync", "kind": kind, "programs": args.programs,
                          "us_per_phase": 1e6 * (times[hi] - times[lo]) / (hi - lo)}), flush=True)


if __name__ == "__main__":
    main()
