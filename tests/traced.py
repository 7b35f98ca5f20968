"""What a traced program does, read from its jaxpr (for tests that check a program's structure)."""

import collections

import jax
import jax.extend

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


def step_without_collectives(loud, quiet, config, params, impl: str) -> tuple[collections.Counter, ...]:
    """One decode step of a ShardedFamily `loud` and of the same family built with communicate=False (`quiet`) ->
    (loud's collectives, quiet's collectives, loud's other equations, quiet's other equations), by primitive."""
    def counts(family):
        step = lambda p, t: family.decode_step(  # noqa: E731
            config, p, t, family.init_cache(config, 1, 32, jax.numpy.float32), jax.numpy.int32(20), impl=impl)
        every = primitive_counts(jax.make_jaxpr(step)(params, jax.numpy.zeros((1,), jax.numpy.int32)).jaxpr)
        talk = collections.Counter({k: v for k, v in every.items() if k.startswith(COLLECTIVES)})
        return talk, every - talk

    (loud_talk, loud_rest), (quiet_talk, quiet_rest) = counts(loud), counts(quiet)
    return loud_talk, quiet_talk, loud_rest, quiet_rest
