"""A DeepSeek decode step with impl="pallas" on one device or a tensor-parallel mesh, its launches chained so that
the glue between them (the K-split partial sums, the residual adds, the RMSNorms, the SwiGLU, the routing) costs no
XLA kernels of its own.

The residual stream travels between launches as x plus a tuple of pending partial sums (kernels/stream_norm.py:
`Stream`). Per layer:
  1. the stream combined and attn_norm applied (stream_norm), then the query's first projection beside kv_a;
  2. multi-head latent attention (deepseek.attend_decode_kernel: three MLA kernels, the first adding q's and kv_a's
     partial sums, roping, normalising the latent and writing the cache, the last adding its slices' products);
  3. o_proj, its K-split sums left pending on the stream;
  4. MoE: the stream combined and mlp_norm applied; the router beside the shared experts' gate/up in one launch,
     whose router program that finishes last routes the token (moe.route_beside_shared: the routing hides behind
     the shared experts' streaming); the routed experts' gate/up (every routed group reading the token's one row);
     then down with each routed output weighed by its routing weight beside the shared experts' down, all left
     pending on the stream. A dense layer: the same without routing, its split gate/up finished in its own launch (a
     tile's last program adds the partial sums and applies the SwiGLU).
The launches that finish a split reduction themselves (the last program of a tile to arrive adds the others' partial
sums: kernels/common.py, `arrive_last`) share one array of arrival counters, zero between launches.
The final norm and the LM head read the last layer's stream in XLA.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import stream_norm as sn
from tilert_jax.kernels.common import zero_counters
from tilert_jax.models import deepseek as ds
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import SINGLE, grouped_tiles, stacked
from tilert_jax.sharding import collectives


ARRIVAL_COUNTERS = 4096  # for the launches that finish their split reductions themselves (each checks it has enough)


def supported(config: ds.DeepseekConfig, params: ds.DeepseekParams, tokens, cache: ds.MLACache) -> bool:
    """Whether `decode_step` fits: a batch of at most 16 rows; no sparse-attention indexer that could select (V3.2's
    selects every token while the cache holds at most index_topk, and is skipped then, as deepseek.attend skips it);
    every routed expert held (not an expert-parallel slice); no biases; attention the MLA kernels tile, and every
    weight the grouped kernel."""
    n = tokens.shape[0]
    selects = config.has_indexer and cache.kv[0].shape[1] > config.index_topk
    if n > 16 or selects or any(not ds.decode_kernel_fits(config, layer.attn) for layer in params.layers):
        return False
    for layer in params.layers:
        a, mlp = layer.attn, layer.mlp
        lins = [ds.query_first(a), a.kv_a, a.o]
        if isinstance(mlp, ds.MoE):
            e = mlp.experts
            held = e.gate.w.shape[0]
            if held != config.n_routed_experts or n * config.num_experts_per_tok > min(64, held):
                return False
            lins += [e.gate, e.up, e.down] + ([] if mlp.shared is None else [mlp.shared.gate, mlp.shared.up,
                                                                              mlp.shared.down])
        else:
            lins += [mlp.gate, mlp.up, mlp.down]
        if any(lin.b is not None or not grouped_tiles(lin, config.fp8_block) for lin in lins):
            return False
    return True


def _parts(y, n: int) -> jax.Array:
    """A one-group product's output [1, n, N], or its partial sums [S, 1, n, N], as partial sums [S', n, N]."""
    return y.reshape(-1, n, y.shape[-1])


def _pending(y, n: int) -> jax.Array:
    """A product's output [G, B, N] or its partial sums [S, G, B, N] as pending sums on the stream [S', n, hidden]:
    one group of n rows, or (routed) n * k groups of one row, token-major."""
    if y.shape[-3] == 1:  # [..., 1, n, h]
        return _parts(y, n)
    k = y.shape[-3] // n
    return jnp.swapaxes(y.reshape(-1, n, k, y.shape[-1]), 1, 2).reshape(-1, n, y.shape[-1])


def _reduced(parts: tuple[jax.Array, ...], tp_axis) -> tuple[jax.Array, ...]:
    """Under shard_map over `tp_axis` a device's pending sums cover only its heads or its slice of the intermediate:
    added up here and over the mesh into one pending sum [1, n, hidden] float32. Without a mesh axis, as given."""
    if tp_axis is None:
        return parts
    total = sum(jnp.sum(part.astype(jnp.float32), axis=0) for part in parts)  # [n, hidden]
    return (collectives.psum(total, tp_axis)[None],)


def _moe(config: ds.DeepseekConfig, p: ds.MoE, stream: sn.Stream, blk, counters):
    """-> the combined stream [n, hidden], the MoE's outputs as pending sums and the counters. (A split routed
    gate/up, FP8's, is finished by XLA: finished in its launch it measured no faster, docs/PERF.md session 11.)"""
    n = stream.x.shape[0]
    top_k = config.num_experts_per_tok
    x, h = sn.stream_norm(stream)
    e = p.experts
    shared = None if p.shared is None else (p.shared.gate, p.shared.up, p.shared.down)
    beside = None if shared is None else moe.route_beside_shared(h, p.router, p.e_bias, moe.routing_rule(config),
                                                                 shared[:2], blk, counters)
    if beside is None:
        (weights, index), shared_mid = ds.route(config, p, h, "pallas"), None
    else:
        weights, index, shared_mid, counters = beside
    ys = moe.expert_launches(h, index.reshape(n * top_k), (e.gate, e.up, e.down), shared, blk,
                             group_weights=weights.reshape(n * top_k), shared_dtype=jnp.float32, finish=False,
                             shared_mid=shared_mid)
    return x, tuple(_pending(y, n) for y in ys if y is not None), counters


