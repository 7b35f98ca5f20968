"""Grid-wide barriers inside one Pallas (Triton) kernel, and the phased launch built on them.

At batch 1 a decode layer is a chain of short, dependent steps (project, attend, project, ...). Launched as separate
kernels, each step pays a launch and a drain of the GPU; measured on the H200 that fixed cost, not bandwidth, is
what separates the 1B step from its floor. A persistent kernel instead launches no more programs than can be
resident at once and separates its phases by grid barriers: every program arrives on a global counter and waits
until all have.

`grid_barrier` is the barrier; `phased_call` runs a kernel body phase by phase: on a GPU as one launch with a
barrier between phases, in interpret mode (programs run one after another, so a barrier would never open) as one
launch per phase, each launch boundary standing in for the barrier. Every buffer a phase writes is an output of the
call, so both forms compute the same thing and the CPU tests check the phase bodies against their references.
"""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

from tilert_jax.kernels.common import interpret_default, triton_params

RESIDENT_PROGRAMS = 128  # programs of a phased kernel: <= the H200's 132 multiprocessors, so all are resident


def grid_barrier(count_ref, target) -> None:
    """Waits until `target` arrivals have been counted on count_ref (int32 [1], zero at launch).

    Barrier i of a kernel with P programs waits for target = (i + 1) * P. The CTA barrier before the arrival makes
    this program's stores precede it; the arrival (one thread, acquire-release at GPU scope) publishes them; the
    polls are atomic reads (acquire), and the CTA barrier after them holds every thread until the wait is over."""
    plt.debug_barrier()
    plt.atomic_add(count_ref, 0, jnp.int32(1))
    lax.while_loop(lambda seen: seen < target, lambda _: plt.atomic_add(count_ref, 0, jnp.int32(0)),
                   plt.atomic_add(count_ref, 0, jnp.int32(0)))
    plt.debug_barrier()


def phased_call(
    body: Callable,  # body(phase, *refs): one phase's work for program pl.program_id(0); refs = inputs + outputs
    num_phases: int,
    inputs: list[jax.Array],
    out_shape: list[jax.ShapeDtypeStruct],
    *,
    programs: int = RESIDENT_PROGRAMS,
    num_warps: int = 4,
    num_stages: int = 4,
    name: str = "phased",
    one_launch: bool = True,
    interpret: bool | None = None,
) -> list[jax.Array]:
    """Runs body's phases 0..num_phases-1 over `programs` programs, each phase after every program finished the
    previous one. Every element of every output must be written by some phase (on a GPU they start undefined).
    one_launch=False launches each phase separately (always so in interpret mode): what the barriers replace."""
    interpret = interpret_default() if interpret is None else interpret
    n_in, n_out = len(inputs), len(out_shape)
    if interpret or not one_launch:
        outs = [jnp.zeros(s.shape, s.dtype) for s in out_shape]
        for phase in range(num_phases):
            outs = pl.pallas_call(
                lambda *refs, phase=phase: body(phase, *refs[:n_in], *refs[n_in + n_out:]),
                out_shape=out_shape, grid=(programs,), interpret=interpret, name=f"{name}_{phase}",
                compiler_params=None if interpret else triton_params(num_warps, num_stages),
                input_output_aliases={n_in + i: i for i in range(n_out)},
            )(*inputs, *outs)
        return list(outs)

    def kernel(*refs):
        count_ref = refs[n_in]  # the barrier's arrivals (aliased to the last output)
        refs = refs[:n_in] + refs[n_in + 1:n_in + 1 + n_out]
        for phase in range(num_phases):
            if phase:
                grid_barrier(count_ref, phase * programs)
            body(phase, *refs)

    # A fresh zero counter per call: aliasing it to an output makes XLA copy the constant into a new buffer.
    count = jnp.zeros((1,), jnp.int32)
    results = pl.pallas_call(
        kernel, out_shape=list(out_shape) + [jax.ShapeDtypeStruct((1,), jnp.int32)], grid=(programs,), name=name,
        compiler_params=triton_params(num_warps, num_stages), input_output_aliases={n_in: n_out},
    )(*inputs, count)
    return list(results[:n_out])


def neighbour_exchange(phases: int, programs: int = RESIDENT_PROGRAMS, one_launch: bool = True,
                       interpret: bool | None = None):
    """A check of the barrier: each phase, program p writes p * 1000 + phase, then (from phase 1) reads what program
    (p + 5) % programs wrote the phase before. -> (data, bad), int32 [phases, programs] each; bad counts values that
    were not there yet (all zeros when every barrier held)."""
    def body(phase, data_ref, bad_ref):
        pid = pl.program_id(0)
        other = (pid + 5) % programs
        cell = (pl.ds(phase, 1), pl.ds(pid, 1))
        plt.store(data_ref.at[cell], jnp.full((1, 1), pid * 1000 + phase, jnp.int32))
        if phase:
            seen = plt.load(data_ref.at[pl.ds(phase - 1, 1), pl.ds(other, 1)])
            plt.store(bad_ref.at[cell], (seen != other * 1000 + phase - 1).astype(jnp.int32))
        else:
            plt.store(bad_ref.at[cell], jnp.zeros((1, 1), jnp.int32))

    shapes = [jax.ShapeDtypeStruct((phases, programs), jnp.int32)] * 2
    data, bad = phased_call(body, phases, [], shapes, programs=programs, name="neighbour_exchange",
                            one_launch=one_launch, interpret=interpret)
    return data, bad
