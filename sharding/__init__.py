"""Meshes, the one logical-axis -> mesh-axis table, and the collectives the models call under shard_map."""

from tilert_jax.sharding.mesh import make_mesh
from tilert_jax.sharding.rules import RULES, param_shardings, partition_spec, shard_count

__all__ = ["RULES", "make_mesh", "param_shardings", "partition_spec", "shard_count"]
