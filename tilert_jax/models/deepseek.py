"""DeepSeek V2 / V2-Lite, V3 and V3.2-Exp as pure functions: MLA attention (with or without the query LoRA), MoE
with shared experts, DeepSeek Sparse Attention (V3.2's lightning indexer), the MTP layer, FP8 block-scaled weights.

The math follows transformers 5 (`deepseek_v2`, `deepseek_v3`, `deepseek_v32`) exactly, including its choices:
V2's router never renormalises its top-k weights; V3 / V3.2 route with sigmoid "noaux_tc" whatever `topk_method`
says; the q_a / kv_a RMSNorms use eps 1e-6; the attention scale is qk_head_dim ** -0.5 times yarn's
mscale(factor, mscale_all_dim) ** 2.

Layers are unrolled in Python (as in models/dense.py). The whole-sequence forward expands the latents into per-head
keys and values; prefill and decode run the absorbed form over the compressed cache (see models/mla.py).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

from tilert_jax import cache as kv
from tilert_jax import config as config_lib
from tilert_jax.kernels import index_scores, mla_decode, ops
from tilert_jax.models import mla, moe
from tilert_jax.models.deepseek_linear import Linear, linear, linear_spec, linears, swiglu, weight
from tilert_jax.params import ParamSpec, layer_run, param_bytes
from tilert_jax.rope import RopeConfig, apply_rope, apply_rope_interleaved, rope_tables, yarn_mscale
from tilert_jax.sharding import collectives

MODEL_TYPES = ("deepseek_v2", "deepseek_v3", "deepseek_v32")
LATENT_NORM_EPS = 1e-6  # q_a_layernorm / kv_a_layernorm are built without the config's eps in transformers
INDEX_NORM_EPS = 1e-6


@dataclasses.dataclass(frozen=True)
class DeepseekConfig:
    """One DeepSeek model. Tests and the bench shrink it with `dataclasses.replace` (e.g. num_layers)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int  # the dense MLP layers
    moe_intermediate_size: int  # one routed (or shared) expert
    num_layers: int
    num_heads: int
    q_lora_rank: int | None  # None: a plain q_proj (V2-Lite)
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rope: RopeConfig
    attn_scale: float  # softmax scale, yarn's mscale correction included
    rope_interleave: bool = True  # MLA rope on interleaved pairs (V2, V3.2 always; V3 per config.json)
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    attention_bias: bool = False  # biases on q_a_proj / kv_a_proj_with_mqa / o_proj
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    n_shared_experts: int = 0
    routed_scaling_factor: float = 1.0
    router: str = "sigmoid"  # "softmax" (V2) or "sigmoid" (V3 / V3.2 noaux_tc with e_score_correction_bias)
    topk_method: str = "noaux_tc"  # V2: "greedy" or "group_limited_greedy"
    n_group: int | None = None
    topk_group: int | None = None
    norm_topk_prob: bool = False
    first_k_dense_replace: int = 0  # layers before this one use the dense MLP
    mlp_layer_types: tuple[str, ...] | None = None  # explicit "dense" / "sparse" per layer (V3.2), else the above
    index_topk: int = 0  # DeepSeek Sparse Attention (V3.2): tokens each query attends to; 0 = dense attention
    index_n_heads: int = 0
    index_head_dim: int = 0
    mtp_layers: int = 0  # next-token-prediction layers in the checkpoint (loaded by `load_mtp`)
    fp8_block: tuple[int, int] | None = None  # FP8 checkpoint: weight_block_size (block_out, block_in)
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"

    @property
    def family(self) -> str:
        return "deepseek"

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def has_indexer(self) -> bool:
        return self.index_topk > 0

    @property
    def num_kv_heads(self) -> int:
        """MLA expands every latent into num_heads keys and values: for mesh checks it is multi-head attention."""
        return self.num_heads

    def is_moe(self, layer: int) -> bool:
        if self.n_routed_experts == 0:
            return False
        if self.mlp_layer_types is not None and layer < len(self.mlp_layer_types):
            return self.mlp_layer_types[layer] == "sparse"
        return layer >= self.first_k_dense_replace


# transformers' defaults for keys a config.json may leave out
_DEFAULTS = {
    "deepseek_v2": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=64, n_shared_experts=2, num_experts_per_tok=None,
                        routed_scaling_factor=1.0, first_k_dense_replace=0, moe_intermediate_size=1407,
                        n_group=None, topk_group=None, max_position_embeddings=2048, num_nextn_predict_layers=0),
    "deepseek_v3": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                        v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                        routed_scaling_factor=2.5, first_k_dense_replace=3, moe_intermediate_size=2048,
                        n_group=8, topk_group=4, norm_topk_prob=True, max_position_embeddings=4096,
                        num_nextn_predict_layers=1),
    "deepseek_v32": dict(q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
                         v_head_dim=128, n_routed_experts=256, n_shared_experts=1, num_experts_per_tok=8,
                         routed_scaling_factor=2.5, first_k_dense_replace=3, moe_intermediate_size=2048,
                         n_group=8, topk_group=4, norm_topk_prob=True, max_position_embeddings=163840,
                         index_topk=2048, index_head_dim=128, index_n_heads=64, num_nextn_predict_layers=0),
}


def _fp8_block(hf: dict) -> tuple[int, int] | None:
    quant = hf.get("quantization_config")
    if not quant:
        return None
    method = quant.get("quant_method")
    if method != "fp8":
        raise ValueError(f"unsupported quantization_config quant_method {method!r} (only DeepSeek's block fp8)")
    if quant.get("fmt", "e4m3") != "e4m3":
        raise ValueError(f"unsupported fp8 format {quant.get('fmt')!r} (only e4m3)")
    block = quant.get("weight_block_size") or [128, 128]
    if len(block) != 2:
        raise ValueError(f"weight_block_size must have two entries, got {block!r}")
    return int(block[0]), int(block[1])


