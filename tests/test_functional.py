"""tilert_jax.forward inside a user's JAX program: under jax.jit, jax.grad (w.r.t. the parameters) and jax.vmap it
gives the same numbers as the direct call. Float32 throughout; tolerances are stated next to each comparison."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tilert_jax
from tilert_jax.config import config_from_hf
from tilert_jax.models import family
from tilert_jax.params import map_specs

ATOL = 1e-5  # float32, the same ops in a different program: only rounding-level differences are allowed

CONFIGS = {
    "llama": dict(model_type="llama", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, rope_theta=10000.0, rms_norm_eps=1e-5,
                  torch_dtype="float32"),
    "qwen3_tied": dict(model_type="qwen3", vocab_size=61, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                       num_attention_heads=4, num_key_value_heads=1, head_dim=16, rope_theta=1000000.0,
                       tie_word_embeddings=True, torch_dtype="float32"),
}


def _model(name, seed=0):
    """Random float32 parameters (std 0.2; norms near, not at, one) and tokens, from numpy: no JAX compile per shape."""
    config = config_from_hf(CONFIGS[name])
    rng = np.random.default_rng(seed)
    params = map_specs(lambda spec: jnp.asarray((0.2 * rng.standard_normal(spec.shape)
                                                 + (1.0 if spec.init == "ones" else 0.0)).astype(np.float32)),
                       family(config).param_specs(config))
    tokens = jnp.asarray(rng.integers(0, config.vocab_size, (3, 11)), jnp.int32)
    return config, params, tokens


def _loss(config, params, tokens):
    logits = tilert_jax.forward(config, params, tokens[:, :-1])
    logp = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))


# ------------------------------------------------------------------- a plain re-implementation, written separately

def _rms(x, w, eps):
    return w * (x / jnp.sqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps))


def _rope(x, theta):  # x: [B, T, heads, d], rotate-half convention (as transformers' Llama)
    d = x.shape[-1]
    inv = 1.0 / (theta ** (jnp.arange(0, d, 2, dtype=jnp.float32) / d))
    ang = jnp.arange(x.shape[1], dtype=jnp.float32)[:, None] * inv[None, :]  # [T, d/2]
    cos = jnp.concatenate([jnp.cos(ang)] * 2, -1)[None, :, None, :]
    sin = jnp.concatenate([jnp.sin(ang)] * 2, -1)[None, :, None, :]
    rotated = jnp.concatenate([-x[..., d // 2:], x[..., : d // 2]], -1)
    return x * cos + rotated * sin


def plain_forward(hf, params, tokens):
    """The same architecture from the config.json dict, with none of the engine's code."""
    eps, theta = hf.get("rms_norm_eps", 1e-6), hf["rope_theta"]
    x = params.embed[tokens]
    t = tokens.shape[1]
    mask = jnp.tril(jnp.ones((t, t), bool))
    for layer in params.layers:
        a = layer.attn
        h = _rms(x, layer.attn_norm, eps)
        q = jnp.einsum("bth,ndh->btnd", h, a.wq)
        k = jnp.einsum("bth,ndh->btnd", h, a.wk)
        v = jnp.einsum("bth,ndh->btnd", h, a.wv)
        if hf["model_type"] == "qwen3":
            q, k = _rms(q, a.q_norm, eps), _rms(k, a.k_norm, eps)
        q, k = _rope(q, theta), _rope(k, theta)
        groups = q.shape[2] // k.shape[2]
        k, v = jnp.repeat(k, groups, axis=2), jnp.repeat(v, groups, axis=2)
        s = jnp.einsum("bqnd,bknd->bnqk", q, k) / np.sqrt(q.shape[-1])
        s = jnp.where(mask, s, -jnp.inf)
        o = jnp.einsum("bnqk,bknd->bqnd", jax.nn.softmax(s, axis=-1), v)
        x = x + jnp.einsum("btnd,hnd->bth", o, a.wo)
        h = _rms(x, layer.mlp_norm, eps)
        m = layer.mlp
        x = x + (jax.nn.silu(h @ m.w_gate.T) * (h @ m.w_up.T)) @ m.w_down.T
    x = _rms(x, params.final_norm, eps)
    return x @ (params.embed if params.lm_head is None else params.lm_head).T


# ------------------------------------------------------------------------------------------------------------ tests
# Everything but the direct call is jitted: eager JAX compiles each primitive separately and would dominate the time.

@pytest.fixture(scope="module", params=sorted(CONFIGS))
def case(request):
    config, params, tokens = _model(request.param)
    direct = tilert_jax.forward(config, params, tokens)  # the direct (eager) call every variant is compared with
    return request.param, config, params, tokens, direct


