"""Tensor parallelism on 8 simulated CPU devices: the same logits and greedy tokens as one device, with parameters
really split."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding

import tilert_jax
from tilert_jax.config import preset
from tilert_jax.convert import convert
from tilert_jax.models import dense
from tilert_jax.params import init_params
from tilert_jax.sharding import make_mesh
from tilert_jax.sharding.sharded import ShardedFamily
from traced import check_silenced_step

PROMPT = np.random.default_rng(2).integers(0, 160, (2, 20))


@pytest.fixture(scope="module")
def checkpoint(hf_checkpoint, tmp_path_factory):
    _, directory = hf_checkpoint("llama_8heads", True, False)
    return convert(directory, tmp_path_factory.mktemp("tp") / "converted", progress=False)


@pytest.fixture(scope="module")
def single(checkpoint):
    model = tilert_jax.load(checkpoint)
    return model, np.asarray(model.logits(PROMPT)), model.generate(PROMPT[0].tolist(), max_new_tokens=12,
                                                                    stop_at_eos=False).tokens


@pytest.mark.parametrize("tp", [2, 4, 8])
def test_tensor_parallel_matches_one_device(checkpoint, single, tp):
    _, ref_logits, ref_tokens = single
    model = tilert_jax.load(checkpoint, mesh=make_mesh(tp=tp))
    wq = model.params.layers[0].attn.wq  # [heads, head_dim, hidden]
    assert {s.data.shape[0] for s in wq.addressable_shards} == {8 // tp}
    assert {s.data.shape[0] for s in model.params.embed.addressable_shards} == {160 // tp}
    logits = np.asarray(model.logits(PROMPT))
    # float32: a sharded reduction sums in another order, so logits move by rounding only (~1e-7 relative).
    assert np.abs(logits - ref_logits).max() <= 1e-5 * np.abs(ref_logits).max()
    assert model.generate(PROMPT[0].tolist(), max_new_tokens=12, stop_at_eos=False).tokens == ref_tokens


def test_raw_directory_loads_sharded(hf_checkpoint, single):
    _, ref_logits, _ = single
    model = tilert_jax.load(hf_checkpoint("llama_8heads", True, False)[1], mesh=make_mesh(tp=4))
    assert len(model.params.layers[1].mlp.w_up.addressable_shards) == 4
    np.testing.assert_allclose(np.asarray(model.logits(PROMPT)), ref_logits, atol=1e-5 * np.abs(ref_logits).max())


def test_bad_meshes(checkpoint):
    with pytest.raises(ValueError, match="needs 16 devices"):
        make_mesh(tp=16)
    with pytest.raises(ValueError, match="no experts"):
        tilert_jax.load(checkpoint, mesh=make_mesh(tp=2, ep=2))
    with pytest.raises(ValueError, match="tp=3 must divide"):
        tilert_jax.load(checkpoint, mesh=make_mesh(tp=3))


@pytest.mark.parametrize("impl", ["xla", "pallas"])
def test_silenced_step_is_the_step_without_its_collectives(checkpoint, impl):
    """communicate=False (the bench's step for timing communication) traces the same decode step minus every
    collective, also at tp=8 over 2 KV heads (each device keeps its KV head)."""
    check_silenced_step(tilert_jax.load(checkpoint, mesh=make_mesh(tp=8)), impl)


@pytest.mark.parametrize("tp,tied", [(2, False), (4, True)])
def test_fused_pallas_decode_under_tensor_parallelism(tp, tied, monkeypatch):
    """impl="pallas" under shard_map (by default, and with every fused op): each device runs the fused decode
    kernels (interpreted here) on the heads and MLP columns it holds; the output and down projections' float32
    partial sums are reduced over the mesh and added by the next kernel. float32: the logits of one device's fused
    step within 1e-5 relative (the same kernels; only the mesh-wide sum runs in another order), of its XLA step
    within 1e-4 (as test_kernels_decode.py: the kernels add in another order and keep the stream's partial sums in
    float32)."""
    monkeypatch.setenv("TILERT_PALLAS_OPS", "all")
    config = dataclasses.replace(preset("tiny"), num_heads=8, num_kv_heads=4, head_dim=32, hidden_size=256,
                                 qkv_bias=True, o_bias=True, tie_word_embeddings=tied)
    mesh = make_mesh(tp=tp)
    sharded = ShardedFamily(config, mesh)
    params = init_params(dense.param_specs(config), jax.random.key(1), jnp.float32, std=0.1)
    prompt = jax.random.randint(jax.random.key(2), (1, 12), 0, config.vocab_size)
    _, cache = dense.prefill(config, params, prompt, dense.init_cache(config, 1, 64, jnp.float32), 0, jnp.int32(11))
    cache_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), sharded.cache_specs)
    tp_params, tp_cache = jax.device_put(params, sharded.param_shardings), jax.device_put(cache, cache_shardings)
    assert {s.data.shape[0] for s in tp_params.layers[0].attn.wk.addressable_shards} == {4 // tp}

    def step(family, impl):
        return jax.jit(lambda p, t, c, pos: family.decode_step(config, p, t, c, pos, impl=impl))

    token, pos = prompt[:, -1], jnp.int32(12)
    monkeypatch.delenv("TILERT_PALLAS_OPS")  # the default op set: a mesh takes the fused step too
    assert "pallas_call" in str(jax.make_jaxpr(step(sharded, "pallas"))(tp_params, token, tp_cache, pos))
    monkeypatch.setenv("TILERT_PALLAS_OPS", "all")
    logits, new_cache = step(sharded, "pallas")(tp_params, token, tp_cache, pos)
    one_device, one_cache = step(dense, "pallas")(params, token, cache, pos)
    plain, _ = step(dense, "xla")(params, token, cache, pos)
    assert np.linalg.norm(logits - one_device) <= 1e-5 * np.linalg.norm(one_device)
    assert np.linalg.norm(logits - plain) <= 1e-4 * np.linalg.norm(plain)
    for ours, ref in zip(new_cache.k + new_cache.v, one_cache.k + one_cache.v):
        assert np.linalg.norm(ours - ref) <= 1e-5 * np.linalg.norm(ref)


@pytest.mark.parametrize("name,mesh", [("tiny", None), ("tiny", dict(tp=2)), ("deepseek-v3", None),
                                       ("deepseek-v3", dict(tp=2, ep=2))])
def test_prefill_in_a_chain_of_programs_is_the_one_program_prefill(name, mesh):
    """The engine's prefill as a chain of programs (layer 0, layers 1 to 3, layer 4: engine.PREFILL_FIRST_LAYERS)
    gives the one program's first token and cache: on one device bit for bit (the same operations), on a mesh
    within 1e-6 relative in float32 (each program places its reductions on its own)."""
    from tilert_jax.engine import Decoder
    from tilert_jax.models import family
    from tilert_jax.sampling import SamplingParams
    from tilert_jax.sharding import param_shardings

    config = dataclasses.replace(preset(name), num_layers=5)
    if name == "deepseek-v3":
        config = dataclasses.replace(config, vocab_size=256, hidden_size=256, intermediate_size=512,
                                     moe_intermediate_size=128, first_k_dense_replace=1, num_heads=2,
                                     n_routed_experts=16, n_group=4, topk_group=2, num_experts_per_tok=4,
                                     q_lora_rank=128, kv_lora_rank=128, fp8_block=None)
    mesh = mesh and make_mesh(**mesh)
    specs = family(config).param_specs(config)
    params = init_params(specs, jax.random.key(0), jnp.float32, std=0.1)
    if mesh is not None:
        params = jax.device_put(params, param_shardings(specs, mesh))
    tokens = jax.random.randint(jax.random.key(1), (1, 64), 0, config.vocab_size)
    args = (params, tokens, jnp.int32(40), jax.random.key(2))
    results = {}
    for split in (0, 1):
        decoder = Decoder(config, "xla", mesh, prefill_split=split)
        runs = [(run.start, run.stop) for run in decoder.prefill_runs]
        assert runs == ([(0, 1), (1, 4), (4, None)] if split else [(0, None)])
        prefill, _ = decoder.compiled("prefill", SamplingParams(temperature=1.0), 128, *args)
        on_host, token, cache = prefill(*args)
        assert on_host.sharding.memory_kind == "pinned_host" and token.sharding.memory_kind == "device"
        results[split] = jax.device_get((on_host, token, cache))
    (on_host, token, cache), (_, ref_token, ref_cache) = results[1], results[0]
    assert on_host == token == ref_token
    assert jax.tree.structure(cache) == jax.tree.structure(ref_cache)
    for ours, ref in zip(jax.tree.leaves(cache), jax.tree.leaves(ref_cache)):
        if mesh is None:
            np.testing.assert_array_equal(ours, ref)
        else:
            assert np.linalg.norm(ours - ref) <= 1e-6 * np.linalg.norm(ref)