def deepseek_config_from_hf(hf: dict) -> DeepseekConfig:
    model_type = hf["model_type"]
    if model_type not in MODEL_TYPES:
        raise ValueError(f"not a DeepSeek model type: {model_type!r}")
    get = lambda key: hf[key] if key in hf else _DEFAULTS[model_type].get(key)  # noqa: E731
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} for {model_type} (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"unsupported mlp_bias=true for {model_type}")
    q_lora_rank = get("q_lora_rank")
    if model_type == "deepseek_v32" and q_lora_rank is None:
        raise ValueError("deepseek_v32 needs q_lora_rank (its indexer reads the query latent)")
    rope_dim = get("qk_rope_head_dim")
    rope = RopeConfig.from_hf(hf, rotary_dim=rope_dim)
    qk_head_dim = get("qk_nope_head_dim") + rope_dim
    attn_scale = qk_head_dim ** -0.5
    if rope.rope_type != "default" and rope.mscale_all_dim:
        attn_scale *= yarn_mscale(rope.factor, rope.mscale_all_dim) ** 2
    if model_type == "deepseek_v2":
        router, topk_method, norm_topk = "softmax", hf.get("topk_method") or "greedy", False
        if topk_method not in ("greedy", "group_limited_greedy"):
            raise ValueError(f"unsupported topk_method {topk_method!r} for deepseek_v2")
        interleave = True
    else:
        router, topk_method, norm_topk = "sigmoid", "noaux_tc", bool(get("norm_topk_prob"))
        interleave = bool(hf.get("rope_interleave", True)) if model_type == "deepseek_v3" else True
    n_experts = get("n_routed_experts") or 0
    top_k = get("num_experts_per_tok") or 0
    n_group, topk_group = get("n_group"), get("topk_group")
    if n_experts and (router == "sigmoid" or topk_method == "group_limited_greedy"):
        if not n_group or not topk_group or n_experts % n_group:
            raise ValueError(f"n_group={n_group} / topk_group={topk_group} do not divide {n_experts} experts")
    first_dense = get("first_k_dense_replace") or 0
    layer_types = None
    num_layers = hf["num_hidden_layers"]
    if model_type == "deepseek_v32" and hf.get("mlp_layer_types"):
        types = tuple(hf["mlp_layer_types"])
        default = tuple("dense" if i < first_dense else "sparse" for i in range(num_layers))
        layer_types = None if types == default else types
    mtp = hf.get("num_nextn_predict_layers", hf.get("num_mtp_layers", get("num_nextn_predict_layers"))) or 0
    return DeepseekConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        moe_intermediate_size=get("moe_intermediate_size"),
        num_layers=num_layers,
        num_heads=hf["num_attention_heads"],
        q_lora_rank=q_lora_rank,
        kv_lora_rank=get("kv_lora_rank"),
        qk_nope_head_dim=get("qk_nope_head_dim"),
        qk_rope_head_dim=rope_dim,
        v_head_dim=get("v_head_dim"),
        rope=rope,
        attn_scale=float(attn_scale),
        rope_interleave=interleave,
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=get("max_position_embeddings"),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        attention_bias=bool(hf.get("attention_bias", False)),
        n_routed_experts=n_experts,
        num_experts_per_tok=top_k,
        n_shared_experts=get("n_shared_experts") or 0,
        routed_scaling_factor=float(get("routed_scaling_factor")),
        router=router,
        topk_method=topk_method,
        n_group=n_group,
        topk_group=topk_group,
        norm_topk_prob=norm_topk,
        first_k_dense_replace=first_dense,
        mlp_layer_types=layer_types,
        index_topk=(get("index_topk") or 0) if model_type == "deepseek_v32" else 0,
        index_n_heads=(get("index_n_heads") or 0) if model_type == "deepseek_v32" else 0,
        index_head_dim=(get("index_head_dim") or 0) if model_type == "deepseek_v32" else 0,
        mtp_layers=int(mtp),
        fp8_block=_fp8_block(hf),
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=config_lib._eos_ids(hf.get("eos_token_id")),
        dtype=config_lib._checkpoint_dtype(hf),
    )


# ----------------------------------------------------------------------------------------------- parameters


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Indexer:
    wq_b: Linear  # [q_lora, index_heads * index_head_dim]
    wk: Linear  # [hidden, index_head_dim]
    k_norm: jax.Array  # [index_head_dim] LayerNorm weight
    k_norm_bias: jax.Array  # [index_head_dim]
    weights_proj: jax.Array  # [hidden, index_heads] float32


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLA:
    kv_a: Linear  # [hidden, kv_lora + rope]
    kv_a_norm: jax.Array  # [kv_lora]
    kv_b: Linear  # [kv_lora, heads * (nope + v)]
    o: Linear  # [heads * v, hidden]
    q_proj: Linear | None = None  # [hidden, heads * (nope + rope)] (no query LoRA)
    q_a: Linear | None = None  # [hidden, q_lora]
    q_a_norm: jax.Array | None = None  # [q_lora]
    q_b: Linear | None = None  # [q_lora, heads * (nope + rope)]
    indexer: Indexer | None = None


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLP:
    gate: Linear  # [hidden, f] (a stack [experts, hidden, f] for routed experts)
    up: Linear  # [hidden, f]
    down: Linear  # [f, hidden]


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MoE:
    router: jax.Array  # [hidden, experts]
    experts: MLP  # stacked over the expert axis
    e_bias: jax.Array | None = None  # [experts] float32 e_score_correction_bias (V3 / V3.2)
    shared: MLP | None = None  # the shared experts as one MLP of n_shared * moe_intermediate


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class Layer:
    attn_norm: jax.Array  # [hidden]
    attn: MLA
    mlp_norm: jax.Array  # [hidden]
    mlp: MLP | MoE


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class DeepseekParams:
    embed: jax.Array  # [vocab, hidden]
    layers: tuple[Layer, ...]
    final_norm: jax.Array  # [hidden]
    lm_head: jax.Array | None  # [hidden, vocab]; None when tied


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MTPLayer:
    enorm: jax.Array  # [hidden] on the next token's embedding
    hnorm: jax.Array  # [hidden] on the previous hidden state
    eh_proj: Linear  # [2 * hidden, hidden]
    block: Layer  # a decoder layer (always MoE)
    norm: jax.Array  # [hidden] shared_head.norm; the head itself is the main lm_head


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MTPParams:
    layers: tuple[MTPLayer, ...]


