#!/usr/bin/env bash
# Issue 7 in one call on nvidia-h200-x8: the whole DeepSeek-V3.2-Exp shape (61 layers, FP8, random weights, 674 GB:
# 86 GB a device at tp=8; the MTP layer is not loaded, the bench decodes without speculation), batch 1, prompt 1024,
# 128 new tokens. Run from the repository root:
#
#   bash scripts/gpu/v32_x8.sh              # MESHES="tp8 tp2ep4" by default; about 4 minutes per mesh;
#                                           # CHECK= skips the 4-layer logits check against XLA
#
# Output under $OUT (default ./gpu_out): log.txt, <mesh>.log and bench.jsonl (one JSON line per mesh, with
# comm_ms_per_token).
set -u
NAME=v32_x8
source "$(dirname "$0")/setup.sh"

bench() {  # bench NAME ARGS...: one bench process, its whole log in $OUT/NAME.log
  local name=$1; shift
  say "bench deepseek-v3.2-exp $*"
  timeout "${LIMIT_S:-280}" python3 -m tilert_jax.bench --random-weights --preset deepseek-v3.2-exp "$@" \
    --impl "${IMPL:-pallas}" --prompt-len 1024 --new-tokens 128 --repeats 2 --ttft-repeats 1 \
    --out "$OUT/bench.jsonl" > "$OUT/$name.log" 2>&1 || say "bench $* FAILED or timed out (rc $?)"
  tail -n 5 "$OUT/$name.log" >> "$LOG"
}

# Four full-width layers first: the step's logits against the XLA step's on the same mesh (logits_rel_err_vs_xla).
[ -n "${CHECK-1}" ] && bench check_tp8 --tp 8 --layers 4 --dense-layers 1
for mesh in ${MESHES:-tp8 tp2ep4}; do
  case $mesh in
    tp8) bench tp8 --tp 8 --no-check-logits ;;
    tp2ep4) bench tp2ep4 --tp 2 --ep 4 --no-check-logits ;;
    ep8) bench ep8 --ep 8 --no-check-logits ;;
    *) say "unknown mesh $mesh" ;;
  esac
done
say "done"
