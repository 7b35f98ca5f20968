"""Small random DeepSeek V2 / V3 / V3.2 checkpoints written as the hub's are: bf16 or FP8 block-scaled safetensors
(one file or shards), optionally with the MTP layer as `model.layers.{num_layers}.*`.

The torch model each helper returns holds exactly the values the files hold (rounded to bf16, or dequantized from
FP8), in float32, so it is the reference for a float32 load of the files.
"""

from __future__ import annotations

import copy
import json
import re
from pathlib import Path

import torch
import transformers
from safetensors.torch import load_file, save_file

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=64, beta_fast=32.0,
            beta_slow=1.0)
COMMON = dict(vocab_size=160, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
              num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=32, qk_nope_head_dim=16,
              qk_rope_head_dim=8, v_head_dim=16, n_routed_experts=8, num_experts_per_tok=2,
              first_k_dense_replace=1, max_position_embeddings=256, rms_norm_eps=1e-5, initializer_range=0.15,
              bos_token_id=None, eos_token_id=None)

# name -> (config class, model class, config kwargs)
FAMILIES = {
    # V2-Lite: no query LoRA, softmax greedy routing, two shared experts, yarn with mscale == mscale_all_dim
    "v2_lite": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0,
                     rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    # V2 with group-limited greedy routing and a routed scaling factor
    "v2_group": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                 dict(q_lora_rank=48, n_shared_experts=1, topk_method="group_limited_greedy", n_group=4,
                      topk_group=2, routed_scaling_factor=1.5, rope_parameters=dict(rope_type="default",
                                                                                   rope_theta=10000.0))),
    # V3: query LoRA, sigmoid noaux_tc with groups, yarn with mscale != mscale_all_dim (both corrections)
    "v3": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
           dict(q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                norm_topk_prob=True, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8))),
    # V3 without rope interleaving and without renormalised top-k weights
    "v3_plain": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                 dict(q_lora_rank=48, n_shared_experts=1, n_group=2, topk_group=1, routed_scaling_factor=1.0,
                      norm_topk_prob=False, rope_interleave=False,
                      rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # V2-Lite and V3 with a latent of 32 + 16 and 16 experts: every decode weight tiles the grouped kernel (the
    # router too, so the routing runs in its launch) and attention the MLA kernels (fused Pallas decode)
    "v2_lite_tiled": ("DeepseekV2Config", "DeepseekV2ForCausalLM",
                      dict(q_lora_rank=None, n_shared_experts=2, topk_method="greedy", routed_scaling_factor=1.0,
                           qk_rope_head_dim=16, n_routed_experts=16,
                           rope_parameters=dict(YARN, mscale=0.707, mscale_all_dim=0.707))),
    "v3_tiled": ("DeepseekV3Config", "DeepseekV3ForCausalLM",
                 dict(q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                      norm_topk_prob=True, qk_rope_head_dim=16, n_routed_experts=16,
                      rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=0.8))),
    # V3.2 shaped as v3_tiled, index_topk as long as the decode tests' caches: the indexer selects every token
    "v32_tiled": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
                  dict(q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                       norm_topk_prob=True, qk_rope_head_dim=16, n_routed_experts=16, index_topk=32,
                       index_n_heads=8, index_head_dim=16, rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
    # V3.2: DSA with index_topk well below the test sequences, so selection happens
    "v32": ("DeepseekV32Config", "DeepseekV32ForCausalLM",
            dict(q_lora_rank=48, n_shared_experts=1, n_group=4, topk_group=2, routed_scaling_factor=2.5,
                 norm_topk_prob=True, index_topk=6, index_n_heads=8, index_head_dim=16,
                 rope_parameters=dict(YARN, mscale=1.0, mscale_all_dim=1.0))),
}

EXPERT = re.compile(r"^(.*\.mlp\.experts)\.(\d+)\.(gate|up|down)_proj\.weight$")


def make_model(name: str, seed: int = 0):
    """A float32 random model whose norms, biases and routing are far from their initial ones and zeros."""
    config_cls, model_cls, kwargs = FAMILIES[name]
    config = getattr(transformers, config_cls)(**(COMMON | kwargs))
    torch.manual_seed(seed)
    model = getattr(transformers, model_cls)(config).float().eval()
    _perturb(model)
    return model