def _layer_specs(config: DeepseekConfig, moe_layer: bool) -> Layer:
    h, n, r = config.hidden_size, config.num_heads, config.kv_lora_rank
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    blk, bias = config.fp8_block, config.attention_bias
    norm = lambda dim, axis: ParamSpec((dim,), (axis,), init="ones")  # noqa: E731
    attn = MLA(
        kv_a=linear_spec(h, r + dr, "embed", "kv_lora", fp8_block=blk, bias=bias),
        kv_a_norm=norm(r, "kv_lora"),
        kv_b=linear_spec(r, n * (dn + dv), "kv_lora", "heads", fp8_block=blk),
        o=linear_spec(n * dv, h, "heads", "embed", fp8_block=blk, bias=bias),
    )
    if config.q_lora_rank is None:
        attn.q_proj = linear_spec(h, n * (dn + dr), "embed", "heads", fp8_block=blk)
    else:
        q = config.q_lora_rank
        attn.q_a = linear_spec(h, q, "embed", "q_lora", fp8_block=blk, bias=bias)
        attn.q_a_norm = norm(q, "q_lora")
        attn.q_b = linear_spec(q, n * (dn + dr), "q_lora", "heads", fp8_block=blk)
    if config.has_indexer:
        hi, di = config.index_n_heads, config.index_head_dim
        attn.indexer = Indexer(
            wq_b=linear_spec(config.q_lora_rank, hi * di, "q_lora", None, fp8_block=blk),
            wk=linear_spec(h, di, "embed", None, fp8_block=blk),
            k_norm=ParamSpec((di,), (None,), init="ones"),
            k_norm_bias=ParamSpec((di,), (None,), init="zeros"),
            weights_proj=ParamSpec((h, hi), ("embed", None), dtype="float32"),
        )

    def mlp(f: int, experts: int | None = None) -> MLP:
        axis = "expert_mlp" if experts else "mlp"
        return MLP(gate=linear_spec(h, f, "embed", axis, fp8_block=blk, experts=experts),
                   up=linear_spec(h, f, "embed", axis, fp8_block=blk, experts=experts),
                   down=linear_spec(f, h, axis, "embed", fp8_block=blk, experts=experts))

    if moe_layer:
        e, f = config.n_routed_experts, config.moe_intermediate_size
        ffn = MoE(router=ParamSpec((h, e), ("embed", None)), experts=mlp(f, experts=e),
                  e_bias=ParamSpec((e,), (None,), init="zeros", dtype="float32") if config.router == "sigmoid"
                  else None,
                  shared=mlp(f * config.n_shared_experts) if config.n_shared_experts else None)
    else:
        ffn = mlp(config.intermediate_size)
    return Layer(attn_norm=norm(h, "embed"), attn=attn, mlp_norm=norm(h, "embed"), mlp=ffn)


def param_specs(config: DeepseekConfig) -> DeepseekParams:
    h = config.hidden_size
    return DeepseekParams(
        embed=ParamSpec((config.vocab_size, h), ("vocab", "embed")),
        layers=tuple(_layer_specs(config, config.is_moe(i)) for i in range(config.num_layers)),
        final_norm=ParamSpec((h,), ("embed",), init="ones"),
        lm_head=None if config.tie_word_embeddings else ParamSpec((h, config.vocab_size), ("embed", "vocab")),
    )


def mtp_param_specs(config: DeepseekConfig, fp8_eh_proj: bool | None = None) -> MTPParams:
    """The MTP layers' parameters (their embedding and head are the main model's). fp8_eh_proj: whether eh_proj is
    stored FP8 (default: as every other Linear of the checkpoint)."""
    h = config.hidden_size
    fp8 = config.fp8_block is not None if fp8_eh_proj is None else fp8_eh_proj
    norm = ParamSpec((h,), ("embed",), init="ones")
    return MTPParams(layers=tuple(
        MTPLayer(enorm=norm, hnorm=norm,
                 eh_proj=linear_spec(2 * h, h, None, "embed", fp8_block=config.fp8_block if fp8 else None),
                 block=_layer_specs(config, config.n_routed_experts > 0), norm=norm)
        for _ in range(config.mtp_layers)))


# ----------------------------------------------------------------------------------------------------- cache


@jax.tree_util.register_dataclass
@dataclasses.dataclass
class MLACache:
    """Per layer, per token: [latent (kv_lora_rank), rope key (qk_rope_head_dim)], and V3.2's indexer key."""

    kv: tuple[jax.Array, ...]  # per layer [B, max_len, kv_lora_rank + qk_rope_head_dim]
    index_k: tuple[jax.Array, ...] = ()  # per layer [B, max_len, index_head_dim] (V3.2), else empty

    @property
    def max_len(self) -> int:
        return self.kv[0].shape[1]

    @classmethod
    def zeros(cls, config: DeepseekConfig, batch: int, max_len: int, dtype, num_layers: int | None = None
              ) -> "MLACache":
        layers = config.num_layers if num_layers is None else num_layers
        width = config.kv_lora_rank + config.qk_rope_head_dim
        kv = tuple(jnp.zeros((batch, max_len, width), dtype) for _ in range(layers))
        index_k = ()
        if config.has_indexer:
            index_k = tuple(jnp.zeros((batch, max_len, config.index_head_dim), dtype) for _ in range(layers))
        return cls(kv=kv, index_k=index_k)

    def nbytes_per_token(self) -> int:
        """Bytes stored per token (one sequence), over all layers."""
        return sum(a.dtype.itemsize * a.shape[2] for a in self.kv + self.index_k)


