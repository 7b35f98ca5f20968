"""Model configuration: frozen dataclasses read from a Hugging Face config.json, and named presets of real shapes.

A config is static (hashable): it is passed to jitted functions as a static argument. Tests shrink one with
`dataclasses.replace`.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from tilert_jax.rope import RopeConfig

DENSE_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3")


@dataclasses.dataclass(frozen=True)
class DenseConfig:
    """A decoder-only transformer with GQA attention and a SwiGLU MLP (Llama 3.x, Qwen2.5, Qwen3, Mistral)."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rope: RopeConfig
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 8192
    tie_word_embeddings: bool = False
    qkv_bias: bool = False  # Qwen2.5; Llama's attention_bias sets this and o_bias
    o_bias: bool = False
    qk_norm: bool = False  # Qwen3: RMSNorm over head_dim on q and k before rope
    sliding_window: int | None = None  # Mistral: a key is visible to queries less than this many positions after it
    bos_token_id: int | None = None
    eos_token_ids: tuple[int, ...] = ()
    dtype: str = "bfloat16"  # the checkpoint's own dtype, the default when loading

    @property
    def family(self) -> str:
        return "dense"


def _eos_ids(value) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, (list, tuple)) else (int(value),)


def _checkpoint_dtype(hf: dict) -> str:
    dtype = hf.get("dtype") or hf.get("torch_dtype") or "bfloat16"
    return {"bfloat16": "bfloat16", "float32": "float32", "float16": "float16"}.get(str(dtype), "bfloat16")


def dense_config_from_hf(hf: dict) -> DenseConfig:
    model_type = hf["model_type"]
    if hf.get("hidden_act", "silu") != "silu":
        raise ValueError(f"unsupported hidden_act {hf['hidden_act']!r} for {model_type} (only silu)")
    if hf.get("mlp_bias"):
        raise ValueError(f"unsupported mlp_bias=true for {model_type}")
    num_heads = hf["num_attention_heads"]
    head_dim = hf.get("head_dim") or hf["hidden_size"] // num_heads
    attention_bias = bool(hf.get("attention_bias", False))
    sliding_window = None
    if model_type == "mistral" or hf.get("use_sliding_window"):
        sliding_window = hf.get("sliding_window")
    return DenseConfig(
        model_type=model_type,
        vocab_size=hf["vocab_size"],
        hidden_size=hf["hidden_size"],
        intermediate_size=hf["intermediate_size"],
        num_layers=hf["num_hidden_layers"],
        num_heads=num_heads,
        num_kv_heads=hf.get("num_key_value_heads") or num_heads,
        head_dim=head_dim,
        rope=RopeConfig.from_hf(hf, rotary_dim=head_dim),
        rms_norm_eps=hf.get("rms_norm_eps", 1e-6),
        max_position_embeddings=hf.get("max_position_embeddings", 8192),
        tie_word_embeddings=bool(hf.get("tie_word_embeddings", False)),
        qkv_bias=model_type == "qwen2" or attention_bias,
        o_bias=model_type != "qwen2" and attention_bias,
        qk_norm=model_type == "qwen3",
        sliding_window=sliding_window,
        bos_token_id=hf.get("bos_token_id"),
        eos_token_ids=_eos_ids(hf.get("eos_token_id")),
        dtype=_checkpoint_dtype(hf),
    )


_FAMILY_READERS = {t: dense_config_from_hf for t in DENSE_MODEL_TYPES}


def register_family(model_types: tuple[str, ...], reader) -> None:
    """Lets a model family (models/*.py) add the config.json reader for its model types."""
    for model_type in model_types:
        _FAMILY_READERS[model_type] = reader


def config_from_hf(hf: dict):
    """The config for a Hugging Face config.json dict; a clear ValueError for a model type we do not run."""
    import tilert_jax.models  # noqa: F401  (each family registers its reader on import)

    model_type = hf.get("model_type")
    if model_type not in _FAMILY_READERS:
        supported = ", ".join(sorted(_FAMILY_READERS))
        raise ValueError(f"unsupported model_type {model_type!r} (supported: {supported})")
    return _FAMILY_READERS[model_type](hf)


def load_config(directory: str | Path):
    path = Path(directory) / "config.json"
    if not path.is_file():
        raise ValueError(f"missing config.json in {directory}")
    try:
        hf = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"config.json in {directory} is not valid JSON: {e}") from None
    return config_from_hf(hf)


