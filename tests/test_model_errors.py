"""Bad input to load / logits / generate raises a clear ValueError, and the model works normally afterwards."""

import numpy as np
import pytest

import tilert_jax


@pytest.fixture(scope="module")
def model(hf_checkpoint):
    return tilert_jax.load(hf_checkpoint("llama_tied")[1])


def test_missing_path():
    with pytest.raises(ValueError, match="no such model directory"):
        tilert_jax.load("/nonexistent/model/dir")


def test_unknown_hub_id_is_not_downloaded():
    with pytest.raises(ValueError, match="local Hugging Face cache"):
        tilert_jax.load("nobody-here/no-such-model")


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt=[]), "prompt is empty"),
    (dict(prompt=""), "prompt is empty"),
    (dict(prompt=[1, 2, 160]), "outside the vocabulary"),
    (dict(prompt=[-1, 2]), "outside the vocabulary"),
    (dict(prompt=[1] * 257), "longer than the context"),
    (dict(prompt=[1] * 250, max_new_tokens=10), "exceeds the context"),
    (dict(temperature=-0.5), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_k=0), "top_k"),
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(prompt="text needs a tokenizer"), "no tokenizer"),
])
def test_bad_generate_arguments(model, kwargs, message):
    args = dict(prompt=[1, 2, 3], max_new_tokens=4) | kwargs
    with pytest.raises(ValueError, match=message):
        model.generate(args.pop("prompt"), **args)
    assert len(model.generate([1, 2, 3], max_new_tokens=4, stop_at_eos=False).tokens) == 4


def test_bad_logits_arguments(model):
    with pytest.raises(ValueError, match="outside the vocabulary"):
        model.logits([[0, 999]])
    with pytest.raises(ValueError, match="integers"):
        model.logits(np.zeros((1, 2, 3), np.int32))
    assert model.logits([[0, 1]]).shape == (1, 2, 160)
