"""The embedded default model (tilert_jax/assets/default): an end-to-end check of tokenizer, loader and forward on
real data. Its held-out loss, measured when it was trained (scripts/train_default_model.py), must not regress."""

import json
from pathlib import Path

import jax
import numpy as np
import pytest

import tilert_jax
from tilert_jax.assets import DEFAULT_MODEL

SAMPLE = Path(__file__).parent / "data" / "stdlib_heldout_sample.txt"
SEQ_LEN = 512
# Loss in nats/token on SAMPLE (the start of held-out stdlib files, never trained on) measured at training time:
# MEASURED_SAMPLE_LOSS. The bound leaves room for rounding on other CPUs and BLAS builds, not for a worse model.
MEASURED_SAMPLE_LOSS = 3.4364
LOSS_BOUND = MEASURED_SAMPLE_LOSS + 0.05


@pytest.fixture(scope="module")
def model():
    return tilert_jax.load(DEFAULT_MODEL)


def test_checkpoint_is_a_hub_style_llama():
    files = {f.name: f for f in DEFAULT_MODEL.iterdir()}
    for name in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert name in files
    assert sum(f.stat().st_size for f in files.values()) <= 20 * 2**20
    hf = json.loads(files["config.json"].read_text())
    assert hf["model_type"] == "llama" and hf["architectures"] == ["LlamaForCausalLM"]


def heldout_loss(model, text: str) -> tuple[float, int]:
    """Mean next-token loss (nats/token) of `text`, encoded with its leading <|endoftext|>, in windows of SEQ_LEN."""
    ids = np.asarray(model.tokenizer.encode(text), np.int64)
    n = (len(ids) - 1) // SEQ_LEN
    x = np.stack([ids[i * SEQ_LEN:(i + 1) * SEQ_LEN] for i in range(n)])
    y = np.stack([ids[i * SEQ_LEN + 1:(i + 1) * SEQ_LEN + 1] for i in range(n)])
    logp = np.asarray(jax.nn.log_softmax(model.logits(x), axis=-1))
    return float(-np.take_along_axis(logp, y[..., None], axis=-1).mean()), int(y.size)


def test_heldout_loss(model):
    text = SAMPLE.read_text()
    loss, tokens = heldout_loss(model, text)
    assert tokens >= 2048
    print(f"held-out loss {loss:.4f} nats/token over {tokens} tokens (measured at training: {MEASURED_SAMPLE_LOSS})")
    assert loss < LOSS_BOUND
    # An untrained model sits near log(vocab): the bound is far from that.
    assert LOSS_BOUND < 0.5 * np.log(model.config.vocab_size)


def test_tokenizer_round_trips_python(model):
    tok = model.tokenizer
    text = "def f(x):\n    return {'a': x ** 2}  # é\n"
    ids = tok.encode(text)
    assert ids[0] == tok.token_id("<|endoftext|>") == 0  # documents start with <|endoftext|>, as in training
    assert tok.decode(ids) == text
    assert model.stop_ids == (0,)


def test_generation_writes_python(model):
    """With the checkpoint's own sampling settings (generation_config.json, what `python -m tilert_jax.generate`
    uses) and a fixed seed: indented lines, Python keywords."""
    settings = json.loads((DEFAULT_MODEL / "generation_config.json").read_text())
    result = model.generate("def fibonacci(n):", max_new_tokens=100, seed=0, temperature=settings["temperature"],
                            top_k=settings["top_k"], top_p=settings["top_p"])
    lines = [line for line in result.text.split("\n")[1:] if line.strip()]
    assert len(lines) >= 5, result.text
    indents = [len(line) - len(line.lstrip(" ")) for line in lines]
    assert sum(i % 4 == 0 for i in indents) >= 0.7 * len(lines), result.text
    keywords = ("def ", "return", "self", "if ", "None", "import ", "for ", " in ", "class ", "=")
    assert sum(k in result.text for k in keywords) >= 4, result.text


def test_same_logits_in_transformers(model):
    """The checkpoint is in true Hugging Face layout: transformers' LlamaForCausalLM gives the same logits."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(DEFAULT_MODEL, dtype=torch.float32).eval()
    hf_tok = transformers.AutoTokenizer.from_pretrained(DEFAULT_MODEL)
    text = "import os\n\n\nclass Path:\n    def __init__(self, *parts):\n        self.parts = parts\n"
    ids = model.tokenizer.encode(text)
    assert hf_tok(text)["input_ids"] == ids
    with torch.no_grad():
        want = hf_model(torch.tensor([ids])).logits.numpy()
    np.testing.assert_allclose(np.asarray(model.logits(ids)), want, atol=2e-4, rtol=1e-4)
