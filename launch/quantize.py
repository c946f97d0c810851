"""Quantize a float checkpoint to 4-bit weights, written as an AWQ GEMM Hugging Face folder
(loadable by AutoAWQ, vLLM and HF transformers).

    python launch/quantize.py /models/llama /models/llama-awq --method awq
    python launch/quantize.py /models/llama /models/llama-rtn --method rtn --group-size 64
    python launch/quantize.py /models/internlm2 /models/internlm2-awq --calib book.txt

`awq` runs the float model on calibration text (a bundled English text, or --calib FILE) to
choose per-channel scales and clipping ranges, then rounds; `rtn` rounds directly. Linear
weights become qweight/qzeros/scales; embeddings, norms and the LM head keep the source dtype.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.quantize import (  # noqa: E402
    FLOAT_DTYPES,
    METHODS,
    W_BIT,
    QuantizeError,
    quantize_checkpoint,
)

logger = logging.getLogger("quantize")

FLAGS = {
    "model": "MODEL_DIR",
    "out_dir": "OUT_DIR",
    "method": "--method",
    "w_bit": "--w-bit",
    "group_size": "--group-size",
    "calib": "--calib",
    "calib_tokens": "--calib-tokens",
    "calib_seq_len": "--calib-seq-len",
    "float_dtype": "--float-dtype",
    "device": "--device",
}
"""QuantizeError.key -> the argument a user typed."""


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("model_dir", type=Path, help="float Hugging Face checkpoint folder")
    p.add_argument("out_dir", type=Path, help="folder to write (must not exist, or be empty)")
    p.add_argument("--method", choices=METHODS, default="awq", help="awq (default) or rtn")
    p.add_argument("--w-bit", type=int, default=W_BIT, help="weight bits (only 4)")
    p.add_argument(
        "--group-size", type=int, default=128, help="inputs per scale/zero group (default 128)"
    )
    p.add_argument(
        "--calib",
        type=Path,
        default=None,
        help="UTF-8 calibration text (awq), instead of the bundled English text",
    )
    p.add_argument(
        "--calib-tokens", type=int, default=512, help="calibration tokens (awq, default 512)"
    )
    p.add_argument(
        "--calib-seq-len",
        type=int,
        default=128,
        help="tokens per calibration sequence (awq, default 128)",
    )
    p.add_argument(
        "--no-zero-point",
        action="store_true",
        help="symmetric quantization (zero point 8) instead of a zero point per group",
    )
    p.add_argument("--no-clip", action="store_true", help="skip AWQ's clipping search")
    p.add_argument("--force", action="store_true", help="overwrite a non-empty OUT_DIR")
    p.add_argument(
        "--shard-mb",
        type=float,
        default=None,
        help="largest safetensors shard in MB (10^6 bytes); default: one file",
    )
    p.add_argument(
        "--float-dtype",
        choices=sorted(FLOAT_DTYPES),
        default=None,
        help="dtype of the tensors that stay float (embeddings, norms, head, biases); default: "
        "the source's. float16 suits servers whose AWQ kernels run in float16 (vLLM)",
    )
    p.add_argument("--device", default="cpu", help="device for the AWQ search (cpu, cuda)")
    p.add_argument("--report", type=Path, default=None, help="write the per-layer report (JSON)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--log-level",
        type=str.upper,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        default="INFO",
        help="logging level (default INFO; DEBUG logs every layer group's alpha and errors)",
    )
    return p.parse_args(argv)


def _error(message: str) -> int:
    print(f"error: {message}", file=sys.stderr)
    return 2


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=args.log_level, format="%(message)s")
    if args.shard_mb is not None and args.shard_mb <= 0:
        return _error(f"--shard-mb must be positive, got {args.shard_mb}")
    calib_text = None
    if args.calib is not None:
        if args.method != "awq":
            return _error(f"--calib is for --method awq; --method {args.method} uses no text")
        try:
            calib_text = args.calib.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            return _error(f"--calib {args.calib}: cannot read it as UTF-8 text ({e})")
        if not calib_text.strip():
            return _error(f"--calib {args.calib} is empty")
    if args.report is not None and not args.report.parent.is_dir():
        return _error(f"--report {args.report}: the folder {args.report.parent} does not exist")
    shard_bytes = None if args.shard_mb is None else int(args.shard_mb * 1_000_000)
    try:
        report = quantize_checkpoint(
            args.model_dir,
            args.out_dir,
            args.method,
            w_bit=args.w_bit,
            group_size=args.group_size,
            zero_point=not args.no_zero_point,
            calib_text=calib_text,
            calib_tokens=args.calib_tokens,
            calib_seq_len=args.calib_seq_len,
            clip=not args.no_clip,
            force=args.force,
            max_shard_bytes=shard_bytes,
            float_dtype=args.float_dtype,
            device=args.device,
            progress=not args.quiet,
        )
    except QuantizeError as e:
        flag = FLAGS.get(e.key or "")
        return _error(f"{flag}: {e}" if flag else str(e))
    except OSError as e:
        return _error(str(e))
    if args.report is not None:
        args.report.write_text(json.dumps(report.to_dict(), indent=2) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    sys.exit(main())
