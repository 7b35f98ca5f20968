"""tilert_jax.export writes our parameters in Hugging Face layout: the exact inverse of convert/maps.py, checked by
loading the written checkpoint back through tilert_jax.load and comparing logits."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import tilert_jax
from tilert_jax.config import config_from_hf
from tilert_jax.convert.maps import tensor_map
from tilert_jax.export import hf_tensors, save_hf_checkpoint, to_hf_layout
from tilert_jax.models import family
from tilert_jax.params import leaf_paths, map_specs

SMALL = dict(vocab_size=97, hidden_size=32, intermediate_size=48, num_hidden_layers=2, num_attention_heads=4,
             torch_dtype="float32")
CONFIGS = {
    "llama_tied": dict(SMALL, model_type="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "llama_bias": dict(SMALL, model_type="llama", num_key_value_heads=1, attention_bias=True, rope_theta=5e5),
    "qwen2": dict(SMALL, model_type="qwen2", num_key_value_heads=2),
    "qwen3": dict(SMALL, model_type="qwen3", num_key_value_heads=2, head_dim=16),
    "mistral": dict(SMALL, model_type="mistral", num_key_value_heads=4, head_dim=8, sliding_window=5),
}


def _params(hf, seed=0):
    """Random float32 parameters (numpy: no JAX compile per shape); biases and norms are not 0 / 1 either."""
    config = config_from_hf(hf)
    rng = np.random.default_rng(seed)
    params = map_specs(lambda spec: (0.3 * rng.standard_normal(spec.shape) + (0.3 if len(spec.shape) == 1 else 0))
                       .astype(np.float32), family(config).param_specs(config))
    return config, params


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_inverse_of_the_load_map(name):
    config, params = _params(CONFIGS[name])
    flat = dict(zip(leaf_paths(params), jax.tree.leaves(params)))
    maps, _ = tensor_map(config)
    for m in maps:
        hf = to_hf_layout(m, np.asarray(flat[m.path]))
        assert hf.shape == m.hf_shape
        np.testing.assert_array_equal(m.to_ours(hf), np.asarray(flat[m.path]), err_msg=m.hf_name)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_through_load(name, tmp_path):
    config, params = _params(CONFIGS[name])
    save_hf_checkpoint(tmp_path, CONFIGS[name], params)
    model = tilert_jax.load(tmp_path)
    assert model.config == config
    tokens = np.arange(2 * 13).reshape(2, 13) * 7 % config.vocab_size
    loaded = np.asarray(model.logits(tokens))
    model.params = jax.tree.map(jnp.asarray, params)  # the parameters we exported, through the same compiled forward
    np.testing.assert_array_equal(loaded, np.asarray(model.logits(tokens)))


def test_bfloat16_export(tmp_path):
    hf = CONFIGS["llama_tied"]
    config, params = _params(hf)
    save_hf_checkpoint(tmp_path, hf, params, dtype="bfloat16")
    model = tilert_jax.load(tmp_path)
    assert model.params.embed.dtype == jnp.bfloat16 and model.config.dtype == "bfloat16"
    rounded = jax.tree.map(lambda p: np.asarray(p).astype(jnp.bfloat16), params)
    for a, b in zip(jax.tree.leaves(model.params), jax.tree.leaves(rounded)):
        np.testing.assert_array_equal(np.asarray(a, np.float32), np.asarray(b, np.float32))


def test_shape_mismatch_is_an_error():
    config, params = _params(CONFIGS["qwen2"])
    other = config_from_hf(dict(CONFIGS["qwen2"], hidden_size=64))
    with pytest.raises(ValueError, match="has shape"):
        hf_tensors(other, params)
