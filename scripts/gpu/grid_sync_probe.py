"""What a grid barrier costs against a kernel boundary, and whether it orders memory (kernels/grid_sync.py).

    python scripts/gpu/grid_sync_probe.py [--programs 128] [--phases 1,64,256]

Each phase, every program writes one value and then reads the value a neighbour wrote in the previous phase; a
wrong value counts as a failure. Timed as one phased launch (barriers between phases) and as the same phases
launched separately inside one jitted function (kernel boundaries between them); per-phase cost = the slope over
phase counts of the median time per call of back-to-back calls. JSON lines on stdout.
"""

import argparse
import json
import time

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.grid_sync import phased_call

SHIFT = 5


def body(programs):
    def run(phase, data_ref, bad_ref):  # data, bad: int32 [phases, programs]
        pid = pl.program_id(0)
        cell = (pl.ds(phase, 1), pl.ds(pid, 1))
        plt.store(data_ref.at[cell], jnp.full((1, 1), pid * 1000 + phase, jnp.int32))
        if phase == 0:
            plt.store(bad_ref.at[cell], jnp.zeros((1, 1), jnp.int32))
            return
        other = (pid + SHIFT) % programs
        seen = plt.load(data_ref.at[pl.ds(phase - 1, 1), pl.ds(other, 1)])
        plt.store(bad_ref.at[cell], (seen != other * 1000 + phase - 1).astype(jnp.int32))
    return run


def phased(phases, programs):
    shapes = [jax.ShapeDtypeStruct((phases, programs), jnp.int32)] * 2
    return jax.jit(lambda: phased_call(body(programs), phases, [], shapes, programs=programs, name="probe"))


def launches(phases, programs):
    """The same phases as separate launches, each reading the previous launch's output."""
    run = body(programs)

    def one(phase, data):
        def kernel(data_in, data_out, bad_out):
            del data_in  # aliased to data_out
            run(phase, data_out, bad_out)
        return pl.pallas_call(kernel, grid=(programs,), input_output_aliases={0: 0},
                              out_shape=[jax.ShapeDtypeStruct((phases, programs), jnp.int32)] * 2,
                              compiler_params=plt.CompilerParams(num_warps=4, num_stages=1))(data)

    @jax.jit
    def chain():
        data = jnp.zeros((phases, programs), jnp.int32)
        bads = []
        for phase in range(phases):
            data, bad = one(phase, data)
            bads.append(bad[phase])
        return data, jnp.stack(bads)
    return chain


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
    for kind, make in (("barrier", phased), ("launch", launches)):
        times = {}
        for phases in counts:
            fn = make(phases, args.programs)
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
