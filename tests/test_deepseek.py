"""DeepSeek V2 / V3 / V3.2 against Hugging Face transformers on small random checkpoints (bf16, float32 and FP8
block-scaled files, one file or shards, raw and converted): float32 logits, greedy tokens, the cached decode, the
latent cache's size, the MTP layer."""

import dataclasses
import json

import jax
import jax.extend
import jax.numpy as jnp
import numpy as np
import pytest
import torch

import hf_deepseek
import tilert_jax
from traced import check_silenced_step
from tilert_jax.convert import convert
from tilert_jax.convert.hf import plan
from tilert_jax.convert.safetensors_files import CheckpointError
from tilert_jax.models import deepseek

PROMPT = np.random.default_rng(1).integers(0, 160, (2, 24))
KL_BOUND = 1e-5


def max_kl(ref_logits, logits) -> float:
    """max over positions of KL(reference || ours), in float64."""
    ref = torch.log_softmax(torch.tensor(np.asarray(ref_logits), dtype=torch.float64), -1)
    ours = torch.log_softmax(torch.tensor(np.asarray(logits), dtype=torch.float64), -1)
    return float((ref.exp() * (ref - ours)).sum(-1).max())


def reference_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(np.asarray(tokens))).logits.float().numpy()


@pytest.fixture(scope="session")
def ds_checkpoint(tmp_path_factory):
    """(name, fmt, sharded, mtp, old_dialect) -> (torch model, mtp or None, directory), each made once."""
    made = {}

    def get(name, fmt="float32", sharded=False, mtp=False, old_dialect=False):
        key = (name, fmt, sharded, mtp, old_dialect)
        if key not in made:
            model = hf_deepseek.make_model(name)
            mtp_model = hf_deepseek.make_mtp(model) if mtp else None
            directory = tmp_path_factory.mktemp(f"ds_{name}_{fmt}")
            hf_deepseek.write_checkpoint(model, directory, fmt=fmt, sharded=sharded, mtp=mtp_model,
                                         old_dialect=old_dialect)
            made[key] = model, mtp_model, directory
        return made[key]

    return get


@pytest.fixture(scope="session")
def ds_loaded(ds_checkpoint, tmp_path_factory):
    """(case, 'raw' | 'converted') -> (torch model, tilert_jax Model loaded in float32)."""
    made = {}

    def get(case, source="raw"):
        if (case, source) not in made:
            model, _, directory = ds_checkpoint(*case)
            if source == "converted":
                directory = convert(directory, tmp_path_factory.mktemp("ds_converted") / "ckpt", progress=False)
            made[case, source] = model, tilert_jax.load(directory, dtype="float32")
        return made[case, source]

    return get


# (name, file format, sharded, mtp, old config.json dialect), source
LOGIT_CASES = [
    (("v2_lite", "bfloat16", True, False, True), "raw"),  # no query LoRA, softmax greedy, yarn
    (("v2_lite", "bfloat16", True, False, True), "converted"),
    (("v2_group", "float32", False, False, False), "raw"),  # group-limited greedy, routed scaling
    (("v3", "bfloat16", False, True, False), "raw"),  # query LoRA, noaux_tc, yarn mscale != mscale_all_dim, MTP
    (("v3_plain", "float32", True, False, True), "raw"),  # no rope interleave, no top-k renormalisation
    (("v32", "bfloat16", True, False, False), "raw"),  # DSA, index_topk 6 < 24
    (("v3", "fp8", True, False, False), "raw"),  # FP8 e4m3 + 16x16 weight_scale_inv, shards
    (("v32", "fp8", False, False, True), "raw"),
    (("v32", "fp8", False, False, True), "converted"),
]


@pytest.mark.parametrize("case,source", LOGIT_CASES, ids=[f"{c[0]}-{c[1]}-{'sharded' if c[2] else 'single'}-{s}"
                                                          for c, s in LOGIT_CASES])
def test_float32_logits_match(ds_loaded, case, source):
    model, ours = ds_loaded(case, source)
    logits = np.asarray(ours.logits(PROMPT))
    ref = reference_logits(model, PROMPT)
    assert ref.std() > 0.8  # a random model that is not near-uniform, so a wrong model shows
    assert max_kl(ref, logits) <= KL_BOUND
    np.testing.assert_array_equal(ref.argmax(-1), logits.argmax(-1))


