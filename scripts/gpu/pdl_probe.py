"""Whether a Pallas kernel may start before the one it depends on has finished (programmatic dependent launch).

    XLA_FLAGS=--xla_gpu_enable_pdl=true python scripts/gpu/pdl_probe.py

Kernel A: every program first executes `griddepcontrol.launch_dependents` (the early trigger), spins, then counts
itself on a flag. Kernel B, which reads A's flag, records the count at its entry without waiting. B seeing fewer than
all of A's programs means XLA launched B early and put no `griddepcontrol.wait` before B's first load: a kernel
could then stream its weights before waiting on its predecessor.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plt

PROGRAMS, SPIN = 132, 200_000


def _asm(text: str, x):
    out, = plt.elementwise_inline_asm(text + "\n\tmov.b32 $0, 0;", args=[x], constraints="=r,r", pack=1,
                                      result_shape_dtypes=[jax.ShapeDtypeStruct(x.shape, jnp.int32)])
    return out


def kernel_a(_, flag_ref, sink_ref, *, trigger):  # (the flag's input ref is its output's: aliased)
    pid = pl.program_id(0)
    zero = _asm("griddepcontrol.launch_dependents;", jnp.full((1,), pid)) if trigger else jnp.zeros((1,), jnp.int32)
    acc = lax.fori_loop(0, SPIN, lambda i, a: a * 1.0000001 + 1e-7, (pid + zero).astype(jnp.float32))
    plt.store(sink_ref.at[pl.ds(pid, 1)], acc)
    plt.atomic_add(flag_ref, jnp.max(zero), jnp.int32(1))


def kernel_b(flag_ref, seen_ref, *, wait):
    zero = _asm("griddepcontrol.wait;", jnp.zeros((1,), jnp.int32)) if wait else jnp.zeros((1,), jnp.int32)
    seen_ref[0] = plt.atomic_add(flag_ref, jnp.max(zero), jnp.int32(0))


def step(flag, *, trigger: bool, wait: bool):
    """Kernel A, then kernel B on A's flag -> (the count B saw [1], A's spin results)."""
    params = plt.CompilerParams(num_warps=4, num_stages=1)
    flag, sink = pl.pallas_call(
        lambda *refs: kernel_a(*refs, trigger=trigger),
        out_shape=[jax.ShapeDtypeStruct((1,), jnp.int32), jax.ShapeDtypeStruct((PROGRAMS,), jnp.float32)],
        grid=(PROGRAMS,), input_output_aliases={0: 0}, compiler_params=params, name="pdl_a")(flag)
    seen = pl.pallas_call(lambda *refs: kernel_b(*refs, wait=wait), out_shape=jax.ShapeDtypeStruct((1,), jnp.int32),
                          grid=(1,), compiler_params=params, name="pdl_b")(flag)
    return seen, sink


if __name__ == "__main__":
    for trigger, wait in ((False, False), (True, False), (True, True)):
        seen, _ = jax.jit(functools.partial(step, trigger=trigger, wait=wait))(jnp.zeros((1,), jnp.int32))
        print(f"trigger={trigger} wait={wait}: B saw {int(seen[0])} of {PROGRAMS} programs of A")
