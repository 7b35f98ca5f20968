"""The DeepSeek family's map from Hugging Face tensor names to our parameter paths (V2, V3, V3.2, their MTP layers).

The layout is derived from the family's ParamSpec tree, so the map and the parameters cannot disagree: a Linear whose
spec carries a `scale` is FP8 in the checkpoint (`weight` e4m3 + `weight_scale_inv`), every other weight must be a
float type. Routed experts, one tensor per expert in the checkpoint, are stacked into one [experts, in, out] leaf
(`hf_names` lists the members). Linear weights go from [out, in] to [in, out]; FP8 scales are transposed alike.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import numpy as np

FLOAT_DTYPES = ("BF16", "F16", "F32")
FP8_DTYPES = ("F8_E4M3",)


def _same(w: np.ndarray) -> np.ndarray:
    return w


def _swap(w: np.ndarray) -> np.ndarray:
    """[..., out, in] -> [..., in, out]."""
    return np.ascontiguousarray(np.swapaxes(w, -1, -2))


@dataclasses.dataclass(frozen=True)
class StackMap:
    """A TensorMap (convert/maps.py) that may stack several checkpoint tensors and restricts their dtypes."""

    hf_name: str  # the tensor's name (with '*' for the expert index when stacked)
    hf_shape: tuple[int, ...]  # the shape of one checkpoint tensor
    path: str
    to_ours: Callable[[np.ndarray], np.ndarray] = _same  # applied to the (stacked) array
    hf_names: tuple[str, ...] | None = None  # the stacked members, in order
    hf_dtypes: tuple[str, ...] | None = None  # allowed safetensors dtypes


def _linear(hf: str, ours: str, spec, experts: int | None = None) -> list[StackMap]:
    """hf: module name ('model.layers.0.self_attn.q_a_proj', '*' for the expert index); spec: its Linear spec."""
    in_dim, out_dim = spec.w.shape[-2:]
    members = lambda suffix: (None if experts is None  # noqa: E731
                              else tuple(hf.replace("*", str(e)) + suffix for e in range(experts)))
    fp8 = spec.scale is not None
    maps = [StackMap(hf + ".weight", (out_dim, in_dim), ours + "/w", _swap, members(".weight"),
                     FP8_DTYPES if fp8 else FLOAT_DTYPES)]
    if fp8:
        in_blocks, out_blocks = spec.scale.shape[-2:]
        maps.append(StackMap(hf + ".weight_scale_inv", (out_blocks, in_blocks), ours + "/scale", _swap,
                             members(".weight_scale_inv"), FLOAT_DTYPES))
    if spec.b is not None:
        maps.append(StackMap(hf + ".bias", (out_dim,), ours + "/b", _same, None, FLOAT_DTYPES))
    return maps


def _vector(hf: str, ours: str, spec) -> StackMap:
    return StackMap(hf, tuple(spec.shape), ours, _same, None, FLOAT_DTYPES)


def _mlp(hf: str, ours: str, spec, experts: int | None = None) -> list[StackMap]:
    maps = []
    for hf_proj, name in (("gate_proj", "gate"), ("up_proj", "up"), ("down_proj", "down")):
        maps += _linear(f"{hf}.{hf_proj}", f"{ours}/{name}", getattr(spec, name), experts)
    return maps


def layer_maps(hf: str, ours: str, spec) -> list[StackMap]:
    """One decoder layer: hf 'model.layers.3.', ours 'layers/3/', spec its Layer spec."""
    from tilert_jax.models.deepseek import MoE

    a = spec.attn
    maps = [_vector(hf + "input_layernorm.weight", ours + "attn_norm", spec.attn_norm),
            _vector(hf + "post_attention_layernorm.weight", ours + "mlp_norm", spec.mlp_norm)]
    att, at = hf + "self_attn.", ours + "attn/"
    if a.q_proj is not None:
        maps += _linear(att + "q_proj", at + "q_proj", a.q_proj)
    else:
        maps += _linear(att + "q_a_proj", at + "q_a", a.q_a)
        maps.append(_vector(att + "q_a_layernorm.weight", at + "q_a_norm", a.q_a_norm))
        maps += _linear(att + "q_b_proj", at + "q_b", a.q_b)
    maps += _linear(att + "kv_a_proj_with_mqa", at + "kv_a", a.kv_a)
    maps.append(_vector(att + "kv_a_layernorm.weight", at + "kv_a_norm", a.kv_a_norm))
    maps += _linear(att + "kv_b_proj", at + "kv_b", a.kv_b)
    maps += _linear(att + "o_proj", at + "o", a.o)
    if a.indexer is not None:
        ix, io = att + "indexer.", at + "indexer/"
        maps += _linear(ix + "wq_b", io + "wq_b", a.indexer.wq_b)
        maps += _linear(ix + "wk", io + "wk", a.indexer.wk)
        maps += [_vector(ix + "k_norm.weight", io + "k_norm", a.indexer.k_norm),
                 _vector(ix + "k_norm.bias", io + "k_norm_bias", a.indexer.k_norm_bias)]
        hidden, heads = a.indexer.weights_proj.shape
        maps.append(StackMap(ix + "weights_proj.weight", (heads, hidden), io + "weights_proj", _swap, None,
                             FLOAT_DTYPES))
    m, mo = hf + "mlp", ours + "mlp"
    if isinstance(spec.mlp, MoE):
        hidden, experts = spec.mlp.router.shape
        maps.append(StackMap(m + ".gate.weight", (experts, hidden), mo + "/router", _swap, None, FLOAT_DTYPES))
        if spec.mlp.e_bias is not None:
            maps.append(_vector(m + ".gate.e_score_correction_bias", mo + "/e_bias", spec.mlp.e_bias))
        maps += _mlp(m + ".experts.*", mo + "/experts", spec.mlp.experts, experts)
        if spec.mlp.shared is not None:
            maps += _mlp(m + ".shared_experts", mo + "/shared", spec.mlp.shared)
    else:
        maps += _mlp(m, mo, spec.mlp)
    return maps


def deepseek_map(config) -> tuple[list[StackMap], set[str]]:
    """Every tensor of a DeepSeek checkpoint's main model; the names that may appear and are ignored (a trailing
    '*' ignores a prefix: the MTP layers, loaded apart by models.deepseek.load_mtp)."""
    from tilert_jax.models.deepseek import param_specs

    specs = param_specs(config)
    v, h = config.vocab_size, config.hidden_size
    maps = [StackMap("model.embed_tokens.weight", (v, h), "embed", _same, None, FLOAT_DTYPES),
            StackMap("model.norm.weight", (h,), "final_norm", _same, None, FLOAT_DTYPES)]
    ignored = set()
    if config.tie_word_embeddings:
        ignored.add("lm_head.weight")
    else:
        maps.append(StackMap("lm_head.weight", (v, h), "lm_head", _swap, None, FLOAT_DTYPES))
    for i, layer in enumerate(specs.layers):
        maps += layer_maps(f"model.layers.{i}.", f"layers/{i}/", layer)
        ignored.add(f"model.layers.{i}.self_attn.rotary_emb.inv_freq")
    for k in range(config.mtp_layers):
        ignored.add(f"model.layers.{config.num_layers + k}.*")
    return maps, ignored


def mtp_map(config, specs) -> list[StackMap]:
    """The MTP layers' tensors (`model.layers.{num_layers + k}.*`) onto `mtp_param_specs`' tree."""
    maps = []
    for k, layer in enumerate(specs.layers):
        hf, ours = f"model.layers.{config.num_layers + k}.", f"layers/{k}/"
        maps += [_vector(hf + "enorm.weight", ours + "enorm", layer.enorm),
                 _vector(hf + "hnorm.weight", ours + "hnorm", layer.hnorm),
                 _vector(hf + "shared_head.norm.weight", ours + "norm", layer.norm)]
        maps += _linear(hf + "eh_proj", ours + "eh_proj", layer.eh_proj)
        maps += layer_maps(hf, ours + "block/", layer.block)
    return maps


def resolve(maps, entries):
    """(map, entry) pairs for `maps` found in `entries`, validated (see convert.hf.match)."""
    from tilert_jax.convert.hf import match

    return match(maps, set(), entries, check_unexpected=False)
