"""On-device sampling: greedy is argmax, filters keep the right candidates, a seed reproduces a sample."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tilert_jax.sampling import SamplingParams, sample

LOGITS = jnp.asarray(np.random.default_rng(0).normal(size=(3, 50)) * 3, jnp.float32)


def draws(params: SamplingParams, n: int = 400) -> np.ndarray:
    keys = jax.random.split(jax.random.key(0), n)
    return np.asarray(jax.vmap(lambda k: sample(LOGITS, k, params))(keys))  # [n, 3]


def test_greedy_is_argmax():
    np.testing.assert_array_equal(sample(LOGITS, jax.random.key(0), SamplingParams()), LOGITS.argmax(-1))


def test_top_k_draws_only_the_k_best():
    got = draws(SamplingParams(temperature=1.0, top_k=3))
    best = np.argsort(-np.asarray(LOGITS), axis=-1)[:, :3]
    for row in range(3):
        assert set(got[:, row]) <= set(best[row])
        assert len(set(got[:, row])) > 1


def test_top_p_draws_only_the_nucleus():
    top_p = 0.6
    got = draws(SamplingParams(temperature=1.0, top_p=top_p))
    probs = np.asarray(jax.nn.softmax(LOGITS, -1))
    for row in range(3):
        order = np.argsort(-probs[row])
        before = np.cumsum(probs[row][order]) - probs[row][order]
        nucleus = set(order[before < top_p])
        assert set(got[:, row]) <= nucleus


def test_temperature_matches_softmax_frequencies():
    """2000 draws: each frequency within 5 standard errors of its softmax(logits / T) probability."""
    t = 2.0
    got = draws(SamplingParams(temperature=t), n=2000)[:, 0]
    probs = np.asarray(jax.nn.softmax(LOGITS[0] / t))
    freq = np.bincount(got, minlength=50) / len(got)
    assert np.all(np.abs(freq - probs) <= 5 * np.sqrt(probs * (1 - probs) / len(got)) + 1e-3)


def test_same_seed_same_sample_other_seed_differs():
    params = SamplingParams(temperature=1.0)
    a = sample(LOGITS, jax.random.key(7), params)
    b = sample(LOGITS, jax.random.key(7), params)
    np.testing.assert_array_equal(a, b)
    assert any(not np.array_equal(a, sample(LOGITS, jax.random.key(s), params)) for s in range(8, 12))


@pytest.mark.parametrize("kwargs", [dict(temperature=-1.0), dict(top_p=0.0), dict(top_p=1.01), dict(top_k=0),
                                    dict(top_k=2.5)])
def test_bad_parameters(kwargs):
    with pytest.raises(ValueError):
        SamplingParams(**kwargs)


def test_generate_is_reproducible(hf_checkpoint):
    import tilert_jax

    model = tilert_jax.load(hf_checkpoint("qwen2")[1])
    kwargs = dict(max_new_tokens=12, temperature=0.9, top_k=20, top_p=0.9, stop_at_eos=False)
    a = model.generate([5, 6, 7], seed=3, **kwargs).tokens
    assert a == model.generate([5, 6, 7], seed=3, **kwargs).tokens
    assert a != model.generate([5, 6, 7], seed=4, **kwargs).tokens
