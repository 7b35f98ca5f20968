"""python -m tilert_jax.bench: decode latency on real model shapes with random weights, one JSON object per line.

    python -m tilert_jax.bench --preset llama-3.1-8b --random-weights --prompt-len 1024 --new-tokens 128 \
        --batch 1,2,4,8 --impl xla,pallas

`--batch` and `--impl` take one value or a comma-separated list; each combination prints one line. The parameters
come from tilert_jax.params.init_params over the family's param_specs; prefill and decode are the engine's Decoder.

What the numbers mean:
- weight_bytes: the bytes of parameters one decode step reads (the family's decode_weight_bytes): every parameter
  but only one row of an untied embedding table (a tied table is the LM head and counts); for a mixture of experts,
  only the experts a token activates. `commit` comes from TILERT_COMMIT when set (the GPU machine has no .git).
- copy_gbps: a device-to-device copy of a large buffer measured in the same process, counting bytes read plus bytes
  written over the time (the quantity GPU.md gives as 4.28 TB/s on the H200).
- floor_ms = weight_bytes / copy_gbps. HBM moves bytes at one aggregate rate whether they are read or written, so a
  read-only weight stream's best rate is the copy's read+write rate, not half of it. The KV cache a step reads is
  reported (kv_bytes) but not added to the floor.
- tpot_ms_*: decode runs `chunk` steps per dispatch, dispatches are enqueued back to back as the engine does (the
  next before the host waits on the current); the time between successive chunk completions divided by `chunk` is one
  sample. The first chunk of each generation (which holds the dispatch latency) is left out. p50/p90/p99 are over the
  samples of `repeats` generations after one warm-up generation; tpot_ms_mean is over every step.
- frac_of_floor = floor_ms / tpot_ms_p50; achieved_gbps = weight_bytes / tpot_ms_p50.
- logits_rel_err_vs_xla (pallas rows): one decode step from the same cache through both paths, relative L2 error
  of the logits; with random weights the logits are nearly tied, so tokens_match_xla (greedy tokens equal to the
  XLA run's) drops after the first bf16 rounding difference flips a token and says little in bf16.
- ttft_ms: prefill of the prompt and the first sampled token, host to host (median of --ttft-repeats after warm-up;
  ttft_ms_min the fastest). prefill_programs: the programs the prefill ran as (--prefill-split, engine.py).
- ttft_floor_ms: the larger of one device's prefill matmul FLOPs (2 * matmul params * batch * prompt + causal
  attention over its heads; of a mixture's routed experts only the activated share) over the bf16 matmul rate
  measured in the same process (mm_tflops, an 8192^3 product), and prefill_bytes / copy_gbps: every parameter byte
  the device holds but an untied embedding table's (a prompt's tokens choose every expert of a mixture).
- On a mesh (--tp / --ep): weight_bytes counts what one device holds (sharding/rules.py's table: a replicated
  parameter whole, a sharded one its shard; of the routed experts it holds, the activated fraction), so floor_ms is
  the per-device floor. comm_ms_per_token is the p50
  step time minus that of the same sharded program with every collective dropped (numbers wrong, traffic the same).
  overlap: whether the reductions ran in their overlapped forms (the default; $TILERT_OVERLAP=0 turns them off,
  sharding/collectives.py); the part of the communication they hide is the difference of tpot_ms_p50 between a run
  with and one without.
- tpot_ms_per_layer = tpot_ms_p50 / num_layers (with --layers, the bench runs fewer full-width layers).
- --slice-of N: one device's share of a tp=N mesh as a model of its own on one device (`tp_slice`), so its launches
  can be timed without a mesh; its floor is the per-device floor, and it runs no reductions.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.config import PRESETS, preset
from tilert_jax.sharding import make_mesh, param_shardings, shard_count
from tilert_jax.sharding.collectives import overlap_enabled
from tilert_jax.engine import CACHE_BUCKET, PREFILL_FIRST_LAYERS, PREFILL_GROWTH, PROMPT_BUCKET, Decoder, _round_up
from tilert_jax.models import family
from tilert_jax.models.dense import PALLAS_OPS_ENV, pallas_ops
from tilert_jax.params import init_params, is_spec, param_bytes, path_name
from tilert_jax.sampling import SamplingParams


def _median_time(fn, reps: int, inner: int) -> float:
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn(inner)
        times.append((time.perf_counter() - start) / inner)
    return statistics.median(times)


def copy_gbps(nbytes: int, reps: int = 5, inner: int = 10) -> float:
    """Device-to-device streaming rate: bytes read + bytes written per second / 1e9 (an in-place XOR, donated)."""
    n = nbytes // 4
    x = jax.lax.iota(jnp.uint32, n)
    f = jax.jit(lambda a: a ^ jnp.uint32(0x5BD1E995), donate_argnums=0)
    x = f(x).block_until_ready()

    def run(k):
        nonlocal x
        for _ in range(k):
            x = f(x)
        x.block_until_ready()

    return 2 * n * 4 / _median_time(run, reps, inner) / 1e9


def matmul_tflops(n: int, dtype, reps: int = 3, inner: int = 10) -> float:
    ka, kb = jax.random.split(jax.random.key(1))
    a = jax.random.normal(ka, (n, n), jnp.float32).astype(dtype)
    b = jax.random.normal(kb, (n, n), jnp.float32).astype(dtype)
    f = jax.jit(lambda a, b: a @ b)
    f(a, b).block_until_ready()

    def run(k):
        out = [f(a, b) for _ in range(k)]
        out[-1].block_until_ready()

    return 2 * n ** 3 / _median_time(run, reps, inner) / 1e12


def device_shards(mesh):
    """spec -> the number of devices that divide that parameter on `mesh` (1 without a mesh): what the byte and FLOP
    counts below take to count one device's share."""
    return lambda spec: 1 if mesh is None else shard_count(spec, mesh)