def _mlp(p: ds.MLP, stream: sn.Stream, blk, counters):
    x, h = sn.stream_norm(stream)
    (mid,), counters = gm.grouped_matvecs([gm.Product(x=h[None], ids=SINGLE, **stacked(p.gate, p.up))], block=blk,
                                          counters=counters)
    y = gm.grouped_matvecs([gm.Product(x=mid, ids=SINGLE, out_dtype=jnp.float32, **stacked(p.down))], block=blk,
                           finish=False)[0]
    return x, (_pending(y, x.shape[0]),), counters


def decode_step(config: ds.DeepseekConfig, params: ds.DeepseekParams, tokens, cache: ds.MLACache, pos, tp_axis=None):
    """tokens: int[B] at position pos -> float32 logits [B, vocab] and the updated cache (see `supported`).

    Under shard_map over `tp_axis` each device runs the launches on its heads, its slice of every intermediate and of
    the vocabulary (sharding/rules.py); the output projection's and the MLP's pending sums are reduced over the mesh
    (`_reduced`) before the next stream_norm adds them, and the logits are gathered."""
    if tp_axis is not None:
        ds.check_tp(config, jax.lax.axis_size(tp_axis))
    n = tokens.shape[0]
    blk, eps = config.fp8_block, config.rms_norm_eps
    x, parts = collectives.embed_lookup(params.embed, tokens[:, None], tp_axis)[:, 0], ()  # the stream [n, hidden]
    counters = zero_counters(ARRIVAL_COUNTERS)  # passed from launch to launch, zero between them
    new_kv = []
    for i, layer in enumerate(params.layers):
        a = layer.attn
        x, h = sn.stream_norm(sn.Stream(x, parts, layer.attn_norm, eps))
        q, compressed = (_parts(y, n) for y in gm.grouped_matvecs(
            [gm.Product(x=h[None], ids=SINGLE, **stacked(lin)) for lin in (ds.query_first(a), a.kv_a)], block=blk,
            finish=False))  # [S, n, *] each
        if a.q_proj is None:  # the query LoRA: q_b reads the normed q_a
            q = ds.query(config, a, q.sum(0).astype(h.dtype), "pallas")[0][None]
        out, kv_i, counters = ds.attend_decode_kernel(config, a, q, compressed, cache.kv[i], pos, counters)
        o = gm.grouped_matvecs([gm.Product(x=out.reshape(1, n, -1), ids=SINGLE, **stacked(a.o))], block=blk,
                               finish=False)[0]
        stream = sn.Stream(x, _reduced((_pending(o, n),), tp_axis), layer.mlp_norm, eps)
        if isinstance(layer.mlp, ds.MoE):
            x, parts, counters = _moe(config, layer.mlp, stream, blk, counters)
        else:
            x, parts, counters = _mlp(layer.mlp, stream, blk, counters)
        parts = _reduced(parts, tp_axis)
        new_kv.append(kv_i)
    _, h = sn.stream_reference(sn.Stream(x, parts, params.final_norm, eps))
    return (ds.lm_head(params, h, tp_axis, config.vocab_size),
            ds.MLACache(kv=tuple(new_kv), index_k=cache.index_k))