def test_fp8_weights_stay_fp8(ds_loaded):
    _, ours = ds_loaded(("v3", "fp8", True, False, False))
    layer = ours.params.layers[1]
    assert ours.params.embed.dtype == jnp.float32  # dtype="float32" applies to the unquantized tensors
    assert layer.attn.q_b.w.dtype == jnp.float8_e4m3fn and layer.attn.q_b.scale.dtype == jnp.float32
    assert layer.mlp.experts.gate.w.dtype == jnp.float8_e4m3fn
    assert layer.mlp.experts.gate.w.shape == (8, 64, 32) and layer.mlp.experts.gate.scale.shape == (8, 4, 2)
    assert layer.attn.kv_a.scale.shape == (4, 3)  # 40 output channels: a partial last block
    assert layer.mlp.router.dtype == jnp.float32  # the router stays unquantized


GREEDY_CASES = [("v2_lite", "bfloat16", True, False, True), ("v3", "bfloat16", False, True, False),
                ("v32", "bfloat16", True, False, False), ("v32", "fp8", False, False, True)]


@pytest.mark.parametrize("case", GREEDY_CASES, ids=[f"{c[0]}-{c[1]}" for c in GREEDY_CASES])
def test_greedy_generation_matches(ds_loaded, case):
    model, ours = ds_loaded(case)
    prompt = PROMPT[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt[None]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    result = ours.generate(prompt.tolist(), max_new_tokens=8, stop_at_eos=False)
    assert result.tokens == ref[0, len(prompt):].tolist()


@pytest.mark.parametrize("case", [("v32", "bfloat16", True, False, False)], ids=["v32"])
def test_cached_decode_matches_transformers(ds_loaded, case):
    """Prefill + one-token decode steps (absorbed MLA over the latent cache; for V3.2 the indexer over its key cache,
    then only the selected tokens gathered) give transformers' logits at every position."""
    model, ours = ds_loaded(case)
    config, params = ours.config, ours.params
    tokens = jnp.asarray(PROMPT[:1, :20], jnp.int32)
    ref = reference_logits(model, tokens)[0]
    cache = deepseek.init_cache(config, 1, 32, params.embed.dtype)
    prefill = jax.jit(deepseek.prefill, static_argnums=0)
    step = jax.jit(deepseek.decode_step, static_argnums=0)
    logits, cache = prefill(config, params, tokens[:, :8], cache, 0, 7)
    steps = [np.asarray(logits)[0]]
    for pos in range(8, 20):
        logits, cache = step(config, params, tokens[:, pos], cache, jnp.int32(pos))
        steps.append(np.asarray(logits)[0])
    assert max_kl(ref[7:], np.stack(steps)) <= KL_BOUND
    np.testing.assert_array_equal(ref[7:].argmax(-1), np.stack(steps).argmax(-1))


@pytest.mark.parametrize("case", [("v2_lite", "bfloat16", True, False, True), ("v32", "bfloat16", True, False, False)],
                         ids=["v2_lite", "v32"])
def test_prefill_last_layer_takes_one_token(ds_loaded, case):
    """The prefill's last layer runs its query side, attention, o and MoE for the token at last_index alone (here
    not the last row: right padding): the logits are the whole-sequence forward's at that token, and every row's
    latent cache entry and V3.2 index key are what the all-rows layers write (prefill_layers)."""
    _, ours = ds_loaded(case)
    config, params = ours.config, ours.params
    tokens = jnp.asarray(PROMPT[:, :20], jnp.int32)
    cache = deepseek.init_cache(config, 2, 32, params.embed.dtype)
    logits, got = jax.jit(deepseek.prefill, static_argnums=0)(config, params, tokens, cache, 0, 15)
    _, want = jax.jit(deepseek.prefill_layers, static_argnums=0)(config, params, tokens, cache, 0)
    ref = np.asarray(deepseek.forward(config, params, tokens))[:, 15]
    np.testing.assert_allclose(logits, ref, rtol=0, atol=1e-5 * np.abs(ref).max())
    assert len(got.kv) == len(want.kv) == config.num_layers and len(got.index_k) == len(want.index_k)
    for a, b in zip(got.kv + got.index_k, want.kv + want.index_k):
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-6 * float(jnp.abs(b).max()))


