"""The bench on the CPU: the `tiny` preset through `python -m tilert_jax.bench`, both implementations; the model of
one device's share of a mesh (--slice-of)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import jax
import pytest

KEYS = {"preset", "ttft_ms", "tpot_ms_p50", "tpot_ms_p90", "tpot_ms_p99", "weight_bytes", "achieved_gbps",
        "floor_ms", "frac_of_floor", "device", "copy_gbps", "batch", "impl", "jax"}


def test_bench_tiny_cli():
    env = dict(os.environ, JAX_PLATFORMS="cpu", XLA_FLAGS="")
    cmd = [sys.executable, "-m", "tilert_jax.bench", "--preset", "tiny", "--random-weights", "--prompt-len", "40",
           "--new-tokens", "9", "--chunk", "4", "--repeats", "1", "--ttft-repeats", "1", "--impl", "xla,pallas",
           "--batch", "1,2"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env,
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode == 0, out.stderr[-3000:]
    rows = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("{")]
    assert [(r["impl"], r["batch"]) for r in rows] == [("xla", 1), ("pallas", 1), ("xla", 2), ("pallas", 2)]
    for r in rows:
        assert KEYS <= set(r), KEYS - set(r)
        assert r["preset"] == "tiny" and r["weight_bytes"] > 0 and r["tpot_ms_p50"] > 0
        assert abs(r["frac_of_floor"] - r["floor_ms"] / r["tpot_ms_p50"]) < 1e-9
        assert r["tpot_ms_p50"] <= r["tpot_ms_p90"] <= r["tpot_ms_p99"]
    # Same random weights, greedy: the fused Pallas decode (interpreted here) picks the same tokens.
    assert rows[1]["tokens_match_xla"] == 1.0 and rows[3]["tokens_match_xla"] == 1.0


def test_bench_requires_random_weights():
    out = subprocess.run([sys.executable, "-m", "tilert_jax.bench", "--preset", "tiny"], capture_output=True,
                         text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"),
                         cwd=Path(__file__).resolve().parents[1])
    assert out.returncode != 0 and "--random-weights" in out.stderr


def test_matmul_params_counts_the_activated_experts():
    """The prefill FLOP floor's weights: DeepSeek-V3's activated parameters, counted here from its published shapes
    (embedding table, LM head and FP8 scales left out; 8 of 256 routed experts plus the shared one)."""
    from tilert_jax.bench import bench_config, matmul_params

    c = bench_config("deepseek-v3")
    attn = (c.hidden_size * c.q_lora_rank + c.q_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.qk_rope_head_dim)
            + c.hidden_size * (c.kv_lora_rank + c.qk_rope_head_dim)
            + c.kv_lora_rank * c.num_heads * (c.qk_nope_head_dim + c.v_head_dim) + c.num_heads * c.v_head_dim
            * c.hidden_size)
    dense_mlp = 3 * c.hidden_size * c.intermediate_size
    moe = ((c.n_shared_experts + c.num_experts_per_tok) * 3 * c.hidden_size * c.moe_intermediate_size
           + c.n_routed_experts * c.hidden_size)
    dense = c.first_k_dense_replace
    expected = c.num_layers * attn + dense * dense_mlp + (c.num_layers - dense) * moe
    assert matmul_params(c) == expected


def test_prefill_bytes_read_every_expert():
    """The prefill's byte floor: every parameter but an untied embedding table. A dense model's is its decode bytes
    less the one embedding row a decode step reads; a mixture's holds every expert, not the activated share."""
    import jax.numpy as jnp

    from tilert_jax.bench import bench_config, prefill_bytes, weight_bytes
    from tilert_jax.models import family
    from tilert_jax.params import abstract_params

    dense = bench_config("llama-3.1-8b")
    assert prefill_bytes(dense, jnp.bfloat16) == weight_bytes(dense, jnp.bfloat16) - dense.hidden_size * 2
    moe = bench_config("deepseek-v3", 4, 1)
    params = abstract_params(family(moe).param_specs(moe), jnp.bfloat16)
    experts = sum(x.size * x.dtype.itemsize for layer in params.layers[1:]
                  for x in (layer.mlp.experts.gate.w, layer.mlp.experts.up.w, layer.mlp.experts.down.w))
    assert prefill_bytes(moe, jnp.bfloat16) - weight_bytes(moe, jnp.bfloat16) > 0.9 * experts * (1 - 8 / 256)