def _perturb(module) -> None:
    with torch.no_grad():
        for p_name, p in module.named_parameters():
            if p.ndim == 1:
                p.add_(0.2 * torch.randn_like(p))
        for b_name, b in module.named_buffers():
            if b_name.endswith("e_score_correction_bias"):
                b.copy_(0.1 * torch.randn_like(b))  # comparable to the spread of sigmoid scores: changes choices


def make_mtp(model, seed: int = 1):
    """transformers' MtpModel on top of `model` (one layer), randomised like the main model."""
    from transformers.modeling_layers import MtpModel

    torch.manual_seed(seed)
    mtp = MtpModel(model, model.config.num_mtp_layers).float().eval()
    with torch.no_grad():
        for p_name, p in mtp.named_parameters():
            if p_name.startswith("layers.") and p.ndim >= 2:
                p.normal_(0.0, model.config.initializer_range)
    _perturb(mtp.layers)
    return mtp


def mtp_tensors(model, mtp) -> dict[str, torch.Tensor]:
    """The MTP layer as the hub stores it: `model.layers.{num_layers}.*`, per-expert weights, plus the copies of the
    embedding and head that DeepSeek's checkpoints carry."""
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    out = {prefix + "embed_tokens.weight": model.model.embed_tokens.weight,
           prefix + "shared_head.head.weight": model.lm_head.weight}
    for name, t in mtp.layers[0].state_dict().items():
        if name.startswith("post_norm."):
            out[prefix + "shared_head.norm." + name[len("post_norm."):]] = t
        elif name.startswith("mtp_block."):
            out.update(_split_experts(prefix + name[len("mtp_block."):], t))
        else:
            out[prefix + name] = t
    return out