def weight_bytes(config, dtype, mesh=None) -> int:
    """Bytes of parameters one device reads per decode step: the family's count (one row of an untied embedding
    table; a mixture of experts' active experts) of the shards it holds on `mesh`."""
    return int(family(config).decode_weight_bytes(config, dtype, device_shards(mesh)))


def prefill_bytes(config, dtype, mesh=None) -> int:
    """Bytes of parameters one device reads in a prefill: all it holds but an untied embedding table's rows."""
    specs, shards = family(config).param_specs(config), device_shards(mesh)
    total = param_bytes(specs, dtype, shards)
    if getattr(specs, "lm_head", None) is not None:
        total -= param_bytes(specs.embed, dtype, shards)
    return total


def kv_bytes(config, batch: int, context: int, dtype) -> int:
    """Cache bytes one decode step reads at `context` tokens."""
    fam = family(config)
    if hasattr(fam, "decode_cache_bytes"):
        return int(batch * fam.decode_cache_bytes(config, dtype, context))
    return 2 * config.num_layers * batch * config.num_kv_heads * config.head_dim * jnp.dtype(dtype).itemsize * context


def matmul_params(config, mesh=None) -> int:
    """Weights one prompt token multiplies on one device: every parameter of rank >= 2 but the embedding table, the
    LM head (prefill applies it to the last token only) and FP8 block scales, of the shards it holds on `mesh`; of a
    mixture's routed experts, only the num_experts_per_tok / n_routed_experts share a token activates."""
    active = getattr(config, "num_experts_per_tok", 1) / getattr(config, "n_routed_experts", 1)
    shards = device_shards(mesh)
    total = 0.0
    for path, spec in jax.tree_util.tree_flatten_with_path(family(config).param_specs(config), is_leaf=is_spec)[0]:
        parts = path_name(path).split("/")
        if len(spec.shape) < 2 or parts[0] in ("embed", "lm_head") or parts[-1] == "scale":
            continue
        total += math.prod(spec.shape) // shards(spec) * (active if "experts" in parts else 1)
    return int(total)


def bench_config(name: str, layers: int = 0, dense_layers: int = -1, slice_of: int = 1):
    """The preset, cut to `layers` full-width layers when given; a mixture of experts keeps `dense_layers` lead
    dense-MLP layers (default: the preset's) and at least one expert layer. slice_of > 1: `tp_slice`."""
    config = tp_slice(preset(name), slice_of)
    if not layers:
        return config
    dense = getattr(config, "first_k_dense_replace", 0) if dense_layers < 0 else dense_layers
    dense = min(dense, layers - 1)
    return dataclasses.replace(config, num_layers=layers,
                               **({"first_k_dense_replace": dense} if hasattr(config, "n_routed_experts") else {}))