def test_floors_count_what_one_device_holds():
    """On a mesh the floors count one device's shards: at tp=4 a dense model's matrices and LM head are divided by 4
    and its norms are whole; at ep=4 a mixture's routed experts are divided by 4 and everything else is whole."""
    import jax.numpy as jnp

    from tilert_jax.bench import bench_config, matmul_params, prefill_bytes, weight_bytes
    from tilert_jax.models import family
    from tilert_jax.params import abstract_params
    from tilert_jax.sharding import make_mesh

    nbytes = lambda x: x.size * x.dtype.itemsize  # noqa: E731
    c = bench_config("llama-3.1-8b")
    params = abstract_params(family(c).param_specs(c), jnp.bfloat16)
    norms = sum(nbytes(x) for x in jax.tree.leaves(params) if x.ndim == 1)
    matrices = sum(nbytes(x) for x in jax.tree.leaves(params) if x.ndim > 1) - nbytes(params.embed)
    tp4 = make_mesh(tp=4)
    assert weight_bytes(c, jnp.bfloat16, tp4) == matrices // 4 + norms + c.hidden_size * 2
    assert prefill_bytes(c, jnp.bfloat16, tp4) == matrices // 4 + norms
    assert matmul_params(c, tp4) == (matrices - nbytes(params.lm_head)) // 2 // 4

    moe = bench_config("deepseek-v3", 4, 1)
    params = abstract_params(family(moe).param_specs(moe), jnp.bfloat16)
    routed = sum(nbytes(x) for layer in params.layers[1:] for x in jax.tree.leaves(layer.mlp.experts))
    active = routed * moe.num_experts_per_tok // moe.n_routed_experts
    ep4 = make_mesh(ep=4)
    assert weight_bytes(moe, jnp.bfloat16) - weight_bytes(moe, jnp.bfloat16, ep4) == active - active // 4
    assert prefill_bytes(moe, jnp.bfloat16) - prefill_bytes(moe, jnp.bfloat16, ep4) == routed - routed // 4


@pytest.mark.parametrize("name, tp", [("deepseek-v3.2-exp", 8), ("deepseek-v3", 4), ("llama-3.1-8b", 4),
                                      ("llama-3.1-8b", 8)])
def test_tp_slice_has_one_device_shards(name, tp):
    """`tp_slice` (bench --slice-of) is the model one device of a tp mesh holds: every parameter's shape is the shard
    the sharding rules give that device (sharding/rules.py, `partition_spec`), including KV heads at tp equal to
    their count; a tp that does not divide the heads is refused with the fields named."""
    from types import SimpleNamespace

    from tilert_jax.bench import tp_slice
    from tilert_jax.config import preset
    from tilert_jax.models import family
    from tilert_jax.params import is_spec
    from tilert_jax.sharding.rules import partition_spec

    full = preset(name)
    mesh = SimpleNamespace(shape={"tp": tp, "ep": 1})
    sliced = tp_slice(full, tp)
    specs = jax.tree.leaves(family(full).param_specs(full), is_leaf=is_spec)
    ours = jax.tree.leaves(family(sliced).param_specs(sliced), is_leaf=is_spec)
    assert len(specs) == len(ours)
    for spec, mine in zip(specs, ours):
        shard = tuple(size // (tp if axis == "tp" else 1) for size, axis in zip(spec.shape, partition_spec(spec, mesh)))
        assert mine.shape == shard, (spec.axes, spec.shape)
    with pytest.raises(ValueError, match="tp=3 does not divide num_heads"):
        tp_slice(full, 3)
