"""Where time to first token goes beside the GPU's work: host dispatch, the GPU's own time per prefill
(back-to-back calls), and the host-to-host latency, for the engine's prefill with and without XLA's dot merger."""

import statistics
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

from tilert_jax.bench import bench_config
from tilert_jax.engine import CACHE_BUCKET, PROMPT_BUCKET, Decoder, _round_up
from tilert_jax.models import family
from tilert_jax.params import init_params
from tilert_jax.sampling import SamplingParams


def probe(name, fn, args, reps=10):
    out = fn(*args)
    jax.block_until_ready(out)
    disp, total = [], []
    for _ in range(reps):
        start = time.perf_counter()
        out = fn(*args)
        ret = time.perf_counter()
        jax.block_until_ready(out)
        end = time.perf_counter()
        disp.append(ret - start)
        total.append(end - start)
        del out
    start = time.perf_counter()
    outs = [fn(*args) for _ in range(reps)]
    jax.block_until_ready(outs)
    pipelined = (time.perf_counter() - start) / reps
    print(f"{name:34s} dispatch {1e3 * statistics.median(disp):7.3f} ms  host-to-host {1e3 * statistics.median(total):7.3f}"
          f" ms  back-to-back {1e3 * pipelined:7.3f} ms/call", flush=True)


def main(preset="llama-3.2-1b", impl="pallas", prompt_len=1024):
    config = bench_config(preset, 0, -1)
    params = init_params(family(config).param_specs(config), jax.random.key(0), jnp.bfloat16)
    dec = Decoder(config, impl)
    padded = _round_up(prompt_len, PROMPT_BUCKET)
    max_len = _round_up(prompt_len + 128, CACHE_BUCKET)
    tokens = jnp.asarray(np.random.RandomState(0).randint(0, config.vocab_size, (1, padded)), jnp.int32)
    key, last = jax.random.key(0), jnp.int32(prompt_len - 1)
    args = (params, tokens, last, key)
    fn = dec._prefill_fn(SamplingParams(), max_len)
    probe("prefill (no dot merger)", fn.lower(*args).compile(), args)
    merged = jax.jit(fn.__wrapped__)
    probe("prefill (dot merger)", merged.lower(*args).compile(), args)
    probe("prefill (no merger, plain jit)", fn, args)
    touch = jax.jit(lambda p, t, l, k: p.embed[0, 0] + t[0, 0])
    probe("trivial jit on the same arguments", touch.lower(*args).compile(), args)
    one = jax.jit(lambda t: t[0, 0] + 1)
    probe("trivial jit on one array", one, (tokens,))


if __name__ == "__main__":
    main(*sys.argv[1:2])
