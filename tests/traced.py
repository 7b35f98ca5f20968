"""What a traced program does, read from its jaxpr (for tests that check a program's structure)."""

import collections

import jax
import jax.extend
import jax.numpy as jnp

from tilert_jax.sharding.sharded import ShardedFamily

COLLECTIVES = ("psum", "all_gather", "all_to_all", "ppermute", "reduce_scatter")


def primitive_counts(jaxpr: jax.extend.core.Jaxpr) -> collections.Counter:
    """Equations by primitive name, those of sub-programs (shard_map, pjit, loops, branches) included."""
    counts = collections.Counter()
    for eqn in jaxpr.eqns:
        counts[eqn.primitive.name] += 1
        for value in eqn.params.values():
            for sub in value if isinstance(value, (tuple, list)) else (value,):
                if isinstance(sub, jax.extend.core.ClosedJaxpr):
                    counts += primitive_counts(sub.jaxpr)
                elif isinstance(sub, jax.extend.core.Jaxpr):
                    counts += primitive_counts(sub)
    return counts


def check_silenced_step(model, impl: str) -> None:
    """A sharded model's decode step, and the same family built with communicate=False (the bench's step for timing
    communication): both trace the same equations but for the collectives, of which the silenced one has none."""
    config, loud = model.config, model.decoder.family
    quiet = ShardedFamily(config, loud.mesh, communicate=False)

    def counts(family):  # -> (collectives, every other equation), by primitive
        step = lambda p, t: family.decode_step(  # noqa: E731
            config, p, t, family.init_cache(config, 1, 32, jnp.float32), jnp.int32(20), impl=impl)
        every = primitive_counts(jax.make_jaxpr(step)(model.params, jnp.zeros((1,), jnp.int32)).jaxpr)
        talk = collections.Counter({k: v for k, v in every.items() if k.startswith(COLLECTIVES)})
        return talk, every - talk

    (loud_talk, loud_rest), (quiet_talk, quiet_rest) = counts(loud), counts(quiet)
    assert loud_talk and not quiet_talk
    assert loud_rest == quiet_rest