def init_cache(config: DeepseekConfig, batch: int, max_len: int, dtype, num_kv_heads: int | None = None
               ) -> MLACache:
    """num_kv_heads: accepted for the dense family's signature; the latent cache has no heads."""
    return MLACache.zeros(config, batch, max_len, dtype)


def cache_partition_specs(config: DeepseekConfig, tp_axis: str) -> MLACache:
    """Under shard_map every device holds the whole latent cache (it is shared by all heads), replicated."""
    spec = jax.sharding.PartitionSpec()
    return MLACache(kv=(spec,) * config.num_layers, index_k=(spec,) * config.num_layers if config.has_indexer else ())


def cache_bytes_per_token(config: DeepseekConfig, dtype) -> int:
    """What `init_cache` stores per token: (kv_lora_rank + qk_rope_head_dim [+ index_head_dim]) per layer."""
    width = config.kv_lora_rank + config.qk_rope_head_dim + (config.index_head_dim if config.has_indexer else 0)
    return config.num_layers * width * jnp.dtype(dtype).itemsize


# --------------------------------------------------------------------------------------------------- forward


def _rope(config: DeepseekConfig, x, cos, sin):
    """The MLA rope: x [B, T, heads, rope_dim]."""
    return apply_rope_interleaved(x, cos, sin) if config.rope_interleave else apply_rope(x, cos, sin)


def _indexer_queries(config: DeepseekConfig, p: Indexer, x, q_resid, cos, sin, impl: str = "xla"):
    """The indexer's queries [B, T, Hi, Di] (rope on the first rope_dim channels, half-split) and per-head weights
    [B, T, Hi] float32 of the query rows: x [B, T, hidden], q_resid the normed q_a of the same rows."""
    b, t, _ = x.shape
    dr = config.qk_rope_head_dim
    q = linear(q_resid, p.wq_b, config.fp8_block, impl).reshape(b, t, config.index_n_heads, config.index_head_dim)
    q = jnp.concatenate([apply_rope(q[..., :dr], cos, sin), q[..., dr:]], axis=-1)
    head_weights = jnp.matmul(x.astype(jnp.float32), p.weights_proj.astype(jnp.float32))
    return q, head_weights * config.index_n_heads ** -0.5


def _indexer_keys(config: DeepseekConfig, p: Indexer, x, cos, sin, impl: str = "xla"):
    """The indexer's keys [B, T, Di] of the rows x [B, T, hidden]: LayerNorm, then the queries' rope."""
    dr = config.qk_rope_head_dim
    k = mla.layer_norm(linear(x, p.wk, config.fp8_block, impl), p.k_norm, p.k_norm_bias, INDEX_NORM_EPS)[:, :, None]
    return jnp.concatenate([apply_rope(k[..., :dr], cos, sin), k[..., dr:]], axis=-1)[:, :, 0]


def _row(a, index, axis: int = 1):
    """Row `index` (traced) of a along axis, kept as a length-1 axis."""
    return jax.lax.dynamic_index_in_dim(a, index, axis=axis, keepdims=True)


def _attention(config: DeepseekConfig, p: MLA, x, positions, kv_cache, index_cache, pos, impl, last_index=None):
    """x: [B, T, hidden] (normed); positions [T]. Returns the output [B, T, hidden] before o_proj's bias (under
    shard_map a partial sum over the heads this device holds) and the layer's caches. With last_index (a prefill's
    last layer) only row last_index's output [B, 1, hidden]; every row's cache entries are still written."""
    b = x.shape[0]
    if last_index is None:  # the query's first projection and kv_a read the same x: one launch with impl="pallas"
        q, compressed = linears(x, [(query_first(p),), (p.kv_a,)], config.fp8_block, impl)
    else:
        q = linear(_row(x, last_index), query_first(p), config.fp8_block, impl)
        compressed = linear(x, p.kv_a, config.fp8_block, impl)
    out, kv_cache, index_cache = attend(config, p, x, q, compressed, positions, kv_cache, index_cache, pos, impl,
                                        last_index)
    y = linear(out.reshape(b, q.shape[1], -1), Linear(w=p.o.w, scale=p.o.scale), config.fp8_block, impl)
    return y, kv_cache, index_cache


def query_first(p: MLA) -> Linear:
    """The query's first projection: q_proj, or q_a under the query LoRA."""
    return p.q_proj if p.q_proj is not None else p.q_a


def query(config: DeepseekConfig, p: MLA, q_first, impl):
    """The query [B, T, H * (dn + dr)] from the query's first projection, and the normed q_a under the query LoRA (the
    indexer reads it; None without the LoRA)."""
    if p.q_proj is not None:
        return q_first, None
    q_resid = ops.rms_norm(q_first, p.q_a_norm, LATENT_NORM_EPS, implementation=impl)
    return linear(q_resid, p.q_b, config.fp8_block, impl), q_resid


def _heads(config: DeepseekConfig, p: MLA) -> int:
    """The heads this device holds (all of them without a mesh)."""
    return p.kv_b.w.shape[-1] // (config.qk_nope_head_dim + config.v_head_dim)


def decode_kernel_fits(config: DeepseekConfig, p: MLA) -> bool:
    """Whether `attend_decode_kernel` tiles this layer's shapes."""
    return mla_decode.supported(_heads(config, p), config.qk_nope_head_dim, config.qk_rope_head_dim,
                                config.v_head_dim, config.kv_lora_rank, None if p.kv_b.scale is None else
                                config.fp8_block)


