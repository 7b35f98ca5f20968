"""The fused Pallas decode step (models/dense.py, impl="pallas", interpreted here) against the XLA decode step.

float32 models: logits agree to 1e-4 relative (both compute in float32; the kernels add in another order and the
fused residual stream keeps split-K partial sums in float32 before rounding, as the XLA path rounds each product).
"""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.config import preset
from tilert_jax.kernels import tuning
from tilert_jax.kernels.matvec import MatvecConfig
from tilert_jax.models import dense
from tilert_jax.params import init_params


def rel(out, ref) -> float:
    out, ref = np.asarray(out, np.float64), np.asarray(ref, np.float64)
    return float(np.linalg.norm(out - ref) / np.linalg.norm(ref))


def _configs():
    base = preset("tiny")  # llama: hidden 128, 4 heads of 32, 2 KV heads
    qwen3 = dataclasses.replace(base, model_type="qwen3", qk_norm=True, tie_word_embeddings=True)
    qwen2 = dataclasses.replace(base, model_type="qwen2", qkv_bias=True, num_heads=8, num_kv_heads=2, head_dim=32,
                                hidden_size=256)
    return {"qwen3-tied": (qwen3, 2), "qwen2-bias": (qwen2, 1)}  # the plain llama path runs in test_bench.py


# The MLP as one phased launch, or two; the LM head on XLA after the final norm's launch (kernels/stream_norm.py);
# the products on XLA but gate/up (the batched default) with the norms as stream_norm launches (qkv_norm, mlp_norm).
@pytest.mark.parametrize("ops", ["all", "qkv,attention,o,gate_up,down,lm_head", "qkv,attention,o,gate_up,down",
                                 "attention,gate_up,qkv_norm,mlp_norm"])
@pytest.mark.parametrize("name", sorted(_configs()))
def test_fused_decode_matches_xla(name, ops, monkeypatch):
    monkeypatch.setenv("TILERT_PALLAS_OPS", ops)
    config, batch = _configs()[name]
    config = dataclasses.replace(config, num_layers=2)
    if name == "qwen3-tied":  # split-K everywhere it is allowed: partial sums flow between the kernels
        table = {tuning.matvec_key(op, batch, k, n): dataclasses.asdict(MatvecConfig(bn=32, bk=32, split=2))
                 for op, k, n in (("qkv", 128, 256), ("o", 128, 128), ("down", 384, 128))}
        table[tuning.attention_key(batch, 2, 64, 32)] = dict(splits=3, block=16)
        monkeypatch.setattr(tuning, "_table", lambda: table)
    params = init_params(dense.param_specs(config), jax.random.key(1), jnp.float32, std=0.1)
    cache = dense.init_cache(config, batch, 64, jnp.float32)
    prompt = jax.random.randint(jax.random.key(2), (batch, 12), 0, config.vocab_size)
    _, cache = dense.prefill(config, params, prompt, cache, jnp.int32(0), jnp.int32(11))
    step_x = jax.jit(lambda p, t, c, pos: dense.decode_step(config, p, t, c, pos, impl="xla"))
    step_p = jax.jit(lambda p, t, c, pos: dense.decode_step(config, p, t, c, pos, impl="pallas"))
    token = prompt[:, -1]
    assert "pallas_call" in str(jax.make_jaxpr(step_p)(params, token, cache, jnp.int32(12)))
    cache_x = cache_p = cache
    for pos in (12, 13):
        logits_x, cache_x = step_x(params, token, cache_x, jnp.int32(pos))
        logits_p, cache_p = step_p(params, token, cache_p, jnp.int32(pos))
        assert logits_p.shape == (batch, config.vocab_size) and logits_p.dtype == jnp.float32
        assert rel(logits_p, logits_x) < 1e-4
        for a, b in zip(cache_p.k + cache_p.v, cache_x.k + cache_x.v):
            assert rel(a, b) < 1e-4
        token = jnp.argmax(logits_x, axis=-1).astype(jnp.int32)


@pytest.mark.parametrize("name", sorted(_configs()))
def test_prefill_lm_head_kernel_matches_xla(name):
    """impl="pallas" prefill: the last token's final norm + LM head is the Pallas kernel, its logits those of the XLA
    prefill to 1e-4 relative (float32), the caches the same."""
    config, batch = _configs()[name]
    config = dataclasses.replace(config, num_layers=2)
    params = init_params(dense.param_specs(config), jax.random.key(1), jnp.float32, std=0.1)
    cache = dense.init_cache(config, batch, 64, jnp.float32)
    prompt = jax.random.randint(jax.random.key(2), (batch, 12), 0, config.vocab_size)
    prefill = {impl: jax.jit(lambda p, t, c, impl=impl: dense.prefill(config, p, t, c, 0, jnp.int32(9), impl=impl))
               for impl in ("xla", "pallas")}
    assert "pallas_call" in str(jax.make_jaxpr(prefill["pallas"])(params, prompt, cache))
    (logits_x, cache_x), (logits_p, cache_p) = (prefill[impl](params, prompt, cache) for impl in ("xla", "pallas"))
    assert logits_p.shape == (batch, config.vocab_size) and logits_p.dtype == jnp.float32
    assert rel(logits_p, logits_x) < 1e-4
    for a, b in zip(cache_p.k + cache_p.v, cache_x.k + cache_x.v):
        assert rel(a, b) < 1e-5


@pytest.mark.gpu
@pytest.mark.parametrize("ops", ["all", "qkv,attention,o,mlp,lm_head", None])  # the layer's weights in one launch,
# or the MLP's; None: the default set (at llama-3.2-1b the attention's 16 splits merged by the layer launch)
@pytest.mark.parametrize("name", ["llama-3.2-1b", "qwen3-8b"])
def test_gpu_fused_decode_step(name, ops, monkeypatch):
    """bf16, real shapes (qwen3-8b cut to 4 layers): one decode step's logits through the fused kernels and through
    XLA, each against a float32 XLA reference on the same (bf16-valued) parameters. The fused path may be no
    further from it than twice the XLA path's own bf16 error plus 1e-2."""
    from tilert_jax.config import preset as named

    if ops is None:
        monkeypatch.delenv("TILERT_PALLAS_OPS", raising=False)
    else:
        monkeypatch.setenv("TILERT_PALLAS_OPS", ops)
    config = named(name)
    if config.num_layers > 16:
        config = dataclasses.replace(config, num_layers=4)
    params = init_params(dense.param_specs(config), jax.random.key(3), jnp.bfloat16)
    cache = dense.init_cache(config, 1, 1280, jnp.bfloat16)  # the tuned attention's length (kernels/tuning.json)
    prompt = jax.random.randint(jax.random.key(4), (1, 300), 0, config.vocab_size)
    _, cache = jax.jit(lambda p, t, c: dense.prefill(config, p, t, c, jnp.int32(0), jnp.int32(299)))(params, prompt,
                                                                                                     cache)
    token, pos = prompt[:, -1], jnp.int32(300)
    step = lambda impl: jax.jit(lambda p, c: dense.decode_step(config, p, token, c, pos, impl=impl)[0])  # noqa: E731
    up = lambda t: jax.tree.map(lambda a: a.astype(jnp.float32), t)  # noqa: E731
    ref = step("xla")(up(params), up(cache))
    err_xla = rel(step("xla")(params, cache), ref)
    err_pallas = rel(step("pallas")(params, cache), ref)
    assert err_pallas <= 2 * err_xla + 1e-2, (err_pallas, err_xla)
