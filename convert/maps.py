"""Explicit maps from Hugging Face tensor names to this engine's parameter paths, one per model family.

Each entry names the Hugging Face tensor, its expected shape there, our leaf path ('layers/3/attn/wq') and the
layout change between the two. Dense models keep transformers' [out, in] Linear layout with the heads split out
(q_proj [heads * head_dim, hidden] -> wq [heads, head_dim, hidden]); DeepSeek's map (deepseek_map.py) transposes.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np


@dataclasses.dataclass(frozen=True)
class TensorMap:
    hf_name: str
    hf_shape: tuple[int, ...]
    path: str
    to_ours: Callable[[np.ndarray], np.ndarray] = lambda w: w


def _reshape(shape):
    return lambda w: w.reshape(shape)


def dense_map(config) -> tuple[list[TensorMap], set[str]]:
    """The tensors of a Llama / Qwen2 / Qwen3 / Mistral checkpoint, and the names that may appear and are ignored."""
    h, n, kvh, d, f, v = (config.hidden_size, config.num_heads, config.num_kv_heads, config.head_dim,
                          config.intermediate_size, config.vocab_size)
    maps = [TensorMap("model.embed_tokens.weight", (v, h), "embed"),
            TensorMap("model.norm.weight", (h,), "final_norm")]
    ignored = set()
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    else:
        maps.append(TensorMap("lm_head.weight", (v, h), "lm_head"))
    for i in range(config.num_layers):
        hf, ours = f"model.layers.{i}.", f"layers/{i}/"
        maps += [
            TensorMap(hf + "input_layernorm.weight", (h,), ours + "attn_norm"),
            TensorMap(hf + "post_attention_layernorm.weight", (h,), ours + "mlp_norm"),
            TensorMap(hf + "self_attn.q_proj.weight", (n * d, h), ours + "attn/wq", _reshape((n, d, h))),
            TensorMap(hf + "self_attn.k_proj.weight", (kvh * d, h), ours + "attn/wk", _reshape((kvh, d, h))),
            TensorMap(hf + "self_attn.v_proj.weight", (kvh * d, h), ours + "attn/wv", _reshape((kvh, d, h))),
            TensorMap(hf + "self_attn.o_proj.weight", (h, n * d), ours + "attn/wo", _reshape((h, n, d))),
            TensorMap(hf + "mlp.gate_proj.weight", (f, h), ours + "mlp/w_gate"),
            TensorMap(hf + "mlp.up_proj.weight", (f, h), ours + "mlp/w_up"),
            TensorMap(hf + "mlp.down_proj.weight", (h, f), ours + "mlp/w_down"),
        ]
        if config.qkv_bias:
            maps += [TensorMap(hf + "self_attn.q_proj.bias", (n * d,), ours + "attn/bq", _reshape((n, d))),
                     TensorMap(hf + "self_attn.k_proj.bias", (kvh * d,), ours + "attn/bk", _reshape((kvh, d))),
                     TensorMap(hf + "self_attn.v_proj.bias", (kvh * d,), ours + "attn/bv", _reshape((kvh, d)))]
        if config.o_bias:
            maps.append(TensorMap(hf + "self_attn.o_proj.bias", (h,), ours + "attn/bo"))
        if config.qk_norm:
            maps += [TensorMap(hf + "self_attn.q_norm.weight", (d,), ours + "attn/q_norm"),
                     TensorMap(hf + "self_attn.k_norm.weight", (d,), ours + "attn/k_norm")]
        ignored.add(hf + "self_attn.rotary_emb.inv_freq")
    return maps, ignored


FAMILY_MAPS = {"dense": dense_map}


def _register_families() -> None:
    from tilert_jax.convert.deepseek_map import deepseek_map

    FAMILY_MAPS["deepseek"] = deepseek_map


_register_families()


def tensor_map(config) -> tuple[list[TensorMap], set[str]]:
    return FAMILY_MAPS[config.family](config)