# Real model shapes, written as the config.json their hub checkpoints carry (random weights in the bench).
PRESETS: dict[str, dict] = {
    "tiny": dict(model_type="llama", vocab_size=512, hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, rope_theta=10000.0),
    "llama-3.2-1b": dict(model_type="llama", vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                         num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                         rms_norm_eps=1e-5, max_position_embeddings=131072, tie_word_embeddings=True,
                         rope_theta=500000.0, rope_scaling=dict(rope_type="llama3", factor=32.0, low_freq_factor=1.0,
                                                                high_freq_factor=4.0,
                                                                original_max_position_embeddings=8192)),
    "llama-3.1-8b": dict(model_type="llama", vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                         num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, rms_norm_eps=1e-5,
                         max_position_embeddings=131072, rope_theta=500000.0,
                         rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                           original_max_position_embeddings=8192)),
    "qwen3-8b": dict(model_type="qwen3", vocab_size=151936, hidden_size=4096, intermediate_size=12288,
                     num_hidden_layers=36, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                     rms_norm_eps=1e-6, max_position_embeddings=40960, rope_theta=1000000.0),
    "qwen2.5-7b": dict(model_type="qwen2", vocab_size=152064, hidden_size=3584, intermediate_size=18944,
                       num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4, rms_norm_eps=1e-6,
                       max_position_embeddings=32768, rope_theta=1000000.0),
    "mistral-7b": dict(model_type="mistral", vocab_size=32768, hidden_size=4096, intermediate_size=14336,
                       num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8, head_dim=128,
                       rms_norm_eps=1e-5, max_position_embeddings=32768, rope_theta=1000000.0, sliding_window=None),
}

# DeepSeek (models/deepseek.py): the hub config.json of each checkpoint. deepseek-v3 / -v3.2-exp are the published
# FP8 checkpoints (e4m3 weights, 128x128 scales); shrink the layer count with dataclasses.replace(config,
# num_layers=n, first_k_dense_replace=k) (layers below first_k_dense_replace are dense MLP layers, the rest MoE).
_DEEPSEEK_YARN = dict(type="yarn", factor=40, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1)
_DEEPSEEK_V3 = dict(model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
                    moe_intermediate_size=2048, num_hidden_layers=61, num_nextn_predict_layers=1,
                    num_attention_heads=128, num_key_value_heads=128, n_shared_experts=1, n_routed_experts=256,
                    routed_scaling_factor=2.5, kv_lora_rank=512, q_lora_rank=1536, qk_rope_head_dim=64,
                    v_head_dim=128, qk_nope_head_dim=128, topk_method="noaux_tc", n_group=8, topk_group=4,
                    num_experts_per_tok=8, moe_layer_freq=1, first_k_dense_replace=3, norm_topk_prob=True,
                    scoring_func="sigmoid", hidden_act="silu", max_position_embeddings=163840, rms_norm_eps=1e-6,
                    rope_theta=10000, rope_scaling=dict(_DEEPSEEK_YARN, mscale=1.0, mscale_all_dim=1.0),
                    tie_word_embeddings=False, bos_token_id=0, eos_token_id=1, torch_dtype="bfloat16",
                    quantization_config=dict(activation_scheme="dynamic", fmt="e4m3", quant_method="fp8",
                                             weight_block_size=[128, 128]))
PRESETS.update({
    "deepseek-v2-lite": dict(model_type="deepseek_v2", vocab_size=102400, hidden_size=2048, intermediate_size=10944,
                             moe_intermediate_size=1408, num_hidden_layers=27, num_attention_heads=16,
                             num_key_value_heads=16, n_shared_experts=2, n_routed_experts=64, num_experts_per_tok=6,
                             routed_scaling_factor=1.0, kv_lora_rank=512, q_lora_rank=None, qk_rope_head_dim=64,
                             v_head_dim=128, qk_nope_head_dim=128, topk_method="greedy", n_group=1, topk_group=1,
                             moe_layer_freq=1, first_k_dense_replace=1, norm_topk_prob=False,
                             scoring_func="softmax", hidden_act="silu", max_position_embeddings=163840,
                             rms_norm_eps=1e-6, rope_theta=10000,
                             rope_scaling=dict(_DEEPSEEK_YARN, mscale=0.707, mscale_all_dim=0.707),
                             tie_word_embeddings=False, bos_token_id=100000, eos_token_id=100001,
                             torch_dtype="bfloat16"),
    "deepseek-v3": _DEEPSEEK_V3,
    "deepseek-v3.2-exp": dict(_DEEPSEEK_V3, model_type="deepseek_v32", num_nextn_predict_layers=1, index_topk=2048,
                              index_head_dim=128, index_n_heads=64),
})


def preset(name: str):
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r} (known: {', '.join(PRESETS)})")
    return config_from_hf(PRESETS[name])