def test_forward_matches_plain_reimplementation(case):
    name, config, params, tokens, direct = case
    plain = jax.jit(functools.partial(plain_forward, CONFIGS[name]))(params, tokens)
    np.testing.assert_allclose(direct, plain, atol=ATOL, rtol=ATOL)


def test_jit(case):
    name, config, params, tokens, direct = case
    closed = jax.jit(functools.partial(tilert_jax.forward, config))(params, tokens)  # config closed over
    static = jax.jit(tilert_jax.forward, static_argnums=0)(config, params, tokens)  # config as a static argument

    @jax.jit
    def users_program(params, tokens):  # forward as one piece of a bigger jitted function
        logits = tilert_jax.forward(config, params, tokens)
        return jax.nn.log_softmax(logits, axis=-1), jnp.argmax(logits[:, -1], axis=-1)

    logp, nxt = users_program(params, tokens)
    for out in (closed, static):
        np.testing.assert_allclose(out, direct, atol=ATOL, rtol=ATOL)
    np.testing.assert_allclose(logp, jax.nn.log_softmax(direct, axis=-1), atol=ATOL, rtol=ATOL)
    np.testing.assert_array_equal(nxt, jnp.argmax(direct[:, -1], axis=-1))


def test_grad(case):
    """jax.grad w.r.t. every parameter (under jax.jit) equals the gradient of the independent re-implementation
    (1e-5, relative to the largest entry of each leaf), and its directional derivative along a random direction
    matches a central finite difference of the loss (float32: a step of norm ~0.03 leaves ~1e-3 relative truncation
    and rounding error; the tolerance is 1% relative)."""
    name, config, params, tokens, _ = case

    def plain_loss(params, tokens):
        logp = jax.nn.log_softmax(plain_forward(CONFIGS[name], params, tokens[:, :-1]), axis=-1)
        return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], axis=-1))

    grads = jax.jit(jax.grad(functools.partial(_loss, config)))(params, tokens)
    expected = jax.jit(jax.grad(plain_loss))(params, tokens)
    leaves = jax.tree_util.tree_leaves_with_path(expected)
    assert len(leaves) == len(jax.tree.leaves(grads)) > 10
    for (path, want), got in zip(leaves, jax.tree.leaves(grads)):
        scale = float(jnp.abs(want).max())
        assert scale > 0, f"zero gradient for {jax.tree_util.keystr(path)}"
        np.testing.assert_allclose(got / scale, want / scale, atol=ATOL, err_msg=jax.tree_util.keystr(path))

    rng = np.random.default_rng(3)
    direction = jax.tree.map(lambda x: jnp.asarray(rng.standard_normal(x.shape), jnp.float32), params)
    eps = 2.5e-4

    @jax.jit
    def loss_along(step):  # the loss at params + step * direction
        return _loss(config, jax.tree.map(lambda p, v: p + step * v, params, direction), tokens)

    numeric = (float(loss_along(eps)) - float(loss_along(-eps))) / (2 * eps)
    analytic = sum(float(jnp.vdot(g, v)) for g, v in zip(jax.tree.leaves(grads), jax.tree.leaves(direction)))
    assert abs(analytic) > 1e-2
    print("finite difference", numeric, "analytic", analytic)
    assert abs(numeric - analytic) <= 1e-2 * abs(analytic), (numeric, analytic)


def test_vmap(case):
    """vmap over a batch of sequences (each one a [1, T] call inside) equals the batched direct call; vmap over the parameters (an ensemble of two models) equals calling each model."""
    name, config, params, tokens, direct = case
    per_sequence = jax.jit(jax.vmap(lambda p, t: tilert_jax.forward(config, p, t[None])[0], in_axes=(None, 0)))
    np.testing.assert_allclose(per_sequence(params, tokens), direct, atol=ATOL, rtol=ATOL)

    _, other, _ = _model(name, seed=5)
    stacked = jax.tree.map(lambda a, b: jnp.stack([a, b]), params, other)
    ensemble = jax.jit(jax.vmap(lambda p, t: tilert_jax.forward(config, p, t), in_axes=(0, None)))(stacked, tokens)
    np.testing.assert_allclose(ensemble[0], direct, atol=ATOL, rtol=ATOL)
    other_direct = jax.jit(functools.partial(tilert_jax.forward, config))(other, tokens)
    np.testing.assert_allclose(ensemble[1], other_direct, atol=ATOL, rtol=ATOL)
