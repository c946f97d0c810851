"""CPU benchmark: decode steps through the native decoder (`kernels/cpu_decoder.py`) against the
layer-by-layer path, for each checkpoint architecture, in one run.

    python bench/native_decode_archs.py [--batch 1] [--new-tokens 64] [--repeats 3] [--report PATH]

Each architecture gets a random checkpoint of the same shape (`--layers` layers, hidden
`--hidden`, 8 query heads over 4 KV heads, head_dim 64, MLP 3 x hidden, vocabulary 4,096;
fp32): Llama, Qwen3 (q / k head norms), Phi-3 (packed projections, LongRoPE), Phi-3 with
partial RoPE (Phi-4-mini's 0.75) and Granite (multipliers). `--batch` prompts of 32 random
tokens decode `--new-tokens` tokens each, greedy, EOS ignored, in-process, prefix cache off;
`DIST_RUNTIME_CPU_DECODE=layers` runs the same steps layer by layer. Timed: the whole
`generate` call, the best of `--repeats` after a warm-up. Reported: output tokens per second
both ways and the speed-up. One summary line; `--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.config import CPU_DECODE_ENV  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402

HEADS, KV_HEADS, HEAD_DIM = 8, 4, 64


def architectures(head_dim: int) -> dict[str, dict[str, Any]]:
    """Name -> write_random_checkpoint arguments beyond the shape."""
    longrope = {
        "rope_type": "longrope",
        "short_factor": [1.0 + 0.01 * i for i in range(head_dim // 2)],
        "long_factor": [1.0 + 0.1 * i for i in range(head_dim // 2)],
        "original_max_position_embeddings": 4096,
    }
    turned = int(head_dim * 0.75) // 2  # (partial RoPE: factors for the turned pairs only)
    partial = {
        **longrope,
        "short_factor": [1.0 + 0.01 * i for i in range(turned)],
        "long_factor": [1.0 + 0.1 * i for i in range(turned)],
    }
    return {
        "llama": {"architecture": "llama"},
        "qwen3": {"architecture": "qwen3"},
        "phi3": {"architecture": "phi3", "rope_scaling": longrope},
        "phi4-mini-partial": {
            "architecture": "phi3",
            "rope_scaling": partial,
            "partial_rotary_factor": 0.75,
        },
        "granite": {"architecture": "granite"},
    }


def rate(folder: Path, prompts: list[list[int]], params: SamplingParams, repeats: int) -> float:
    """Output tokens per second, best of `repeats` after a warm-up."""
    with Runtime(
        model=str(folder), device="cpu", dtype="float32", session_len=512,
        cache={"enable_prefix_caching": False},
    ) as rt:  # fmt: skip
        rt.generate(prompts, params)
        best = float("inf")
        for _ in range(repeats):
            start = time.perf_counter()
            outs = rt.generate(prompts, params)
            best = min(best, time.perf_counter() - start)
    return sum(len(o.token_ids) for o in outs) / best


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    head_dim = args.hidden // HEADS
    gen = torch.Generator().manual_seed(0)
    prompts = [torch.randint(300, 4096, (32,), generator=gen).tolist() for _ in range(args.batch)]
    params = SamplingParams(max_new_tokens=args.new_tokens, temperature=0.0, ignore_eos=True)
    results: dict[str, tuple[float, float]] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, extra in architectures(head_dim).items():
            folder = write_random_checkpoint(
                Path(tmp) / name, vocab_size=4096, hidden_size=args.hidden,
                intermediate_size=3 * args.hidden, num_layers=args.layers, num_heads=HEADS,
                num_kv_heads=KV_HEADS, max_position_embeddings=8192, seed=1, **extra,
            )  # fmt: skip
            os.environ[CPU_DECODE_ENV] = "layers"
            layers = rate(folder, prompts, params, args.repeats)
            os.environ.pop(CPU_DECODE_ENV)
            fused = rate(folder, prompts, params, args.repeats)
            results[name] = (layers, fused)
    parts = [f"{name} {fused / layers:.2f}x" for name, (layers, fused) in results.items()]
    summary = (
        f"native-decode: b{args.batch} x {args.new_tokens} tokens, {args.layers} layers of "
        f"{args.hidden}, native decoder against layer by layer: " + ", ".join(parts)
    )
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("CPU native decode by architecture", summary, args.threads),
            f"- random fp32 checkpoints: {args.layers} layers, hidden {args.hidden}, {HEADS} "
            f"heads over {KV_HEADS} KV heads, head_dim {head_dim}, MLP {3 * args.hidden}, "
            f"vocabulary 4,096; {args.batch} prompt(s) of 32 tokens, {args.new_tokens} new "
            f"tokens, greedy; best of {args.repeats} after a warm-up",
            "",
            "| architecture | layer by layer (tokens / s) | native (tokens / s) | speed-up |",
            "|---|---:|---:|---:|",
        ]
        for name, (layers, fused) in results.items():
            lines.append(f"| {name} | {layers:.1f} | {fused:.1f} | {fused / layers:.2f}x |")
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