def test_cache_stores_only_the_latent_and_rope_key():
    for name, width in (("deepseek-v2-lite", 512 + 64), ("deepseek-v3", 512 + 64),
                        ("deepseek-v3.2-exp", 512 + 64 + 128)):
        config = tilert_jax.preset(name)
        cache = jax.eval_shape(lambda: deepseek.init_cache(config, 1, 1024, jnp.bfloat16))
        per_token = sum(a.shape[2] * a.dtype.itemsize for a in jax.tree.leaves(cache))
        assert per_token == config.num_layers * width * 2 == deepseek.cache_bytes_per_token(config, jnp.bfloat16)
    config = hf_deepseek_config("v32")
    cache = deepseek.init_cache(config, 1, 64, jnp.float32)
    assert cache.nbytes_per_token() == 3 * (32 + 8 + 16) * 4  # 3 layers x (kv_lora + rope + index key) x f32


def hf_deepseek_config(name):
    _, _, kwargs = hf_deepseek.FAMILIES[name]
    hf = dict(hf_deepseek.COMMON | kwargs, model_type={"v32": "deepseek_v32"}.get(name, "deepseek_v3"))
    hf["num_hidden_layers"] = hf_deepseek.COMMON["num_hidden_layers"]
    return tilert_jax.config_from_hf(hf)


def test_mtp_layer_matches_transformers(ds_checkpoint, ds_loaded):
    """The MTP layer loads from the checkpoint's model.layers.{num_layers}.* and drafts transformers' logits."""
    case = ("v3", "bfloat16", False, True, False)
    model, mtp, directory = ds_checkpoint(*case)
    _, ours = ds_loaded(case)
    assert ours.config.mtp_layers == 1
    mtp_params = deepseek.load_mtp(directory, ours.config, dtype="float32")
    tokens = torch.tensor(PROMPT[:, :17])
    with torch.no_grad():
        hidden = model.model(tokens[:, :-1]).last_hidden_state
        positions = torch.arange(1, 17)[None].expand(2, -1)
        draft = mtp.forward_layer(0, hidden, positions, None, input_ids=tokens[:, 1:])
        ref = mtp._project_to_logits(draft).float().numpy()
    our_hidden = deepseek.hidden_states(ours.config, ours.params, jnp.asarray(PROMPT[:, :16]))
    np.testing.assert_allclose(np.asarray(our_hidden), hidden.numpy(), atol=1e-4)
    logits = deepseek.mtp_forward(ours.config, ours.params, mtp_params, jnp.asarray(PROMPT[:, 1:17]), our_hidden)
    assert max_kl(ref, logits) <= KL_BOUND
    np.testing.assert_array_equal(ref.argmax(-1), np.asarray(logits).argmax(-1))


def test_bfloat16_logits_close(ds_checkpoint):
    """bf16 end to end against transformers in bf16: rounding differs op by op, so the bound is loose."""
    model, _, directory = ds_checkpoint("v3", "bfloat16", False, True, False)
    ours = tilert_jax.load(directory)
    assert ours.params.embed.dtype == jnp.bfloat16
    ref = reference_logits(model.to(torch.bfloat16), PROMPT)
    model.float()
    logits = np.asarray(ours.logits(PROMPT))
    ref_log = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1)
    our_log = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    assert float((ref_log.exp() * (ref_log - our_log)).sum(-1).mean()) < 2e-2
    assert (ref.argmax(-1) == logits.argmax(-1)).mean() >= 0.85


def test_fp8_checkpoint_without_quantization_config_is_refused(ds_checkpoint, tmp_path):
    import shutil

    _, _, directory = ds_checkpoint("v3", "fp8", True, False, False)
    copy = tmp_path / "ckpt"
    shutil.copytree(directory, copy)
    hf = json.loads((copy / "config.json").read_text())
    del hf["quantization_config"]
    (copy / "config.json").write_text(json.dumps(hf))
    with pytest.raises(CheckpointError, match="dtype F8_E4M3"):
        plan(copy)


