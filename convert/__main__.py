"""python -m tilert_jax.convert --src SRC_DIR --dst DST_DIR [--dtype bfloat16|float32]"""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tilert_jax.convert",
                                     description="Convert a Hugging Face checkpoint into a tilert_jax (orbax) one.")
    parser.add_argument("--src", required=True, help="Hugging Face checkpoint directory (safetensors + config.json)")
    parser.add_argument("--dst", required=True, help="output directory (must not exist)")
    parser.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default=None,
                        help="parameter dtype (default: the checkpoint's own)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    args = parser.parse_args(argv)

    from tilert_jax.convert.writer import convert

    try:
        out = convert(args.src, args.dst, args.dtype, progress=not args.no_progress)
    except (ValueError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
