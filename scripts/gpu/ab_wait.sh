export JAX_PLATFORMS=cuda PYTHONUNBUFFERED=1 JAX_COMPILATION_CACHE_DIR=/tmp/jcc
bench() { timeout 170 python3 -m tilert_jax.bench --random-weights --repeats 3 --ttft-repeats 1 --preset $1 --impl pallas --out $OUT/$2.jsonl 2>&1 | grep -o '"tpot_ms_p50[^,]*,\|"frac_of_floor[^,]*,\|"logits_rel_err_vs_xla[^,]*,' | tr '\n' ' '; echo " $2 $1"; }
python3 -m pip install -q --no-deps --no-build-isolation -e . >/dev/null 2>&1
timeout 90 python3 scripts/gpu/dbg_attn_o.py x 2>&1 | grep "rep\|Error" | head -5
for P in llama-3.2-1b llama-3.1-8b; do bench $P epoch; done
timeout 150 python3 -m pytest -q -m gpu tests/test_kernels_attention.py tests/test_kernels_decode.py 2>&1 | tail -1