def attend_decode_kernel(config: DeepseekConfig, p: MLA, q, compressed, kv_cache, pos, counters=None):
    """One decode token of multi-head latent attention through kernels/mla_decode.py, from its projections as they
    leave their launch: q [S, B, H * (dn + dr)] and compressed = kv_a(x) [S, B, r + dr] as S float32 partial sums
    (S = 1: finished). The rope is taken in float32 (V3's XLA path rounds it to bf16 first). Returns the heads'
    outputs [B, H, dv], the latent cache with the token's entry at pos, and the arrival counters (zero) after it."""
    parts, b = q.shape[:2]
    cos, sin = rope_tables(config.rope, jnp.reshape(pos, (1,)), jnp.float32)  # [1, dr]
    return mla_decode.mla_decode(q.reshape(parts, b, _heads(config, p), -1), compressed, p.kv_a_norm, cos[0], sin[0],
                                 p.kv_b.w, p.kv_b.scale, None if p.kv_b.scale is None else config.fp8_block, kv_cache,
                                 pos, softmax_scale=config.attn_scale, interleaved=config.rope_interleave,
                                 eps=LATENT_NORM_EPS, counters=counters)


def attend(config: DeepseekConfig, p: MLA, x, q, compressed, positions, kv_cache, index_cache, pos, impl,
           q_index=None):
    """Multi-head latent attention from the projections of the normed x [B, T, hidden] (x itself is read by the
    sparse-attention indexer only): q = query_first(p)(x) [B, T, *], compressed = kv_a(x) [B, T, r + dr]. Returns the
    heads' outputs [B, T, H, dv] (o_proj not applied) and the layer's caches. With q_index (traced; a cache given),
    q holds row q_index's query alone [B, 1, *] and so does the output; every row's cache entries are written."""
    b, t = compressed.shape[:2]
    tq = q.shape[1]
    r = config.kv_lora_rank
    dn, dr, dv = config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    n = _heads(config, p)
    blk = config.fp8_block
    q, q_resid = query(config, p, q, impl)
    q_positions, x_q = (positions, x) if q_index is None else (_row(positions, q_index, 0), _row(x, q_index))
    # V2 rotates in float32 (complex arithmetic); V3 in the activation dtype. Identical in float32.
    rope_dtype = jnp.float32 if config.model_type == "deepseek_v2" else q.dtype

    def tables(rows, dtype):  # the rope's cos, sin [1, len(rows), dr]
        return rope_tables(config.rope, rows[None, :], dtype)

    new_index, top = index_cache, None
    if kv_cache is not None and p.indexer is not None and kv_cache.shape[1] > config.index_topk:
        iq, hw = _indexer_queries(config, p.indexer, x_q, q_resid, *tables(q_positions, q.dtype), impl)
        ik = _indexer_keys(config, p.indexer, x, *tables(positions, q.dtype), impl)
        new_index = jax.lax.dynamic_update_slice(index_cache, ik.astype(index_cache.dtype), (0, pos, 0))
        if impl == "pallas" and tq == 1 and index_scores.supported(kv_cache.shape[1], config.index_head_dim):
            scores = index_scores.index_scores(iq[:, 0], new_index, hw[:, 0], q_positions[0])[:, None]  # [B, 1, S]
        else:
            visible = q_positions[None, :, None] >= jnp.arange(kv_cache.shape[1], dtype=jnp.int32)[None, None, :]
            scores = mla.index_scores(iq, new_index, hw, visible)
        top = mla.select_top(scores, config.index_topk)  # [B, Tq, K]
    if (kv_cache is not None and impl == "pallas" and t == 1 and top is None and decode_kernel_fits(config, p)):
        out, new_kv, _ = attend_decode_kernel(config, p, jnp.swapaxes(q, 0, 1), jnp.swapaxes(compressed, 0, 1),
                                              kv_cache, pos)
        return out[:, None], new_kv, new_index  # [B, 1, H, dv]

    q = q.reshape(b, tq, n, dn + dr)
    q_nope, q_pe = q[..., :dn], q[..., dn:]  # compressed: [B, T, r + dr]
    latent = ops.rms_norm(compressed[..., :r], p.kv_a_norm, LATENT_NORM_EPS, implementation=impl)
    q_pe = _rope(config, q_pe, *tables(q_positions, rope_dtype))
    k_pe = _rope(config, compressed[..., None, r:], *tables(positions, rope_dtype))[:, :, 0]  # [B, T, dr]
    if kv_cache is None:  # whole sequence, expanded per-head keys and values
        visible = positions[None, :, None] >= positions[None, None, :]  # [1, T, T]
        if p.indexer is not None and t > config.index_topk:
            cos, sin = tables(positions, q.dtype)
            iq, hw = _indexer_queries(config, p.indexer, x, q_resid, cos, sin, impl)
            ik = _indexer_keys(config, p.indexer, x, cos, sin, impl)
            top = mla.select_top(mla.index_scores(iq, ik, hw, visible), config.index_topk)
            visible = visible & mla.selection_mask(top, t)
        kv = linear(latent, p.kv_b, blk).reshape(b, t, n, dn + dv)
        keys = jnp.concatenate([kv[..., :dn], jnp.broadcast_to(k_pe[:, :, None, :], (b, t, n, dr))], axis=-1)
        out = mla.attend_expanded(jnp.concatenate([q_nope, q_pe], axis=-1), keys, kv[..., dn:], visible,
                                  config.attn_scale)
        return out, None, None
    # absorbed attention over the latent cache
    entry = jnp.concatenate([latent, k_pe], axis=-1).astype(kv_cache.dtype)  # [B, T, r + dr]
    new_kv = jax.lax.dynamic_update_slice(kv_cache, entry, (0, pos, 0))
    length = new_kv.shape[1]
    visible = q_positions[None, :, None] >= jnp.arange(length, dtype=jnp.int32)[None, None, :]  # [1, Tq, S]
    w_kv = weight(p.kv_b, blk, q.dtype).reshape(r, n, dn + dv)
    q_lat = jnp.einsum("bthd,rhd->bthr", q_nope, w_kv[..., :dn])
    q_cat = jnp.concatenate([q_lat, q_pe], axis=-1).astype(new_kv.dtype)  # [B, Tq, H, r + dr]
    if top is None:
        o_lat = mla.attend_latent(q_cat, new_kv, visible, config.attn_scale, r)
    elif tq == 1:  # one query (decode, a prefill's last token): read only the selected tokens
        o_lat = mla.attend_latent_selected(q_cat, new_kv, top, top <= q_positions[None, :, None], config.attn_scale,
                                           r)
    else:
        o_lat = mla.attend_latent(q_cat, new_kv, visible & mla.selection_mask(top, length), config.attn_scale, r)
    out = jnp.einsum("bthr,rhd->bthd", o_lat.astype(q.dtype), w_kv[..., dn:])
    return out, new_kv, new_index


