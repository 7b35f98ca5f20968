"""The collectives the model code calls. Each takes the mesh axis it reduces over, or None outside shard_map (then
it is the identity), so one model function serves one device and a mesh."""

from __future__ import annotations

import contextlib
import os

import jax
import jax.numpy as jnp

OVERLAP_ENV = "TILERT_OVERLAP"
_silent = False  # inside `silenced()`: every collective below is the identity


def overlap_enabled() -> bool:
    """Whether the model code reduces in its overlapped forms (see deepseek._moe), in which a reduction does not wait
    for work it does not need, so XLA's asynchronous all-reduce can run beside that work. On unless
    $TILERT_OVERLAP=0: DeepSeek-V3 layers at ep=2 on two H200s decode 1.4% faster with it (docs/PERF.md, session
    21)."""
    return os.environ.get(OVERLAP_ENV, "1") != "0"


@contextlib.contextmanager
def silenced():
    """While tracing inside it every collective here is the identity: the program keeps its mesh axes (each device
    computes and reads exactly its share) but exchanges nothing, so its numbers are wrong. The bench times it beside
    the real program to report per-token communication time."""
    global _silent
    saved, _silent = _silent, True
    try:
        yield
    finally:
        _silent = saved


def _off(axis: str | None) -> bool:
    return axis is None or _silent


def psum(x: jax.Array, axis: str | None) -> jax.Array:
    """Sum of the partial results of a row-sharded matmul (attention output, MLP down projection)."""
    return x if _off(axis) else jax.lax.psum(x, axis)


def embed_lookup(embed: jax.Array, tokens: jax.Array, axis: str | None) -> jax.Array:
    """embed: [vocab or vocab / tp, hidden] (rows sharded over `axis`); tokens: int[B, T] -> [B, T, hidden]."""
    if axis is None:
        return embed[tokens]
    rows = embed.shape[0]
    local = tokens - jax.lax.axis_index(axis) * rows
    mine = (local >= 0) & (local < rows)
    x = jnp.where(mine[..., None], embed[jnp.clip(local, 0, rows - 1)], 0)
    return psum(x, axis)


def gather_vocab(logits: jax.Array, axis: str | None, vocab_size: int) -> jax.Array:
    """logits: [..., vocab / tp] per device -> [..., vocab] on every device."""
    if _off(axis) or logits.shape[-1] == vocab_size:
        return logits
    return jax.lax.all_gather(logits, axis, axis=logits.ndim - 1, tiled=True)


def local_kv_heads(x: jax.Array, num_heads: int, num_kv_heads: int, axis: str | None) -> jax.Array:
    """x: a KV projection's weight [kv heads held, head_dim, hidden] or bias [kv heads held, head_dim]. When the mesh
    is wider than the number of KV heads the KV projection is replicated; each device keeps only the KV head its query
    heads attend to."""
    if axis is None or x.shape[0] != num_kv_heads or jax.lax.axis_size(axis) == 1:
        return x
    tp = jax.lax.axis_size(axis)
    group = num_heads // num_kv_heads  # query heads per KV head
    first_query_head = jax.lax.axis_index(axis) * (num_heads // tp)
    return jax.lax.dynamic_slice_in_dim(x, first_query_head // group, 1, axis=0)
