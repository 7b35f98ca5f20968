# Sourced by the one-call device scripts (mesh_run.sh, v32_x8.sh) after setting NAME: the environment, $OUT and its
# log.txt, `say` (a timestamped line on stdout and in the log), the GPUs listed in the log, and the package installed
# from the working tree. TILERT_COMMIT names the tree in the bench lines (the device's copy has no .git).
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda NCCL_NVLS_ENABLE=0
export JAX_COMPILATION_CACHE_DIR=${JAX_COMPILATION_CACHE_DIR:-/tmp/tilert_jax_cache}
export TILERT_COMMIT=${TILERT_COMMIT:-$(git rev-parse --short HEAD 2>/dev/null)}
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
LOG="$OUT/log.txt"
T0=$(date +%s)
say() { echo "[$NAME $(( $(date +%s) - T0 ))s] $*" | tee -a "$LOG"; }

say "commit $TILERT_COMMIT"
nvidia-smi --query-gpu=name,memory.total --format=csv >> "$LOG" 2>&1
python3 -m pip install -q --no-deps --no-build-isolation -e . >> "$LOG" 2>&1 || say "install FAILED"
