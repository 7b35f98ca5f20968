#!/usr/bin/env bash
# Everything one GPU call needs, in one command: install the project, run the GPU tests, (optionally) tune the
# kernels, run the bench presets, print a table last. Run from the repository root on the GPU machine:
#
#   bash scripts/gpu/run_all.sh                       # install, GPU tests, every bench line (committed tuning)
#   STAGES="install tune bench" BENCH="8b 1b" bash scripts/gpu/run_all.sh
#
# STAGES: any of install, tests, tune, bench (default: install tests bench). TUNE_ARGS: extra tune_kernels.py flags.
# BENCH: any of 8b, 1b (llama-3.1-8b, llama-3.2-1b at batch 1: xla, pallas and pallas with only some ops),
#        batch (llama-3.1-8b at batch 2, 4, 8), qwen3 (qwen3-8b at batch 1), cb (XLA command-buffer flag variants
#        on llama-3.2-1b); default all, in that order. Since session 29 the GPU tests take more than 3.5 minutes
#        (test_layer_decode, test_mlp_block and the fused decode steps alone 3.4) and the bench lines up to 11:
#        more than one device call's 10 minutes, so run them as separate calls, e.g. STAGES="install tests", then
#        STAGES="install bench" BENCH="8b 1b", then STAGES="install bench" BENCH="batch qwen3 cb".
# Output under $OUT (default ./gpu_out): log.txt, bench.jsonl, tune.jsonl, tuning.json.
set -u
export PYTHONUNBUFFERED=1
export JAX_PLATFORMS=cuda
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tilert_jax_cache}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
STAGES=${STAGES:-install tests bench}
BENCH=${BENCH:-8b 1b batch qwen3 cb}
TUNE_BUDGET_S=${TUNE_BUDGET_S:-100}
LOG="$OUT/log.txt"
BENCH_OUT="$OUT/bench.jsonl"
T0=$(date +%s)
say() { echo "[run_all $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }
has() { case " $1 " in *" $2 "*) return 0;; esac; return 1; }

say "stages: $STAGES | bench: $BENCH | commit $(git rev-parse --short HEAD 2>/dev/null)"
nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,memory.used,memory.total \
  --format=csv >> "$LOG" 2>&1

if has "$STAGES" install; then
  say "install"
  python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || say "install FAILED"
fi
python3 -c "import jax, jaxlib; print('jax', jax.__version__, 'jaxlib', jaxlib.__version__, jax.devices())" 2>&1 \
  | tee -a "$LOG"

if has "$STAGES" tests; then
  say "gpu tests"
  timeout 540 python3 -m pytest -q -m gpu -p no:cacheprovider tests/ 2>&1 | tail -n 40 | tee -a "$LOG"
fi

if has "$STAGES" tune; then
  say "tune (budget ${TUNE_BUDGET_S}s)"
  # shellcheck disable=SC2086
  timeout $((TUNE_BUDGET_S + 150)) python3 scripts/gpu/tune_kernels.py --budget-s "$TUNE_BUDGET_S" \
    --out "$OUT/tuning.json" --log "$OUT/tune.jsonl" ${TUNE_ARGS:-} 2>&1 | grep -v "^WARNING" | tee -a "$LOG"
  [ -s "$OUT/tuning.json" ] && export TILERT_TUNING="$OUT/tuning.json"  # entries here override kernels/tuning.json
fi

bench() {  # bench TIMEOUT_S ARGS...
  local limit=$1; shift
  say "bench $*  ${XLA_FLAGS:+(XLA_FLAGS=$XLA_FLAGS)}"
  timeout "$limit" python3 -m tilert_jax.bench --random-weights --prompt-len 1024 --new-tokens 128 \
    --out "$BENCH_OUT" "$@" >> "$LOG" 2>&1 || say "bench $* FAILED or timed out (rc $?)"
}

if has "$STAGES" bench; then
  # Each kernel's share: the fused decode with only some ops in Pallas (the rest on their XLA references).
  # plain pallas = models/dense.py DEFAULT_PALLAS_OPS; pallas[all] = every fused kernel.
  has "$BENCH" 8b && bench 170 --preset llama-3.1-8b --batch 1 \
    --impl "xla,pallas,pallas[all],pallas[attention+o+down],pallas[qkv+attention]"
  has "$BENCH" 1b && bench 120 --preset llama-3.2-1b --batch 1 --impl "xla,pallas,pallas[all],pallas[attention+o+down]"
  has "$BENCH" batch && bench 150 --preset llama-3.1-8b --impl xla,pallas --batch 2,4,8 --ttft-repeats 2 \
    --no-check-logits
  has "$BENCH" qwen3 && bench 100 --preset qwen3-8b --impl xla,pallas --batch 1
  if has "$BENCH" cb; then
    for flags in "--xla_gpu_enable_command_buffer=" \
                 "--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,CUDNN,WHILE,CONDITIONAL --xla_gpu_graph_min_graph_size=1"; do
      XLA_FLAGS="$flags" bench 70 --preset llama-3.2-1b --impl xla,pallas --batch 1 --ttft-repeats 1 --no-check-logits
    done
  fi
fi

say "done"
[ -s "$BENCH_OUT" ] && python3 scripts/gpu/table.py "$BENCH_OUT" $( [ -s "$OUT/tune.jsonl" ] && echo "$OUT/tune.jsonl" )
