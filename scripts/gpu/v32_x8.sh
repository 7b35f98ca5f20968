#!/usr/bin/env bash
# Issue 7 in one call on nvidia-h200-x8: the whole DeepSeek-V3.2-Exp shape (61 layers + MTP, FP8, random weights,
# about 674 GB: 86 GB a device at tp=8), batch 1, prompt 1024, 128 new tokens. Run from the repository root:
#
#   bash scripts/gpu/v32_x8.sh              # MESHES="tp8 tp2ep4" by default; about 4 minutes per mesh
#
# Output under $OUT (default ./gpu_out): log.txt, <mesh>.log and bench.jsonl (one JSON line per mesh, with comm_ms_per_token).
set -u
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda NCCL_NVLS_ENABLE=0
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tilert_jax_cache}
export TILERT_COMMIT=${TILERT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
T0=$(date +%s)
say() { echo "[v32_x8 $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

say "commit $TILERT_COMMIT"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || say "install FAILED"

for mesh in ${MESHES:-tp8 tp2ep4}; do
  case $mesh in
    tp8) flags="--tp 8" ;;
    tp2ep4) flags="--tp 2 --ep 4" ;;
    ep8) flags="--ep 8" ;;
    *) say "unknown mesh $mesh"; continue ;;
  esac
  say "bench deepseek-v3.2-exp $flags"
  timeout "${LIMIT_S:-280}" python3 -m tilert_jax.bench --random-weights --preset deepseek-v3.2-exp $flags \
    --impl "${IMPL:-pallas}" --prompt-len 1024 --new-tokens 128 --repeats 2 --ttft-repeats 1 \
    --out "$OUT/bench.jsonl" > "$OUT/$mesh.log" 2>&1 || say "bench $flags FAILED or timed out (rc $?)"
  tail -n 5 "$OUT/$mesh.log" >> "$LOG"
done
say "done"