def _mlp(config: DeepseekConfig, p: MLP, x, impl: str = "xla"):
    """Under shard_map: a partial sum over this device's slice of the intermediate dimension."""
    blk = config.fp8_block
    return linear(swiglu(x, p.gate, p.up, blk, impl), p.down, blk, impl)


def route(config: DeepseekConfig, p: MoE, x, impl: str = "xla"):
    """The normed hidden rows x [N, hidden] -> routing weights [N, k] float32 and expert ids [N, k] int32."""
    parts = moe.router_partials(x, p.router, impl)  # [S, N, E] float32: the logits as partial sums
    return moe.route(parts, p.e_bias, moe.routing_rule(config), impl)


def _moe(config: DeepseekConfig, p: MoE, x, impl: str = "xla", tp_axis=None, ep_axis=None):
    """The MoE block's output [b, t, h], reduced over the mesh. Under shard_map over `ep_axis` each device holds a
    contiguous slice of the routed experts: every device routes (the router is replicated), runs the chosen experts
    it holds, and only the first expert shard keeps the shared experts' output, so one reduction over the expert and
    tensor axes sums each contribution once.

    Overlapped (collectives.overlap_enabled) on an expert axis alone (tensor axis of size 1), where every device holds
    the shared experts whole: only the routed outputs are reduced, and each device adds the shared experts' output,
    computed in launches of their own after the reduction is issued, so the reduction does not wait for them and
    XLA's asynchronous all-reduce can run beside them. Over tp x ep the shared experts are split over tp and would
    need a reduction of their own: the single reduction stays."""
    b, t, h = x.shape
    flat = x.reshape(b * t, h)
    weights, index = route(config, p, flat, impl)
    e = p.experts
    if ep_axis is not None:
        index, weights = moe.local_experts(index, weights, e.gate.w.shape[0], jax.lax.axis_index(ep_axis))
    shared = None if p.shared is None else (p.shared.gate, p.shared.up, p.shared.down)
    axes = tuple(a for a in (ep_axis, tp_axis) if a is not None) or None
    whole_shared = tp_axis is None or jax.lax.axis_size(tp_axis) == 1
    overlapped = shared is not None and ep_axis is not None and whole_shared and collectives.overlap_enabled()
    out, shared_out = moe.experts(flat, index, weights, (e.gate, e.up, e.down), None if overlapped else shared,
                                  config.fp8_block, impl)
    out = out.astype(x.dtype).reshape(b, t, h)
    if overlapped:
        reduced = collectives.psum(out, axes)  # issued before the shared experts, which it does not need
        return reduced + moe.shared_expert(flat, shared, config.fp8_block, impl).reshape(b, t, h)
    if shared_out is not None:
        shared_out = shared_out.reshape(b, t, h)
        out = out + (shared_out if ep_axis is None else jnp.where(jax.lax.axis_index(ep_axis) == 0, shared_out, 0))
    return collectives.psum(out, axes)


def _layer(config: DeepseekConfig, layer: Layer, x, positions, kv_cache, index_cache, pos, impl, tp_axis=None,
           ep_axis=None, last_index=None):
    """x [B, T, hidden] -> the stream after the layer and its caches; with last_index (a prefill's last layer) the
    stream of row last_index alone [B, 1, hidden], every row's cache entries written."""
    h = ops.rms_norm(x, layer.attn_norm, config.rms_norm_eps, implementation=impl)
    attn, kv_cache, index_cache = _attention(config, layer.attn, h, positions, kv_cache, index_cache, pos, impl,
                                             last_index)
    if last_index is not None:
        x = _row(x, last_index)
    attn = collectives.psum(attn, tp_axis)
    x = x + (attn if layer.attn.o.b is None else attn + layer.attn.o.b.astype(attn.dtype))
    h = ops.rms_norm(x, layer.mlp_norm, config.rms_norm_eps, implementation=impl)
    if isinstance(layer.mlp, MoE):
        x = x + _moe(config, layer.mlp, h, impl, tp_axis, ep_axis)
    else:
        x = x + collectives.psum(_mlp(config, layer.mlp, h, impl), tp_axis)
    return x, kv_cache, index_cache


