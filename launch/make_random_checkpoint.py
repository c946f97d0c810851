"""Write a tiny random-weight Hugging Face checkpoint folder (tests, benchmarks, demos).

    python launch/make_random_checkpoint.py /tmp/tiny-llama
    python launch/make_random_checkpoint.py /tmp/tiny-internlm2 --architecture internlm2 \\
        --layers 4 --hidden 256 --heads 8 --kv-heads 2 --shard-mb 1
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dist_runtime.formats.random_checkpoint import (  # noqa: E402
    ARCHITECTURES,
    DTYPES,
    write_random_checkpoint,
)

logger = logging.getLogger("make_random_checkpoint")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; defaults match `write_random_checkpoint`."""
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("out_dir", type=Path, help="folder to write (created if missing)")
    p.add_argument("--architecture", choices=sorted(ARCHITECTURES), default="llama")
    p.add_argument("--layers", type=int, default=2, help="decoder layers")
    p.add_argument("--hidden", type=int, default=64, help="hidden size")
    p.add_argument("--heads", type=int, default=8, help="query heads")
    p.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    p.add_argument("--head-dim", type=int, default=None, help="default: hidden / heads")
    p.add_argument("--vocab", type=int, default=512, help="vocabulary size (>= 260)")
    p.add_argument("--intermediate", type=int, default=160, help="MLP width")
    p.add_argument("--max-position", type=int, default=4096, help="max_position_embeddings")
    p.add_argument("--rope-theta", type=float, default=10000.0)
    p.add_argument("--bias", action="store_true", help="q/k/v/o projection biases")
    p.add_argument("--tie", action="store_true", help="tie the LM head to the embedding")
    p.add_argument(
        "--shard-mb",
        type=float,
        default=None,
        help="largest safetensors shard in MB (10^6 bytes); default: one file",
    )
    p.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-tokenizer", action="store_true", help="skip tokenizer.json")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    """Parse options and write the checkpoint."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = parse_args(argv)
    shard_bytes = None if args.shard_mb is None else int(args.shard_mb * 1_000_000)
    folder = write_random_checkpoint(
        args.out_dir,
        architecture=args.architecture,
        vocab_size=args.vocab,
        hidden_size=args.hidden,
        intermediate_size=args.intermediate,
        num_layers=args.layers,
        num_heads=args.heads,
        num_kv_heads=args.kv_heads,
        head_dim=args.head_dim,
        rope_theta=args.rope_theta,
        max_position_embeddings=args.max_position,
        tie_word_embeddings=args.tie,
        bias=args.bias,
        dtype=args.dtype,
        seed=args.seed,
        max_shard_bytes=shard_bytes,
        with_tokenizer=not args.no_tokenizer,
    )
    logger.info("wrote %s checkpoint to %s", args.architecture, folder)


if __name__ == "__main__":
    main()
