"""Peak host memory of `python -m tilert_jax.convert` on a ~2 GB bf16 Llama-shaped checkpoint this script writes.

    python scripts/measure_convert_memory.py [--workdir /tmp/convert-mem]

Prints the checkpoint size, the largest tensor, the converter's resident memory once its imports are done and its
peak, so the difference can be read as the cost of streaming the tensors.
"""

import argparse
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import save_file

CONFIG = dict(model_type="llama", vocab_size=32000, hidden_size=2048, intermediate_size=5632, num_hidden_layers=20,
              num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096, rms_norm_eps=1e-5,
              rope_theta=10000.0, tie_word_embeddings=False, torch_dtype="bfloat16")


def write_checkpoint(directory: Path) -> tuple[int, int]:
    c = CONFIG
    h, f, v, kvd = c["hidden_size"], c["intermediate_size"], c["vocab_size"], 4 * 128
    shapes = {"model.embed_tokens.weight": (v, h), "model.norm.weight": (h,), "lm_head.weight": (v, h)}
    for i in range(c["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes |= {p + "input_layernorm.weight": (h,), p + "post_attention_layernorm.weight": (h,),
                   p + "self_attn.q_proj.weight": (h, h), p + "self_attn.k_proj.weight": (kvd, h),
                   p + "self_attn.v_proj.weight": (kvd, h), p + "self_attn.o_proj.weight": (h, h),
                   p + "mlp.gate_proj.weight": (f, h), p + "mlp.up_proj.weight": (f, h),
                   p + "mlp.down_proj.weight": (h, f)}
    directory.mkdir(parents=True)
    weight_map, shard, shard_bytes, index = {}, {}, 0, 0
    names = list(shapes)
    for n, name in enumerate(names):
        shard[name] = torch.randn(shapes[name], dtype=torch.bfloat16) * 0.02
        shard_bytes += shard[name].numel() * 2
        if shard_bytes > 400e6 or n == len(names) - 1:
            file = f"model-{index:05d}.safetensors"
            save_file(shard, str(directory / file), metadata={"format": "pt"})
            weight_map |= {k: file for k in shard}
            shard, shard_bytes, index = {}, 0, index + 1
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    (directory / "config.json").write_text(json.dumps(CONFIG))
    sizes = [2 * torch.Size(s).numel() for s in shapes.values()]
    return sum(sizes), max(sizes)


def convert_peak_rss_mb(src: Path, dst: Path) -> tuple[float, float, float]:
    """(resident MB once the converter's imports are done, peak resident MB of the whole run, seconds)."""
    code = ("import resource, sys\n"
            "import tilert_jax.convert.__main__ as cli, tilert_jax.convert.writer\n"
            "rss = int(open('/proc/self/statm').read().split()[1]) * resource.getpagesize() / 2**20\n"
            "code = cli.main(sys.argv[1:])\n"
            "print('RSS_MB', rss, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)\n"
            "sys.exit(code)\n")
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-c", code, "--src", str(src), "--dst", str(dst), "--no-progress"],
                         capture_output=True, text=True, check=True)
    line = [x for x in out.stdout.splitlines() if x.startswith("RSS_MB")][0].split()
    return float(line[1]), float(line[2]), time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--workdir", default="/tmp/convert-mem")
    args = parser.parse_args()
    work = Path(args.workdir)
    shutil.rmtree(work, ignore_errors=True)
    total, largest = write_checkpoint(work / "hf")
    baseline, peak, seconds = convert_peak_rss_mb(work / "hf", work / "out")
    print(f"checkpoint {total / 1e9:.2f} GB, largest tensor {largest / 1e6:.0f} MB")
    print(f"converter resident after imports {baseline:.0f} MB, peak {peak:.0f} MB: streaming cost "
          f"{peak - baseline:.0f} MB = {(peak - baseline) * 2**20 / largest:.1f} x the largest tensor, in {seconds:.0f} s")
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
