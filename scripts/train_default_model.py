"""Trains the embedded default model (tilert_jax/assets/default) on the source of Python's standard library.

Every machine with Python has this text, so the model and its tokenizer can be rebuilt anywhere:

    pip install -e '.[train]'
    python scripts/train_default_model.py            # about 15-25 minutes on 2 CPU cores

What it does, deterministically (fixed seeds, sorted files, a fixed number of steps):
1. Reads the .py files under sysconfig.get_paths()["stdlib"], leaving out test directories, site-packages,
   pydoc_data (documentation strings, not code) and the codec tables of encodings/. A file is held out when the
   SHA-256 of its relative path is 0 mod 20 (about 5% of the files, whole files, never seen in training).
2. Trains a byte-level BPE tokenizer (the `tokenizers` library) on the training files, with one special token,
   <|endoftext|>, that starts every document and serves as bos and eos.
3. Trains a Llama-architecture model with this project's own `tilert_jax.forward`, `jax.grad` and optax AdamW.
4. Exports it in Hugging Face layout (tilert_jax.export, the inverse of convert/maps.py), loads it back through
   `tilert_jax.load` exactly as a user's checkpoint is loaded, checks the logits against the trained parameters,
   and reports the held-out loss in nats per token.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import shutil
import sys
import sysconfig
import time
from pathlib import Path

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402

REPO = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO / "tilert_jax" / "assets" / "default"
HELDOUT_SAMPLE = REPO / "tests" / "data" / "stdlib_heldout_sample.txt"

EOT = "<|endoftext|>"
EXCLUDED_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "pydoc_data", "__pycache__"}
HELDOUT_MODULUS = 20
SAMPLE_CHARS = 12_000  # the held-out sample the test scores (tests/test_default_model.py)

MODEL = dict(
    architectures=["LlamaForCausalLM"],
    model_type="llama",
    vocab_size=4096,
    hidden_size=256,
    intermediate_size=768,
    num_hidden_layers=4,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=64,
    hidden_act="silu",
    max_position_embeddings=512,
    initializer_range=0.02,
    rms_norm_eps=1e-5,
    rope_theta=10000.0,
    rope_scaling=None,
    attention_bias=False,
    attention_dropout=0.0,
    mlp_bias=False,
    pretraining_tp=1,
    tie_word_embeddings=True,
    bos_token_id=0,
    eos_token_id=0,
    use_cache=True,
    torch_dtype="float32",
)


# ---------------------------------------------------------------------------------------------------------- data

def is_heldout(relpath: str) -> bool:
    return int(hashlib.sha256(relpath.encode()).hexdigest(), 16) % HELDOUT_MODULUS == 0


def stdlib_files(root: Path) -> list[tuple[str, str]]:
    """(relative path, text) of the standard library's source files, sorted by path."""
    out = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if EXCLUDED_DIRS.intersection(rel.parts[:-1]) or rel.parts[0].startswith("config-"):
            continue
        try:
            text = path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
        if rel.parts[0] == "encodings" and "decoding_table = (" in text:
            continue  # 256-entry codec tables: a megabyte of repetition that teaches nothing about code
        if text.strip():
            out.append((rel.as_posix(), text))
    return out


def split(files: list[tuple[str, str]]) -> tuple[list[tuple[str, str]], list[tuple[str, str]]]:
    train = [f for f in files if not is_heldout(f[0])]
    heldout = [f for f in files if is_heldout(f[0])]
    return train, heldout


# ----------------------------------------------------------------------------------------------------- tokenizer

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, special_tokens=[EOT],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(texts, trainer)
    assert tok.token_to_id(EOT) == 0
    tok.post_processor = processors.Sequence([  # encode(text) gives [<|endoftext|>, ...text]: a document start
        processors.ByteLevel(trim_offsets=False),
        processors.TemplateProcessing(single=f"{EOT} $A", pair=f"{EOT} $A {EOT} $B", special_tokens=[(EOT, 0)]),
    ])
    return tok


TOKENIZER_CONFIG = {
    "tokenizer_class": "PreTrainedTokenizerFast",
    "bos_token": EOT,
    "eos_token": EOT,
    "unk_token": None,
    "pad_token": None,
    "add_bos_token": True,
    "add_eos_token": False,
    "clean_up_tokenization_spaces": False,
    "model_max_length": MODEL["max_position_embeddings"],
    "added_tokens_decoder": {"0": {"content": EOT, "lstrip": False, "normalized": False, "rstrip": False,
                                   "single_word": False, "special": True}},
}


# A model this small repeats itself under greedy decoding; `python -m tilert_jax.generate` samples by default, as
# transformers does, from these settings (a fixed --seed keeps it reproducible; --temperature 0 is greedy).
GENERATION_CONFIG = {"bos_token_id": 0, "eos_token_id": 0, "do_sample": True, "temperature": 0.6, "top_k": 50,
                     "top_p": 0.95, "max_length": MODEL["max_position_embeddings"]}


def encode_stream(tok, texts: list[str]) -> np.ndarray:
    """All documents, each starting with <|endoftext|>, as one uint16 token stream."""
    ids = [e.ids for e in tok.encode_batch(texts)]
    return np.concatenate([np.asarray(x, np.uint16) for x in ids])


