"""python -m tilert_jax.generate: stream a model's continuation of a prompt, then one line of speed figures.

With no arguments it runs the embedded default model (a small Llama trained on Python's standard library, see
scripts/train_default_model.py) on a default prompt:

    python -m tilert_jax.generate
    python -m tilert_jax.generate --prompt "class Stack:" --temperature 0.8 --top-p 0.95 --seed 1
    python -m tilert_jax.generate --model /path/to/Llama-3.2-1B-Instruct --chat --prompt "What is JAX?"
    python -m tilert_jax.generate --model meta-llama/Llama-3.2-1B   # a hub id already in the local HF cache

Sampling settings not given as flags come from the checkpoint's generation_config.json, as transformers reads them
(the default model's: temperature 0.6, top-k 50, top-p 0.95); without one, decoding is greedy. `--temperature 0`
is always greedy. The generated text goes to stdout as it is produced (a plain prompt is echoed first); the figures
line follows it.
Errors are one line on stderr, `error: ...`, with a non-zero exit status.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

from tilert_jax.assets import DEFAULT_MODEL

DEFAULT_PROMPT = "def fibonacci(n):"
DEFAULT_MAX_NEW_TOKENS = 200
PROGRESS_BYTES = 256 * 2**20  # show a loading progress bar for checkpoints larger than this
DTYPES = ("bfloat16", "float16", "float32")


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, not argparse's usage block
        sys.stderr.write(f"error: {message} (see --help)\n")
        sys.exit(2)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def parser() -> argparse.ArgumentParser:
    p = _Parser(prog="python -m tilert_jax.generate",
                description="Generate text with a model, streamed as it is produced, then print time to first "
                            "token, ms per output token, tokens/s, achieved GB/s and compile time.")
    p.add_argument("--model", default=None,
                   help="a local checkpoint directory (converted, or Hugging Face safetensors) or a hub id found "
                        "in the local Hugging Face cache (default: the embedded model, trained on Python's "
                        "standard library)")
    prompt = p.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", default=None, help=f"the prompt text (default: {DEFAULT_PROMPT!r})")
    prompt.add_argument("--prompt-file", default=None, help="read the prompt from this file ('-': stdin)")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt as one user turn with the tokenizer's chat template")
    p.add_argument("--max-new-tokens", type=_positive_int, default=None,
                   help=f"stop after this many new tokens (default: {DEFAULT_MAX_NEW_TOKENS}, or what the "
                        f"context leaves); generation also stops at the end-of-sequence token")
    p.add_argument("--temperature", type=float, default=None,
                   help="0 is greedy (default: the checkpoint's generation_config.json, as in transformers, else 0)")
    p.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens")
    p.add_argument("--top-p", type=float, default=None, help="sample within this probability mass (0, 1]")
    p.add_argument("--seed", type=int, default=0, help="sampling seed (default: 0)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="parameter dtype (default: the checkpoint's own)")
    return p


def _read_prompt(args) -> str:
    if args.prompt_file is not None:
        if args.prompt_file == "-":
            return sys.stdin.read()
        return Path(args.prompt_file).read_text(encoding="utf-8")
    return DEFAULT_PROMPT if args.prompt is None else args.prompt


def _sampling(args, directory: Path) -> dict:
    """The sampling settings: the flags given, else the checkpoint's generation_config.json (as transformers reads
    it: do_sample, temperature, top_k defaulting to 50, top_p), else greedy."""
    config = {}
    path = directory / "generation_config.json"
    if path.is_file():
        try:
            config = json.loads(path.read_text())
        except json.JSONDecodeError:
            config = {}
    sampled = bool(config.get("do_sample")) and config.get("temperature", 1.0) not in (0, None)
    out = dict(temperature=float(config.get("temperature", 1.0)) if sampled else 0.0,
               top_k=config.get("top_k", 50) if sampled else None,
               top_p=config.get("top_p") if sampled else None)
    if out["top_k"] == 0:
        out["top_k"] = None
    if out["top_p"] is not None and out["top_p"] >= 1:
        out["top_p"] = None
    given = {k: getattr(args, k) for k in out if getattr(args, k) is not None}
    return {**out, **given}


def _checkpoint_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.glob("*.safetensors")) if path.is_dir() else 0


def _write(text: str) -> None:
    sys.stdout.write(text)
    sys.stdout.flush()


def run(args) -> int:
    from tilert_jax.sampling import SamplingParams

    # Everything that can be checked without the model is checked before it is loaded.
    SamplingParams(temperature=args.temperature or 0.0, top_k=args.top_k, top_p=args.top_p)
    prompt = _read_prompt(args)
    if not prompt:
        raise ValueError("the prompt is empty")

    import jax

    import tilert_jax
    from tilert_jax.engine import resolve_model_path

    path = args.model if args.model is not None else DEFAULT_MODEL
    directory = resolve_model_path(path)  # a hub id becomes its snapshot directory in the local cache
    start = time.perf_counter()
    model = tilert_jax.load(directory, dtype=args.dtype, progress=_checkpoint_bytes(directory) > PROGRESS_BYTES)
    if model.tokenizer is None:
        raise ValueError(f"{path} has no tokenizer.json: this command needs the checkpoint's tokenizer")
    leaves = jax.tree.leaves(model.params)
    n_params, n_bytes = sum(x.size for x in leaves), sum(x.nbytes for x in leaves)
    sampling = _sampling(args, directory)
    SamplingParams(**sampling)
    how = ("greedy" if sampling["temperature"] == 0 else
           ", ".join(f"{k.replace('_', '-')} {v}" for k, v in sampling.items() if v is not None) + f", seed {args.seed}")
    print(f"loaded {path} ({n_params / 1e6:,.1f}M parameters, {n_bytes / 1e9:.2f} GB) in "
          f"{time.perf_counter() - start:.1f} s; {how}", file=sys.stderr, flush=True)

    prompt_ids = model.encode(prompt, chat=args.chat)
    room = model.config.max_position_embeddings - len(prompt_ids)
    max_new = args.max_new_tokens
    if max_new is None:
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt_ids)} tokens, which fills the context "
                             f"({model.config.max_position_embeddings})")
        max_new = min(DEFAULT_MAX_NEW_TOKENS, room)
    elif max_new > room:
        raise ValueError(f"the prompt ({len(prompt_ids)} tokens) plus --max-new-tokens ({max_new}) exceeds the "
                         f"context ({model.config.max_position_embeddings})")

    if not args.chat:
        _write(prompt)
    result = model.generate(prompt_ids, max_new_tokens=max_new, seed=args.seed, on_text=_write, **sampling)
    stopped = "end of sequence" if result.tokens and result.tokens[-1] in model.stop_ids else "max new tokens"
    _write("\n")
    print(f"[{result.stats.new_tokens} new tokens ({stopped}) | {result.stats.summary()}]", flush=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        return run(args)
    except (ValueError, OSError) as e:
        sys.stdout.flush()
        message = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        print(f"error: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("\ninterrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
