"""A model family's functions run under shard_map over a mesh, with the signatures of the family module itself.

Parameters arrive placed by the RULES table; inside, each device computes its heads, MLP columns and vocabulary
slice, and the model code's collectives (sharding/collectives.py) reduce over the `tp` axis.
"""

from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from tilert_jax import cache as kv
from tilert_jax.models import family
from tilert_jax.params import layer_run
from tilert_jax.sharding import collectives
from tilert_jax.sharding.rules import param_partition_specs, param_shardings

REPLICATED = PartitionSpec()


class ShardedFamily:
    """communicate=False traces every function under `collectives.silenced()` (wrong numbers, the same compute and
    memory traffic, no exchange): the bench times it beside the real thing to report per-token communication
    time."""

    def __init__(self, config, mesh: Mesh, communicate: bool = True, layers: slice = slice(None)):
        """layers: the run of the model's layers whose parameters and cache the functions take (a stage of the
        engine's prefill; every layer by default)."""
        self.config, self.mesh, self.family, self.communicate = config, mesh, family(config), communicate
        self.layers = layers
        self.tp, ep = mesh.shape["tp"], mesh.shape["ep"]
        experts = getattr(config, "n_routed_experts", 0)
        if ep != 1 and not experts:
            raise ValueError(f"{config.model_type} has no experts: use a mesh with ep=1")
        if experts and experts % ep:
            raise ValueError(f"ep={ep} must divide the {experts} routed experts")
        # The mesh axes the model code reduces over (keyword arguments of the family's functions).
        self.axes = {"tp_axis": "tp"}
        if experts:
            self.axes["ep_axis"] = "ep" if ep > 1 else None
        heads, kv_heads = config.num_heads, config.num_kv_heads
        if heads % self.tp or (kv_heads % self.tp and self.tp % kv_heads):
            raise ValueError(f"tp={self.tp} must divide num_heads={heads}, and num_kv_heads={kv_heads} must divide "
                             f"or be divisible by tp")
        specs = self.family.param_specs(config)
        self.param_specs = layer_run(param_partition_specs(specs, mesh), layers)
        self.param_shardings = layer_run(param_shardings(specs, mesh), layers)
        self.cache_specs = kv.layer_run(self.family.cache_partition_specs(config, "tp"), layers)

    def _shard(self, fn, in_specs, out_specs):
        if not self.communicate:
            fn = collectives.silenced()(fn)
        return jax.shard_map(fn, mesh=self.mesh, in_specs=in_specs, out_specs=out_specs, check_vma=False)

    def sequence_compiler_options(self, impl: str) -> dict:
        return self.family.sequence_compiler_options(impl)

    def init_cache(self, config, batch: int, max_len: int, dtype):
        cache = self.family.init_cache(config, batch, max_len, dtype, num_kv_heads=max(config.num_kv_heads, self.tp))
        cache = kv.layer_run(cache, self.layers)
        shardings = jax.tree.map(lambda s: NamedSharding(self.mesh, s), self.cache_specs)
        return jax.lax.with_sharding_constraint(cache, shardings)

    def forward(self, config, params, tokens, impl: str = "xla"):
        fn = lambda p, t: self.family.forward(config, p, t, impl=impl, **self.axes)  # noqa: E731
        return self._shard(fn, (self.param_specs, REPLICATED), REPLICATED)(params, tokens)

    def prefill_layers(self, config, params, inputs, cache, pos, impl: str = "xla"):
        def fn(p, x, c):  # pos stays as given: a Python int 0 tells the family the cache is fresh
            return self.family.prefill_layers(config, p, x, c, pos, impl=impl, **self.axes)

        in_specs = (self.param_specs, REPLICATED, self.cache_specs)
        return self._shard(fn, in_specs, (REPLICATED, self.cache_specs))(params, inputs, cache)

    def prefill(self, config, params, inputs, cache, pos, last_index, impl: str = "xla"):
        def fn(p, x, c, last):
            return self.family.prefill(config, p, x, c, pos, last, impl=impl, **self.axes)

        in_specs = (self.param_specs, REPLICATED, self.cache_specs, REPLICATED)
        return self._shard(fn, in_specs, (REPLICATED, self.cache_specs))(params, inputs, cache, last_index)

    def decode_step(self, config, params, tokens, cache, pos, impl: str = "xla"):
        def fn(p, t, c, pos):
            return self.family.decode_step(config, p, t, c, pos, impl=impl, **self.axes)

        in_specs = (self.param_specs, REPLICATED, self.cache_specs, REPLICATED)
        return self._shard(fn, in_specs, (REPLICATED, self.cache_specs))(params, tokens, cache, pos)