def test_presets_and_random_weights():
    """The real-shape presets build their parameter trees (abstractly: no real-size allocation on the CPU), count
    only the activated experts as decode bytes, and a shrunken FP8 V3 (random e4m3 weights, unit scales: what the
    bench builds) runs a decode step."""
    from tilert_jax.params import abstract_params, init_params, param_bytes

    v2 = tilert_jax.preset("deepseek-v2-lite")
    v3 = tilert_jax.preset("deepseek-v3")
    assert v2.q_lora_rank is None and v2.router == "softmax" and v2.fp8_block is None
    assert v3.fp8_block == (128, 128) and v3.router == "sigmoid" and v3.mtp_layers == 1
    for config, total_gb, active_gb in ((v2, (31, 32.5), (4.5, 5.5)), (v3, (650, 700), (35, 40))):
        specs = deepseek.param_specs(config)
        shapes = jax.eval_shape(lambda: init_params(specs, jax.random.key(0), jnp.bfloat16))
        assert jax.tree.structure(shapes) == jax.tree.structure(abstract_params(specs, jnp.bfloat16))
        assert total_gb[0] < param_bytes(specs, jnp.bfloat16) / 1e9 < total_gb[1]
        assert active_gb[0] < deepseek.decode_weight_bytes(config, jnp.bfloat16) / 1e9 < active_gb[1]
    small = dataclasses.replace(v3, vocab_size=256, hidden_size=256, intermediate_size=512, moe_intermediate_size=128,
                                num_layers=2, first_k_dense_replace=1, num_heads=2, n_routed_experts=16,
                                n_group=4, topk_group=2, num_experts_per_tok=4, q_lora_rank=128, kv_lora_rank=128)
    small_specs = deepseek.param_specs(small)
    params = jax.jit(lambda key: init_params(small_specs, key, jnp.bfloat16))(jax.random.key(0))
    assert params.layers[1].mlp.experts.up.w.dtype == jnp.float8_e4m3fn

    @jax.jit
    def run(params):
        cache = deepseek.init_cache(small, 1, 16, jnp.bfloat16)
        return deepseek.decode_step(small, params, jnp.zeros((1,), jnp.int32), cache, jnp.int32(4))[0]

    logits = run(params)
    assert logits.shape == (1, 256) and bool(jnp.isfinite(logits).all())


