#!/usr/bin/env bash
# llama-3.1-8b at tp=4 under communication settings of XLA and NCCL, each in its own process (one GPU call):
#
#   bash scripts/gpu/tp_variants.sh
#
# Output under $OUT (default ./gpu_out): variants.jsonl (bench lines with a "variant" key), flags.txt (the
# collective-related XLA flags this jaxlib knows).
set -u
export PYTHONUNBUFFERED=1 JAX_PLATFORMS=cuda NCCL_NVLS_ENABLE=0
OUT=${OUT:-$PWD/gpu_out}
mkdir -p "$OUT"
python3 -m pip install -q --no-deps --no-build-isolation -e . > "$OUT/log.txt" 2>&1
python3 - > "$OUT/flags.txt" <<'PY'
import glob, os, re, jaxlib
names = set()
for so in glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "**", "*.so"), recursive=True) + \
        glob.glob(os.path.join(os.path.dirname(jaxlib.__file__), "..", "jax_plugins", "**", "*.so"), recursive=True):
    data = open(so, "rb").read()
    names |= set(re.findall(rb"xla_gpu_[a-z0-9_]*(?:all_reduce|collective|one_shot|nccl|command_buffer)[a-z0-9_]*", data))
print("\n".join(sorted(n.decode() for n in names)))
PY
variant() {  # variant NAME ENV...
  local name=$1; shift
  echo "variant $name: $*" | tee -a "$OUT/log.txt"
  env "$@" timeout 90 python3 -m tilert_jax.bench --random-weights --preset llama-3.1-8b --tp 4 --prompt-len 1024 \
    --new-tokens 128 --repeats 3 --ttft-repeats 2 2>> "$OUT/log.txt" \
    | python3 -c "import json,sys; [print(json.dumps(dict(json.loads(l), variant='$name'))) for l in sys.stdin]" \
    >> "$OUT/variants.jsonl"
}
# ONLY: the names to run (default all). A flag this jaxlib does not know is skipped.
runs() { [ -z "${ONLY:-}" ] || case " $ONLY " in *" $1 "*) ;; *) return 1;; esac; }
knows() { grep -q "^$1\$" "$OUT/flags.txt"; }
runs default && variant default X=1
runs nccl_ll && variant nccl_ll NCCL_PROTO=LL
runs cmdbuf_collectives && variant cmdbuf_collectives \
  XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES,WHILE,CONDITIONAL
runs one_shot && variant one_shot XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true
runs all_reduce_kernel && knows xla_gpu_allow_all_reduce_kernel && \
  variant all_reduce_kernel XLA_FLAGS=--xla_gpu_allow_all_reduce_kernel=true
runs collective_kernels && knows xla_gpu_experimental_use_collective_kernels && \
  variant collective_kernels XLA_FLAGS=--xla_gpu_experimental_use_collective_kernels=true
runs sync_all_reduce && knows xla_gpu_enable_async_all_reduce && \
  variant sync_all_reduce XLA_FLAGS=--xla_gpu_enable_async_all_reduce=false
runs sync_collectives && knows xla_gpu_disable_async_collectives && \
  variant sync_collectives XLA_FLAGS=--xla_gpu_disable_async_collectives=ALLREDUCE,ALLGATHER
runs symmetric_buffers && knows xla_gpu_experimental_enable_nccl_symmetric_buffers && \
  variant symmetric_buffers "XLA_FLAGS=--xla_gpu_experimental_enable_nccl_symmetric_buffers=true --xla_gpu_enable_nccl_user_buffers=true"
python3 - "$OUT/variants.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['variant']:20} tpot {r['tpot_ms_p50']:.3f} ms  comm {r['comm_ms_per_token']:.3f} ms  "
          f"no-comm {r['tpot_ms_p50_without_collectives']:.3f} ms")
PY
