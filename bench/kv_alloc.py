"""CPU benchmark of a runtime start with its KV cache in fresh anonymous pages (`workers/kv_cache.py
zeros`, what runs) against the same start with `torch.zeros` (every byte written first), in one
run, alternating.

    python bench/kv_alloc.py [--repeats 5] [--cache-gb 1,4] [--report PATH]

In-process executor, a tiny random Llama checkpoint (2 layers): each repeat starts a Runtime with
a KV cache of `--cache-gb` GiB (cache.cpu_kv_cache_gb), generates 3 tokens and shuts it down,
timed from construction to the end of shutdown; also the process's resident memory right after
the start. Reported: medians per cache size and allocation, and their ratio. One summary line;
`--report` writes a markdown report.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

import workers.kv_cache as kv_cache_module  # noqa: E402
from bench.machine import cpu_report_header  # noqa: E402
from dist_runtime import Runtime, SamplingParams  # noqa: E402
from dist_runtime.formats.random_checkpoint import write_random_checkpoint  # noqa: E402

LAZY = kv_cache_module.zeros


def eager(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    return torch.zeros(shape, dtype=dtype, device=device)


MODES = {"fresh pages": LAZY, "torch.zeros": eager}


def resident_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def one_start(model: Path, gb: float) -> tuple[float, int]:
    start = time.perf_counter()
    rt = Runtime(
        model=str(model), device="cpu", dtype="float32", session_len=64,
        cache={"cpu_kv_cache_gb": gb},
    )  # fmt: skip
    rss = resident_bytes()
    try:
        rt.generate([[5, 6, 7]], SamplingParams(max_new_tokens=3, temperature=0.0))
    finally:
        rt.shutdown()
    return time.perf_counter() - start, rss


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--cache-gb", default="1,4", help="KV cache sizes (GiB), comma-separated")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="write a markdown report here")
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    sizes = [float(x) for x in args.cache_gb.split(",")]
    with tempfile.TemporaryDirectory(prefix="kv-alloc-bench-") as tmp:
        model = write_random_checkpoint(
            Path(tmp), architecture="llama", seed=0, vocab_size=512, hidden_size=64,
            intermediate_size=160, num_layers=2, num_heads=8, num_kv_heads=4,
        )  # fmt: skip
        times: dict[tuple[float, str], list[float]] = {}
        rss: dict[tuple[float, str], list[int]] = {}
        one_start(model, sizes[0])  # warm-up: first-use imports and caches
        for _ in range(args.repeats):
            for gb in sizes:
                for mode, fn in MODES.items():
                    kv_cache_module.zeros = fn  # type: ignore[assignment]
                    try:
                        seconds, resident = one_start(model, gb)
                    finally:
                        kv_cache_module.zeros = LAZY
                    times.setdefault((gb, mode), []).append(seconds)
                    rss.setdefault((gb, mode), []).append(resident)
    med = {k: statistics.median(v) for k, v in times.items()}
    parts = []
    for gb in sizes:
        lazy, full = med[(gb, "fresh pages")], med[(gb, "torch.zeros")]
        parts.append(f"{gb:g} GiB {lazy:.3f} vs {full:.3f} s ({full / lazy:.1f}x)")
    summary = "kv-alloc: start + 3 tokens + stop, fresh pages vs torch.zeros: " + "; ".join(parts)
    print(summary)
    if args.report:
        lines = [
            *cpu_report_header("CPU KV cache allocation at start", summary, args.threads),
            "- in-process executor, tiny random Llama checkpoint (2 layers, 4 KV heads of 8); "
            f"{args.repeats} repeats after one warm-up, the modes alternating",
            "",
            "| KV cache | allocation | seconds (median) | resident MiB after start (median) "
            "| each |",
            "|---:|---|---:|---:|---|",
        ]
        for (gb, mode), values in times.items():
            each = ", ".join(f"{v:.3f}" for v in values)
            mib = statistics.median(rss[(gb, mode)]) / 2**20
            lines.append(f"| {gb:g} GiB | {mode} | {med[(gb, mode)]:.3f} | {mib:,.0f} | {each} |")
        Path(args.report).write_text("\n".join(lines) + "\n", encoding="utf-8")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