def _split_experts(name: str, t: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' fused expert stacks -> one tensor per expert and projection, as checkpoints store them."""
    if name.endswith("mlp.experts.gate_up_proj"):
        base, f = name[: -len("gate_up_proj")], t.shape[1] // 2
        return {k: v for e in range(t.shape[0]) for k, v in
                ((f"{base}{e}.gate_proj.weight", t[e, :f]), (f"{base}{e}.up_proj.weight", t[e, f:]))}
    if name.endswith("mlp.experts.down_proj"):
        base = name[: -len("down_proj")]
        return {f"{base}{e}.down_proj.weight": t[e] for e in range(t.shape[0])}
    return {name: t}


def set_from_checkpoint(model, tensors: dict[str, torch.Tensor]) -> None:
    """Loads checkpoint-named float tensors (per-expert names fused back) into the float32 torch model."""
    state = model.state_dict()
    with torch.no_grad():
        for name, t in tensors.items():
            m = EXPERT.match(name)
            if m and m.group(1) + ".down_proj" not in state:
                continue  # another module's (the MTP layer's)
            if m:
                base, e, proj = m.group(1), int(m.group(2)), m.group(3)
                if proj == "down":
                    state[base + ".down_proj"][e].copy_(t)
                else:
                    f = t.shape[0]
                    half = slice(0, f) if proj == "gate" else slice(f, 2 * f)
                    state[base + ".gate_up_proj"][e, half].copy_(t)
            elif name in state:
                state[name].copy_(t)


def quantize_fp8(w: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """[out, in] float32 -> (e4m3 weight, float32 weight_scale_inv [ceil(out/bo), ceil(in/bi)], dequantized)."""
    bo, bi = block
    out_dim, in_dim = w.shape
    nbo, nbi = -(-out_dim // bo), -(-in_dim // bi)
    padded = torch.zeros(nbo * bo, nbi * bi)
    padded[:out_dim, :in_dim] = w
    amax = padded.reshape(nbo, bo, nbi, bi).abs().amax(dim=(1, 3))
    scale = torch.where(amax > 0, amax / 448.0, torch.ones_like(amax)).float()
    full = scale.repeat_interleave(bo, 0).repeat_interleave(bi, 1)[:out_dim, :in_dim]
    q = (w / full).to(torch.float8_e4m3fn)
    return q, scale, q.float() * full


def _quantized(name: str, t: torch.Tensor) -> bool:
    """Which tensors DeepSeek stores in FP8: every Linear weight of the decoder layers but the router's and the
    indexer's head weights (and, here, the MTP layer's eh_proj)."""
    return (name.startswith("model.layers.") and name.endswith(".weight") and t.ndim == 2
            and not name.endswith("mlp.gate.weight") and "weights_proj" not in name and "eh_proj" not in name
            and "embed_tokens" not in name and "shared_head" not in name)


def _read_all(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for f in sorted(directory.glob("*.safetensors")):
        tensors.update(load_file(str(f)))
        f.unlink()
    index = directory / "model.safetensors.index.json"
    if index.exists():
        index.unlink()
    return tensors


def _write(directory: Path, tensors: dict[str, torch.Tensor], shards: int) -> None:
    names = sorted(tensors)
    if shards == 1:
        save_file({n: tensors[n].contiguous() for n in names}, str(directory / "model.safetensors"),
                  metadata={"format": "pt"})
        return
    weight_map = {}
    for s in range(shards):
        file = f"model-{s + 1:05d}-of-{shards:05d}.safetensors"
        part = names[s::shards]
        save_file({n: tensors[n].contiguous() for n in part}, str(directory / file), metadata={"format": "pt"})
        weight_map.update({n: file for n in part})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_checkpoint(model, directory: Path, *, fmt: str = "float32", sharded: bool = False,
                     fp8_block: tuple[int, int] = (16, 16), mtp=None, old_dialect: bool = False) -> Path:
    """Writes `model` (and `mtp`) as a hub checkpoint in `fmt` ("float32", "bfloat16" or "fp8": e4m3 Linear weights
    with weight_scale_inv blocks, the rest bf16). For "bfloat16" and "fp8" the torch model (and mtp) are updated in
    place to the values the files hold, so they remain the exact float32 reference."""
    directory = Path(directory)
    to_save = model if fmt == "float32" else copy.deepcopy(model).to(torch.bfloat16)
    to_save.save_pretrained(directory)
    tensors = _read_all(directory)
    if mtp is not None:
        tensors.update({k: v.to(next(iter(tensors.values())).dtype) for k, v in mtp_tensors(model, mtp).items()})
    if fmt != "float32":
        reference = {}
        for name in list(tensors):
            t = tensors[name].float()
            if fmt == "fp8" and _quantized(name, t):
                q, scale, deq = quantize_fp8(t, fp8_block)
                tensors[name], tensors[name + "_scale_inv"] = q, scale
                reference[name] = deq
            else:
                tensors[name] = t.to(torch.bfloat16) if not name.endswith("e_score_correction_bias") else t
                reference[name] = tensors[name].float()
        set_from_checkpoint(model, reference)
        if mtp is not None:
            _set_mtp(model, mtp, reference)
    _write(directory, tensors, 3 if sharded else 1)
    config = json.loads((directory / "config.json").read_text())
    if fmt == "fp8":
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(fp8_block)}
    if old_dialect:
        rope = config.pop("rope_parameters")
        config["rope_theta"] = rope.pop("rope_theta")
        if rope.get("rope_type", "default") != "default":
            rope["type"] = rope.pop("rope_type")
            config["rope_scaling"] = rope
    (directory / "config.json").write_text(json.dumps(config, indent=2))
    return directory


def _set_mtp(model, mtp, reference: dict[str, torch.Tensor]) -> None:
    prefix = f"model.layers.{model.config.num_hidden_layers}."
    renamed = {}
    for name, t in reference.items():
        if not name.startswith(prefix) or name.startswith((prefix + "embed_tokens", prefix + "shared_head.head")):
            continue
        rest = name[len(prefix):]
        if rest.startswith("shared_head.norm."):
            renamed["post_norm." + rest[len("shared_head.norm."):]] = t
        elif rest.split(".")[0] in ("enorm", "hnorm", "eh_proj"):
            renamed[rest] = t
        else:
            renamed["mtp_block." + rest] = t
    set_from_checkpoint(mtp.layers[0], renamed)