def check_tp(config: DeepseekConfig, tp: int) -> None:
    """Every FP8 weight that the mesh splits (sharding/rules.py splits a dimension the tp size divides) must split
    at whole scale blocks."""
    if config.num_heads % tp:
        raise ValueError(f"tp={tp} must divide num_heads={config.num_heads}")
    if config.fp8_block is None:
        return
    block_out, block_in = config.fp8_block
    n, dn, dr, dv = config.num_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.v_head_dim
    split = {"q_b / q_proj output": (n * (dn + dr), block_out), "kv_b output": (n * (dn + dv), block_out),
             "o_proj input": (n * dv, block_in), "mlp intermediate": (config.intermediate_size, min(block_in,
                                                                                                   block_out)),
             "expert intermediate": (config.moe_intermediate_size, min(block_in, block_out)),
             "shared expert intermediate": (config.moe_intermediate_size * max(config.n_shared_experts, 1),
                                            min(block_in, block_out))}
    for name, (size, block) in split.items():
        if size % tp == 0 and (size // tp) % block:
            raise ValueError(f"tp={tp} splits the FP8 {name} ({size}) inside its {block}-wide scale blocks")


def _decoder(config: DeepseekConfig, params: DeepseekParams, inputs, positions, cache: MLACache | None, pos, impl,
             tp_axis=None, ep_axis=None):
    """inputs: int tokens [B, T], or the residual stream [B, T, hidden] out of the layers before params.layers (a
    prefill in stages, engine.Decoder: params.layers and the cache then hold a later run of the model's layers) ->
    the stream [B, T, hidden] before the final norm and the updated cache (None without one).

    Under shard_map over `tp_axis` each device holds its heads, its slice of every intermediate dimension and of the
    vocabulary; the hidden stream and the latent cache are replicated."""
    if tp_axis is not None:
        check_tp(config, jax.lax.axis_size(tp_axis))
    x = inputs if inputs.ndim == 3 else collectives.embed_lookup(params.embed, inputs, tp_axis)
    new_kv, new_index = [], []
    for i, layer in enumerate(params.layers):
        kv_i = None if cache is None else cache.kv[i]
        index_i = cache.index_k[i] if cache is not None and cache.index_k else None
        x, kv_i, index_i = _layer(config, layer, x, positions, kv_i, index_i, pos, impl, tp_axis, ep_axis)
        new_kv.append(kv_i)
        new_index.append(index_i)
    if cache is None:
        return x, None
    return x, MLACache(kv=tuple(new_kv), index_k=tuple(new_index) if cache.index_k else ())


def final_norm(config: DeepseekConfig, params: DeepseekParams, x, impl: str = "xla") -> jax.Array:
    """The stream [..., hidden] after the last layer -> the final RMSNorm's output."""
    return ops.rms_norm(x, params.final_norm, config.rms_norm_eps, implementation=impl)


def lm_head(params: DeepseekParams, x, tp_axis=None, vocab_size: int | None = None) -> jax.Array:
    """x: final-normed [..., hidden] -> float32 logits [..., vocab] (gathered over `tp_axis` when the vocabulary is
    split)."""
    w = params.embed.T if params.lm_head is None else params.lm_head
    logits = jnp.matmul(x, w, preferred_element_type=jnp.float32)
    return collectives.gather_vocab(logits, tp_axis, vocab_size or logits.shape[-1])


def sequence_compiler_options(impl: str) -> dict:
    """XLA options for the whole-sequence programs beyond the engine's own: none (XLA's Triton gemm fusions stay, the
    FP8 weights' dequantization fused into them)."""
    return {}


def hidden_states(config: DeepseekConfig, params: DeepseekParams, tokens, impl: str = "xla",
                  tp_axis=None, ep_axis=None) -> jax.Array:
    """tokens [B, T] -> the final-normed hidden states [B, T, hidden] (what the MTP layer reads)."""
    positions = jnp.arange(tokens.shape[1], dtype=jnp.int32)
    x, _ = _decoder(config, params, tokens, positions, None, None, impl, tp_axis, ep_axis)
    return final_norm(config, params, x, impl)


def forward(config: DeepseekConfig, params: DeepseekParams, tokens, impl: str = "xla", tp_axis=None,
            ep_axis=None) -> jax.Array:
    """tokens: int[B, T] at positions 0..T-1, no cache -> float32 logits [B, T, vocab]."""
    hidden = hidden_states(config, params, tokens, impl, tp_axis, ep_axis)
    return lm_head(params, hidden, tp_axis, config.vocab_size)


def prefill_layers(config: DeepseekConfig, params: DeepseekParams, inputs, cache: MLACache, pos, impl: str = "xla",
                   tp_axis=None, ep_axis=None):
    """inputs: int tokens [B, T] written at pos..pos+T-1 (right padding allowed: later steps overwrite it), or the
    residual stream [B, T, hidden] of those tokens out of the layers before params.layers.

    Returns the stream after params.layers (before the final norm) and their updated cache."""
    positions = pos + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    return _decoder(config, params, inputs, positions, cache, pos, impl, tp_axis, ep_axis)


def prefill(config: DeepseekConfig, params: DeepseekParams, inputs, cache: MLACache, pos, last_index,
            impl: str = "xla", tp_axis=None, ep_axis=None):
    """`prefill_layers`, then the float32 logits [B, vocab] of the token at index `last_index`; returns them and the
    updated cache. The last layer writes every token's latent cache (and index keys) but computes the rest, MLA's
    query side and attention, the output projection and the MLP or MoE, for that token alone: no later layer reads
    the other rows."""
    positions = pos + jnp.arange(inputs.shape[1], dtype=jnp.int32)
    x, body_cache = _decoder(config, layer_run(params, slice(0, -1)), inputs, positions,
                             kv.layer_run(cache, slice(0, -1)), pos, impl, tp_axis, ep_axis)
    index_k = cache.index_k[-1] if cache.index_k else None
    x, kv_last, index_last = _layer(config, params.layers[-1], x, positions, cache.kv[-1], index_k, pos, impl,
                                    tp_axis, ep_axis, last_index)
    cache = kv.join_layers(body_cache, MLACache(kv=(kv_last,), index_k=(index_last,) if cache.index_k else ()))
    return lm_head(params, final_norm(config, params, x[:, 0], impl), tp_axis, config.vocab_size), cache


def decode_step(config: DeepseekConfig, params: DeepseekParams, tokens, cache: MLACache, pos, impl: str = "xla",
                tp_axis=None, ep_axis=None):
    """tokens: int[B] at position pos -> float32 logits [B, vocab] and the updated cache. impl="pallas" chains its
    kernels' launches (models/deepseek_decode.py) where the shapes allow, on one device or over `tp_axis`."""
    if impl == "pallas" and ep_axis is None:
        from tilert_jax.models import deepseek_decode  # it builds on this module

        if deepseek_decode.supported(config, params, tokens, cache):
            return deepseek_decode.decode_step(config, params, tokens, cache, pos, tp_axis)
    positions = pos + jnp.zeros((1,), jnp.int32)
    x, cache = _decoder(config, params, tokens[:, None], positions, cache, pos, impl, tp_axis, ep_axis)
    return lm_head(params, final_norm(config, params, x[:, 0], impl), tp_axis, config.vocab_size), cache


# ------------------------------------------------------------------------------------------------------- MTP


def mtp_layer(config: DeepseekConfig, params: DeepseekParams, layer: MTPLayer, tokens, hidden, positions,
              kv_cache=None, index_cache=None, pos=None, impl: str = "xla"):
    """One next-token-prediction layer (transformers' MtpLayer): tokens [B, T] are the tokens one step ahead of the
    hidden states [B, T, hidden] it refines (the main model's final-normed output, or the previous MTP layer's).

    Returns (hidden [B, T, hidden] after shared_head.norm, float32 logits [B, T, vocab] through the main lm_head,
    kv_cache, index_cache); the caches are None without them (a layer's cache comes from
    `MLACache.zeros(config, batch, max_len, dtype, num_layers=config.mtp_layers)`)."""
    eps = config.rms_norm_eps
    emb = ops.rms_norm(params.embed[tokens], layer.enorm, eps, implementation=impl)
    prev = ops.rms_norm(hidden.astype(emb.dtype), layer.hnorm, eps, implementation=impl)
    x = linear(jnp.concatenate([emb, prev], axis=-1), layer.eh_proj, config.fp8_block, impl)
    x, kv_cache, index_cache = _layer(config, layer.block, x, positions, kv_cache, index_cache, pos, impl)
    x = ops.rms_norm(x, layer.norm, eps, implementation=impl)
    return x, lm_head(params, x), kv_cache, index_cache


def mtp_forward(config: DeepseekConfig, params: DeepseekParams, mtp: MTPParams, tokens, hidden, positions=None,
                impl: str = "xla") -> jax.Array:
    """The first MTP layer over a whole sequence, no cache: tokens [B, T] (shifted one ahead of `hidden`), hidden
    [B, T, hidden] -> float32 draft logits [B, T, vocab]. positions default to 1..T."""
    if positions is None:
        positions = 1 + jnp.arange(tokens.shape[1], dtype=jnp.int32)
    return mtp_layer(config, params, mtp.layers[0], tokens, hidden, positions, impl=impl)[1]


def load_mtp(path, config: DeepseekConfig, dtype=None) -> MTPParams:
    """The MTP layers of a raw Hugging Face checkpoint directory (`model.layers.{num_layers + k}.*`), in `dtype`."""
    from pathlib import Path

    import numpy as np

    from tilert_jax.convert import deepseek_map
    from tilert_jax.convert.hf import iter_hf_params
    from tilert_jax.convert.safetensors_files import CheckpointError, index_checkpoint
    from tilert_jax.params import abstract_params, is_spec, leaf_paths

    if config.mtp_layers == 0:
        raise ValueError("this checkpoint's config.json declares no MTP layers (num_nextn_predict_layers)")
    entries = index_checkpoint(Path(path))
    first = f"model.layers.{config.num_layers}."
    if first + "enorm.weight" not in entries:
        raise CheckpointError(f"missing tensor {first}enorm.weight: the checkpoint carries no MTP weights")
    fp8_eh = (first + "eh_proj.weight_scale_inv") in entries
    specs = mtp_param_specs(config, fp8_eh)
    maps = deepseek_map.mtp_map(config, specs)
    pairs = deepseek_map.resolve(maps, entries)
    dtype = jnp.dtype(dtype or config.dtype)
    flat = jax.tree_util.tree_flatten(specs, is_leaf=is_spec)[0]
    dtypes = {name: np.dtype(s.resolved_dtype(dtype)) for name, s in zip(leaf_paths(specs), flat)}
    arrays = dict(iter_hf_params(pairs, dtypes))
    abstract = abstract_params(specs, dtype)
    return jax.tree.unflatten(jax.tree.structure(abstract), [jnp.asarray(arrays[p]) for p in leaf_paths(abstract)])


# ----------------------------------------------------------------------------------------------------- bench


def decode_weight_bytes(config: DeepseekConfig, dtype, shards=None) -> int:
    """Weight bytes one decode step reads: every attention / dense / shared / router weight, only the
    `num_experts_per_tok` routed experts a token activates (of each MoE layer), the embedding row and the head.
    FP8 weights count one byte each plus their float32 scales. With `shards` (see params.param_bytes), one device's
    share: of the routed experts it holds, the activated fraction (the mean over devices; the busiest reads more)."""
    specs = param_specs(config)
    total = config.hidden_size * jnp.dtype(dtype).itemsize  # the embedding row
    head = specs.embed if specs.lm_head is None else specs.lm_head
    total += param_bytes((specs.final_norm, head), dtype, shards)
    for layer in specs.layers:
        total += param_bytes((layer.attn_norm, layer.attn, layer.mlp_norm), dtype, shards)
        if isinstance(layer.mlp, MoE):
            total += param_bytes((layer.mlp.router, layer.mlp.e_bias, layer.mlp.shared), dtype, shards)
            experts = param_bytes(layer.mlp.experts, dtype, shards)
            total += experts * config.num_experts_per_tok // config.n_routed_experts
        else:
            total += param_bytes(layer.mlp, dtype, shards)
    return total


def decode_cache_bytes(config: DeepseekConfig, dtype, context: int) -> int:
    """Cache bytes one decode step reads at `context` tokens (V3.2 reads all index keys, then index_topk entries)."""
    kv = config.kv_lora_rank + config.qk_rope_head_dim
    itemsize = jnp.dtype(dtype).itemsize
    if config.has_indexer:
        per_layer = context * config.index_head_dim + min(context, config.index_topk) * kv
    else:
        per_layer = context * kv
    return config.num_layers * per_layer * itemsize


config_lib.register_family(MODEL_TYPES, deepseek_config_from_hf)


def _register():
    import sys

    from tilert_jax import models

    models.register("deepseek", sys.modules[__name__])


_register()
