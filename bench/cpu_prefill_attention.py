"""CPU prefill-chunk attention: PyTorch's fused CPU op without a mask against the masked paths.

    python bench/cpu_prefill_attention.py
    python bench/cpu_prefill_attention.py --report docs/benchmarks/cpu_prefill_attention_<date>.md

A prefill chunk of n queries at the last n of ctx positions sees every key up to its own
position (a bottom-right causal mask). `kernels/paged_attention.py: _attend` runs it on CPU as
two unmasked calls of PyTorch's fused CPU attention op (the chunk's own keys as a causal square,
the cached keys with a KV group's query heads stacked as rows) merged by log-sum-exp ("fused").
Without that op it takes the previous paths ("masked"): SDPA with the explicit bottom-right mask
up to 16M scores, the tiled torch reference (`position_attention_ref`) past that. Chunks of
fewer than FLASH_CPU_MIN_QUERIES (256) queries keep those paths (the 22- and 64-query rows
below are why), and so does a whole prompt (n = ctx) when no LSE is asked for: SDPA's own
causal call is the same kernel without the merge (the first row). For each shape both run on
the same inputs, in turn, best of `--repeats` after a warm-up; their outputs are checked
against each other first. The summary line gives masked / fused time per shape (> 1: the fused
path is faster).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import kernels.paged_attention as pa  # noqa: E402
from bench.cpu_gemm import time_best  # noqa: E402

SHAPES = [
    # (threads, q_heads, kv_heads, head_dim, n, ctx)
    (2, 9, 3, 64, 4096, 4096),  # the demo: a whole 4K prompt in one chunk
    (2, 9, 3, 64, 2048, 8000),  # the demo: the last 2K chunk of an 8K prompt
    (2, 9, 3, 64, 3922, 4038),  # a prompt straddling two steps (document QA without the cache)
    (2, 9, 3, 64, 22, 4038),  # a question's tail over a cached document
    (2, 9, 3, 64, 64, 4038),
    (2, 9, 3, 64, 256, 4038),
    (1, 4, 2, 32, 8192, 16384),  # the long-context micro model, 1 thread per worker
    (1, 4, 2, 32, 8192, 65536),
]


def _attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, fused: bool) -> torch.Tensor:
    """The fused path, or `_attend` as on a PyTorch without the op."""
    scale = q.shape[-1] ** -0.5
    if fused:
        return pa._attend_flash_cpu(q, k, v, scale, False)[0]
    op = pa._flash_cpu
    pa._flash_cpu = lambda: None
    try:
        return pa._attend(q, k, v, scale, False)[0]
    finally:
        pa._flash_cpu = op


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    if pa._flash_cpu() is None:
        raise SystemExit("this PyTorch has no fused CPU attention op: nothing to compare")
    rows, ratios = [], []
    for threads, hq, hk, d, n, ctx in SHAPES:
        torch.set_num_threads(threads)
        gen = torch.Generator().manual_seed(n + ctx)
        q = torch.randn(n, hq, d, generator=gen)
        k, v = (torch.randn(ctx, hk, d, generator=gen) for _ in range(2))

        fused, masked = (functools.partial(_attend, q, k, v, on) for on in (True, False))
        torch.testing.assert_close(fused(), masked(), rtol=1e-4, atol=1e-5)
        t_fused = time_best(fused, args.repeats)
        t_masked = time_best(masked, args.repeats)
        path = (
            "SDPA causal"
            if n == ctx
            else "SDPA + mask"
            if n * ctx <= pa.LARGE_SCORES
            else "tiled reference"
        )
        ratio = t_masked / t_fused
        ratios.append(ratio)
        row = (
            f"| {threads} | {hq} / {hk} | {d} | {n} | {ctx} | {path} | {t_masked * 1e3:.0f} | "
            f"{t_fused * 1e3:.0f} | {ratio:.2f}x |"
        )
        rows.append(row)
        print(row, flush=True)
    summary = "cpu-prefill-attention: masked / fused " + ", ".join(
        f"n{s[4]}/ctx{s[5]} {r:.2f}x" for s, r in zip(SHAPES, ratios)
    )
    print(summary)
    if args.report:
        header = (
            "| threads | q / kv heads | head_dim | n | ctx | masked path | masked (ms) | "
            "fused (ms) | masked / fused |\n|---:|---|---:|---:|---:|---|---:|---:|---:|\n"
        )
        Path(args.report).write_text(
            f"# CPU prefill-chunk attention: fused op vs masked paths ({datetime.date.today()})"
            "\n\n"
            + "\n\n".join((__doc__ or "").split("\n\n")[2:]).strip()
            + f"\n\nMachine: {platform.machine()}, torch {torch.__version__}, best of "
            f"{args.repeats}.\n\n**Summary:** `{summary}`\n\n"
            + header
            + "\n".join(rows)
            + "\n\nCommand: `python bench/cpu_prefill_attention.py "
            + " ".join(sys.argv[1:])
            + "`\n"
        )


if __name__ == "__main__":
    main()
