"""Kernel configurations per shape: measured entries first (kernels/tuning.json, written from the GPU tuning run
scripts/gpu/tune_kernels.py; a file named by $TILERT_TUNING overrides it), a heuristic otherwise.

Keys: "<op>:B<batch>:K<k>:N<n>" for the matrix-vector ops of the dense decode, weights [N, K] (op: qkv, o, gate_up,
down, lm_head; and mlp_gate_up, mlp_down for the tiles of the phased MLP),
"attention:B<batch>:H<kv heads>:L<max_len>:D<head_dim>" for decode attention, and
"grouped:B<batch>:<G>x<K>x<N>[f][s],..." for a launch of the grouped kernel (kernels/moe_grouped_matvec.py), one term
per product (f: FP8, s: SwiGLU), with the GroupedConfig fields (scripts/gpu/probe_decode_launches.py measures them).
"""

from __future__ import annotations

import functools
import json
import os
from pathlib import Path

from tilert_jax.kernels.common import next_pow2
from tilert_jax.kernels.matvec import MatvecConfig

SMS = 132  # H200 multiprocessors: the heuristic aims for two programs per multiprocessor or more
_DEFAULT_FILE = Path(__file__).with_name("tuning.json")


@functools.lru_cache(maxsize=None)
def _table() -> dict:
    table: dict = {}
    for path in (_DEFAULT_FILE, os.environ.get("TILERT_TUNING")):
        if path and Path(path).is_file():
            table.update(json.loads(Path(path).read_text()))
    return table


def matvec_key(op: str, batch: int, k: int, n: int) -> str:
    return f"{op}:B{batch}:K{k}:N{n}"


def attention_key(batch: int, kv_heads: int, max_len: int, head_dim: int) -> str:
    return f"attention:B{batch}:H{kv_heads}:L{max_len}:D{head_dim}"


def grouped_key(batch: int, products: list[tuple[int, int, int, bool, bool]]) -> str:
    """products: (groups, K, N, fp8, swiglu) each."""
    return f"grouped:B{batch}:" + ",".join(f"{g}x{k}x{n}{'f' * fp8}{'s' * swiglu}" for g, k, n, fp8, swiglu in products)


def grouped_entry(batch: int, products: list[tuple[int, int, int, bool, bool]]) -> dict | None:
    """A measured grouped launch's GroupedConfig fields, or None."""
    entry = _table().get(grouped_key(batch, products))
    return None if entry is None else dict(entry)


def _divides(n: int, bn: int) -> bool:
    return n % bn == 0