def tp_slice(config, tp: int):
    """What one device of a tp-wide mesh computes, as a model of its own for one GPU: the heads, the KV heads (at
    least one), the MLP and expert intermediates and the vocabulary divided by tp, as sharding/rules.py splits
    them; everything replicated (the hidden size, MLA's low ranks, the router) kept. Its decode runs the mesh's
    per-device launches without the reductions between them, so they can be timed and tuned on one GPU."""
    if tp == 1:
        return config
    fields = {"num_heads": config.num_heads, "intermediate_size": config.intermediate_size,
              "vocab_size": config.vocab_size}
    if hasattr(config, "moe_intermediate_size"):
        fields["moe_intermediate_size"] = config.moe_intermediate_size
    bad = [f"{name}={value}" for name, value in fields.items() if value % tp]
    if bad:
        raise ValueError(f"tp={tp} does not divide {', '.join(bad)}")
    sliced = {name: value // tp for name, value in fields.items()}
    if "num_kv_heads" in {f.name for f in dataclasses.fields(config)}:
        sliced["num_kv_heads"] = max(1, config.num_kv_heads // tp)
    return dataclasses.replace(config, **sliced)


def random_model(config, dtype, tp: int = 1, ep: int = 1, seed: int = 0):
    """-> (the tp x ep mesh, or None for one device; random parameters drawn straight into their shards on it)."""
    specs = family(config).param_specs(config)
    mesh = make_mesh(tp=tp, ep=ep) if tp * ep > 1 else None
    params = init_params(specs, jax.random.key(seed), dtype,
                         shardings=None if mesh is None else param_shardings(specs, mesh))
    return mesh, jax.block_until_ready(params)


def _git_commit() -> str | None:
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None
    except Exception:
        return None


def _percentile(values, q) -> float:
    return float(np.percentile(np.asarray(values, np.float64), q))


def _parse_impl(text: str) -> tuple[str, str | None]:
    """"pallas[qkv+attention]" -> ("pallas", "qkv,attention"): the fused decode with only those ops in Pallas."""
    if "[" in text:
        name, rest = text.split("[", 1)
        return name, rest.rstrip("]").replace("+", ",")
    return text, None


def logits_check(dec: Decoder, config, params, cache, token, pos, impl: str, env: dict) -> dict:
    """One decode step from the same cache through impl and through XLA (on the decoder's mesh, if any): relative L2
    error of the logits."""
    fam = dec.family
    if "xla_step" not in env:
        env["xla_step"] = jax.jit(lambda p, t, c, q: fam.decode_step(config, p, t, c, q, impl="xla")[0])
    step = jax.jit(lambda p, t, c, q: fam.decode_step(config, p, t, c, q, impl=impl)[0])
    ref = env["xla_step"](params, token, cache, pos)
    out = step(params, token, cache, pos)
    err = float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref))
    agree = float(jnp.mean(jnp.argmax(out, -1) == jnp.argmax(ref, -1)))
    return {"logits_rel_err_vs_xla": err, "argmax_agrees_with_xla": agree}


def bench_one(config, params, impl_text: str, batch: int, args, env: dict) -> dict:
    impl, only = _parse_impl(impl_text)
    saved = os.environ.get(PALLAS_OPS_ENV)
    if only:
        os.environ[PALLAS_OPS_ENV] = only
    try:
        return _bench_one(config, params, impl, impl_text, batch, args, env, check=impl != "xla" and not only)
    finally:
        if saved is None:
            os.environ.pop(PALLAS_OPS_ENV, None)
        else:
            os.environ[PALLAS_OPS_ENV] = saved


def _bench_one(config, params, impl: str, impl_text: str, batch: int, args, env: dict, check: bool) -> dict:
    split = args.prefill_split
    row = _time_decoder(Decoder(config, impl, env["mesh"], prefill_split=split), config, params, impl, impl_text,
                        batch, args, env, check)
    if env["mesh"] is not None:
        quiet = _time_decoder(Decoder(config, impl, env["mesh"], communicate=False, prefill_split=split), config,
                              params, impl, impl_text, batch, args, env, False)
        row["tpot_ms_p50_without_collectives"] = quiet["tpot_ms_p50"]
        row["comm_ms_per_token"] = row["tpot_ms_p50"] - quiet["tpot_ms_p50"]
        row["overlap"] = overlap_enabled()
    return row


