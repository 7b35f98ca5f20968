"""Small random Hugging Face checkpoints of every supported dense family, written as a hub checkpoint would be."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import transformers

LLAMA3_ROPE = dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                   original_max_position_embeddings=64)
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4,
              max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15)

# name -> (config class, model class, config kwargs)
FAMILIES = {
    "llama": ("LlamaConfig", "LlamaForCausalLM",
              dict(num_key_value_heads=2, rope_theta=500000.0, rope_scaling=LLAMA3_ROPE)),
    "llama_tied": ("LlamaConfig", "LlamaForCausalLM",
                   dict(num_key_value_heads=1, tie_word_embeddings=True, head_dim=8, rope_theta=10000.0)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2, rope_theta=1000000.0)),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM",
              dict(num_key_value_heads=2, head_dim=24, rope_theta=1000000.0, tie_word_embeddings=False)),
    "mistral": ("MistralConfig", "MistralForCausalLM",
                dict(num_key_value_heads=4, head_dim=16, rope_theta=10000.0, sliding_window=7)),
}


def make_model(name: str, seed: int = 0, dtype=torch.float32):
    config_cls, model_cls, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**(COMMON | kwargs))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).to(dtype).eval()
    with torch.no_grad():  # a random model whose norms and biases are not all ones and zeros
        for p_name, p in model.named_parameters():
            if p.ndim == 1:
                p.add_(0.1 * torch.randn_like(p))
    return model


def to_old_dialect(config_path: Path) -> None:
    """Rewrites transformers 5's `rope_parameters` as `rope_theta` + `rope_scaling`, as most hub checkpoints are."""
    hf = json.loads(config_path.read_text())
    rope = hf.pop("rope_parameters")
    hf["rope_theta"] = rope.pop("rope_theta")
    if rope.get("rope_type", "default") != "default":
        hf["rope_scaling"] = rope
    config_path.write_text(json.dumps(hf, indent=2))


def write_checkpoint(model, directory: Path, sharded: bool = False, old_dialect: bool = False) -> Path:
    model.save_pretrained(directory, max_shard_size="40KB" if sharded else "10GB")
    if old_dialect:
        to_old_dialect(directory / "config.json")
    return directory

# For meshes up to 8 devices: 8 query heads sharing 2 KV heads (tp=8 replicates each KV head over 4 devices).
FAMILIES["llama_8heads"] = ("LlamaConfig", "LlamaForCausalLM",
                            dict(num_attention_heads=8, num_key_value_heads=2, head_dim=8, rope_theta=10000.0))