def heuristic_matvec(op: str, batch: int, k: int, ns: tuple[int, ...]) -> MatvecConfig:
    """The shape of the measured winners at the llama shapes ([N, K] weights): 32 output rows per program, each
    streaming 512-byte runs of K (256-wide steps; 128 for gate/up's two tiles), 16 KB of weight per pipeline stage;
    K split (at most 4 ways, 2 above batch 1) only where the output is too narrow for two programs per
    multiprocessor and the op allows partial sums."""
    n_total = ns[0] if op == "gate_up" else sum(ns)
    bn = 32
    while bn > 16 and not all(_divides(n, bn) for n in ns):
        bn //= 2
    bk = 128 if op == "gate_up" else 256
    while bk > 16 and k % bk:
        bk //= 2
    split = 1
    if op in ("qkv", "o", "down"):
        while ((n_total // bn) * split < 2 * SMS and split < (4 if batch == 1 else 2)
               and k % (2 * split * bk) == 0 and k // (2 * split) >= 2 * bk):
            split *= 2
    return MatvecConfig(bn=bn, bk=bk, split=split, num_warps=4, num_stages=4, mode="dot")


def matvec_config(op: str, batch: int, k: int, ns: tuple[int, ...]) -> MatvecConfig:
    n_total = ns[0] if op == "gate_up" else sum(ns)
    entry = _table().get(matvec_key(op, batch, k, n_total))
    if entry is None and batch > 1:  # a batch-1 entry in "dot" mode pads to 16 rows: it serves batches <= 16 too
        entry = _table().get(matvec_key(op, 1, k, n_total))
        # 16 rows of float32 partial sums per pipeline stage would overflow shared memory in the consumer: split <= 2
        entry = None if entry is None else {**entry, "mode": "dot", "split": min(2, entry.get("split", 1))}
    if entry is not None:
        cfg = MatvecConfig(**entry)
        if all(_divides(n, cfg.bn) for n in ns) and k % (cfg.split * cfg.bk) == 0:
            return cfg
    return heuristic_matvec(op, batch, k, ns)


# (hidden, intermediate) -> the fused-decode op that runs as one Mosaic GPU launch there (kernels/layer_decode.py),
# where it measured faster end to end at one token (docs/PERF.md): "mlp", the gate/up and down products (session 27:
# llama-3.2-1b 0.878 to 0.890 ms against 0.899 to 0.909 for two launches), or "layer", the output projection, the
# MLP and the next layer's Q/K/V (session 28: llama-3.2-1b 0.822 to 0.835 ms against 0.865 with "mlp", llama-3.1-8b
# 3.993 to 4.001 ms against 4.163 with two launches, where "mlp" alone had measured level, 4.220 against 4.200 ms;
# qwen3-8b 4.242 against 4.481).
ONE_LAUNCH = {(2048, 8192): "layer", (4096, 14336): "layer", (4096, 12288): "layer"}

# (hidden, intermediate) where the decode attention leaves its splits for the "layer" launch to merge in its output
# projection's prologue (models/dense.py `_attention_splits`; session 31): llama-3.2-1b 0.809 and 0.814 ms against
# 0.829 and 0.834. Not at llama-3.1-8b (4.233 against 4.101 ms): there a program of the output projection merges
# whole KV heads of 128-wide rows from 16 splits, more than the attention's own merge costs.
ATTENTION_SPLITS = {(2048, 8192)}

# (hidden, intermediate) -> the weight blocks the stream requests at once (layer_decode's in_flight), where capping
# them measured faster than requesting every stage (session 28, scripts/gpu/probe_weight_stream.py): llama-3.2-1b's
# layer 36.0 to 36.3 us with 3 of 11 against 38.7 (2: 38.4, 5: 38.2), its MLP 27.7 to 27.9 with 3 or 4 against 29.2.
# The grid barriers' stores and counters wait behind every request in flight. llama-3.1-8b (5 stages) measured
# slower with any cap (layer 110.9 us uncapped, 112.7 with 4).
STREAM_IN_FLIGHT = {(2048, 8192): 3}


def stream_in_flight(hidden: int, ffn: int) -> int | None:
    """layer_decode's in_flight at this shape (None: every stage)."""
    return STREAM_IN_FLIGHT.get((hidden, ffn))


def mlp_block_configs(batch: int, hidden: int, ffn: int) -> tuple[MatvecConfig, MatvecConfig]:
    """(gate/up, down) tile configs of kernels/mlp_block.py: the table's "mlp_gate_up:..." and "mlp_down:..." entries
    (measured with scripts/gpu/tune_mlp_block.py), else the standalone ops' configs."""
    out = []
    for op, k, ns in (("gate_up", hidden, (ffn, ffn)), ("down", ffn, (hidden,))):
        entry = _table().get(matvec_key("mlp_" + op, batch, k, ns[0]))
        out.append(MatvecConfig(**entry) if entry is not None else matvec_config(op, batch, k, ns))
    return out[0], out[1]


def attention_config(batch: int, kv_heads: int, max_len: int, head_dim: int) -> dict:
    entry = _table().get(attention_key(batch, kv_heads, max_len, head_dim))
    if entry is not None:
        return dict(entry)
    splits = 1
    while batch * kv_heads * splits < SMS // 2 and max_len // (splits * 2) >= 256:
        splits *= 2
    return dict(splits=splits, block=64, num_warps=4, num_stages=2)


QKV_ROPE_MAX_HIDDEN = 2048  # above it cuBLAS' products outrun the kernel (docs/PERF.md, session 24)


def swiglu_matmul_config(rows: int, hidden: int, intermediate: int) -> dict | None:
    """The tiling of kernels/swiglu_matmul.py (a sequence's gate/up products and SwiGLU), or None where it has none
    that divides the shapes or XLA's path is faster. 128-row tiles only: at llama-3.2-1b's 1024 rows the kernel
    took 94.5 us a layer against XLA's 104.1 with them, 107.9 with 64-row tiles (session 25); 3 pipeline stages
    (4 measured the same)."""
    if rows % 128 or intermediate % 128 or hidden % 64:
        return None
    return dict(tile_m=128, tile_n=64, tile_k=64, stages=3)


def qkv_rope_config(hidden: int, heads: int, kv_heads: int, head_dim: int, tokens: int, qk_norm: bool,
                    itemsize: int = 2) -> dict | None:
    """The tiling of kernels/qkv_rope.py (a sequence's Q/K/V projection), or None where XLA's path is faster: the
    kernel took llama-3.2-1b's prefill from 3.98 to 3.87 ms of GPU time, but llama-3.1-8b's from 22.63 to 23.07 ms
    (its wider products run faster on cuBLAS than the fusion saves). 128-token blocks (fewer for a short sequence),
    64 hidden columns a pipeline step, query tiles 128 wide (two heads of 64 side by side), as many pipeline stages
    (at most 4) as fit 160 KB of shared memory at the dtype's `itemsize`."""
    if hidden > QKV_ROPE_MAX_HIDDEN:
        return None
    block_k = 64
    while hidden % block_k:
        block_k //= 2
    q_heads = 1
    while q_heads * head_dim < 128 and heads % (2 * q_heads) == 0 and not qk_norm:
        q_heads *= 2
    block_t = min(128, max(16, next_pow2(tokens)))
    stage_bytes = (block_t + q_heads * head_dim) * block_k * itemsize
    return dict(block_t=block_t, block_k=block_k, q_heads=q_heads, num_warps=8 if head_dim * q_heads >= 128 else 4,
                num_stages=max(2, min(4, (160 << 10) // stage_bytes)))
