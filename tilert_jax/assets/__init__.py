"""Files shipped inside the package.

DEFAULT_MODEL is the embedded default model: a 4.2M-parameter Llama trained on the source of Python's standard
library by scripts/train_default_model.py, stored as a Hugging Face checkpoint (config.json, model.safetensors,
tokenizer.json, tokenizer_config.json), so it loads through exactly the path a user's checkpoint takes:

    import tilert_jax
    from tilert_jax.assets import DEFAULT_MODEL
    model = tilert_jax.load(DEFAULT_MODEL)
"""

from pathlib import Path

DEFAULT_MODEL = Path(__file__).resolve().parent / "default"
