"""The key/value cache of the dense models: one preallocated buffer per layer, updated in place (donated). Every
model's cache (KVCache here, deepseek.MLACache) is a dataclass of per-layer tuples: `layer_run` and `join_layers`
split and rejoin it by layers (and its PartitionSpecs alike)."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class KVCache:
    k: tuple[jax.Array, ...]  # per layer [B, num_kv_heads, max_len, head_dim]
    v: tuple[jax.Array, ...]  # per layer [B, num_kv_heads, max_len, head_dim]

    @property
    def max_len(self) -> int:
        return self.k[0].shape[2]

    @classmethod
    def zeros(cls, num_layers: int, batch: int, num_kv_heads: int, max_len: int, head_dim: int, dtype) -> "KVCache":
        shape = (batch, num_kv_heads, max_len, head_dim)
        return cls(k=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)),
                   v=tuple(jnp.zeros(shape, dtype) for _ in range(num_layers)))


def write(buffer: jax.Array, new: jax.Array, pos: jax.Array) -> jax.Array:
    """buffer: [B, H, max_len, D]; new: [B, T, H, D] written at positions pos..pos+T-1."""
    return jax.lax.dynamic_update_slice(buffer, new.transpose(0, 2, 1, 3).astype(buffer.dtype), (0, 0, pos, 0))


def layer_run(cache, layers: slice):
    """The cache (or its specs) of the layers `layers` selects."""
    return dataclasses.replace(cache, **{f.name: getattr(cache, f.name)[layers] for f in dataclasses.fields(cache)})


def join_layers(first, rest):
    """The cache of two consecutive runs of layers as one."""
    return dataclasses.replace(first, **{f.name: getattr(first, f.name) + getattr(rest, f.name)
                                         for f in dataclasses.fields(first)})
