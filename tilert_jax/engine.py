"""The user-facing model: load a checkpoint, compute logits, generate with an on-device decode loop.

Decoding runs `chunk` tokens per dispatch (a scan of decode step + sampling, the cache donated and updated in place,
unrolled on a GPU: UNROLLED_LAYER_STEPS); the host enqueues the next chunk before it reads the current one, so the
device never waits for the host.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax import cache as kv
from tilert_jax.checkpoint import default_dtype, load_params
from tilert_jax.config import load_config
from tilert_jax.models import family
from tilert_jax.params import layer_run
from tilert_jax.sampling import SamplingParams, sample
from tilert_jax.tokenizer import Tokenizer

PROMPT_BUCKET = 64  # prompts are right-padded to a multiple of this, so similar lengths share one compiled prefill
CACHE_BUCKET = 256
# XLA's dot merger turns products that share their input into one by concatenating their weights: with weights as
# arguments that is a copy of every merged weight on each call (llama-3.2-1b prefill: Q/K/V and gate/up, 0.64 ms of
# 4.7). Whole-sequence programs compile without it (and with the family's own options, `sequence_compiler_options`);
# decode keeps it (there the copy fuses into the product).
SEQUENCE_COMPILER_OPTIONS = {"xla_disable_hlo_passes": "dot-merger"}
# A chunk's decode steps run as straight-line code on a GPU while they hold at most UNROLLED_LAYER_STEPS layers
# (qwen3-8b's 36 x 16; not the 61-layer DeepSeek V3): a 16-token chunk as one program without a while loop took
# llama-3.2-1b from 0.841 to 0.830 ms a token and llama-3.1-8b from 4.105 to 4.086 (the gaps between kernels 18.7 ->
# 2.1 us a step; 4 steps a loop iteration measured level), llama-3.1-8b compiling in 72 s against 56, the former the
# first compile on its machine (docs/PERF.md, session 30). Deeper models keep the loop: the ~19 us a step saved is a
# small share of their step, and the compile time grows with the program. So does the CPU, where there is nothing to
# gain (the tests compiled 1.6x longer unrolled).
UNROLLED_LAYER_STEPS = 576


def _unrolled_steps(chunk: int, num_layers: int) -> int:
    """The steps of a chunk's scan that one loop iteration runs (the whole chunk: no loop)."""
    fits = jax.default_backend() == "gpu" and chunk * num_layers <= UNROLLED_LAYER_STEPS
    return chunk if fits else 1


def sequence_compiler_options(functions, impl: str) -> dict:
    """The XLA options of a model's whole-sequence programs (prefill, forward)."""
    return {**SEQUENCE_COMPILER_OPTIONS, **functions.sequence_compiler_options(impl)}


