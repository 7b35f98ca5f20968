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
variant default X=1
variant nccl_ll NCCL_PROTO=LL
variant cmdbuf_collectives XLA_FLAGS=--xla_gpu_enable_command_buffer=FUSION,CUBLAS,CUBLASLT,CUSTOM_CALL,COLLECTIVES,WHILE,CONDITIONAL
if grep -q xla_gpu_unsupported_use_all_reduce_one_shot_kernel "$OUT/flags.txt"; then
  variant one_shot XLA_FLAGS=--xla_gpu_unsupported_use_all_reduce_one_shot_kernel=true
fi
if grep -q xla_gpu_experimental_enable_nvshmem "$OUT/flags.txt"; then
  variant nvshmem XLA_FLAGS=--xla_gpu_experimental_enable_nvshmem=true NVSHMEM_DISABLE_NVLS=1
fi
python3 - "$OUT/variants.jsonl" <<'PY'
import json, sys
for line in open(sys.argv[1]):
    r = json.loads(line)
    print(f"{r['variant']:20} tpot {r['tpot_ms_p50']:.3f} ms  comm {r['comm_ms_per_token']:.3f} ms  "
          f"no-comm {r['tpot_ms_p50_without_collectives']:.3f} ms")
PY
cat "$OUT/flags.txt" | head -60