def _time_decoder(dec: Decoder, config, params, impl: str, impl_text: str, batch: int, args, env: dict,
                  check: bool) -> dict:
    sampling = SamplingParams()
    prompt_len, new_tokens, chunk = args.prompt_len, args.new_tokens, args.chunk
    rng = np.random.RandomState(args.seed)
    prompt = rng.randint(0, config.vocab_size, (batch, prompt_len)).astype(np.int32)
    padded = _round_up(prompt_len, PROMPT_BUCKET)
    chunks = max(1, math.ceil((new_tokens - 1) / chunk))
    max_len = _round_up(max(padded, prompt_len + chunks * chunk), CACHE_BUCKET)
    tokens = jnp.asarray(np.pad(prompt, ((0, 0), (0, padded - prompt_len))), jnp.int32)
    key = jax.random.key(args.seed)
    last_index = jnp.int32(prompt_len - 1)

    prefill, prefill_compile_s = dec.compiled("prefill", sampling, max_len, params, tokens, last_index, key)
    _, token, cache = prefill(params, tokens, last_index, key)
    pos = jnp.int32(prompt_len)
    decode, decode_compile_s = dec.compiled("decode", sampling, chunk, params, cache, token, pos, key)
    checked = logits_check(dec, config, params, cache, token, pos, impl, env) if check and args.check_logits else {}
    del cache

    ttfts = []
    for i in range(args.ttft_repeats + 1):
        start = time.perf_counter()
        on_host, _, cache = prefill(params, tokens, last_index, key)
        np.asarray(on_host)
        if i:  # the first is a warm-up
            ttfts.append(time.perf_counter() - start)
        del cache

    samples, mean_steps, first_tokens = [], [], None
    repeats = args.repeats or max(2, math.ceil(64 / max(1, chunks - 1)))
    for rep in range(repeats + 1):
        on_host, token, cache = prefill(params, tokens, last_index, key)
        out = [np.asarray(on_host)[:, None]]
        pos = jnp.int32(prompt_len)
        start = prev = time.perf_counter()
        pending = decode(params, cache, token, pos, key)
        intervals = []
        for i in range(chunks):
            new, cache, token, pos = pending
            if i + 1 < chunks:
                pending = decode(params, cache, token, pos, key)
            out.append(np.asarray(new))
            now = time.perf_counter()
            intervals.append(now - prev)
            prev = now
        total = prev - start
        del cache, pending
        if rep == 0:
            first_tokens = np.concatenate(out, axis=1)[:, :new_tokens]
            continue
        samples += [t / chunk for t in (intervals[1:] if len(intervals) > 1 else intervals)]
        mean_steps.append(total / (chunks * chunk))

    wbytes = env["weight_bytes"]
    p50 = statistics.median(samples)
    floor_s = wbytes / (env["copy_gbps"] * 1e9)
    flops = 2 * env["matmul_params"] * batch * prompt_len  # one device's
    head_dim = getattr(config, "head_dim", 0)  # MLA's attention FLOPs are left out of its floor (a lower bound)
    heads = config.num_heads // args.tp  # a device's query heads
    flops += 4 * batch * config.num_layers * heads * head_dim * prompt_len * (prompt_len + 1) / 2
    flop_s = flops / (env["mm_tflops"] * 1e12)
    ttft_floor_s = max(flop_s, env["prefill_bytes"] / (env["copy_gbps"] * 1e9))
    ttft = statistics.median(ttfts)
    return {
        "preset": args.preset, "impl": impl_text, "batch": batch, "tp": args.tp, "ep": args.ep,
        "slice_of": args.slice_of,
        "num_layers": config.num_layers, "prompt_len": prompt_len, "new_tokens": new_tokens,
        "chunk": chunk, "dtype": str(params.embed.dtype),
        "ttft_ms": 1e3 * ttft, "ttft_ms_min": 1e3 * min(ttfts), "ttft_floor_ms": 1e3 * ttft_floor_s,
        "ttft_frac": ttft_floor_s / ttft, "prefill_programs": len(dec.prefill_runs),
        "tpot_ms_p50": 1e3 * p50, "tpot_ms_p90": 1e3 * _percentile(samples, 90),
        "tpot_ms_p99": 1e3 * _percentile(samples, 99), "tpot_ms_mean": 1e3 * statistics.mean(mean_steps),
        "tpot_ms_per_layer": 1e3 * p50 / config.num_layers, "samples": len(samples),
        "weight_bytes": wbytes, "kv_bytes": kv_bytes(config, batch, prompt_len + new_tokens // 2, params.embed.dtype),
        "achieved_gbps": wbytes / p50 / 1e9, "copy_gbps": env["copy_gbps"], "floor_ms": 1e3 * floor_s,
        "frac_of_floor": floor_s / p50, "mm_tflops": env["mm_tflops"],
        "compile_prefill_s": prefill_compile_s, "compile_decode_s": decode_compile_s,
        **checked, "pallas_ops": list(pallas_ops(batch)) if impl == "pallas" and config.family == "dense" else [],
        "tokens": first_tokens[0, :8].tolist(), "_all_tokens": first_tokens,
        "device": env["device"], "platform": env["platform"], "jax": jax.__version__,
        "xla_flags": os.environ.get("XLA_FLAGS", ""), "commit": env["commit"],
    }


def _csv(kind):
    def parse(text: str):
        return [kind(v) for v in text.split(",") if v]
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilert_jax.bench", description=__doc__.split("\n")[0])
    parser.add_argument("--preset", required=True, choices=sorted(PRESETS))
    parser.add_argument("--random-weights", action="store_true", help="random weights (the only source for now)")
    parser.add_argument("--prompt-len", type=int, default=1024)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--batch", type=_csv(int), default=[1], help="batch size(s), e.g. 1 or 1,2,4,8")
    parser.add_argument("--impl", type=_csv(str), default=["xla"],
                        help="xla, pallas or both (xla,pallas); pallas[qkv+o] runs only those fused-decode ops in "
                             "Pallas, "
                             "pallas[all] every one (plain pallas: models/dense.py DEFAULT_PALLAS_OPS)")
    parser.add_argument("--no-check-logits", dest="check_logits", action="store_false",
                        help="skip comparing one pallas decode step's logits with XLA's")
    parser.add_argument("--chunk", type=int, default=16, help="decode steps per dispatch")
    parser.add_argument("--repeats", type=int, default=0, help="timed generations (0: enough for 64 samples)")
    parser.add_argument("--ttft-repeats", type=int, default=5)
    parser.add_argument("--prefill-split", type=int, default=PREFILL_FIRST_LAYERS,
                        help=f"the layers of the prefill's first program, each later one {PREFILL_GROWTH}x as many "
                        "(0: one program)")
    parser.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float32"],
                        help="parameter dtype (auto: bfloat16 on a GPU, float32 elsewhere: the CPU runtime lacks some "
                             "bf16 products)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--tp", type=int, default=1, help="tensor-parallel devices")
    parser.add_argument("--ep", type=int, default=1, help="expert-parallel devices (mixtures of experts)")
    parser.add_argument("--layers", type=int, default=0,
                        help="run this many full-width layers (0: the preset's)")
    parser.add_argument("--dense-layers", type=int, default=-1,
                        help="with --layers, how many lead dense-MLP layers a mixture of experts keeps (default: the "
                             "preset's, at most layers - 1)")
    parser.add_argument("--slice-of", type=int, default=1,
                        help="on one device, the share one device of a tp=N mesh computes (tp_slice), no reductions")
    parser.add_argument("--copy-mib", type=int, default=0, help="copy-bandwidth buffer (0: 2048 on GPU, 16 else)")
    parser.add_argument("--out", help="also append the JSON lines to this file")
    args = parser.parse_args(argv)
    if not args.random_weights:
        parser.error("only --random-weights is supported: pass it")
    if args.new_tokens < 2 or args.prompt_len < 1 or args.chunk < 1:
        parser.error("--new-tokens must be >= 2, --prompt-len and --chunk >= 1")
    for impl in args.impl:
        if _parse_impl(impl)[0] not in ("xla", "pallas"):
            parser.error(f"unknown --impl {impl!r}")

    if args.slice_of > 1 and args.tp * args.ep > 1:
        parser.error("--slice-of runs on one device: leave --tp and --ep at 1")
    try:
        config = bench_config(args.preset, args.layers, args.dense_layers, args.slice_of)
    except ValueError as e:
        parser.error(str(e))
    if args.prompt_len + args.new_tokens > config.max_position_embeddings:
        parser.error(f"prompt + new tokens exceed the context ({config.max_position_embeddings})")
    dev = jax.devices()[0]
    on_gpu = dev.platform == "gpu"
    dtype = jnp.dtype(("bfloat16" if on_gpu else "float32") if args.dtype == "auto" else args.dtype)
    mesh, params = random_model(config, dtype, args.tp, args.ep, args.seed)
    env = {
        "mesh": mesh, "weight_bytes": weight_bytes(config, dtype, mesh), "matmul_params": matmul_params(config, mesh),
        "prefill_bytes": prefill_bytes(config, dtype, mesh),
        "copy_gbps": copy_gbps((args.copy_mib or (2048 if on_gpu else 16)) << 20),
        "mm_tflops": matmul_tflops(8192 if on_gpu else 256, dtype),
        "device": getattr(dev, "device_kind", str(dev)), "platform": dev.platform,
        "commit": os.environ.get("TILERT_COMMIT") or _git_commit(),
    }
    reference: dict[int, np.ndarray] = {}
    sink = open(args.out, "a") if args.out else None
    for batch in args.batch:
        for impl in args.impl:
            row = bench_one(config, params, impl, batch, args, env)
            toks = row.pop("_all_tokens")
            if impl == "xla":
                reference[batch] = toks
            elif batch in reference:
                row["tokens_match_xla"] = float(np.mean(reference[batch] == toks))
            line = json.dumps(row)
            print(line, flush=True)
            if sink:
                sink.write(line + "\n")
                sink.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
