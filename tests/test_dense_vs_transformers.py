"""The dense families against Hugging Face transformers on small random checkpoints: logits and greedy tokens."""

import numpy as np
import pytest
import torch

import tilert_jax
from tilert_jax.convert import convert

# family, sharded checkpoint, old config.json dialect (rope_theta + rope_scaling)
CASES = [("llama", True, True), ("llama_tied", False, False), ("qwen2", True, False), ("qwen3", False, True),
         ("mistral", True, True)]
PROMPT = np.random.default_rng(1).integers(0, 160, (2, 24))


def max_kl(ref_logits: np.ndarray, logits: np.ndarray) -> float:
    """max over positions of KL(reference || ours), computed in float64."""
    ref = torch.log_softmax(torch.tensor(ref_logits, dtype=torch.float64), -1)
    ours = torch.log_softmax(torch.tensor(np.asarray(logits), dtype=torch.float64), -1)
    return float((ref.exp() * (ref - ours)).sum(-1).max())


def reference_logits(model, tokens) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@pytest.fixture(scope="module")
def loaded(hf_checkpoint, tmp_path_factory):
    """(case, 'raw' | 'converted') -> (torch model, tilert_jax Model)."""
    cache = {}

    def get(case, source):
        if (case, source) not in cache:
            model, directory = hf_checkpoint(*case)
            if source == "converted":
                directory = convert(directory, tmp_path_factory.mktemp("converted") / "ckpt", progress=False)
            cache[case, source] = model, tilert_jax.load(directory)
        return cache[case, source]

    return get


@pytest.mark.parametrize("source", ["raw", "converted"])
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_float32_logits_match(loaded, case, source):
    model, ours = loaded(case, source)
    logits = np.asarray(ours.logits(PROMPT))
    ref = reference_logits(model, PROMPT)
    # float32 end to end: differences are rounding (~1e-7 in the logits), far below the 1e-6 KL bound.
    assert max_kl(ref, logits) <= 1e-6
    np.testing.assert_array_equal(ref.argmax(-1), logits.argmax(-1))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_greedy_generation_matches(loaded, case):
    model, ours = loaded(case, "converted")
    prompt = PROMPT[0]
    with torch.no_grad():
        ref = model.generate(torch.tensor(prompt[None]), max_new_tokens=16, min_new_tokens=16, do_sample=False)
    result = ours.generate(prompt.tolist(), max_new_tokens=16, stop_at_eos=False)
    assert result.tokens == ref[0, len(prompt):].tolist()


def test_bfloat16_logits_close(hf_checkpoint):
    """bf16 weights and activations against transformers in bf16. Both round every op to 8 mantissa bits but in
    different orders, so logits differ by O(1e-2) per op; the mean KL stays below 1e-2 and top-1 agrees on at
    least 90% of positions (near-ties may swap)."""
    model, directory = hf_checkpoint("llama", True, True)
    ours = tilert_jax.load(directory, dtype="bfloat16")
    assert ours.params.embed.dtype == np.dtype("bfloat16")
    ref = reference_logits(model.to(torch.bfloat16), PROMPT)
    model.float()
    logits = np.asarray(ours.logits(PROMPT))
    ref_log = torch.log_softmax(torch.tensor(ref, dtype=torch.float64), -1)
    our_log = torch.log_softmax(torch.tensor(logits, dtype=torch.float64), -1)
    kl = (ref_log.exp() * (ref_log - our_log)).sum(-1)
    assert float(kl.mean()) < 1e-2
    assert (ref.argmax(-1) == logits.argmax(-1)).mean() >= 0.9


@pytest.mark.parametrize("fresh", [True, False], ids=["fresh-prefill", "traced-pos-prefill"])
def test_cached_decode_matches_whole_sequence_forward(loaded, fresh):
    """Prefill + one-token decode steps give the logits of the whole-sequence forward at every position, whether
    the prefill attends over its own keys (pos the Python int 0) or over the cache it writes (a traced pos)."""
    import jax.numpy as jnp

    from tilert_jax.models import dense

    _, ours = loaded(CASES[4], "raw")  # mistral: sliding window 7 is exercised across the cache
    config, params = ours.config, ours.params
    tokens = jnp.asarray(PROMPT[:1, :20], jnp.int32)
    full = np.asarray(ours.logits(tokens))[0]
    cache = dense.init_cache(config, 1, 32, params.embed.dtype)
    logits, cache = dense.prefill(config, params, tokens[:, :8], cache, 0 if fresh else jnp.int32(0), 7)
    steps = [np.asarray(logits)[0]]
    for pos in range(8, 20):
        logits, cache = dense.decode_step(config, params, tokens[:, pos], cache, jnp.int32(pos))
        steps.append(np.asarray(logits)[0])
    np.testing.assert_allclose(np.stack(steps), full[7:], atol=1e-4, rtol=1e-4)
