#!/usr/bin/env bash
# One call on a machine of several H200s (nvidia-h200-x4): DeepSeek on one GPU, tensor / expert parallelism across
# the GPUs with per-token communication time, and the collectives microbenchmark. Run from the repository root:
#
#   bash scripts/gpu/mesh_run.sh            # at most 10 minutes on 4 H200s
#
# Output under $OUT (default ./gpu_out): log.txt, bench.jsonl, collectives.jsonl. Each step has its own time limit,
# so one failure leaves the rest standing.
set -u
NAME=mesh_run
source "$(dirname "$0")/setup.sh"

bench() {  # bench TIMEOUT_S ARGS...
  local limit=$1; shift
  say "bench $*"
  timeout "$limit" python3 -m tilert_jax.bench --random-weights --prompt-len 1024 --new-tokens 128 --repeats 3 \
    --ttft-repeats 3 --out "$OUT/bench.jsonl" "$@" >> "$LOG" 2>&1 || say "bench $* FAILED or timed out (rc $?)"
}

# DeepSeek-V3 layers (one dense, three expert layers, FP8) across 4 GPUs: experts split over ep, with and without
# the overlapped expert reduction (the shared experts beside the all-reduce, on by default): the difference of the two
# pallas lines' tpot is the communication it hides. Then heads/intermediates over tp, then the same on one GPU.
bench 90 --preset deepseek-v3 --layers 4 --dense-layers 1 --ep 4 --impl pallas
TILERT_OVERLAP=0 bench 90 --preset deepseek-v3 --layers 4 --dense-layers 1 --ep 4 --impl pallas
bench 80 --preset deepseek-v3 --layers 4 --dense-layers 1 --tp 4 --impl pallas
bench 80 --preset deepseek-v3 --layers 4 --dense-layers 1 --impl pallas
# Tensor parallelism on a dense model: tp=4 (XLA and the Pallas decode) against one GPU.
bench 160 --preset llama-3.1-8b --tp 4 --impl xla,pallas
bench 60 --preset llama-3.1-8b --impl pallas
say "collectives"
timeout 45 python3 scripts/gpu/collectives_bench.py --tp 4 >> "$OUT/collectives.jsonl" 2>> "$LOG" \
  || say "collectives FAILED (rc $?)"
say "done"
python3 - "$OUT/bench.jsonl" "$OUT/collectives.jsonl" <<'PY'
import json, sys
for path in sys.argv[1:]:
    try:
        rows = [json.loads(line) for line in open(path)]
    except OSError:
        continue
    for r in rows:
        if "preset" in r:
            print(f"{r['preset']:18} L={r['num_layers']:<3} tp={r['tp']} ep={r['ep']} {r['impl']:8} "
                  f"tpot {r['tpot_ms_p50']:7.3f} ms  per layer {r['tpot_ms_per_layer']:.3f}  "
                  f"frac {r['frac_of_floor']:.3f}  comm {r.get('comm_ms_per_token', 0):.3f} ms  "
                  f"{'overlap  ' if r.get('overlap') else ''}"
                  f"ttft {r['ttft_ms']:.1f} ms")
        else:
            print(json.dumps(r))
PY
