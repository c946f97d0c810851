"""CPU residual add + RMSNorm and SiLU-and-mul: the native kernels against the torch references.

    python bench/cpu_elementwise.py                          # the demo model's sizes
    python bench/cpu_elementwise.py --report docs/benchmarks/cpu_elementwise_<date>.md

For each row count (decode batches and prefill chunks) it times one call of each kernel at the
demo model's sizes (hidden 576, intermediate 1536, float32): the native kernel
(`kernels/cpu_elementwise.py`, what a float32 CPU model runs by default) and the torch reference
(`rms_norm_ref`, `silu_and_mul_ref`, what `DIST_RUNTIME_CPU_ELEMENTWISE=torch` runs), alternating
between the two, best of `--repeats` rounds of enough calls to last a few milliseconds. Each
result is checked against the reference first. GB/s counts the bytes a call must move once
(inputs and outputs, and the weight). The summary line gives native / reference per kernel (the
geometric mean over row counts) and what a demo forward pass (30 layers: 61 norms, 30
SiLU-and-mul) saves at decode batch 1 and at an 8,192-token prefill.
"""

from __future__ import annotations

import argparse
import datetime
import math
import platform
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from kernels.cpu_elementwise import _library, rms_norm_cpu, silu_and_mul_cpu  # noqa: E402
from kernels.rms_norm import rms_norm_ref  # noqa: E402
from kernels.silu_and_mul import silu_and_mul_ref  # noqa: E402

HIDDEN, INTER, LAYERS = 576, 1536, 30
"""The demo model (SmolLM2-135M): hidden size, intermediate size, layers."""
NORMS, SILUS = 2 * LAYERS + 1, LAYERS
"""Calls per forward pass: two norms a layer and the final one; one SiLU-and-mul a layer."""
ROWS = (1, 8, 1024, 8192)


def best_seconds(fns: dict[str, Callable[[], object]], repeats: int) -> dict[str, float]:
    """Seconds per call of each fn, best of `repeats` rounds that alternate between them."""
    calls = {}
    for name, fn in fns.items():
        fn()
        start = time.perf_counter()
        fn()
        calls[name] = max(1, int(0.005 / max(time.perf_counter() - start, 1e-7)))
    best = dict.fromkeys(fns, math.inf)
    for _ in range(repeats):
        for name, fn in fns.items():
            start = time.perf_counter()
            for _ in range(calls[name]):
                fn()
            best[name] = min(best[name], (time.perf_counter() - start) / calls[name])
    return best


def measure(rows: int, repeats: int, gen: torch.Generator) -> list[dict]:
    x = torch.randn(rows, HIDDEN, generator=gen)
    res = torch.randn(rows, HIDDEN, generator=gen)
    w = torch.randn(HIDDEN, generator=gen)
    gate_up = torch.randn(rows, 2 * INTER, generator=gen)
    for got, want in zip(rms_norm_cpu(x, w, 1e-5, res), rms_norm_ref(x, w, 1e-5, res)):
        torch.testing.assert_close(got, want, rtol=2e-6, atol=2e-6)
    torch.testing.assert_close(
        silu_and_mul_cpu(gate_up), silu_and_mul_ref(gate_up), rtol=1e-6, atol=1e-6
    )
    cases: list[tuple[str, int, dict[str, Callable[[], object]]]] = [
        (
            "residual + RMSNorm",
            4 * (4 * rows * HIDDEN + HIDDEN),  # x, residual in; sum, out; weight
            {
                "native": lambda: rms_norm_cpu(x, w, 1e-5, res),
                "torch": lambda: rms_norm_ref(x, w, 1e-5, res),
            },
        ),
        (
            "SiLU-and-mul",
            4 * 3 * rows * INTER,  # gate, up in; out
            {
                "native": lambda: silu_and_mul_cpu(gate_up),
                "torch": lambda: silu_and_mul_ref(gate_up),
            },
        ),
    ]
    out = []
    for kernel, nbytes, fns in cases:
        seconds = best_seconds(fns, repeats)
        out.append({"kernel": kernel, "rows": rows, "bytes": nbytes, "seconds": seconds})
        print(
            f"{kernel} rows {rows}: "
            + ", ".join(
                f"{n} {t * 1e6:.1f} us ({nbytes / t / 1e9:.1f} GB/s)" for n, t in seconds.items()
            ),
            flush=True,
        )
    return out


def pass_saving_ms(results: list[dict], rows: int) -> float:
    """Milliseconds a demo forward pass over `rows` tokens saves: reference minus native."""
    total = 0.0
    for r in results:
        if r["rows"] == rows:
            calls = NORMS if r["kernel"] == "residual + RMSNorm" else SILUS
            total += calls * (r["seconds"]["torch"] - r["seconds"]["native"])
    return total * 1e3


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--rows", default=",".join(map(str, ROWS)))
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--report", help="markdown report path")
    args = p.parse_args()
    if _library() is None:
        sys.exit("the native CPU kernels are not built here (no C compiler): nothing to compare")
    torch.set_num_threads(args.threads)
    rows = [int(r) for r in args.rows.split(",")]
    gen = torch.Generator().manual_seed(0)
    results = [row for n in rows for row in measure(n, args.repeats, gen)]
    parts = []
    for kernel in ("residual + RMSNorm", "SiLU-and-mul"):
        ratios = [
            r["seconds"]["torch"] / r["seconds"]["native"] for r in results if r["kernel"] == kernel
        ]
        parts.append(
            f"{kernel} native/torch {math.exp(sum(map(math.log, ratios)) / len(ratios)):.2f}x"
        )
    saving = [
        f"saves {pass_saving_ms(results, n):.2f} ms a pass at {n} rows"
        for n in (1, 8192)
        if n in rows
    ]
    summary = "cpu-elementwise: " + ", ".join(parts) + ("; " + ", ".join(saving) if saving else "")
    print(summary)
    if not args.report:
        return
    lines = [
        "| kernel | rows | native (us) | native GB/s | torch (us) | torch GB/s | native / torch |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results:
        n, t = r["seconds"]["native"], r["seconds"]["torch"]
        lines.append(
            f"| {r['kernel']} | {r['rows']:,} | {n * 1e6:.1f} | {r['bytes'] / n / 1e9:.1f} | "
            f"{t * 1e6:.1f} | {r['bytes'] / t / 1e9:.1f} | {t / n:.2f}x |"
        )
    Path(args.report).write_text(
        f"# CPU residual add + RMSNorm and SiLU-and-mul: native vs torch ({datetime.date.today()})"
        "\n\n"
        + "\n\n".join(__doc__.split("\n\n")[2:]).strip()
        + f"\n\nMachine: {platform.machine()}, torch {torch.__version__}, {args.threads} threads."
        + "\n\n"
        + "\n".join(lines)
        + f"\n\n**Summary:** `{summary}`\n\nCommand: `python bench/cpu_elementwise.py "
        + " ".join(sys.argv[1:])
        + "`\n"
    )


if __name__ == "__main__":
    main()
