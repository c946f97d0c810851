"""Convert a llama.cpp GGUF file into a Hugging Face checkpoint folder the runtime loads.

    python launch/convert.py SmolLM2-135M-Instruct.Q4_1.gguf /models/smollm2
    python launch/convert.py model.gguf /models/out --dtype bfloat16 --shard-mb 2000

Quantized weights are dequantized (float32 by default); `--weights int4` keeps Q4_0 / Q4_1 /
Q4_K linear layers 4-bit for the W4A16 kernel (the demo model's Q4_1 layers: about 4x smaller
on a GPU). Supported: Llama-, Qwen2-, Phi-3-, Granite-, Gemma 2- and Gemma 3-architecture GGUFs
with F32/F16/BF16/Q4_0/Q4_1/Q5_0/Q5_1/Q8_0/Q2_K..Q6_K tensors and a byte-level BPE or
SentencePiece vocabulary.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.formats.gguf import OUTPUT_DTYPES, GGUFError, convert_gguf  # noqa: E402

logger = logging.getLogger("convert")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("gguf", type=Path, help="the .gguf file to convert")
    p.add_argument("out_dir", type=Path, help="folder to write (must not exist, or be empty)")
    p.add_argument("--dtype", choices=sorted(OUTPUT_DTYPES), default="float32", help="weight dtype")
    p.add_argument(
        "--shard-mb",
        type=float,
        default=None,
        help="largest safetensors shard in MB (10^6 bytes); default: one file",
    )
    p.add_argument(
        "--no-tokenizer",
        action="store_true",
        help="write only config and weights (for GGUFs whose tokenizer is not supported)",
    )
    p.add_argument(
        "--weights",
        choices=["float", "int4"],
        default="float",
        help="float: dequantize every tensor (default); int4: keep 4-bit linear layers 4-bit",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    if args.shard_mb is not None and args.shard_mb <= 0:
        print(f"error: --shard-mb must be positive, got {args.shard_mb}", file=sys.stderr)
        return 2
    shard_bytes = None if args.shard_mb is None else int(args.shard_mb * 1_000_000)
    try:
        folder = convert_gguf(
            args.gguf,
            args.out_dir,
            dtype=args.dtype,
            max_shard_bytes=shard_bytes,
            tokenizer=not args.no_tokenizer,
            progress=not args.quiet,
            weights=args.weights,
        )
    except (GGUFError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    logger.info("wrote %s", folder)
    return 0


if __name__ == "__main__":
    sys.exit(main())
