"""A DeepSeek decode step with impl="pallas" on one device, its launches chained so that the glue between them (the
K-split partial sums, the residual adds, the RMSNorms, the SwiGLU, the routing) costs no XLA kernels of its own.

The residual stream travels between launches as x and its RMSNorm h, each launch that adds to it finishing both in
its last program (kernels/stream_norm.py: `stream_epilogue`; a stream_norm launch normalises the embedding). Per
layer:
  1. the query's first projection beside kv_a, from h;
  2. multi-head latent attention (deepseek.attend_decode_kernel: three MLA kernels, the first adding q's and kv_a's
     partial sums, roping, normalising the latent and writing the cache, the last adding its slices' products);
  3. o_proj, whose last program adds its K-split sums to the stream and applies mlp_norm;
  4. MoE: the router beside the shared experts' gate/up in one launch, whose router program that finishes last
     routes the token (moe.route_beside_shared: the routing hides behind the shared experts' streaming); the routed
     experts' gate/up (every routed group reading the token's one row); then down with each routed output weighed
     by its routing weight beside the shared experts' down, whose last program adds them all to the stream and
     applies the next layer's attn_norm (the final norm after the last layer). A dense layer: the same without
     routing, its split gate/up finished in its own launch (a tile's last program adds the partial sums and applies
     the SwiGLU).
The launches that finish a reduction themselves (the last program to arrive adds the others' partial sums:
kernels/common.py, `arrive_last`) share one array of arrival counters, zero between launches. The LM head reads the
last layer's normed stream in XLA.
"""

from __future__ import annotations

import jax.numpy as jnp

from tilert_jax.kernels import moe_grouped_matvec as gm
from tilert_jax.kernels import stream_norm as sn
from tilert_jax.kernels.common import zero_counters
from tilert_jax.models import deepseek as ds
from tilert_jax.models import moe
from tilert_jax.models.deepseek_linear import SINGLE, stacked


ARRIVAL_COUNTERS = 4096  # for the launches that finish their split reductions themselves (each checks it has enough)


def supported(config: ds.DeepseekConfig, params: ds.DeepseekParams, tokens) -> bool:
    """Whether `decode_step` fits: a batch of at most 16 rows, no sparse-attention indexer, no biases, attention the
    MLA kernels tile, and every weight tiles the grouped kernel."""
    n = tokens.shape[0]
    blk = config.fp8_block
    if n > 16 or any(layer.attn.indexer is not None or not ds.decode_kernel_fits(config, layer.attn)
                     for layer in params.layers):
        return False
    for layer in params.layers:
        a, mlp = layer.attn, layer.mlp
        lins = [ds.query_first(a), a.kv_a, a.o]
        if isinstance(mlp, ds.MoE):
            e = mlp.experts
            if n * config.num_experts_per_tok > min(64, e.gate.w.shape[0]):
                return False
            lins += [e.gate, e.up, e.down] + ([] if mlp.shared is None else [mlp.shared.gate, mlp.shared.up,
                                                                              mlp.shared.down])
        else:
            lins += [mlp.gate, mlp.up, mlp.down]
        for lin in lins:
            k_dim, n_dim = lin.w.shape[-2:]
            if lin.b is not None or gm.tiles(k_dim, n_dim, blk if lin.scale is not None else None) is None:
                return False
    return True


def _finish_stream(products: list[gm.Product], x, norm, eps: float, blk, counters):
    """One launch of products whose results are pending on the stream x [n, hidden] -> (x plus the results, its
    RMSNorm with `norm`, the counters): finished by the launch's last program (`stream_norm.stream_epilogue`), or
    after packed FP8 products (whose outputs it does not read) by a stream_norm launch."""
    n = x.shape[0]
    if not any(gm.reads_packed(p) for p in products):
        _, (x, h), counters = gm.grouped_matvecs(products, block=blk, finish=False, counters=counters,
                                                 epilogue=sn.stream_epilogue(x, norm, eps, len(products)))
        return x, h, counters
    ys = gm.grouped_matvecs(products, block=blk, finish=False)
    return *sn.stream_norm(sn.Stream(x, tuple(sn.pending(y, n) for y in ys), norm, eps)), counters


