"""Tensor parallelism on 8 simulated CPU devices: the same logits and greedy tokens as one device, with parameters
really split."""

import numpy as np
import pytest

import tilert_jax
from tilert_jax.convert import convert
from tilert_jax.sharding import make_mesh

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
    wq = model.params.layers[0].attn.wq  # [hidden, heads, head_dim]
    assert {s.data.shape[1] for s in wq.addressable_shards} == {8 // tp}
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
