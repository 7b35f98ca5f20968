"""Prints the bench JSON lines as a table: python scripts/gpu/table.py bench.jsonl [tune.jsonl]."""

import json
import sys


def flags_tag(flags: str) -> str:
    if not flags:
        return "default"
    if "xla_gpu_enable_command_buffer=" in flags:
        value = (flags.split("xla_gpu_enable_command_buffer=")[1].split() or [""])[0]
        return "cb=" + ("off" if not value else "+while" if "WHILE" in value else value)
    return flags[:24]


def main(path: str, tune_path: str | None = None) -> None:
    rows = [json.loads(line) for line in open(path) if line.startswith("{")]
    base = {(r["preset"], r["impl"], flags_tag(r.get("xla_flags", ""))): r["tpot_ms_p50"] for r in rows
            if r["batch"] == 1}
    head = (f"{'preset':14s} {'impl':6s} {'B':>2s} {'flags':12s} {'ttft ms':>8s} {'ttft/fl':>7s} {'p50 ms':>7s} "
            f"{'p90':>7s} {'p99':>7s} {'GB/s':>6s} {'floor':>6s} {'frac':>5s} {'xB1':>5s} {'match':>5s}")
    print(head)
    print("-" * len(head))
    for r in rows:
        tag = flags_tag(r.get("xla_flags", ""))
        b1 = base.get((r["preset"], r["impl"], tag))
        ratio = f"{r['tpot_ms_p50'] / b1:5.2f}" if b1 else "    -"
        match = f"{r['tokens_match_xla']:5.2f}" if "tokens_match_xla" in r else "    -"
        print(f"{r['preset']:14s} {r['impl']:6s} {r['batch']:2d} {tag[:12]:12s} {r['ttft_ms']:8.1f} "
              f"{r.get('ttft_frac', 0):7.2f} {r['tpot_ms_p50']:7.3f} {r['tpot_ms_p90']:7.3f} {r['tpot_ms_p99']:7.3f} "
              f"{r['achieved_gbps']:6.0f} {r['floor_ms']:6.3f} {r['frac_of_floor']:5.2f} {ratio} {match}")
    if rows:
        r = rows[0]
        print(f"device {r['device']} | jax {r['jax']} | copy {r['copy_gbps']:.0f} GB/s | matmul "
              f"{r['mm_tflops']:.0f} TFLOP/s | commit {r.get('commit')}")
    if tune_path:
        best: dict = {}
        xla: dict = {}
        for line in open(tune_path):
            t = json.loads(line)
            if "us" not in t:
                continue
            if t["impl"] == "xla":
                xla[t["key"]] = t
            elif t["key"] not in best or t["us"] < best[t["key"]]["us"]:
                best[t["key"]] = t
        print(f"\n{'kernel':36s} {'xla us':>8s} {'pallas us':>9s} {'xla GB/s':>8s} {'pal GB/s':>8s}")
        for key, t in best.items():
            x = xla.get(key, {})
            print(f"{key:36s} {x.get('us', float('nan')):8.1f} {t['us']:9.1f} {x.get('gbps', float('nan')):8.0f} "
                  f"{t.get('gbps', float('nan')):8.0f}")


if __name__ == "__main__":
    main(*sys.argv[1:3])