def _moe(config: ds.DeepseekConfig, p: ds.MoE, x, h, norm, blk, counters):
    """x [n, hidden] the stream, h its mlp_norm -> (the stream after the MoE, its RMSNorm with `norm`, counters).
    (A split routed gate/up, FP8's, is finished by XLA: finished in its launch it measured no faster, docs/PERF.md
    session 11.)"""
    n = x.shape[0]
    top_k = config.num_experts_per_tok
    e = p.experts
    shared = None if p.shared is None else (p.shared.gate, p.shared.up, p.shared.down)
    beside = None if shared is None else moe.route_beside_shared(h, p.router, p.e_bias, moe.routing_rule(config),
                                                                 shared[:2], blk, counters)
    if beside is None:
        (weights, index), shared_mid = ds.route(config, p, h, "pallas"), None
    else:
        weights, index, shared_mid, counters = beside
    return moe.expert_launches(
        h, index.reshape(n * top_k), (e.gate, e.up, e.down), shared, blk, group_weights=weights.reshape(n * top_k),
        shared_dtype=jnp.float32, shared_mid=shared_mid,
        down_launch=lambda down: _finish_stream(down, x, norm, config.rms_norm_eps, blk, counters))


def _mlp(config: ds.DeepseekConfig, p: ds.MLP, x, h, norm, blk, counters):
    (mid,), counters = gm.grouped_matvecs([gm.Product(x=h[None], ids=SINGLE, **stacked(p.gate, p.up))], block=blk,
                                          counters=counters)
    down = gm.Product(x=mid, ids=SINGLE, out_dtype=jnp.float32, **stacked(p.down))
    return _finish_stream([down], x, norm, config.rms_norm_eps, blk, counters)


def decode_step(config: ds.DeepseekConfig, params: ds.DeepseekParams, tokens, cache: ds.MLACache, pos):
    """tokens: int[B] at position pos -> float32 logits [B, vocab] and the updated cache (see `supported`)."""
    n = tokens.shape[0]
    blk, eps = config.fp8_block, config.rms_norm_eps
    layers = params.layers
    x, h = sn.stream_norm(sn.Stream(params.embed[tokens], (), layers[0].attn_norm, eps))  # the stream, its norm
    counters = zero_counters(ARRIVAL_COUNTERS)  # passed from launch to launch, zero between them
    new_kv = []
    for i, layer in enumerate(layers):
        a = layer.attn
        q, compressed = (y.reshape(-1, n, y.shape[-1]) for y in gm.grouped_matvecs(
            [gm.Product(x=h[None], ids=SINGLE, **stacked(lin)) for lin in (ds.query_first(a), a.kv_a)], block=blk,
            finish=False))  # [S, n, *] each
        if a.q_proj is None:  # the query LoRA: q_b reads the normed q_a
            q = ds.query(config, a, q.sum(0).astype(h.dtype), "pallas")[0][None]
        out, kv_i, counters = ds.attend_decode_kernel(config, a, q, compressed, cache.kv[i], pos, counters)
        o = gm.Product(x=out.reshape(1, n, -1), ids=SINGLE, **stacked(a.o))
        x, h, counters = _finish_stream([o], x, layer.mlp_norm, eps, blk, counters)
        after = layers[i + 1].attn_norm if i + 1 < len(layers) else params.final_norm
        x, h, counters = (_moe if isinstance(layer.mlp, ds.MoE) else _mlp)(config, layer.mlp, x, h, after, blk,
                                                                           counters)
        new_kv.append(kv_i)
    return ds.lm_head(params, h, None, config.vocab_size), ds.MLACache(kv=tuple(new_kv), index_k=cache.index_k)
