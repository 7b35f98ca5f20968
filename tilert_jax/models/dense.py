"""Dense decoder-only transformers (Llama 3.x, Qwen2.5, Qwen3, Mistral) as pure functions.

Layers are unrolled in Python rather than scanned: a scan pays one XLA while-loop iteration per layer in every
decode step, and per-layer parameters let each matmul read its weight in place. Projection weights are stored [out,
in] as torch's Linear stores them (the input dimension contiguous, heads split out of the output one): the decode
kernels stream them fastest that way (kernels/matvec.py), and cuBLAS takes them as they are for prefill.

With impl="pallas", a decode step (one token per row, batch <= 16) is written as five fused ops per layer
(`_decode_fused`): RMSNorm + Q/K/V projection; attention with q/k norm, rope and the in-place cache write; output
projection + residual; RMSNorm + gate/up + SiLU; down projection + residual (and RMSNorm + LM head). Each is a Pallas
kernel or its XLA reference (`pallas_ops`: by default the ones measured faster on the H200). At one token on a Hopper
GPU op "layer" runs the output projection, the MLP and the next layer's RMSNorm + Q/K/V projection as one launch, a
Mosaic GPU weight stream (kernels/layer_decode.py; by default where it measured faster, tuning.ONE_LAUNCH:
llama-3.2-1b, llama-3.1-8b and qwen3-8b), so a layer is two launches, attention and the rest; op "mlp" runs the
gate/up and down projections as one launch (the same kernel, elsewhere the phased Triton kernel kernels/mlp_block.py,
opt-in). Under
shard_map the same ops run on the heads and MLP columns this device holds (llama-3.1-8b at tp=4: 2.66 ms against
XLA's 3.02, docs/PERF.md session 18); the output and down projections then hand their float32 partial sums, reduced
over the mesh, to the next fused op.
Prefill and the whole-sequence forward run their other products on cuBLAS (`sequence_compiler_options`); with
impl="pallas" the Q/K/V projection, rope and cache write are one launch where it pays (kernels/qkv_rope.py, hidden
<= 2048), and so are the gate/up products with the SwiGLU (kernels/swiglu_matmul.py, Mosaic GPU). The prefill's
last layer computes the keys and values of every token but the rest for the last token only, through the decode's
fused ops, and its LM head is the decode's Pallas norm + matrix-vector kernel (`_last_token_layer`). impl="xla" is
the plain path.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
from jax.sharding import PartitionSpec

from tilert_jax import cache as kv
from tilert_jax.config import DenseConfig
from tilert_jax.kernels import ops, tuning
from tilert_jax.kernels import stream_norm as sn
from tilert_jax.params import ParamSpec, layer_run, param_bytes
from tilert_jax.rope import rope_tables
from tilert_jax.sharding import collectives


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Attention:
    wq: jax.Array  # [num_heads, head_dim, hidden]
    wk: jax.Array  # [num_kv_heads, head_dim, hidden]
    wv: jax.Array  # [num_kv_heads, head_dim, hidden]
    wo: jax.Array  # [hidden, num_heads, head_dim]
    bq: jax.Array | None = None  # [num_heads, head_dim]
    bk: jax.Array | None = None  # [num_kv_heads, head_dim]
    bv: jax.Array | None = None  # [num_kv_heads, head_dim]
    bo: jax.Array | None = None  # [hidden]
    q_norm: jax.Array | None = None  # [head_dim]
    k_norm: jax.Array | None = None  # [head_dim]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLP:
    w_gate: jax.Array  # [intermediate, hidden]
    w_up: jax.Array  # [intermediate, hidden]
    w_down: jax.Array  # [hidden, intermediate]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    attn_norm: jax.Array  # [hidden]
    attn: Attention
    mlp_norm: jax.Array  # [hidden]
    mlp: MLP


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DenseParams:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[Layer, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [vocab, hidden]; None when tied to embed


def param_specs(config: DenseConfig) -> DenseParams:
    h, n, kvh, d, f = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                       config.intermediate_size)

    def bias(*shape_axes):
        return ParamSpec(tuple(s for s, _ in shape_axes), tuple(a for _, a in shape_axes), init="zeros")

    def layer() -> Layer:
        attn = Attention(
            wq=ParamSpec((n, d, h), ("heads", "head_dim", "embed")),
            wk=ParamSpec((kvh, d, h), ("kv_heads", "head_dim", "embed")),
            wv=ParamSpec((kvh, d, h), ("kv_heads", "head_dim", "embed")),
            wo=ParamSpec((h, n, d), ("embed", "heads", "head_dim")),
            bq=bias((n, "heads"), (d, "head_dim")) if config.qkv_bias else None,
            bk=bias((kvh, "kv_heads"), (d, "head_dim")) if config.qkv_bias else None,
            bv=bias((kvh, "kv_heads"), (d, "head_dim")) if config.qkv_bias else None,
            bo=bias((h, "embed")) if config.o_bias else None,
            q_norm=ParamSpec((d,), ("head_dim",), init="ones") if config.qk_norm else None,
            k_norm=ParamSpec((d,), ("head_dim",), init="ones") if config.qk_norm else None,
        )
        mlp = MLP(w_gate=ParamSpec((f, h), ("mlp", "embed")), w_up=ParamSpec((f, h), ("mlp", "embed")),
                  w_down=ParamSpec((h, f), ("embed", "mlp")))
        norm = ParamSpec((h,), ("embed",), init="ones")
        return Layer(attn_norm=norm, attn=attn, mlp_norm=norm, mlp=mlp)

    return DenseParams(
        embed=ParamSpec((config.vocab_size, h), ("vocab", "embed")),
        layers=tuple(layer() for _ in range(config.num_layers)),
        final_norm=ParamSpec((h,), ("embed",), init="ones"),
        lm_head=None if config.tie_word_embeddings else ParamSpec((config.vocab_size, h), ("vocab", "embed")),
    )


def decode_weight_bytes(config: DenseConfig, dtype, shards=None) -> int:
    """Weight bytes one decode step reads: every parameter, but only one row of an untied embedding table (one
    device's share of them with `shards`, see params.param_bytes)."""
    specs = param_specs(config)
    total = param_bytes(specs, dtype, shards)
    if specs.lm_head is not None:
        total -= param_bytes(specs.embed, dtype, shards) - config.hidden_size * jnp.dtype(dtype).itemsize
    return total


def init_cache(config: DenseConfig, batch: int, max_len: int, dtype, num_kv_heads: int | None = None) -> kv.KVCache:
    """num_kv_heads: the global head count of a cache sharded over a mesh wider than config.num_kv_heads (each
    device then holds the one KV head its query heads use)."""
    heads = num_kv_heads or config.num_kv_heads
    return kv.KVCache.zeros(config.num_layers, batch, heads, max_len, config.head_dim, dtype)


def cache_partition_specs(config: DenseConfig, tp_axis: str) -> kv.KVCache:
    """PartitionSpecs of the cache under shard_map: KV heads split over tp_axis."""
    spec = PartitionSpec(None, tp_axis, None, None)
    return kv.KVCache(k=(spec,) * config.num_layers, v=(spec,) * config.num_layers)


def _queries_keys_values(config: DenseConfig, p: Attention, x, positions, cache_kv, pos, impl, tp_axis):
    """x: [B, T, hidden] (normed); positions: [T] -> q [B, T, heads, head_dim], k and v [B, T, kv_heads, head_dim]
    (biases, q/k norm and rope applied), and the layer's cache (k, v) with them written at pos (None without one).
    Under shard_map over `tp_axis` the weights hold this device's heads."""
    n, kvh = config.num_heads, config.num_kv_heads
    wk, wv, bk, bv = (t if t is None else collectives.local_kv_heads(t, n, kvh, tp_axis)
                      for t in (p.wk, p.wv, p.bk, p.bv))
    cos, sin = rope_tables(config.rope, positions[None, :], x.dtype)  # [1, T, head_dim]
    batch, tokens, hidden = x.shape
    kernel = tuning.qkv_rope_config(hidden, p.wq.shape[0], *wk.shape[:2], tokens, config.qk_norm, x.dtype.itemsize)
    return ops.qkv_rope(
        x, p.wq, wk, wv, cos[0], sin[0], cache_kv, pos, eps=config.rms_norm_eps,
        bias=None if p.bq is None else (p.bq, bk, bv), qk_norm=(p.q_norm, p.k_norm) if config.qk_norm else None,
        config=kernel, implementation=_op_impl("qkv_rope", impl, batch) if tokens > 1 and kernel else "xla")


def _attention(config: DenseConfig, p: Attention, x, positions, cache_kv, pos, impl, tp_axis):
    """x: [B, T, hidden] (normed); positions: [T]. With a cache, keys are written at pos.. and read back whole,
    except when pos is the Python int 0 (a fresh prefill): the tokens then attend over their own keys.

    Under shard_map over `tp_axis` the weights hold this device's heads; the output is a partial sum to reduce."""
    q, k, v, cache_kv = _queries_keys_values(config, p, x, positions, cache_kv, pos, impl, tp_axis)
    scale, window = config.head_dim ** -0.5, config.sliding_window
    keys, values = (k.transpose(0, 2, 1, 3), v.transpose(0, 2, 1, 3)) if cache_kv is None else cache_kv
    if cache_kv is None or (isinstance(pos, int) and pos == 0):
        out = ops.self_attention(q, k, v, scale=scale, sliding_window=window, implementation=impl)
    else:
        k_pos = jnp.arange(keys.shape[2], dtype=jnp.int32)
        out = ops.attention(q, keys, values, positions, k_pos, scale=scale, sliding_window=window,
                            implementation=impl)
    y = jnp.einsum("btnd,hnd->bth", out, p.wo)
    if p.bo is not None:
        y = y + p.bo
    return y, (keys, values)


def _mlp(p: MLP, x, impl):
    """x: [B, T, hidden] (normed) -> [B, T, hidden] (under shard_map a partial sum: the weights hold this device's
    slice of the intermediate dimension)."""
    batch, tokens, hidden = x.shape
    kernel = tuning.swiglu_matmul_config(batch * tokens, hidden, p.w_gate.shape[0])
    mid = ops.swiglu_matmul(x, p.w_gate, p.w_up, config=kernel,
                            implementation=_op_impl("swiglu_matmul", impl, batch) if kernel else "xla")
    return mid @ p.w_down.T


def _decoder(config: DenseConfig, params: DenseParams, inputs, positions, cache, pos, impl, tp_axis):
    """inputs: int tokens [B, T], or the residual stream [B, T, hidden] out of the layers before params.layers (a
    prefill in stages, engine.Decoder: params.layers and the cache then hold a later run of the model's layers) ->
    the stream [B, T, hidden] before the final norm and the updated cache (None without one)."""
    x = inputs if inputs.ndim == 3 else collectives.embed_lookup(params.embed, inputs, tp_axis)  # [B, T, hidden]
    new_k, new_v = [], []
    for i, layer in enumerate(params.layers):
        layer_cache = None if cache is None else (cache.k[i], cache.v[i])
        h = ops.rms_norm(x, layer.attn_norm, config.rms_norm_eps, implementation=impl)
        attn_out, (k, v) = _attention(config, layer.attn, h, positions, layer_cache, pos, impl, tp_axis)
        x = x + collectives.psum(attn_out, tp_axis)
        h = ops.rms_norm(x, layer.mlp_norm, config.rms_norm_eps, implementation=impl)
        x = x + collectives.psum(_mlp(layer.mlp, h, impl), tp_axis)
        new_k.append(k)
        new_v.append(v)
    new_cache = None if cache is None else kv.KVCache(k=tuple(new_k), v=tuple(new_v))
    return x, new_cache


def lm_head(config: DenseConfig, params: DenseParams, x, impl: str = "xla", tp_axis=None) -> jax.Array:
    """x: the residual stream [..., hidden] -> final RMSNorm -> float32 logits [..., vocab] (gathered from the
    vocabulary shards under shard_map)."""
    return _logits(config, params, ops.rms_norm(x, params.final_norm, config.rms_norm_eps, implementation=impl),
                   tp_axis)


def _logits(config: DenseConfig, params: DenseParams, h, tp_axis) -> jax.Array:
    """The normed stream h [..., hidden] -> float32 logits [..., vocab] (XLA's product, gathered)."""
    w = params.embed if params.lm_head is None else params.lm_head  # [vocab, hidden]
    return collectives.gather_vocab(jnp.matmul(h, w.T, preferred_element_type=jnp.float32), tp_axis,
                                    config.vocab_size)


def sequence_compiler_options(impl: str) -> dict:
    """XLA options for the whole-sequence programs (prefill, forward) beyond the engine's own. With impl="pallas",
    no Triton gemm fusions: cuBLAS runs llama-3.2-1b's narrow K and V products in 6.4 us against their 10.0 as
    fusions, Q and o in 14 against 20 and 18 (docs/PERF.md, session 22). The one product that loses, a single row
    times the LM head (cuBLAS' matrix-vector path converts the whole weight to float32 first: 0.62 ms against 0.13),
    is the Pallas kernel there (see `prefill`)."""
    return {"xla_gpu_enable_triton_gemm": False} if impl == "pallas" else {}


def forward(config: DenseConfig, params: DenseParams, tokens, impl: str = "xla", tp_axis=None) -> jax.Array:
    """tokens: int[B, T] at positions 0..T-1, no cache -> float32 logits [B, T, vocab]."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x, _ = _decoder(config, params, tokens, positions, None, None, impl, tp_axis)
    return lm_head(config, params, x, impl, tp_axis)


MAX_FUSED_BATCH = 16  # the matrix-vector kernels' rows (one 16-row tensor-core tile)


def prefill_layers(config: DenseConfig, params: DenseParams, inputs, cache: kv.KVCache, pos, impl: str = "xla",
                   tp_axis=None):
    """inputs: int tokens [B, T] written at pos..pos+T-1 (right padding allowed: later steps overwrite it), or the
    residual stream [B, T, hidden] of those tokens out of the layers before params.layers. A Python int pos of 0 (a
    fresh cache) lets the prompt attend over its own keys, fused on a GPU with impl="pallas".

    Returns the stream after params.layers (before the final norm) and their updated cache."""
    positions = pos + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    return _decoder(config, params, inputs, positions, cache, pos, impl, tp_axis)


def prefill(config: DenseConfig, params: DenseParams, inputs, cache: kv.KVCache, pos, last_index,
            impl: str = "xla", tp_axis=None):
    """`prefill_layers`, then the float32 logits [B, vocab] of the token at index `last_index`; returns them and the
    updated cache. The last layer computes the keys and values of every token but the rest for that token alone
    (`_last_token_layer`): no later layer reads its other rows."""
    positions = pos + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    body = layer_run(params, slice(0, -1))
    x, body_cache = _decoder(config, body, inputs, positions, kv.layer_run(cache, slice(0, -1)), pos, impl, tp_axis)
    x, parts, (k, v) = _last_token_layer(config, params.layers[-1], x, positions, (cache.k[-1], cache.v[-1]), pos,
                                         last_index, impl, tp_axis)
    cache = kv.join_layers(body_cache, kv.KVCache(k=(k,), v=(v,)))
    if parts is not None:  # added once here: each program of the LM head's kernel would read them again
        x = (x.astype(jnp.float32) + jnp.sum(parts, axis=0)).astype(x.dtype)
    lm_impl = impl if x.shape[0] <= MAX_FUSED_BATCH else "xla"
    return _fused_lm_head(config, params, x, None, lm_impl, tp_axis), cache


def _last_token_layer(config: DenseConfig, layer: Layer, x, positions, cache_kv, pos, last_index, impl, tp_axis):
    """A prefill's last layer for the token at index `last_index` of x [B, T, hidden]: the keys and values of every
    token into the layer's cache (k, v), then that token's attention over them, output projection and MLP as the
    decode's fused ops -> its stream [B, hidden], float32 partial sums pending on it (or None), and the cache."""
    batch = x.shape[0]
    h = ops.rms_norm(x, layer.attn_norm, config.rms_norm_eps, implementation=impl)
    q, _, _, (keys, values) = _queries_keys_values(config, layer.attn, h, positions, cache_kv, pos, impl, tp_axis)
    pick = lambda a, axis: jax.lax.dynamic_index_in_dim(a, last_index, axis=axis, keepdims=True)  # noqa: E731
    k_pos = jnp.arange(keys.shape[2], dtype=jnp.int32)
    out = ops.attention(pick(q, 1), keys, values, pick(positions, 0), k_pos, scale=config.head_dim ** -0.5,
                        sliding_window=config.sliding_window, implementation=impl)  # [B, 1, heads, head_dim]
    tail_impl = impl if batch <= MAX_FUSED_BATCH else "xla"
    x, parts, *_ = _output_and_mlp(config, layer, out.reshape(batch, -1), pick(x, 1)[:, 0], None, tail_impl,
                                   tp_axis)
    return x, parts, (keys, values)


def _fused_decode_supported(config: DenseConfig, params: DenseParams, tokens, cache) -> bool:
    """Shapes are the ones this device holds (under shard_map, its heads); a KV head replicated over a mesh wider
    than the number of KV heads takes the XLA path."""
    d = config.head_dim
    heads, kv_heads = params.layers[0].attn.wq.shape[0], params.layers[0].attn.wk.shape[0]
    return (tokens.shape[0] <= MAX_FUSED_BATCH and d >= 32 and d & (d - 1) == 0 and heads % kv_heads == 0
            and cache.k[0].shape[1] == kv_heads and params.embed.dtype == cache.k[0].dtype)


# mlp: gate_up + down in one launch; layer: o, gate_up, down and the next layer's qkv in one launch;
# stream_attention: the layer launch ending with the next layer's attention; qkv_rope: the prefill's Q/K/V projection
# with rope and the cache write; swiglu_matmul: the prefill's gate/up products with the SwiGLU in their epilogue
# attention_splits: the decode attention leaves its splits to the layer launch, which merges them; qkv_norm and
# mlp_norm: the norms before an XLA Q/K/V projection and before gate/up as stream_norm launches (`_norm_launch`;
# opt-in: not yet measured, session 31)
FUSED_OPS = ("qkv", "attention", "o", "gate_up", "down", "lm_head", "mlp", "layer", "stream_attention", "qkv_rope",
             "swiglu_matmul", "attention_splits", "qkv_norm", "mlp_norm")
PALLAS_OPS_ENV = "TILERT_PALLAS_OPS"  # names the ops that run in Pallas (see `pallas_ops`)
# The ops that run in Pallas by default: the sets measured fastest end to end on the H200 with the [out, in] weights
# (docs/PERF.md, session 8). Batch 1: llama-3.2-1b 0.914 ms, llama-3.1-8b 4.29 ms. Above batch 1 the Q/K/V, output
# and down kernels (16-row tensor-core tiles, K split at most 2 ways) lose to XLA's products: llama-3.1-8b batch 8
# 4.73 ms with attention + gate/up against 5.22 with Q/K/V added. The LM head and the phased MLP stay opt-in; the
# one-launch layer (or MLP) runs by default where it measured faster (`_one_launch`, sessions 27 and 28). The
# prefill's qkv_rope and swiglu_matmul run where the tuning has a tiling (sessions 24 and 25), and the attention
# leaves its splits to that layer launch where it measured faster (`_attention_splits`, session 31).
DEFAULT_PALLAS_OPS = ("qkv", "attention", "o", "gate_up", "down", "qkv_rope", "swiglu_matmul")
BATCHED_PALLAS_OPS = ("attention", "gate_up", "qkv_rope", "swiglu_matmul")


def pallas_ops(batch: int = 1) -> tuple[str, ...]:
    """The fused ops in Pallas: $TILERT_PALLAS_OPS (comma-separated FUSED_OPS names, or "all"; read at
    trace time), else the measured default for this batch size. The others run their XLA reference; the bench uses
    the variable to show each kernel's share."""
    only = os.environ.get(PALLAS_OPS_ENV)
    if only:
        return FUSED_OPS if only == "all" else tuple(op for op in FUSED_OPS if op in only.split(","))
    return DEFAULT_PALLAS_OPS if batch == 1 else BATCHED_PALLAS_OPS


def _op_impl(op: str, impl: str, batch: int) -> str:
    """The implementation of one fused-decode op under impl="pallas" (see pallas_ops)."""
    return impl if impl != "pallas" or op in pallas_ops(batch) else "xla"


def _stream(result, parts):
    """A fused op's result when its input came as x + partial sums: (y, x_new); else (y, None)."""
    return result if parts is not None else (result, None)


def _project_residual(op: str, inp, w, x, bias, impl, tp_axis, pending: bool = False):
    """x + inp @ w^T (w [N, K]) -> the residual stream as (x, None), or (x, partial sums) when the config splits K,
    the product's rows are sharded over `tp_axis` (then the sums are reduced over the mesh: float32 [1, B, N]) or
    `pending` asks for its float32 sums [1, B, N] (its reader adds them)."""
    batch, k = inp.shape
    cfg = tuning.matvec_config(op, batch, k, (w.shape[0],))
    impl = _op_impl(op, impl, batch)
    if impl == "xla":
        cfg = dataclasses.replace(cfg, split=1)  # XLA's product: the plain residual form, no partial sums
    if tp_axis is not None:
        y = ops.matvec(inp, w, out_dtype=jnp.float32, config=cfg, implementation=impl)
        y = collectives.psum(jnp.sum(y, axis=0) if cfg.split > 1 else y, tp_axis)  # [B, N]
        return x, (y if bias is None else y + bias.astype(jnp.float32))[None]
    if bias is not None:
        cfg = dataclasses.replace(cfg, split=1)
        return x + (ops.matvec(inp, w, config=cfg, implementation=impl) + bias), None
    if cfg.split > 1:
        return x, ops.matvec(inp, w, config=cfg, implementation=impl)
    if pending:
        return x, ops.matvec(inp, w, out_dtype=jnp.float32, config=cfg, implementation=impl)[None]
    return ops.matvec_residual(inp, w, x, config=cfg, implementation=impl), None


def _one_launch(op: str, x, ffn: int) -> bool:
    """Whether the fused decode runs op "mlp" (the MLP) or "layer" (the output projection, the MLP and the next
    layer's Q/K/V) as one launch: where $TILERT_PALLAS_OPS names the op, else where the Mosaic GPU weight stream
    (kernels/layer_decode.py) runs and measured faster (tuning.ONE_LAUNCH). Where the stream does not run, the MLP
    named by $TILERT_PALLAS_OPS is the phased Triton kernel; the layer has no other launch."""
    runs = ops.layer_decode_supported(x, ffn)
    if os.environ.get(PALLAS_OPS_ENV):
        return op in pallas_ops(x.shape[0]) and (runs or op == "mlp")
    return tuning.ONE_LAUNCH.get((x.shape[1], ffn)) == op and runs


def _stream_attention(config: DenseConfig, x, ffn: int, attention) -> bool:
    """Whether the layer launch ends with the next layer's attention (kernels/stream_attention.py): where
    $TILERT_PALLAS_OPS names "stream_attention" (opt-in: llama-3.2-1b measured level with the Triton attention's
    launch, session 29), the layer's op runs, and the attention has no bias, q/k norm or window and fits the kernel."""
    return ("stream_attention" in pallas_ops(x.shape[0])  # never in the default sets: named or "all"
            and not (config.qkv_bias or config.qk_norm or config.sliding_window is not None)
            and _one_launch("layer", x, ffn) and ops.stream_attention_supported(x, ffn, attention))


def _attention_splits(layer: Layer, x, impl: str, tp_axis) -> bool:
    """Whether the decode attention leaves its splits (ops.decode_attention's partials) for the layer launch that
    follows it to merge in its output projection's prologue: where that launch runs and $TILERT_PALLAS_OPS names
    "attention_splits", else where it measured faster (tuning.ATTENTION_SPLITS)."""
    ffn = layer.mlp.w_gate.shape[0]
    wanted = ("attention_splits" in pallas_ops(1) if os.environ.get(PALLAS_OPS_ENV)
              else (x.shape[1], ffn) in tuning.ATTENTION_SPLITS)
    return (wanted and impl == "pallas" and tp_axis is None and layer.attn.bo is None and x.shape[0] == 1
            and _one_launch("layer", x, ffn))


def _norm_launch(op: str, impl: str, batch: int) -> bool:
    """Whether a layer's RMSNorm is one stream_norm launch that adds the sums the product before it leaves pending:
    op "qkv_norm", the norm before an XLA Q/K/V projection after the down product; op "mlp_norm", the norm before the
    gate/up product (which then takes the normed input) after the output projection. Each replaces XLA's residual
    add and two norm kernels above batch 1, where the Q/K/V, output and down products run on XLA."""
    wanted = impl == "pallas" and op in pallas_ops(batch)
    return wanted and (op == "mlp_norm" or _op_impl("qkv", impl, batch) == "xla")


def _norm_stream(x, parts, weight, eps: float):
    """One stream_norm launch: x [B, hidden] plus its float32 partial sums (or None) -> (their sum, its RMSNorm)."""
    return sn.stream_norm(sn.Stream(x, () if parts is None else (parts,), weight, eps))


def _norm_qkv(config: DenseConfig, layer: Layer, x, parts, cfg, impl):
    """The layer's RMSNorm and Q/K/V projection on the stream x [B, hidden] with float32 partial sums `parts`
    pending (or None) -> (qkv [B, N] or its partial sums [S, B, N], the combined stream [B, hidden])."""
    batch, h = x.shape
    weights, eps = _qkv_weights(layer, h), config.rms_norm_eps
    if _norm_launch("qkv_norm", impl, batch):
        x, normed = _norm_stream(x, parts, layer.attn_norm, eps)
        return jnp.concatenate([ops.matvec(normed, w) for w in weights], axis=-1), x
    qkv, x_new = _stream(ops.norm_matvec(x, layer.attn_norm, eps, weights, x_parts=parts, config=cfg,
                                         implementation=_op_impl("qkv", impl, batch)), parts)
    return qkv, (x if x_new is None else x_new)


def _qkv_weights(layer: Layer, hidden: int) -> tuple[jax.Array, jax.Array, jax.Array]:
    """The layer's (W_q, W_k, W_v) as [out, hidden] matrices (free reshapes)."""
    return tuple(w.reshape(-1, hidden) for w in (layer.attn.wq, layer.attn.wk, layer.attn.wv))


def _output_and_mlp(config: DenseConfig, layer: Layer, attn, x, parts, impl, tp_axis, counters=None,
                    next_layer: Layer | None = None, next_attention=None):
    """One token row per sequence after its attention (attn [B, heads * head_dim], or the splits the previous launch
    left; x [B, hidden] with float32 partial sums `parts` pending on it or None): x + attn @ wo^T, then
    x + MLP(RMSNorm(x)), as fused decode ops -> the new x, the partial sums pending on it (or None), the next layer's
    Q/K/V projection when this launch made it (float32 partial sums [S, B, N], or None: the caller projects), the
    weight stream's counters (as given without it) and, given next_attention (ops.StreamAttention: the caller checked
    `_stream_attention`), the next layer's (attn, k_cache, v_cache) (else None)."""
    batch, h = x.shape
    a, mlp, eps = layer.attn, layer.mlp, config.rms_norm_eps
    w_o = a.wo.reshape(h, -1)
    if impl == "pallas" and tp_axis is None and a.bo is None and _one_launch("layer", x, mlp.w_gate.shape[0]):
        following = {} if next_layer is None else dict(next_norm=next_layer.attn_norm,
                                                        next_qkv=_qkv_weights(next_layer, h),
                                                        next_attention=next_attention)
        out, x, counters, *attention = ops.layer_block(x, layer.mlp_norm, eps, mlp.w_gate, mlp.w_up, mlp.w_down,
                                                       attn=attn, w_o=w_o, x_parts=parts, counters=counters,
                                                       implementation=impl, **following)
        if next_layer is None:
            return x, out, None, counters, None
        return x, None, out, counters, tuple(attention) or None
    x, parts = _project_residual("o", attn, w_o, x, a.bo, impl, tp_axis, _norm_launch("mlp_norm", impl, batch))
    if impl == "pallas" and _one_launch("mlp", x, mlp.w_gate.shape[0]):
        configs = tuning.mlp_block_configs(batch, h, mlp.w_gate.shape[0])
        parts, x, counters = ops.mlp_block(x, layer.mlp_norm, eps, mlp.w_gate, mlp.w_up, mlp.w_down, x_parts=parts,
                                           configs=configs, counters=counters, implementation=impl)
        parts = parts if tp_axis is None else collectives.psum(jnp.sum(parts, axis=0), tp_axis)[None]
        return x, parts, None, counters, None
    config_gate_up = tuning.matvec_config("gate_up", batch, h, (mlp.w_gate.shape[0],) * 2)
    gate_up = functools.partial(ops.swiglu_matvec, eps=eps, w_gate=mlp.w_gate, w_up=mlp.w_up, config=config_gate_up,
                                implementation=_op_impl("gate_up", impl, batch))
    if _norm_launch("mlp_norm", impl, batch):
        x, normed = _norm_stream(x, parts, layer.mlp_norm, eps)
        mid = gate_up(normed, None)
    else:
        mid, x_new = _stream(gate_up(x, layer.mlp_norm, x_parts=parts), parts)
        x = x if x_new is None else x_new
    pending = _norm_launch("qkv_norm", impl, batch)
    return *_project_residual("down", mid, mlp.w_down, x, None, impl, tp_axis, pending), None, counters, None


def _decode_fused(config: DenseConfig, params: DenseParams, tokens, cache: kv.KVCache, pos, impl, tp_axis):
    """tokens: int[B] at position pos -> the residual stream before the final norm (x [B, hidden] and float32
    partial sums or None) and the updated cache. Every op here takes `implementation=impl`."""
    first = params.layers[0]
    h, d, eps = config.hidden_size, config.head_dim, config.rms_norm_eps
    n, kvh = first.attn.wq.shape[0], first.attn.wk.shape[0]  # held by this device
    batch = tokens.shape[0]
    x = collectives.embed_lookup(params.embed, tokens[:, None], tp_axis)[:, 0]  # [B, hidden]
    parts = None
    cos, sin = rope_tables(config.rope, jnp.reshape(pos, (1,)), x.dtype)  # [1, head_dim]
    cos, sin = cos[0], sin[0]
    attn_cfg = tuning.attention_config(batch, kvh, cache.max_len, d)
    qkv_cfg = tuning.matvec_config("qkv", batch, h, (n * d, kvh * d, kvh * d))
    new_k, new_v = [], []
    arrivals = None  # the attention kernel's split counters, one array through every layer
    counters = None  # and the weight stream's grid barriers'
    qkv = None  # the next layer's Q/K/V projection, when the previous layer's launch made it
    taken = None  # and its attention (attn, k_cache, v_cache), when that launch also took it
    for i, layer in enumerate(params.layers):
        a = layer.attn
        if taken is not None:  # the previous launch took this layer's attention
            attn, k, v = taken
        else:
            if qkv is None:
                qkv, x = _norm_qkv(config, layer, x, parts, qkv_cfg, impl)
                parts = None  # added into x
            qkv = qkv.reshape(qkv.shape[:-1] + (n + 2 * kvh, d))
            bias = (a.bq, a.bk, a.bv) if a.bq is not None else None
            qk_norm = (a.q_norm, a.k_norm) if config.qk_norm else None
            splits_out = _attention_splits(layer, x, impl, tp_axis)
            attn, k, v, arrivals = ops.decode_attention(
                qkv, cache.k[i], cache.v[i], pos, cos, sin, num_heads=n, num_kv_heads=kvh, scale=d ** -0.5, eps=eps,
                bias=bias, qk_norm=qk_norm, sliding_window=config.sliding_window, config=attn_cfg, arrivals=arrivals,
                partials=splits_out, implementation=_op_impl("attention", impl, batch))
            attn = attn if splits_out else attn.reshape(batch, n * d)
        new_k.append(k)
        new_v.append(v)
        next_layer = params.layers[i + 1] if i + 1 < len(params.layers) else None
        following = None  # the next layer's attention, where this layer's launch takes it
        if impl == "pallas" and tp_axis is None and next_layer is not None:
            following = ops.StreamAttention(cache.k[i + 1], cache.v[i + 1], pos, cos, sin, n, d ** -0.5)
            following = following if _stream_attention(config, x, layer.mlp.w_gate.shape[0], following) else None
        x, parts, qkv, counters, taken = _output_and_mlp(config, layer, attn, x, parts, impl, tp_axis, counters,
                                                         next_layer, following)
    return x, parts, kv.KVCache(k=tuple(new_k), v=tuple(new_v))


def _fused_lm_head(config: DenseConfig, params: DenseParams, x, parts, impl, tp_axis) -> jax.Array:
    """Final RMSNorm + LM head in one launch (impl names it: "pallas" is the kernel) -> float32 logits [B, vocab]
    (gathered from the vocabulary shards)."""
    w = params.embed if params.lm_head is None else params.lm_head  # [vocab, hidden] (or this device's slice)
    cfg = dataclasses.replace(tuning.matvec_config("lm_head", x.shape[0], config.hidden_size, (w.shape[0],)), split=1)
    logits, _ = _stream(ops.norm_matvec(x, params.final_norm, config.rms_norm_eps, (w,), x_parts=parts,
                                        out_dtype=jnp.float32, config=cfg, implementation=impl),
                        parts)
    return collectives.gather_vocab(logits, tp_axis, config.vocab_size)


def decode_step(config: DenseConfig, params: DenseParams, tokens, cache: kv.KVCache, pos, impl: str = "xla",
                tp_axis=None):
    """tokens: int[B] at position pos -> float32 logits [B, vocab] and the updated cache."""
    if impl == "pallas" and _fused_decode_supported(config, params, tokens, cache):
        x, parts, cache = _decode_fused(config, params, tokens, cache, pos, impl, tp_axis)
        head_impl = _op_impl("lm_head", impl, tokens.shape[0])
        if head_impl == "xla" and parts is not None:  # the pending sums and the norm in one launch, not XLA's three
            _, h = _norm_stream(x, parts, params.final_norm, config.rms_norm_eps)
            return _logits(config, params, h, tp_axis), cache
        return _fused_lm_head(config, params, x, parts, head_impl, tp_axis), cache
    positions = pos + jnp.zeros((1,), jnp.int32)
    x, cache = _decoder(config, params, tokens[:, None], positions, cache, pos, impl, tp_axis)
    return lm_head(config, params, x[:, 0], impl, tp_axis), cache