def test_tensor_parallel_mesh_matches_transformers(ds_checkpoint):
    """V3.2 with FP8 weights over a tp=2 mesh (heads, intermediate and vocabulary split; FP8 scale blocks split with
    their weights; the latent cache replicated): transformers' logits and greedy tokens."""
    from tilert_jax.sharding import make_mesh

    model, _, directory = ds_checkpoint("v32", "fp8", False, False, True)
    ours = tilert_jax.load(directory, dtype="float32", mesh=make_mesh(tp=2))
    q_b = ours.params.layers[1].attn.q_b
    assert {s.data.shape for s in q_b.w.addressable_shards} == {(48, 48)}
    assert {s.data.shape for s in q_b.scale.addressable_shards} == {(3, 3)}
    logits = np.asarray(ours.logits(PROMPT))
    ref = reference_logits(model, PROMPT)
    assert max_kl(ref, logits) <= KL_BOUND
    np.testing.assert_array_equal(ref.argmax(-1), logits.argmax(-1))
    with torch.no_grad():
        tokens = model.generate(torch.tensor(PROMPT[:1]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens == tokens[0, 24:].tolist()


@pytest.mark.parametrize("name,fmt,fused", [("v3", "fp8", False), ("v2_lite_tiled", "float32", True),
                                            ("v3_tiled", "fp8", True), ("v32", "fp8", False),
                                            ("v32_tiled", "fp8", True)])
def test_pallas_decode_matches_transformers(ds_checkpoint, name, fmt, fused):
    """impl="pallas": decode's FP8 Linears, router and routed experts run the grouped matvec kernel and attention
    the MLA decode kernels (interpreted on the CPU), reading experts and kv_b in place and dequantizing tiles in the
    kernel; V3.2's indexer scores the cache in its kernel before the top-k selection; greedy tokens stay
    transformers'. Where every weight tiles (fused), the step chains its launches
    (models/deepseek_decode.py: pending sums, norms and the SwiGLU in the next launch's prologue, the routing in the
    router's launch) and its logits equal the XLA path's within float32 rounding (1e-5 of their scale); V3.2's
    too while its cache holds at most index_topk tokens (the indexer would select them all, so both paths skip it)."""
    from tilert_jax.models import deepseek_decode

    model, _, directory = ds_checkpoint(name, fmt, True, False, False)
    ours = tilert_jax.load(directory, dtype="float32", impl="pallas")
    with torch.no_grad():
        ref = model.generate(torch.tensor(PROMPT[:1]), max_new_tokens=8, min_new_tokens=8, do_sample=False)
    assert ours.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens == ref[0, 24:].tolist()
    tokens = jnp.asarray(PROMPT[:, 0])
    cache = deepseek.init_cache(ours.config, PROMPT.shape[0], 32, jnp.float32)
    assert deepseek_decode.supported(ours.config, ours.params, tokens, cache) == fused
    if ours.config.has_indexer:  # a longer cache than index_topk: the indexer may select, the chain cannot run
        longer = deepseek.init_cache(ours.config, PROMPT.shape[0], 2 * ours.config.index_topk, jnp.float32)
        assert not deepseek_decode.supported(ours.config, ours.params, tokens, longer)
    _, cache = deepseek.prefill(ours.config, ours.params, jnp.asarray(PROMPT[:, :20]), cache, 0, 19)
    steps = [jax.jit(deepseek.decode_step, static_argnums=(0, 5))(ours.config, ours.params, tokens, cache, 20, impl)[0]
             for impl in ("pallas", "xla")]
    if fused:  # the routing runs as the epilogue of the router's launch, not in a launch of its own
        jaxpr = str(jax.make_jaxpr(deepseek.decode_step, static_argnums=(0, 5))(ours.config, ours.params, tokens,
                                                                                cache, 20, "pallas"))
        assert "moe_grouped_matvec" in jaxpr and "moe_routing" not in jaxpr
    np.testing.assert_allclose(steps[0], steps[1], rtol=0, atol=1e-5 * float(jnp.abs(steps[1]).max()))


@pytest.mark.parametrize("tp,ep", [(2, 4), (1, 8)])
def test_expert_parallel_mesh_matches_one_device(ds_checkpoint, tp, ep):
    """Routed experts split over `ep` (each device runs the chosen experts it holds; the shared expert runs on the
    first expert shard), heads and intermediates over `tp`: the one-device logits within float32 rounding (1e-5
    relative) and the same greedy tokens."""
    from tilert_jax.sharding import make_mesh

    _, _, directory = ds_checkpoint("v3", "fp8", True, False, False)
    single = tilert_jax.load(directory, dtype="float32")
    ours = tilert_jax.load(directory, dtype="float32", mesh=make_mesh(tp=tp, ep=ep))
    gate = ours.params.layers[-1].mlp.experts.gate.w  # [experts, hidden, intermediate]
    assert {s.data.shape[0] for s in gate.addressable_shards} == {8 // ep}
    ref = np.asarray(single.logits(PROMPT))
    logits = np.asarray(ours.logits(PROMPT))
    assert np.abs(logits - ref).max() <= 1e-5 * np.abs(ref).max()
    expected = single.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens
    assert ours.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens == expected


def _moe_reductions_read_own_shared(model) -> list[bool]:
    """Per MoE layer of a sharded model's traced forward: whether the layer's reduction over the expert axis has one
    of that layer's shared-expert weights among its operand's ancestors (each equation taken to read all its
    inputs)."""
    family, config = model.decoder.family, model.config
    closed = jax.make_jaxpr(lambda p: family.forward(config, p, jnp.asarray(PROMPT[:1])))(model.params)
    mapped = next(e for e in closed.jaxpr.eqns if e.primitive.name == "shard_map")
    inner = mapped.params["jaxpr"]
    leaf_of = dict(zip(closed.jaxpr.invars, (id(leaf) for leaf in jax.tree.leaves(model.params))))
    var_of = {leaf_of[outer]: var for outer, var in zip(mapped.invars, inner.invars) if outer in leaf_of}
    producers = {v: e for e in inner.eqns for v in e.outvars}

    def ancestors(roots):
        seen, stack = set(), list(roots)
        while stack:
            v = stack.pop()
            if isinstance(v, jax.extend.core.Var) and v not in seen:
                seen.add(v)
                stack.extend(producers[v].invars if v in producers else ())
        return seen

    reductions = [e for e in inner.eqns if e.primitive.name.startswith("psum") and "ep" in e.params["axes"]]
    moe_layers = [layer.mlp for layer in model.params.layers if isinstance(layer.mlp, deepseek.MoE)]
    assert len(reductions) == len(moe_layers)
    return [bool(ancestors(e.invars) & {var_of[id(leaf)] for leaf in jax.tree.leaves(mlp.shared)})
            for e, mlp in zip(reductions, moe_layers)]


@pytest.mark.parametrize("overlap", ["0", "1"])
def test_overlapped_expert_reduction(ds_checkpoint, monkeypatch, overlap):
    """TILERT_OVERLAP=1 on an expert axis alone (ep=8): each MoE layer reduces only its routed experts' outputs and
    every device adds its own shared experts' output after, so the reduction does not wait for the shared experts
    (on the traced program no shared weight of the layer is an ancestor of its reduction; without overlap each is);
    the logits stay one device's within float32 rounding (1e-5 relative), with the same greedy tokens."""
    from tilert_jax.sharding import make_mesh

    monkeypatch.setenv("TILERT_OVERLAP", overlap)
    _, _, directory = ds_checkpoint("v3", "fp8", True, False, False)
    single = tilert_jax.load(directory, dtype="float32")
    ours = tilert_jax.load(directory, dtype="float32", mesh=make_mesh(ep=8))
    waits = _moe_reductions_read_own_shared(ours)
    assert waits and all(w == (overlap == "0") for w in waits)
    ref = np.asarray(single.logits(PROMPT))
    assert np.abs(np.asarray(ours.logits(PROMPT)) - ref).max() <= 1e-5 * np.abs(ref).max()
    expected = single.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens
    assert ours.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens == expected


@pytest.mark.parametrize("tp,ep", [(1, 8), (2, 4)])
def test_silenced_expert_parallel_step(ds_checkpoint, tp, ep):
    """communicate=False (the bench's step for timing communication) traces the same expert-parallel decode step
    minus every collective: each device still runs only the chosen experts it holds."""
    from tilert_jax.sharding import make_mesh

    _, _, directory = ds_checkpoint("v3", "fp8", True, False, False)
    check_silenced_step(tilert_jax.load(directory, dtype="float32", mesh=make_mesh(tp=tp, ep=ep), impl="pallas"),
                        "pallas")


def test_expert_parallel_pallas_decode(ds_checkpoint):
    """impl="pallas" on a tp=2, ep=4 mesh: each device's grouped kernel (interpreted) runs the chosen experts it
    holds and skips the pairs routed to another shard (id -1: no weight read); greedy tokens equal one device's."""
    from tilert_jax.sharding import make_mesh

    _, _, directory = ds_checkpoint("v3", "fp8", True, False, False)
    single = tilert_jax.load(directory, dtype="float32")
    ours = tilert_jax.load(directory, dtype="float32", mesh=make_mesh(tp=2, ep=4), impl="pallas")
    family, config = ours.decoder.family, ours.config
    step = jax.make_jaxpr(lambda p, t: family.decode_step(config, p, t, family.init_cache(config, 1, 32, jnp.float32),
                                                          jnp.int32(20), impl="pallas"))
    assert "pallas_call" in str(step(ours.params, jnp.asarray(PROMPT[:1, 0])))
    expected = single.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens
    assert ours.generate(PROMPT[0].tolist(), max_new_tokens=8, stop_at_eos=False).tokens == expected


@pytest.mark.parametrize("name", ["v3_tiled", "v32_tiled"])
def test_pallas_decode_chain_under_tensor_parallelism(ds_checkpoint, name):
    """impl="pallas" over tp=2: each device chains the fused launches (interpreted) on its heads and its slice of the
    intermediates; the output projection's and the MLP's pending sums are reduced over the mesh before the next
    stream norm. float32: one device's fused step within 1e-5 relative (the same kernels, the mesh-wide sum in
    another order)."""
    from jax.sharding import NamedSharding

    from tilert_jax.sharding import make_mesh
    from tilert_jax.sharding.sharded import ShardedFamily

    _, _, directory = ds_checkpoint(name, "fp8", True, False, False)
    ours = tilert_jax.load(directory, dtype="float32")
    config, params = ours.config, ours.params
    sharded = ShardedFamily(config, make_mesh(tp=2))
    cache = deepseek.init_cache(config, 1, 32, jnp.float32)
    _, cache = deepseek.prefill(config, params, jnp.asarray(PROMPT[:1, :20]), cache, 0, 19)
    tp_params = jax.device_put(params, sharded.param_shardings)
    tp_cache = jax.device_put(cache, jax.tree.map(lambda s: NamedSharding(sharded.mesh, s), sharded.cache_specs))
    assert {s.data.shape for s in tp_params.layers[-1].mlp.experts.gate.w.addressable_shards} == {(16, 64, 16)}
    token, pos = jnp.asarray(PROMPT[:1, 20]), jnp.int32(20)

    def step(family):
        return jax.jit(lambda p, t, c, q: family.decode_step(config, p, t, c, q, impl="pallas"))

    assert "stream_norm" in str(jax.make_jaxpr(step(sharded))(tp_params, token, tp_cache, pos))
    logits, new_cache = jax.device_get(step(sharded)(tp_params, token, tp_cache, pos))
    ref, ref_cache = jax.device_get(step(deepseek)(params, token, cache, pos))
    assert np.linalg.norm(logits - ref) <= 1e-5 * np.linalg.norm(ref)
    for ours_kv, ref_kv in zip(new_cache.kv, ref_cache.kv):
        assert np.linalg.norm(ours_kv - ref_kv) <= 1e-5 * np.linalg.norm(ref_kv)