def eval_windows(stream: np.ndarray, seq_len: int, count: int) -> np.ndarray:
    """`count` evenly spaced, non-overlapping windows of seq_len + 1 tokens: int32[count, seq_len + 1]."""
    count = min(count, (len(stream) - 1) // seq_len)
    starts = np.linspace(0, len(stream) - seq_len - 1, count).astype(np.int64)
    return np.stack([stream[s:s + seq_len + 1] for s in starts]).astype(np.int32)


# ------------------------------------------------------------------------------------------------------ training

def loss_fn(config, params, batch):
    """batch: int32[B, T + 1] -> mean next-token cross-entropy (nats/token) over B * T predictions."""
    import optax

    import tilert_jax

    logits = tilert_jax.forward(config, params, batch[:, :-1])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch[:, 1:]).mean()


def heldout_loss(config, params, windows: np.ndarray, batch: int = 8) -> float:
    fn = jax.jit(lambda p, b: loss_fn(config, p, b))
    losses = [float(fn(params, jnp.asarray(windows[i:i + batch]))) * len(windows[i:i + batch])
              for i in range(0, len(windows), batch)]
    return sum(losses) / len(windows)


def train(config, stream: np.ndarray, heldout: np.ndarray, args) -> tuple[object, list[dict]]:
    import optax

    from tilert_jax.models import family
    from tilert_jax.params import init_params

    params = init_params(family(config).param_specs(config), jax.random.key(args.seed), jnp.float32)
    n_params = sum(x.size for x in jax.tree.leaves(params))
    print(f"model: {n_params / 1e6:.2f}M parameters, {config.num_layers} layers, hidden {config.hidden_size}, "
          f"vocab {config.vocab_size}", flush=True)
    schedule = optax.warmup_cosine_decay_schedule(0.0, args.lr, min(args.warmup, args.steps // 10), args.steps, end_value=args.lr / 10)
    decay_mask = jax.tree.map(lambda x: x.ndim >= 2, params)  # no weight decay on norms
    opt = optax.chain(optax.clip_by_global_norm(1.0),
                      optax.adamw(schedule, b1=0.9, b2=0.95, weight_decay=0.1, mask=decay_mask))
    opt_state = opt.init(params)

    @jax.jit
    def step(params, opt_state, batch):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(config, p, batch))(params)
        updates, opt_state = opt.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    rng = np.random.default_rng(args.seed)
    long_from = args.steps - int(args.long_fraction * args.steps)
    log, window, start, seen = [], [], time.perf_counter(), 0
    for i in range(1, args.steps + 1):
        # Short windows first (more updates for the compute), the full context at the end (rope sees every position).
        seq = args.short_seq_len if i <= long_from else args.seq_len
        starts = rng.integers(0, len(stream) - seq - 1, size=args.tokens_per_step // seq)
        batch = jnp.asarray(np.stack([stream[s:s + seq + 1] for s in starts]).astype(np.int32))
        params, opt_state, loss = step(params, opt_state, batch)
        seen += batch.shape[0] * seq
        window.append(loss)
        if i % args.log_every == 0 or i == args.steps:
            train_loss = float(np.mean([float(x) for x in window]))
            window = []
            elapsed = time.perf_counter() - start
            entry = dict(step=i, train_loss=round(train_loss, 4), elapsed_s=round(elapsed, 1))
            if i % args.eval_every == 0 or i == args.steps:
                entry["heldout_loss"] = round(heldout_loss(config, params, heldout[:16]), 4)
            log.append(entry)
            eta = elapsed / i * (args.steps - i)
            print(f"step {i:5d}/{args.steps} | train loss {train_loss:.3f}"
                  + (f" | held-out {entry['heldout_loss']:.3f}" if "heldout_loss" in entry else "")
                  + f" | seq {seq} | {seen / elapsed:.0f} tokens/s | {elapsed / 60:.1f} min, "
                  f"eta {eta / 60:.1f} min", flush=True)
    return params, log


# -------------------------------------------------------------------------------------------------------- export

def export(out: Path, tok, params) -> None:
    from tilert_jax.export import save_hf_checkpoint

    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    save_hf_checkpoint(tmp, MODEL, params)
    tok.save(str(tmp / "tokenizer.json"))
    (tmp / "tokenizer_config.json").write_text(json.dumps(TOKENIZER_CONFIG, indent=2) + "\n")
    (tmp / "generation_config.json").write_text(json.dumps(GENERATION_CONFIG, indent=2) + "\n")
    for f in tmp.iterdir():
        f.chmod(0o644)
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)


def sample_loss(model, text: str, seq_len: int) -> tuple[float, int]:
    """Mean next-token loss of `text` (encoded with its leading <|endoftext|>) in windows of seq_len, through
    Model.logits: the same computation as tests/test_default_model.py."""
    ids = np.asarray(model.tokenizer.encode(text), np.int64)
    n = (len(ids) - 1) // seq_len
    x = np.stack([ids[i * seq_len:(i + 1) * seq_len] for i in range(n)])
    y = np.stack([ids[i * seq_len + 1:(i + 1) * seq_len + 1] for i in range(n)])
    logp = jax.nn.log_softmax(model.logits(x), axis=-1)
    nll = -np.take_along_axis(np.asarray(logp), y[..., None], axis=-1)
    return float(nll.mean()), int(y.size)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--tokens-per-step", type=int, default=2048)
    parser.add_argument("--short-seq-len", type=int, default=256, help="window length for most of training")
    parser.add_argument("--seq-len", type=int, default=512, help="window length at the end and for evaluation")
    parser.add_argument("--long-fraction", type=float, default=0.15, help="fraction of steps at --seq-len")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--warmup", type=int, default=50)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--log-every", type=int, default=20)
    parser.add_argument("--eval-every", type=int, default=200)
    parser.add_argument("--heldout-windows", type=int, default=64)
    args = parser.parse_args(argv)

    import tilert_jax
    from tilert_jax.config import config_from_hf

    t0 = time.perf_counter()
    root = Path(sysconfig.get_paths()["stdlib"])
    train_files, heldout_files = split(stdlib_files(root))
    print(f"stdlib {root} (Python {sys.version.split()[0]}): {len(train_files)} training files "
          f"({sum(len(t) for _, t in train_files) / 1e6:.1f} MB), {len(heldout_files)} held-out files "
          f"({sum(len(t) for _, t in heldout_files) / 1e6:.2f} MB)", flush=True)

    tok = train_tokenizer([t for _, t in train_files], MODEL["vocab_size"])
    stream = encode_stream(tok, [t for _, t in train_files])
    heldout_stream = encode_stream(tok, [t for _, t in heldout_files])
    heldout = eval_windows(heldout_stream, args.seq_len, args.heldout_windows)
    chars = sum(len(t) for _, t in train_files)
    print(f"tokenizer: {tok.get_vocab_size()} tokens, {chars / len(stream):.2f} characters/token; "
          f"{len(stream) / 1e6:.2f}M training tokens, {len(heldout_stream) / 1e3:.0f}k held-out tokens "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    total = args.steps * args.tokens_per_step
    print(f"training: {args.steps} steps x {args.tokens_per_step} tokens = {total / 1e6:.2f}M tokens "
          f"({total / len(stream):.2f} epochs), windows of {args.short_seq_len} then {args.seq_len} tokens for the "
          f"last {args.long_fraction:.0%} of steps", flush=True)

    config = config_from_hf(MODEL)
    params, log = train(config, stream, heldout, args)
    loss = heldout_loss(config, params, heldout)

    export(args.out, tok, params)
    model = tilert_jax.load(args.out)  # exactly the path a user's checkpoint takes
    probe = np.asarray(heldout[:2, :-1])
    diff = float(jnp.abs(model.logits(probe) - jax.jit(lambda p, t: tilert_jax.forward(config, p, t))(
        params, jnp.asarray(probe))).max())
    assert diff < 1e-4, f"the exported checkpoint's logits differ from the trained parameters' by {diff}"

    # The fixed held-out sample tests/test_default_model.py scores: the start of the first held-out files.
    sample = ""
    for _, text in heldout_files:
        if len(sample) >= SAMPLE_CHARS:
            break
        sample += text[:SAMPLE_CHARS - len(sample)]
    HELDOUT_SAMPLE.parent.mkdir(parents=True, exist_ok=True)
    HELDOUT_SAMPLE.write_text(sample)
    s_loss, s_tokens = sample_loss(model, sample, args.seq_len)

    greedy = model.generate("def fibonacci(n):", max_new_tokens=100)
    sampled = model.generate("def fibonacci(n):", max_new_tokens=100, seed=0, **{
        k: GENERATION_CONFIG[k] for k in ("temperature", "top_k", "top_p")})
    size = sum(f.stat().st_size for f in args.out.iterdir())
    info = dict(python=sys.version.split()[0], train_files=len(train_files), heldout_files=len(heldout_files),
                train_tokens=int(len(stream)), heldout_tokens=int(len(heldout_stream)),
                heldout_eval_tokens=int(heldout[:, 1:].size), heldout_loss=round(loss, 4),
                sample_loss=round(s_loss, 4), sample_tokens=s_tokens, export_max_logit_diff=diff,
                args={k: v for k, v in vars(args).items() if k != "out"}, log=log,
                minutes=round((time.perf_counter() - t0) / 60, 1))
    (args.out / "training_info.json").write_text(json.dumps(info, indent=2) + "\n")
    print(f"wrote {args.out} ({size / 1e6:.1f} MB); exported logits match the trained parameters (max diff "
          f"{diff:.1e})")
    print("greedy:\ndef fibonacci(n):" + greedy.text)
    print("sampled (the generate command's default settings, seed 0):\ndef fibonacci(n):" + sampled.text)
    print(f"held-out sample ({HELDOUT_SAMPLE.name}, {s_tokens} tokens): loss {s_loss:.4f} nats/token")
    print(f"held-out loss: {loss:.4f} nats/token ({heldout[:, 1:].size} tokens of {len(heldout_files)} held-out "
          f"files; {math.exp(loss):.2f} perplexity)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