def _round_up(n: int, multiple: int) -> int:
    return -(-n // multiple) * multiple


@dataclasses.dataclass
class GenerationStats:
    prompt_tokens: int
    new_tokens: int
    compile_s: float  # compiling prefill and the decode loop (zero when reused)
    ttft_s: float  # prefill plus the first sampled token, compile excluded
    decode_s: float  # every later token
    decode_steps: int  # decode steps the device ran (a chunk may run past the end of sequence)
    weight_bytes: int

    @property
    def ms_per_token(self) -> float:
        return 1e3 * self.decode_s / self.decode_steps if self.decode_steps else float("nan")

    @property
    def tokens_per_s(self) -> float:
        return 1e3 / self.ms_per_token if self.decode_steps else float("nan")

    @property
    def achieved_gbps(self) -> float:
        """Weight bytes read per decode step over its time (the quantity bounded by HBM bandwidth)."""
        return self.weight_bytes / (self.ms_per_token * 1e6) if self.decode_steps else float("nan")

    def summary(self) -> str:
        decode = (f"{self.ms_per_token:.2f} ms/token | {self.tokens_per_s:.1f} tokens/s | "
                  f"{self.achieved_gbps:.1f} GB/s" if self.decode_steps else "no decode steps (stopped at once)")
        return (f"prompt {self.prompt_tokens} tokens | TTFT {1e3 * self.ttft_s:.1f} ms | {decode} | "
                f"compile {self.compile_s:.1f} s")


@dataclasses.dataclass
class GenerationResult:
    tokens: list[int]  # the new token ids (up to and including an end-of-sequence token)
    text: str | None  # their decoded text, when the model has a tokenizer
    stats: GenerationStats


def model_functions(config, mesh=None, communicate: bool = True, layers: slice = slice(None)):
    """The family's forward / init_cache / prefill_layers / prefill / decode_step, run under shard_map when a mesh is
    given (communicate=False: without collectives, for timing only; layers: the run of layers whose parameters and
    cache they take, a prefill stage)."""
    if mesh is None:
        return family(config)
    from tilert_jax.sharding.sharded import ShardedFamily

    return ShardedFamily(config, mesh, communicate, layers)


# The prefill runs as a chain of programs: the embedding and the first PREFILL_FIRST_LAYERS layers, then runs of
# layers PREFILL_GROWTH times longer each, the last with the LM head and the sampling. The host's work for a program
# (its arguments, the command buffer's update and launch) comes before its first kernel: about 0.6 ms for
# llama-3.2-1b's 147 arguments and 300 kernels, 7 ms for deepseek-v2-lite's. In a chain each program's host work
# runs while the GPU runs the one before, which is shorter, so its GPU time covers that work: the bench's TTFT of
# llama-3.2-1b 4.58 -> 4.39 ms, deepseek-v2-lite 29.8 -> 27.9 (docs/PERF.md, session 23).
PREFILL_FIRST_LAYERS = 2
PREFILL_GROWTH = 4


class Decoder:
    """Compiled prefill and decode-chunk functions for one (config, sampling, batch, lengths) combination.

    prefill_split: the layers the prefill's first program runs, each later one prefill_growth times as many (0: one
    program; see PREFILL_FIRST_LAYERS)."""

    def __init__(self, config, impl: str = "xla", mesh=None, communicate: bool = True,
                 prefill_split: int = PREFILL_FIRST_LAYERS, prefill_growth: int = PREFILL_GROWTH):
        self.config = config
        self.impl = impl
        self.family = model_functions(config, mesh, communicate)
        starts, start = [0], prefill_split
        while 0 < start < config.num_layers:
            starts.append(start)
            start *= prefill_growth
        self.prefill_runs = tuple(slice(a, b) for a, b in zip(starts, starts[1:] + [None]))
        self._prefill_stages = [model_functions(config, mesh, communicate, run) for run in self.prefill_runs]
        self._compiled: dict = {}

    def _prefill_fns(self, sampling: SamplingParams, max_len: int, compiler_options: dict | None = None):
        """The prefill as one jitted function per run of layers (self.prefill_runs). Each but the last takes (the
        parameters of its run, its input: the tokens [B, P] or the residual stream [B, P, hidden] out of the run
        before) and returns the stream after its layers and their cache; the last takes (parameters, input,
        last_index, key) and returns the first sampled token [B] on the device, a copy of it in the host's memory
        (see compile_prefill) and its layers' cache."""
        config, impl = self.config, self.impl
        options = sequence_compiler_options(self.family, impl) if compiler_options is None else compiler_options

        def fresh_cache(run, inputs, dtype):
            return kv.layer_run(self.family.init_cache(config, inputs.shape[0], max_len, dtype), run)

        def layers_fn(stage, run):
            def prefill_layers(params, inputs):
                cache = fresh_cache(run, inputs, params.embed.dtype)
                return stage.prefill_layers(config, params, inputs, cache, 0, impl=impl)
            return jax.jit(prefill_layers, compiler_options=options)

        def last_fn(stage, run):
            def prefill(params, inputs, last_index, key):
                cache = fresh_cache(run, inputs, params.embed.dtype)
                logits, cache = stage.prefill(config, params, inputs, cache, 0, last_index, impl=impl)
                token = sample(logits, jax.random.fold_in(key, last_index), sampling)
                return token, jax.device_put(token, jax.memory.Space.Host), cache
            return jax.jit(prefill, compiler_options=options)

        stages = list(zip(self._prefill_stages, self.prefill_runs))
        return [layers_fn(*stage) for stage in stages[:-1]] + [last_fn(*stages[-1])]

    def compile_prefill(self, sampling: SamplingParams, max_len: int, params, tokens, last_index, key,
                        compiler_options: dict | None = None):
        """AOT-compiles the prefill's programs; returns prefill(params, tokens, last_index, key) -> (the first sampled
        token [B] in the host's memory, the same token on the device: the decode's input, the cache), which runs
        them in turn (`prefill.programs`: the compiled programs).

        The program writes the host's copy itself (pinned memory), so reading it (np.asarray) waits for the program
        and no device-to-host transfer after it: 0.07 against 0.15 to 0.25 ms from a program's call to its output
        on the host, and llama-3.2-1b's TTFT 4.12 to 4.24 against 4.19 to 4.34 ms (docs/PERF.md, session 25)."""
        fns = self._prefill_fns(sampling, max_len, compiler_options)
        runs, programs, inputs = self.prefill_runs, [], tokens
        for fn, run in zip(fns[:-1], runs):
            lowered = fn.lower(layer_run(params, run), inputs)
            programs.append(lowered.compile())
            inputs = lowered.out_info[0]  # the stream's shape, the next program's input
        last = fns[-1].lower(layer_run(params, runs[-1]), inputs, last_index, key).compile()

        def prefill(params, tokens, last_index, key):
            x, caches = tokens, []
            for program, run in zip(programs, runs):
                x, cache = program(layer_run(params, run), x)
                caches.append(cache)
            token, on_host, cache = last(layer_run(params, runs[-1]), x, last_index, key)
            return on_host, token, functools.reduce(kv.join_layers, caches + [cache])

        prefill.programs = (*programs, last)  # the compiled programs, in order (their HLO for a profile)
        return prefill

    def _decode_fn(self, sampling: SamplingParams, chunk: int):
        fam, config, impl = self.family, self.config, self.impl

        def decode(params, cache, token, pos, key):  # token: [B] at pos -> the next `chunk` tokens [B, chunk]
            def step(carry, _):
                cache, token, pos = carry
                logits, cache = fam.decode_step(config, params, token, cache, pos, impl=impl)
                nxt = sample(logits, jax.random.fold_in(key, pos), sampling)
                return (cache, nxt, pos + 1), nxt

            (cache, token, pos), tokens = jax.lax.scan(step, (cache, token, pos), None, length=chunk,
                                                       unroll=_unrolled_steps(chunk, config.num_layers))
            return tokens.T, cache, token, pos

        return jax.jit(decode, donate_argnums=(1,))

    def compiled(self, kind: str, sampling: SamplingParams, size: int, *args):
        """AOT-compiles on first use; returns (callable, seconds spent compiling)."""
        key = (kind, sampling, size, tuple((a.shape, a.dtype) for a in jax.tree.leaves(args)))
        if key in self._compiled:
            return self._compiled[key], 0.0
        start = time.perf_counter()
        if kind == "prefill":
            self._compiled[key] = self.compile_prefill(sampling, size, *args)
        else:
            self._compiled[key] = self._decode_fn(sampling, size).lower(*args).compile()
        return self._compiled[key], time.perf_counter() - start

    def run(self, params, prompt: np.ndarray, max_new_tokens: int, sampling: SamplingParams, seed: int = 0,
            chunk: int = 16, stop_ids: tuple[int, ...] = (), on_tokens: Callable[[np.ndarray], None] | None = None):
        """prompt: int32[B, T]. Returns new tokens int32[B, <= max_new_tokens] and the stats."""
        batch, prompt_len = prompt.shape
        padded = _round_up(prompt_len, PROMPT_BUCKET)
        chunks = math.ceil((max_new_tokens - 1) / chunk)
        max_len = _round_up(max(padded, prompt_len + chunks * chunk), CACHE_BUCKET)
        tokens = jnp.asarray(np.pad(prompt, ((0, 0), (0, padded - prompt_len))), jnp.int32)
        key = jax.random.key(seed)
        last_index = jnp.int32(prompt_len - 1)
        prefill, compile_s = self.compiled("prefill", sampling, max_len, params, tokens, last_index, key)

        start = time.perf_counter()
        on_host, token, cache = prefill(params, tokens, last_index, key)
        first = np.asarray(on_host)[:, None]
        ttft = time.perf_counter() - start
        if on_tokens:
            on_tokens(first)
        out, steps = [first], 0
        done = np.isin(first[:, 0], stop_ids)
        decode_start = time.perf_counter()
        if chunks and not done.all():
            pos = jnp.int32(prompt_len)
            decode, seconds = self.compiled("decode", sampling, chunk, params, cache, token, pos, key)
            compile_s += seconds
            decode_start = time.perf_counter()
            pending = decode(params, cache, token, pos, key)
            for i in range(chunks):
                new, cache, token, pos = pending
                if i + 1 < chunks:
                    pending = decode(params, cache, token, pos, key)  # enqueued before we wait on `new`
                new = np.asarray(new)
                steps += chunk
                out.append(new)
                if on_tokens:
                    on_tokens(new)
                done |= np.isin(new, stop_ids).any(axis=1)
                if done.all():
                    break
        decode_s = time.perf_counter() - decode_start
        new_tokens = np.concatenate(out, axis=1)[:, :max_new_tokens]
        stats = GenerationStats(prompt_tokens=prompt_len, new_tokens=new_tokens.shape[1], compile_s=compile_s,
                                ttft_s=ttft, decode_s=decode_s, decode_steps=steps, weight_bytes=0)
        return new_tokens, stats


class Model:
    """A loaded model: `logits(tokens)` and `generate(prompt, ...)`."""

    def __init__(self, config, params, tokenizer: Tokenizer | None = None, mesh=None, impl: str = "xla"):
        self.config = config
        self.params = params
        self.tokenizer = tokenizer
        self.mesh = mesh
        self.decoder = Decoder(config, impl, mesh)
        functions = self.decoder.family
        self._forward = jax.jit(lambda params, tokens: functions.forward(config, params, tokens, impl=impl),
                                compiler_options=sequence_compiler_options(functions, impl))

    @property
    def weight_bytes(self) -> int:
        """Weight bytes one decode step reads (for a mixture of experts, only the experts a token activates)."""
        return family(self.config).decode_weight_bytes(self.config, self.params.embed.dtype)

    def _check_tokens(self, tokens: np.ndarray) -> None:
        if tokens.size == 0:
            raise ValueError("the prompt is empty")
        bad = tokens[(tokens < 0) | (tokens >= self.config.vocab_size)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is outside the vocabulary [0, {self.config.vocab_size})")
        if tokens.shape[-1] > self.config.max_position_embeddings:
            raise ValueError(f"the prompt has {tokens.shape[-1]} tokens, longer than the context "
                             f"({self.config.max_position_embeddings})")

    def logits(self, tokens) -> jax.Array:
        """tokens: int[B, T] or int[T] -> float32 logits [B, T, vocab] (positions 0..T-1, no cache)."""
        tokens = np.asarray(tokens)
        tokens = tokens[None] if tokens.ndim == 1 else tokens
        if tokens.ndim != 2 or not np.issubdtype(tokens.dtype, np.integer):
            raise ValueError(f"tokens must be integers of shape [B, T] or [T], got {tokens.dtype}{list(tokens.shape)}")
        self._check_tokens(tokens)
        return self._forward(self.params, jnp.asarray(tokens, jnp.int32))

    def encode(self, prompt: str | list[int], chat: bool = False) -> list[int]:
        if isinstance(prompt, str):
            if not prompt:
                raise ValueError("the prompt is empty")
            if self.tokenizer is None:
                raise ValueError("this model has no tokenizer: pass the prompt as token ids")
            return self.tokenizer.encode_chat(prompt) if chat else self.tokenizer.encode(prompt)
        return list(prompt)

    @property
    def stop_ids(self) -> tuple[int, ...]:
        ids = set(self.config.eos_token_ids)
        if self.tokenizer is not None and self.tokenizer.token_id(self.tokenizer.eos_token) is not None:
            ids.add(self.tokenizer.token_id(self.tokenizer.eos_token))
        return tuple(sorted(ids))

    def generate(self, prompt: str | list[int], *, max_new_tokens: int, temperature: float = 0.0,
                 top_k: int | None = None, top_p: float | None = None, seed: int = 0, chat: bool = False,
                 stop_at_eos: bool = True, on_text: Callable[[str], None] | None = None,
                 chunk: int = 16) -> GenerationResult:
        """Generates up to `max_new_tokens` after `prompt` (text or token ids); `on_text` receives text as it is
        produced. Stops after an end-of-sequence token unless `stop_at_eos` is False."""
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be an integer >= 1, got {max_new_tokens!r}")
        sampling = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p)
        ids = np.asarray(self.encode(prompt, chat), dtype=np.int64)
        if ids.ndim != 1:
            raise ValueError("the prompt must be a string or a flat list of token ids")
        self._check_tokens(ids)
        if len(ids) + max_new_tokens > self.config.max_position_embeddings:
            raise ValueError(f"the prompt ({len(ids)} tokens) plus max_new_tokens ({max_new_tokens}) exceeds the "
                             f"context ({self.config.max_position_embeddings})")
        stop_ids = self.stop_ids if stop_at_eos else ()
        context = [int(ids[-1])]  # decoded with the new tokens, so a leading space survives SentencePiece decoders
        streamer = _TextStreamer(self.tokenizer, on_text, stop_ids, context) if on_text and self.tokenizer else None
        tokens, stats = self.decoder.run(self.params, ids[None].astype(np.int32), max_new_tokens, sampling, seed,
                                         chunk, stop_ids, streamer.push if streamer else None)
        new = [int(t) for t in tokens[0]]
        for i, t in enumerate(new):
            if t in stop_ids:
                new = new[: i + 1]
                break
        stats.weight_bytes = self.weight_bytes
        stats.new_tokens = len(new)
        text = self.tokenizer.decode_continuation(context, new) if self.tokenizer else None
        return GenerationResult(tokens=new, text=text, stats=stats)


class _TextStreamer:
    """Turns token chunks into text deltas, holding back incomplete UTF-8 sequences and stopping at EOS."""

    def __init__(self, tokenizer: Tokenizer, on_text: Callable[[str], None], stop_ids: tuple[int, ...],
                 context: list[int]):
        self.tokenizer, self.on_text, self.stop_ids, self.context = tokenizer, on_text, stop_ids, context
        self.ids: list[int] = []
        self.printed = 0
        self.stopped = False

    def push(self, tokens: np.ndarray) -> None:  # tokens: [1, n]
        for t in tokens[0]:
            if self.stopped:
                return
            self.stopped = int(t) in self.stop_ids
            self.ids.append(int(t))
        text = self.tokenizer.decode_continuation(self.context, self.ids)
        if text.endswith("\ufffd") and not self.stopped:
            return
        if len(text) > self.printed:
            self.on_text(text[self.printed:])
            self.printed = len(text)


def resolve_model_path(path: str | Path) -> Path:
    """A local directory, or a hub id found in the local Hugging Face cache (nothing is downloaded)."""
    p = Path(path).expanduser()
    if p.is_dir():
        return p
    if isinstance(path, str) and path.count("/") == 1 and not p.exists():
        from huggingface_hub import snapshot_download

        try:
            return Path(snapshot_download(path, local_files_only=True))
        except Exception:
            raise ValueError(f"{path} is neither a directory nor a model in the local Hugging Face cache") from None
    raise ValueError(f"no such model directory: {path}")


def load(path: str | Path, *, dtype=None, mesh=None, impl: str = "xla", progress: bool = False) -> Model:
    """Loads a converted directory or a raw Hugging Face directory (converted on the fly, in memory).

    dtype: parameter dtype (default: the checkpoint's own). mesh: from tilert_jax.sharding.make_mesh; None is one
    device.
    """
    directory = resolve_model_path(path)
    config = load_config(directory)
    dtype = jnp.dtype(dtype) if dtype else default_dtype(directory, config)
    shardings = None if mesh is None else model_functions(config, mesh).param_shardings  # validates the mesh too
    params = load_params(directory, config, dtype, shardings, progress=progress)
    return Model(config, params, Tokenizer.from_dir(directory), mesh=mesh, impl=impl)
